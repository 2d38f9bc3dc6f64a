"""The planner's CLI commands: ``spantrain plan`` and ``spantrain crd``.

Role: thin I/O over the pure passes — read the files, call ``search``/``run_baselines``,
print tables or JSON, draw the chart. Registered through the ``spantrain.commands`` entry
points (see ``cli.py``). Must not import torch, kopf or a Kubernetes client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from spantrain_planner.cli.report import baseline_table, plan_table
from spantrain_planner.core.options import SCHEDULE_CHOICES, PlannerOptions
from spantrain_planner.inputs.cluster import load_cluster, resolve
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.inputs.profiles import get_profile, preset_names
from spantrain_planner.passes.baselines import ALL, BEST_GROUP, GENERAL, HYBRID, run_baselines
from spantrain_planner.passes.search import search


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a model on a cluster and compare with the baselines",
        description=(
            "Compute SpanTrain's hybrid pipeline plan for MODEL on the cluster described in "
            "CLUSTER_FILE, print it as a table with the predicted step time and bottleneck, "
            "and score the same model under each baseline (data parallel, even GPipe/1F1B, "
            "PipeDream-style, Asteroid-like, data parallel on the best group)."
        ),
    )
    p.add_argument("cluster", metavar="CLUSTER_FILE", help="cluster description (YAML/JSON)")
    p.add_argument(
        "--model",
        required=True,
        metavar="PRESET_OR_PROFILE",
        help=f"model preset ({', '.join(preset_names())}) or a profile file",
    )
    p.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    p.add_argument(
        "--schedule",
        choices=SCHEDULE_CHOICES,
        default="auto",
        help="pipeline schedule (default auto: the fastest)",
    )
    p.add_argument("--microbatches", type=int, default=None, help="micro-batch count")
    p.add_argument("--cut-ratio", type=float, default=4.0, help="level-1 grouping cut ratio")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    p.add_argument("--json", action="store_true", help="print the plan and scores as JSON")
    p.add_argument("--chart", metavar="FILE.png", help="draw the simulated step timeline")
    p.add_argument("-o", "--output", metavar="PLAN.json", help="also write the plan file")
    p.add_argument(
        "--measured",
        metavar="MEASURED.yaml",
        help="a ClusterMeasurement (spantrain profile-cluster): its fresh figures replace the "
        "description's, and a table says where every fact came from (measured, label, "
        "default)",
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="ignore measurements older than this (default 24)",
    )
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    profile = get_profile(args.model)
    spec = load_cluster(args.cluster)
    merged = None
    if args.measured:
        from datetime import UTC, datetime, timedelta

        from spantrain_planner.inputs.measured import (
            FAMILY_KIND,
            apply_measurements,
            load_measurement,
        )

        merged = apply_measurements(
            spec,
            load_measurement(args.measured),
            now=datetime.now(UTC),
            max_age=timedelta(hours=args.max_age),
            layer_kind=FAMILY_KIND.get(profile.family),
        )
        spec = merged.spec
    topology = resolve(spec)
    options = PlannerOptions(
        global_batch=args.batch,
        schedule=args.schedule,
        num_microbatches=args.microbatches,
        network_cut_ratio=args.cut_ratio,
    )
    started = time.perf_counter()
    plan, sim = search(topology, profile, options)
    plan_seconds = time.perf_counter() - started
    scores: dict[str, float | None] = {}
    if not args.no_baselines:
        for name, found in run_baselines(topology, profile, options, names=ALL).items():
            scores[name] = found[1].samples_per_second if found else None
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(plan.to_json() + "\n")
    if args.chart:
        from spantrain_planner.cli.chart import draw_timeline
        from spantrain_planner.evaluation.simulator import simulate

        draw_timeline(
            simulate(plan, topology, profile, record=True).intervals,
            [f"s{_stage_of(plan, d)} {d}" for d in sim.device_ids],
            args.chart,
            f"{profile.name} on {topology.name}: {plan.schedule}, "
            f"{sim.samples_per_second:.1f} samples/s (simulated)",
        )
    if args.json:
        out = {
            "plan": plan.model_dump(mode="json", by_alias=True),
            "planHash": plan.digest(),
            "planSeconds": plan_seconds,
            "baselines": scores,
            "ratios": {k: (sim.samples_per_second / v if v else None) for k, v in scores.items()},
        }
        if merged is not None:
            out["factSources"] = [
                s.model_dump(mode="json", by_alias=True) for s in merged.sources
            ]
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(plan_table(plan))
    print(f"planned in {plan_seconds:.2f} s")
    if merged is not None:
        from spantrain_planner.cli.report import sources_table
        from spantrain_planner.inputs.measured import sources_summary

        print()
        print(sources_table(merged))
        print(sources_summary(merged))
    if scores:
        print()
        print(baseline_table(sim.samples_per_second, scores))
        general = [v for k, v in scores.items() if k in GENERAL and v]
        if general:
            print(
                f"\nspeed-up over the best general-purpose baseline: "
                f"{sim.samples_per_second / max(general):.2f}x; over the Asteroid-like hybrid: "
                f"{_ratio(sim.samples_per_second, scores.get(HYBRID))}; over data parallel on "
                f"the best group: {_ratio(sim.samples_per_second, scores.get(BEST_GROUP))}"
            )
    if args.chart:
        print(f"timeline chart: {args.chart}")
    return 0


def _ratio(ours: float, other: float | None) -> str:
    return f"{ours / other:.2f}x" if other else "n/a"


def _stage_of(plan: Plan, device_id: str) -> int:
    for st in plan.stages:
        if any(d.device_id == device_id for d in st.devices):
            return st.stage_index
    return -1


def add_crd_parser(sub: Any) -> None:
    p = sub.add_parser(
        "crd",
        help="print the SpanTrainJob CustomResourceDefinition (YAML)",
        description="Print the CRD generated from the API models (what crds/ holds).",
    )
    p.set_defaults(func=run_crd)


def run_crd(args: argparse.Namespace) -> int:
    from spantrain_planner.api.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return 0
