"""SpanTrain planner: pure planning of hybrid pipeline-parallel training on heterogeneous devices.

Role: everything that *decides* — device inventory, model profiles, grouping, search,
schedules, simulation, baselines, validation, the SpanTrainJob API models and CRD generation.

Sub-packages by role, each importing only the ones listed before it (an import-linter layers
contract in pyproject.toml enforces the order):

* ``core`` -- units, errors, options and schedule names, the operator-worker process contract;
* ``inputs`` -- the cluster inventory, model profiles and the plan document;
* ``evaluation`` -- the simulator and the plan validator;
* ``passes`` -- grouping, partitioning, assembly, schedules, the search, baselines, exhaustive;
* ``api`` -- the SpanTrainJob resource models and the CRD generated from them;
* ``cli`` -- ``spantrain`` itself, ``spantrain plan``/``crd``, plan tables and charts.
Must not import torch, kopf, the Kubernetes client, the worker or the operator (enforced by
import-linter contracts in pyproject.toml).
"""

__version__ = "0.1.0"
