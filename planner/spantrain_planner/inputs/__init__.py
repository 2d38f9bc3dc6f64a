"""What the planner plans over and what it produces: the cluster inventory (devices, links,
network groups), model profiles (per-layer FLOPs, bytes, parameters) and the plan document.

Role: data models and their loading/derivation. May import ``core`` only; must not import
``evaluation``, ``passes``, ``api`` or ``cli``.
"""
