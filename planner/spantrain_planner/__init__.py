"""SpanTrain planner: pure planning of hybrid pipeline-parallel training on heterogeneous devices.

Role: everything that *decides* — device inventory, model profiles, grouping, search,
schedules, simulation, baselines, validation, the SpanTrainJob API models and CRD generation.
Must not import torch, kopf, the Kubernetes client, the worker or the operator (enforced by
import-linter contracts in pyproject.toml).
"""

__version__ = "0.1.0"
