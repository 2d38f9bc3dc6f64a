"""``spantrain operator``: run the SpanTrainJob operator (kopf) in this process.

Role: the command-line entry point registered under ``spantrain.commands``; parses flags,
imports the handlers and hands over to ``kopf.run``. Must not import torch or spantrain_worker.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from spantrain_planner.core import contract as c

from . import settings


def add_operator_parser(sub: Any) -> None:
    d = settings.Settings()
    parser = sub.add_parser(
        "operator",
        help="run the SpanTrainJob operator against the current cluster",
        description="Watch SpanTrainJobs, plan them over the cluster's nodes, run their workers. "
        "Flags override the environment the Helm chart sets (spantrain_operator.settings).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch jobs in every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch jobs in this namespace (repeatable)")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering (a single replica; no KopfPeering CRD needed)")
    # each flag's default is its environment variable's value (the chart sets those), else
    # the default shown
    parser.add_argument("--peering", dest="peering",
                        help=f"peering object shared by the operator replicas (${c.PEERING}; "
                        f"default {d.peering})")
    parser.add_argument("--priority", type=int, dest="peering_priority",
                        help=f"peering priority (${c.PEERING_PRIORITY}; the highest-priority "
                        "replica works)")
    parser.add_argument("--liveness",
                        help=f"serve health probes here, e.g. http://0.0.0.0:8081/healthz "
                        f"(${c.LIVENESS})")
    parser.add_argument("--metrics-port", type=int,
                        help=f"Prometheus metrics port (${c.METRICS_PORT}; default "
                        f"{OPERATOR_METRICS_PORT}; 0 disables)")
    parser.add_argument("--worker-image",
                        help=f"worker image for jobs that name none (${c.WORKER_IMAGE}; "
                        f"default {d.worker_image})")
    parser.add_argument("--plan-processes", type=int,
                        help=f"jobs planned at once, each in its own process "
                        f"(${c.PLAN_PROCESSES}; default 0: one per CPU)")
    parser.add_argument("--plan-budget", type=float, dest="plan_budget_seconds",
                        help="seconds one plan may take; the best plan found by then is used "
                        f"(${c.PLAN_BUDGET_SECONDS}; default {d.plan_budget_seconds:g})")
    parser.add_argument("--log-level", choices=settings.LOG_LEVELS,
                        help=f"log level (${c.LOG_LEVEL}; default {d.log_level})")
    parser.set_defaults(func=run_operator)


FLAGS = ("peering", "peering_priority", "liveness", "metrics_port", "worker_image",
         "plan_processes", "plan_budget_seconds", "log_level")
OPERATOR_METRICS_PORT = 8080


def run_operator(args: argparse.Namespace) -> int:
    try:
        env = settings.Settings.from_env()
    except ValueError as err:
        raise SystemExit(f"spantrain operator: {err}") from None
    if not os.environ.get(c.METRICS_PORT):  # unset: the command serves metrics (0 turns off)
        env = env.with_(metrics_port=OPERATOR_METRICS_PORT)
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    settings.install(env.with_(**given))
    args.log_level = settings.current().log_level
    import logging

    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    # kopf.run does not set up logging (its CLI does); kopf knows debug, info and warning
    kopf.configure(debug=args.log_level == "debug", quiet=args.log_level in ("warning", "error"))
    if args.log_level == "error":
        logging.getLogger().setLevel(logging.ERROR)

    kopf.run(
        standalone=args.standalone,
        priority=settings.current().peering_priority,
        peering_name=None if args.standalone else settings.current().peering,
        liveness_endpoint=settings.current().liveness or None,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    )
    return 0
