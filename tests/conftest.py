"""Top-level pytest configuration: shared fixtures for every test layer.

The control-plane fixtures (``control_plane``, ``kube_api``) live in ``tests/cluster/fixtures``
and start nothing until a test asks for them; they are loaded only where the Kubernetes client
is installed, so ``pytest tests/unit`` runs on a planner-only install (``pip install
spantrain``) too.
"""

import importlib.util

pytest_plugins = ["tests.cluster.fixtures"] if importlib.util.find_spec("kubernetes") else []
