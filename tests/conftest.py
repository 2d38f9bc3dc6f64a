"""Top-level pytest configuration: shared fixtures for every test layer.

The control-plane fixtures (``control_plane``, ``kube_api``) live in ``tests/cluster/fixtures``
and start nothing until a test asks for them.
"""

pytest_plugins = ["tests.cluster.fixtures"]
