"""SpanTrain testbed: an emulated cloud–edge–end cluster on one Linux machine (root needed).

Role: turn a cluster description in the planner's format (``spantrain_planner.inputs.cluster``) into
kernel objects — one network namespace per device joined by Linux bridges, token-bucket
bandwidth limits (``tc`` ``htb``/``tbf``) per ordered node pair, cgroup v1 CPU quotas per
device — start processes inside them, and remove everything afterwards (also after a crash).
The ``spantrain_testbed`` package (``testbed/spantrain_testbed``); used by ``spantrain testbed``,
``spantrain local --emulate``, ``tests/testbed`` and ``bench/cee.py``.

Only bandwidth and compute are enforced. Link *latency* is not emulated: that needs the
``netem`` qdisc, which this kernel does not have; results produced here say so.

Must not import torch, kopf, the Kubernetes client, ``spantrain_worker`` or
``spantrain_operator``; from the project it uses only ``spantrain_planner.inputs.cluster``.
"""

from __future__ import annotations

from .cgroups import CpuQuota, plan_quotas
from .netns import NetPlan, plan_network
from .testbed import StartupGate, Testbed, TestbedError, sweep, sweep_all

__all__ = [
    "CpuQuota",
    "NetPlan",
    "StartupGate",
    "Testbed",
    "TestbedError",
    "plan_network",
    "plan_quotas",
    "sweep",
    "sweep_all",
]
