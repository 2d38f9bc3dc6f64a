"""SpanTrain operator: a kopf operator that turns a SpanTrainJob into a running pipeline.

Role: read nodes into a device inventory, ask the planner for a plan, render and create the
worker pods, and keep the job's status true. Pure decisions live in ``inventory``, ``render``,
``status`` and ``reconcile``; ``k8s`` is the only module that talks to the Kubernetes API;
``handlers`` are thin kopf glue. Must not import torch or spantrain_worker.
"""
