"""Making plans: network grouping, layer partitioning, stage assembly, pipeline schedules,
the hybrid search, the baselines it is compared with, and the exhaustive reference search.

Role: the planning passes. May import ``core``, ``inputs`` and ``evaluation``; must not import
``api`` or ``cli``.
"""
