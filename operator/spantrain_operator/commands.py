"""``spantrain operator``: run the SpanTrainJob operator (kopf) in this process.

Role: the command-line entry point registered under ``spantrain.commands``; parses flags,
imports the handlers and hands over to ``kopf.run``. Must not import torch or spantrain_worker.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_operator_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "operator",
        help="run the SpanTrainJob operator against the current cluster",
        description="Watch SpanTrainJobs, plan them over the cluster's nodes, run their workers.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch jobs in every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch jobs in this namespace (repeatable)")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering (a single replica; no KopfPeering CRD needed)")
    parser.add_argument("--peering", default=os.environ.get("SPANTRAIN_PEERING", "spantrain"),
                        help="peering object shared by the operator replicas")
    parser.add_argument("--priority", type=int, default=0,
                        help="peering priority (the highest-priority replica works)")
    parser.add_argument("--liveness", default=os.environ.get("SPANTRAIN_LIVENESS", ""),
                        help="serve health probes here, e.g. http://0.0.0.0:8081/healthz")
    parser.add_argument("--metrics-port", type=int,
                        default=int(os.environ.get("SPANTRAIN_METRICS_PORT", "8080")),
                        help="Prometheus metrics port (0 disables)")
    parser.add_argument("--worker-image", default=os.environ.get("SPANTRAIN_WORKER_IMAGE"),
                        help="worker image for jobs that name none")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=os.environ.get("SPANTRAIN_LOG_LEVEL", "info"),
                        help="log level (default: $SPANTRAIN_LOG_LEVEL or info)")
    parser.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace) -> int:
    os.environ["SPANTRAIN_METRICS_PORT"] = str(args.metrics_port)
    os.environ["SPANTRAIN_PEERING"] = args.peering
    os.environ["SPANTRAIN_PEERING_PRIORITY"] = str(args.priority)
    if args.worker_image:
        os.environ["SPANTRAIN_WORKER_IMAGE"] = args.worker_image
    import logging

    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    # kopf.run does not set up logging (its CLI does); kopf knows debug, info and warning
    kopf.configure(debug=args.log_level == "debug", quiet=args.log_level in ("warning", "error"))
    if args.log_level == "error":
        logging.getLogger().setLevel(logging.ERROR)

    kopf.run(
        standalone=args.standalone,
        priority=args.priority,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness or None,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    )
    return 0
