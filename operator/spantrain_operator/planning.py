"""One job's plan, computed in a planner process (``planqueue``).

Role: the function the operator's planner processes run: the job's model and options
(``api.planner_inputs``) on the cluster its inventory built, within a time budget. Its
arguments and results are plain pydantic models and pickle; its errors are the planner's
(``PlanningError`` and subclasses), which pickle too.

Must not import kopf, the Kubernetes client, torch, spantrain_worker or the operator's other
modules (each planner process imports only the planner).
"""

from __future__ import annotations

import time

from spantrain_planner import api
from spantrain_planner.inputs.cluster import ClusterSpec, resolve
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.passes.adapt import ReplanInputs
from spantrain_planner.passes.search import make_plan


def plan_job(
    spec: api.SpanTrainJobSpec, cluster: ClusterSpec, budget_seconds: float
) -> tuple[Plan, float, str]:
    """The job's plan, the seconds it took to compute, and what its workers need to plan
    afresh (``ReplanInputs`` as JSON: the cluster as planned, the model, the options)."""
    started = time.monotonic()
    inputs = api.planner_inputs(spec)
    plan = make_plan(resolve(cluster), inputs.profile, inputs.options, time_budget=budget_seconds)
    replan = ReplanInputs(cluster=cluster, profile=inputs.profile, options=inputs.options)
    return plan, time.monotonic() - started, replan.model_dump_json(by_alias=True)
