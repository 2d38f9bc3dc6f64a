"""``python -m spantrain_planner.cli``: the ``spantrain`` command without its console script.

Role: entry shim only. Must not import torch, kopf or a Kubernetes client.
"""

from spantrain_planner.cli import main

raise SystemExit(main())
