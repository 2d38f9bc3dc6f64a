"""SpanTrain worker: executes a planner ``Plan`` on ``torch.distributed``.

Role: one process per device. Builds its stage's layers (``models``), reads its rows of every
micro-batch (``data``), runs the stage's action list with point-to-point re-sharding between
stages of different widths (``runtime``, ``comm``), sums gradients inside the stage, steps
AdamW, writes plan-independent checkpoints (``checkpoint``) and exports metrics (``metrics``).
``spantrain worker`` is the pod entrypoint; ``spantrain local`` runs a whole job on one machine
(``commands``, ``launch``); ``spantrain profile`` measures the layer profile of a user model
given as an entry point ``module:function`` (``profiling``).

Depends on the planner (``spantrain_planner``), torch and prometheus-client. Must not import
kopf, the Kubernetes client or ``spantrain_operator``.
"""

__version__ = "0.1.0"
