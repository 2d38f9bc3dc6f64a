"""Facts every other part of SpanTrain imports: units and quantities, error types, planner
options and schedule names, and the operator-to-worker process contract.

Role: the bottom layer. Must not import any other ``spantrain_planner`` sub-package (nor
pydantic in ``contract``, which the worker's launcher reads before anything else).
"""
