"""The worker's ``spantrain`` subcommands: ``worker`` (pod entrypoint) and ``local``.

Role: registered under the ``spantrain.commands`` entry-point group, so the planner's
dispatcher finds them without importing the worker.

* ``spantrain worker`` runs one rank from the environment the operator injects (see
  ``config``); it is the container command of every worker pod.
* ``spantrain local JOB.yaml [--devices CLUSTER.yaml]`` runs a whole SpanTrainJob on this
  machine: it plans the job on the emulated devices (``make_plan``), prints the plan table,
  starts one worker process per device on 127.0.0.1 with emulated device speeds and links
  (``emulation``), shows a progress line (step, loss, samples/s), prints the final throughput
  and writes the measured timeline as a PNG drawn by the planner's chart function. Ctrl-C
  stops every worker (one process group, see ``launch``) and exits 130.

Must not import kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from spantrain_planner.api import load_job, planner_inputs
from spantrain_planner.cluster import ClusterSpec, load_cluster, resolve
from spantrain_planner.plan import Plan
from spantrain_planner.report import plan_table
from spantrain_planner.search import make_plan

from . import launch
from .emulation import emulation_for
from .metrics import read_timelines

#: Used when ``--devices`` is not given (same content as examples/clusters/local-cpu.yaml).
DEFAULT_DEVICES: dict[str, Any] = {
    "name": "local-cpu",
    "nodes": [
        {"name": "cloud-0", "tier": "cloud", "bandwidthMbps": 1000, "latencyMs": 0.2,
         "devices": [{"accelerator": "cpu", "computeTflops": 0.02, "memoryBytes": "2Gi"}]},
        {"name": "edge-0", "tier": "edge", "bandwidthMbps": 200, "latencyMs": 2,
         "devices": [{"accelerator": "cpu", "computeTflops": 0.012, "memoryBytes": "1Gi"}]},
        {"name": "edge-1", "tier": "edge", "bandwidthMbps": 200, "latencyMs": 2,
         "devices": [{"accelerator": "cpu", "computeTflops": 0.008, "memoryBytes": "1Gi"}]},
    ],
    "links": {"rules": [{"between": ["edge-0", "edge-1"], "bandwidthMbps": 1000,
                         "latencyMs": 0.5}]},
}


# --------------------------------------------------------------------------------------------
# spantrain worker


def add_worker_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run one training worker (the pod entrypoint)",
        description="Run one rank of a SpanTrain job. Everything comes from the environment: "
        "MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, SPANTRAIN_PLAN (plan.json), and "
        "optionally SPANTRAIN_TRAINING (training block or SpanTrainJob manifest), SPANTRAIN_JOB, "
        "SPANTRAIN_CHECKPOINT_DIR, SPANTRAIN_METRICS_PORT (default 9400), "
        "SPANTRAIN_RENDEZVOUS_TIMEOUT (seconds, default 300), SPANTRAIN_DEVICE (auto|cpu|cuda).",
    )
    parser.set_defaults(func=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from .worker import run

    return run()


# --------------------------------------------------------------------------------------------
# spantrain local


def add_local_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "local",
        help="run a SpanTrainJob on this machine with emulated devices",
        description="Plan JOB on the emulated devices of CLUSTER (default: a cloud server and "
        "two slower edge boards), then train it with one local process per device over gloo "
        "on 127.0.0.1. Slower devices and links are emulated by padding each compute action "
        "and each transfer with delays proportional to the measured time (real throttling "
        "is the testbed's job). Shows progress, prints the throughput and writes the "
        "measured timeline chart. Ctrl-C stops every worker.",
    )
    parser.add_argument("job", metavar="JOB.yaml", help="SpanTrainJob manifest")
    parser.add_argument("--devices", metavar="CLUSTER.yaml",
                        help="emulated device description (default: built-in local-cpu)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: ./spantrain-local/<job name>)")
    parser.add_argument("--steps", type=int, help="override training.steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoints in DIR/checkpoints")
    parser.add_argument("--no-emulation", action="store_true",
                        help="run every process at full speed with no link delays")
    parser.set_defaults(func=run_local)


def _progress_line(row: dict[str, Any], steps: int, first_loss: float | None) -> str:
    done = row["step"] + 1
    width = 24
    filled = int(width * done / steps)
    trend = f" (from {first_loss:.3f})" if first_loss is not None else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{steps}  "
            f"loss {row['loss']:.4f}{trend}  {row['samplesPerSecond']:.1f} samples/s")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw_measured_timeline(plan: Plan, out: Path) -> Path | None:
    """Draw the recorded step of every rank with the planner's chart function."""
    from spantrain_planner.chart import draw_timeline
    from spantrain_planner.simulator import Interval

    actions = read_timelines(sorted(out.glob("timeline-rank*.json")))
    if not actions:
        return None
    step = max(a.step for a in actions)
    actions = [a for a in actions if a.step == step]
    t0 = min(a.start for a in actions)
    bars = [Interval(a.rank, a.start - t0, a.end - t0, a.kind, a.microbatch) for a in actions]
    labels = [f"r{d.rank} s{st.stage_index} {d.device_id}" for st in plan.stages
              for d in st.devices]
    return draw_timeline(bars, labels, out / "timeline.png",
                         f"measured step {step} of {plan.model.name} ({plan.schedule})")


