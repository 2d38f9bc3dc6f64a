"""Planner benchmark: SpanTrain's simulated throughput against every baseline, and planning time.

For each example cluster and each of the paper's workloads (ResNet-50-like, BERT-small-like,
GPT-2-small), plan with SpanTrain and with each baseline, score all of them with the same
simulator, and print samples/s and SpanTrain's ratio over each. Then:

* optimality: over random small instances (3-4 devices, 4-6 layers) the search against the
  exhaustive reference planner; the gap is the worst relative excess step time;
* planning time for 64 devices x 100 layers and for the 1024-device cluster.

The last line is machine-readable:
``vs_general=<x> vs_hybrid=<x> vs_best_group=<x> optimality_gap=<x> plan_seconds_64x100=<s>
plan_seconds_1024=<s>`` (ratios are geometric means over the workloads on the paper-shaped
environment 1 cluster, except vs_best_group which is the minimum over workloads and clusters).

Run: ``python bench/planner.py [--quick]`` (``--quick``: 20 optimality cases instead of 50).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

from spantrain_planner.cli.report import table
from spantrain_planner.core.errors import InfeasibleError
from spantrain_planner.core.options import PlannerOptions
from spantrain_planner.inputs.cluster import ClusterSpec, load_cluster, resolve
from spantrain_planner.inputs.profiles import gpt_profile, preset
from spantrain_planner.passes.baselines import ALL, BEST_GROUP, GENERAL, HYBRID, run_baselines
from spantrain_planner.passes.exhaustive import optimality_gaps
from spantrain_planner.passes.search import search

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ["paper-env1", "paper-env2", "mixed-edge"]
WORKLOADS = ["resnet50", "bert-small", "gpt2-small"]
BATCH = 32  # the paper's default batch size


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def compare(cluster: str) -> list[dict[str, object]]:
    topology = resolve(load_cluster(ROOT / "examples" / "clusters" / f"{cluster}.yaml"))
    rows = []
    for workload in WORKLOADS:
        profile = preset(workload)
        options = PlannerOptions(global_batch=BATCH)
        started = time.perf_counter()
        plan, sim = search(topology, profile, options)
        plan_seconds = time.perf_counter() - started
        scores = {
            name: (found[1].samples_per_second if found else None)
            for name, found in run_baselines(topology, profile, options, names=ALL).items()
        }
        rows.append(
            {
                "cluster": cluster,
                "workload": workload,
                "ours": sim.samples_per_second,
                "schedule": plan.schedule,
                "stages": plan.pp_degree,
                "devices": plan.world_size,
                "plan_seconds": plan_seconds,
                **scores,
            }
        )
    return rows


def optimality(num_cases: int) -> tuple[float, int]:
    """Worst relative gap of the search to the exhaustive optimum over random instances."""
    gaps = optimality_gaps(num_cases)
    return max(gaps), len(gaps)


def cluster_64() -> ClusterSpec:
    nodes: list[dict[str, object]] = []
    for i in range(8):
        nodes.append(
            {
                "name": f"cloud-{i}",
                "tier": "cloud",
                "devices": [
                    {"count": 4, "accelerator": "A100", "computeTflops": 60, "memoryBytes": "38Gi"}
                ],
            }
        )
    for i in range(8):
        nodes.append(
            {
                "name": f"edge-{i}",
                "tier": "edge",
                "devices": [
                    {"count": 2, "accelerator": "T4", "computeTflops": 6, "memoryBytes": "15Gi"}
                ],
            }
        )
    for i in range(16):
        nodes.append(
            {
                "name": f"end-{i}",
                "tier": "end",
                "arch": "arm64",
                "devices": [
                    {"count": 1, "accelerator": "Orin", "computeTflops": 1.9, "memoryBytes": "6Gi"}
                ],
            }
        )
    return ClusterSpec.model_validate({"name": "bench-64", "nodes": nodes})


def timed_plans() -> tuple[float, float]:
    topology = resolve(cluster_64())
    assert topology.num_devices == 64
    deep = gpt_profile(
        "gpt-98", num_layers=98, d_model=1024, num_heads=16, seq_len=512, vocab_size=32000
    )
    assert deep.num_layers == 100
    started = time.perf_counter()
    search(topology, deep, PlannerOptions(global_batch=64))
    t64 = time.perf_counter() - started
    started = time.perf_counter()
    big = resolve(load_cluster(ROOT / "examples" / "clusters" / "large-1024.yaml"))
    assert big.num_devices == 1024
    search(big, preset("gpt2-medium"), PlannerOptions(global_batch=512))
    t1024 = time.perf_counter() - started
    return t64, t1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 optimality cases, not 50")
    args = parser.parse_args()

    all_rows = []
    for cluster in CLUSTERS:
        all_rows.extend(compare(cluster))
    headers = ["cluster", "workload", "spantrain", *ALL, "schedule", "plan s"]
    printable = []
    for r in all_rows:
        ours = float(r["ours"])  # type: ignore[arg-type]
        cells: list[object] = [r["cluster"], r["workload"], f"{ours:.1f}"]
        for name in ALL:
            v = r[name]
            cells.append(f"{ours / float(v):.2f}x" if v else "n/a")  # type: ignore[arg-type]
        cells += [
            f"{r['schedule']}/{r['stages']}st/{r['devices']}dev",
            f"{float(r['plan_seconds']):.2f}",
        ]  # type: ignore[arg-type]
        printable.append(cells)
    print("SpanTrain simulated samples/s and its ratio over each baseline (batch 32):")
    print(table(headers, printable))

    env1 = [r for r in all_rows if r["cluster"] == "paper-env1"]

    def ratio(r: dict[str, object], names: tuple[str, ...]) -> float:
        values = [float(r[n]) for n in names if r[n]]  # type: ignore[arg-type]
        return float(r["ours"]) / max(values) if values else math.inf  # type: ignore[arg-type]

    vs_general = geomean([ratio(r, GENERAL) for r in env1])
    vs_hybrid = geomean([ratio(r, (HYBRID,)) for r in env1])
    vs_best_group = min(ratio(r, (BEST_GROUP,)) for r in all_rows)

    cases = 20 if args.quick else 50
    started = time.perf_counter()
    gap, counted = optimality(cases)
    print(
        f"\noptimality: worst gap to the exhaustive optimum over {counted} random instances: "
        f"{gap:.4f} ({time.perf_counter() - started:.0f} s)"
    )
    try:
        t64, t1024 = timed_plans()
    except InfeasibleError as err:  # pragma: no cover - would be a planner bug
        print(f"timed planning failed: {err}", file=sys.stderr)
        return 1
    print(f"planning time: 64 devices x 100 layers {t64:.2f} s; 1024 devices {t1024:.2f} s")
    print(
        f"vs_general={vs_general:.2f} vs_hybrid={vs_hybrid:.2f} "
        f"vs_best_group={vs_best_group:.2f} optimality_gap={gap:.4f} "
        f"plan_seconds_64x100={t64:.2f} plan_seconds_1024={t1024:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
