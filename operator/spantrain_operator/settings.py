"""The operator's settings: one typed, validated object, read once from the environment.

Role: the Helm chart (and ``spantrain operator``'s flags) configure the operator through the
variables named in ``spantrain_planner.core.contract``; ``Settings.from_env`` reads them all here,
with their defaults, and fails with the variable named when one is malformed. ``current()``
is what the handlers use; ``spantrain operator`` installs its flag-merged settings with
``install`` before the handlers are imported.

Pure (standard library and ``contract``). Must not import kopf, the Kubernetes client, torch or
spantrain_worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from spantrain_planner.core import contract as c

DEFAULT_IMAGE = "spantrain:0.1.0"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    reconcile_interval: float = 2.0  #: seconds between a job's timer reconciles
    worker_image: str = DEFAULT_IMAGE  #: image of jobs that name none
    #: NetworkPolicy peers that may scrape workers; None: no per-job NetworkPolicy
    network_policy_scrapers: list[dict[str, Any]] | None = None
    progress_interval: float = 15.0  #: seconds between progress reads of one job
    progress_timeout: float = 1.0  #: timeout of one progress read
    workers: int = 16  #: kopf's worker threads (and the API client's connection pool)
    peering: str = "spantrain"
    peering_priority: int = 0
    peering_mandatory: bool = False
    metrics_port: int = 0  #: the operator's Prometheus port (0: none)
    log_level: str = "info"
    liveness: str = ""  #: serve health probes here, e.g. http://0.0.0.0:8081/healthz
    pod_delete_grace_seconds: int = 10
    #: planner processes: jobs planned at once, each in its own process (0: the CPU count)
    plan_processes: int = 0
    #: seconds one plan may take; the search then returns its best plan so far
    plan_budget_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        scrapers = env.get(c.NETWORK_POLICY_SCRAPERS)
        level = env.get(c.LOG_LEVEL) or d.log_level
        if level not in LOG_LEVELS:
            raise ValueError(f"{c.LOG_LEVEL}={level!r}: use one of {', '.join(LOG_LEVELS)}")
        return cls(
            reconcile_interval=c.number(env, c.RECONCILE_INTERVAL, d.reconcile_interval,
                                        minimum=0.1),
            worker_image=env.get(c.WORKER_IMAGE) or d.worker_image,
            network_policy_scrapers=_peers(scrapers) if scrapers else None,
            progress_interval=c.number(env, c.PROGRESS_INTERVAL, d.progress_interval),
            progress_timeout=c.number(env, c.PROGRESS_TIMEOUT, d.progress_timeout,
                                      minimum=0.01),
            workers=c.integer(env, c.WORKERS, d.workers, minimum=1),
            peering=env.get(c.PEERING) or d.peering,
            peering_priority=c.integer(env, c.PEERING_PRIORITY, d.peering_priority,
                                       minimum=-(2**31)),
            peering_mandatory=env.get(c.PEERING_MANDATORY, "").lower() == "true",
            metrics_port=c.integer(env, c.METRICS_PORT, d.metrics_port),
            log_level=level,
            liveness=env.get(c.LIVENESS, ""),
            pod_delete_grace_seconds=c.integer(env, c.POD_DELETE_GRACE_SECONDS,
                                               d.pod_delete_grace_seconds),
            plan_processes=c.integer(env, c.PLAN_PROCESSES, d.plan_processes),
            plan_budget_seconds=c.number(env, c.PLAN_BUDGET_SECONDS, d.plan_budget_seconds,
                                         minimum=0.1),
        )

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def planner_processes(self) -> int:
        return self.plan_processes or os.cpu_count() or 1


def _peers(raw: str) -> list[dict[str, Any]]:
    try:
        peers = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{c.NETWORK_POLICY_SCRAPERS}: not JSON ({err})") from None
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ValueError(f"{c.NETWORK_POLICY_SCRAPERS}: must be a JSON list of NetworkPolicy "
                         "peers (objects)")
    return peers


_current: Settings | None = None


def install(settings: Settings) -> None:
    """Use ``settings`` from now on (``spantrain operator`` merges its flags in first)."""
    global _current
    _current = settings


def current() -> Settings:
    """The installed settings, else those of this process's environment."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current