def run_local(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    inputs = planner_inputs(job.spec)
    cluster = load_cluster(args.devices) if args.devices else ClusterSpec.model_validate(
        DEFAULT_DEVICES)
    topology = resolve(cluster)
    plan = make_plan(topology, inputs.profile, inputs.options)
    print(plan_table(plan))
    out = Path(args.out or Path("spantrain-local") / job.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints"
    for stale in [*out.glob("timeline*"), *out.glob("rank*.log"), out / "losses.jsonl"]:
        stale.unlink(missing_ok=True)
    if not args.resume and ckpt.exists():
        shutil.rmtree(ckpt)
    training = job.spec.training.model_dump(mode="json", by_alias=True)
    if args.steps:
        training["steps"] = args.steps
        training["warmupSteps"] = min(training["warmupSteps"], args.steps)
    steps = int(training["steps"])
    (out / "plan.json").write_text(plan.to_json())
    (out / "training.json").write_text(json.dumps(training, indent=2))
    emulation = None
    if not args.no_emulation:
        emulation = out / "emulation.json"
        emulation.write_text(emulation_for(plan, topology).model_dump_json(by_alias=True))
    workers = launch.start(
        out / "plan.json", plan.world_size, out, training_path=out / "training.json",
        job=job.name, checkpoint_dir=ckpt, emulation_path=emulation,
    )
    (out / "workers.json").write_text(json.dumps(
        {"pgid": workers.pgid, "pids": [p.pid for p in workers.procs]}))
    print(f"started {plan.world_size} workers (process group {workers.pgid}); logs in {out}")
    tty = sys.stdout.isatty()
    state: dict[str, Any] = {"shown": -1, "first": None}
    started = time.monotonic()

    def tick() -> None:
        rows = _read_rows(out / "losses.jsonl")
        if not rows or rows[-1]["step"] == state["shown"]:
            return
        row = rows[-1]
        if state["first"] is None:
            state["first"] = rows[0]["loss"]
        state["shown"] = row["step"]
        line = _progress_line(row, steps, state["first"])
        if tty:
            print("\r" + line, end="", flush=True)
        elif row["step"] % max(1, steps // 20) == 0 or row["step"] == steps - 1:
            print(line, flush=True)

    try:
        codes = workers.wait(on_tick=tick)
    except KeyboardInterrupt:
        workers.stop()
        print("\ninterrupted: stopped every worker", file=sys.stderr)
        return 130
    tick()
    if tty:
        print()
    if any(codes):
        print(f"workers failed (exit codes {codes}); last log lines:\n"
              f"{workers.logs()[-3000:]}", file=sys.stderr)
        return 1
    rows = _read_rows(out / "losses.jsonl")
    if rows:
        tail = rows[len(rows) // 2:]
        rate = len(tail) * plan.global_batch / sum(r["stepSeconds"] for r in tail)
        print(f"trained {len(rows)} steps in {time.monotonic() - started:.1f}s: loss "
              f"{rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}; throughput {rate:.1f} "
              f"samples/s (over the last {len(tail)} steps; predicted "
              f"{plan.predicted.samples_per_second if plan.predicted else float('nan'):.1f})")
    chart = draw_measured_timeline(plan, out)
    if chart:
        print(f"measured timeline: {chart}")
    return 0
