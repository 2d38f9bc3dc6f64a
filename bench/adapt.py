"""Adapter benchmark: a running job whose devices or links change under it, on the testbed.

Role: the measured check of the dynamic adapter (``spantrain_planner.passes.adapt``,
``spantrain_worker.adapter``). On a small emulated cluster (``spantrain_testbed``: network
namespaces, token-bucket links, cgroup CPU quotas; root needed) it trains one model with the
real worker, one process per rank, and changes the cluster mid-run:

* **device**: the CPU quota of a device in the plan's widest stage is halved at step
  ``CHANGE``. Reported: samples/s before, during (after the change, before any adaptation),
  after adaptation, and of a job planned from scratch for the halved device (run in the same
  process, same testbed, same quota) -- ``recovered_device`` = after / fresh;
* **link**: every inter-node token bucket (the links the plan's cross-node traffic takes: its
  busiest) drops to a tenth at step ``CHANGE``; the same four figures, ``recovered`` = after /
  fresh. The workers re-plan (probe the links, plan afresh, checkpoint, exit with
  ``REPLAN_EXIT_CODE``) and ``train`` restarts them on the plan they left, from their
  checkpoint, as ``spantrain local`` and the operator do; "restart s" is how long the job
  stood still;
* **jitter**: every shaped link's rate jumps to a random 90-110 % of its planned rate every
  half second for the whole run: the adaptations it triggers are counted (target 0);
* **loss**: for every adaptation, whether any loss after it exceeds the highest loss of the 20
  steps before it (``loss_spike``).

Output: a table and the machine-readable last line ``recovered=… recovered_device=…
jitter_changes=… loss_spike=… profiler_bw_error=… profiler_compute_error=…`` (``nan`` where a
figure was not measured); the profiler's figures come from a separate two-device testbed of
known limits (``profiler_check``). Run: ``python bench/adapt.py [--quick]`` as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cee import _kill  # noqa: E402

from spantrain_planner.cli.report import table  # noqa: E402
from spantrain_planner.core.contract import (  # noqa: E402
    REPLAN_EXIT_CODE,
    REPLAN_FILE,
    REPLAN_INPUTS_FILE,
    WorkerEnv,
    rendezvous_env,
)
from spantrain_planner.core.options import PlannerOptions  # noqa: E402
from spantrain_planner.inputs.cluster import ClusterSpec, Topology, resolve  # noqa: E402
from spantrain_planner.inputs.plan import Plan  # noqa: E402
from spantrain_planner.inputs.profiles import ModelProfile, build_profile  # noqa: E402
from spantrain_planner.passes.adapt import ReplanInputs, ReplanRecord  # noqa: E402
from spantrain_planner.passes.search import search  # noqa: E402
from spantrain_testbed import Testbed  # noqa: E402

PY = sys.executable
INSTANCE = 173
# a GPT-shaped decoder for quarter-core devices: 4 blocks of width 128 over 64 byte tokens
MODEL = ("gpt", "gpt-adapt",
         {"numLayers": 4, "dModel": 128, "numHeads": 4, "seqLen": 64, "vocabSize": 256})
CORES = 0.25  # every device's CPU quota
NODES = (("node-a", 2), ("node-b", 2))  # two nodes of two devices
INTRA_MBPS, INTER_MBPS = 10_000.0, 200.0
CHANGE = 14  # the step at which the cluster changes
BEFORE_FROM = 4  # steps [BEFORE_FROM, CHANGE) measure "before"
SPIKE_WINDOW = 20  # steps before an adaptation whose highest loss bounds every later loss


def profile() -> ModelProfile:
    family, name, cfg = MODEL
    return build_profile(family, name, cfg)


def core_tflops() -> float:
    """One core's fp32 matmul speed on this machine, in TFLOP/s (one thread, as the workers):
    the planner's device speed is this times the device's quota."""
    import torch

    from spantrain_worker.profiling import measure_matmul_speed

    torch.set_num_threads(1)
    return measure_matmul_speed() / 1e12


def cluster(per_core: float, cores: dict[str, float] | None = None,
            inter_mbps: float = INTER_MBPS) -> ClusterSpec:
    """The planner's view: every device ``CORES`` cores of ``per_core`` TFLOP/s; ``cores``
    overrides a device's quota (by device id)."""
    cores = cores or {}
    nodes = []
    for name, count in NODES:
        nodes.append({
            "name": name, "tier": "edge", "intraNodeBandwidthMbps": INTRA_MBPS,
            "bandwidthMbps": inter_mbps, "latencyMs": 0.0,
            # one group per device, so that each may have its own speed (ids node/cpuK)
            "devices": [{"count": 1, "accelerator": "cpu", "memoryBytes": "1Gi",
                         "computeTflops": per_core * cores.get(f"{name}/cpu{i}", CORES)}
                        for i in range(count)],
        })
    return ClusterSpec.model_validate({"name": "adapt", "nodes": nodes})


@dataclass
class Run:
    """One training run: per-step rows and the adaptations the workers recorded."""

    rows: list[dict[str, Any]]
    adaptations: list[dict[str, Any]]
    status: str
    restarts: list[float] = field(default_factory=list)  #: seconds each re-plan stood still

    def rate(self, lo: int, hi: int) -> float | None:
        """Median samples/s over steps [lo, hi)."""
        picked = [r["samplesPerSecond"] for r in self.rows if lo <= r["step"] < hi]
        return statistics.median(picked) if picked else None


@dataclass
class Scenario:
    name: str
    change: Callable[[Testbed], None] | None  # applied once step CHANGE is reached
    fresh_cluster: ClusterSpec | None  # the cluster as it is after the change
    jitter: bool = False
    result: dict[str, Any] = field(default_factory=dict)


def launch(tb: Testbed, plan: Plan, out: Path, steps: int, port: int,
           adapt: str, inputs: ReplanInputs | None = None) -> list[subprocess.Popen[bytes]]:
    """Start one worker per rank of ``plan``; they resume from ``out/ckpt`` when it holds a
    checkpoint (a re-plan's restart). ``inputs``: what the workers may re-plan with."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(plan.to_json())
    (out / "training.json").write_text(json.dumps({
        "steps": steps, "warmupSteps": 0, "seed": 0, "logIntervalSteps": 1,
        "learningRate": 1e-3, "adapt": adapt}))
    inputs_path = None
    if inputs is not None:
        inputs_path = out / REPLAN_INPUTS_FILE
        inputs_path.write_text(inputs.model_dump_json(by_alias=True))
    by_rank = {d.rank: d.device_id for st in plan.stages for d in st.devices}
    base = {
        **rendezvous_env(tb.address(by_rank[0]), port, plan.world_size, 0),
        **WorkerEnv(plan_path=str(out / "plan.json"), training_path=str(out / "training.json"),
                    output_dir=str(out), metrics_port=0, device="cpu", job="adapt",
                    rendezvous_timeout=120, timeline_steps="-1",
                    checkpoint_dir=str(out / "ckpt"),
                    replan_inputs_path=None if inputs_path is None else str(inputs_path),
                    ).to_env(),
    }
    procs = []
    for rank in range(plan.world_size):
        with (out / f"rank{rank}.log").open("wb") as log:
            procs.append(tb.run(by_rank[rank], [PY, "-m", "spantrain_worker.worker"],
                                env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def train(tb: Testbed, plan: Plan, out: Path, *, steps: int, port: int, adapt: str,
          change: Callable[[Testbed], None] | None = None, jitter: bool = False,
          inputs: ReplanInputs | None = None, timeout: float = 300.0) -> Run:
    """Run ``plan`` to the end; quotas are lifted while torch loads (enforced from the end of
    step 0 on); ``change`` is applied when step CHANGE starts; ``jitter`` re-draws every
    shaped link's rate every half second. When the workers stop for a re-plan (exit status
    ``REPLAN_EXIT_CODE``) the job restarts on the plan they left, from their checkpoint, as
    ``spantrain local`` and the operator do; the restart's wall time is recorded."""
    losses = out / "losses.jsonl"
    gate = tb.startup_gate(losses)
    stop = threading.Event()
    jitter_thread = None
    if jitter:
        rng = random.Random(0)

        def wobble() -> None:
            while not stop.wait(0.5):
                for shaping in tb.net.shaping:
                    with contextlib.suppress(Exception):
                        tb.scale_links(rng.uniform(0.9, 1.1), [shaping.interface])

        jitter_thread = threading.Thread(target=wobble, daemon=True)
        jitter_thread.start()
    procs = launch(tb, plan, out, steps, port, adapt, inputs)
    status, changed = "timeout", change is None
    restarts: list[float] = []
    restarted_at: float | None = None
    restarted_from = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            gate.poll()
            done = len(losses.read_text().splitlines()) if losses.exists() else 0
            if not changed and done >= CHANGE:
                assert change is not None
                change(tb)
                changed = True
            if restarted_at is not None and done > restarted_from:
                restarts.append(time.monotonic() - restarted_at)
                restarted_at = None
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                status = "ok"
                break
            if all(c == REPLAN_EXIT_CODE for c in codes):
                record = ReplanRecord.model_validate_json((out / REPLAN_FILE).read_text())
                plan = record.new_plan()
                restarted_at, restarted_from = time.monotonic(), done
                port += 1000
                # the restart loads torch as the first start did: quotas lifted until its
                # first step is done (so the restart costs what the workers measured)
                gate.close()
                gate = tb.startup_gate(losses, after_rows=done)
                procs = launch(tb, plan, out, steps, port, adapt, inputs)
                continue
            if any(c not in (None, 0, REPLAN_EXIT_CODE) for c in codes):
                status = f"failed {codes}"
                break
            time.sleep(0.05)
    finally:
        stop.set()
        if jitter_thread is not None:
            jitter_thread.join()
        _kill(procs)
        gate.close()
    rows = [json.loads(x) for x in losses.read_text().splitlines()] if losses.exists() else []
    path = out / "adaptations.jsonl"
    adaptations = ([json.loads(x) for x in path.read_text().splitlines()]
                   if path.exists() else [])
    return Run(rows, adaptations, status, restarts)


def loss_spike(run: Run) -> int:
    """1 if any loss after an adaptation exceeds the highest of the SPIKE_WINDOW before it."""
    loss = {r["step"]: r["loss"] for r in run.rows}
    for a in run.adaptations:
        before = [loss[s] for s in range(a["step"] - SPIKE_WINDOW, a["step"]) if s in loss]
        after = [v for s, v in loss.items() if s >= a["step"]]
        if before and after and max(after) > max(before):
            return 1
    return 0


def widest_stage_device(plan: Plan) -> str:
    """A device of the plan's widest stage (the last one: ties go to the later stage)."""
    stage = max(plan.stages, key=lambda s: (len(s.devices), s.stage_index))
    return stage.devices[-1].device_id


#: the profiler check's testbed: a quarter-core and a half-core device on two nodes, and an
#: asymmetric link between them (``tests/testbed/test_profiler.py`` runs the same)
PROFILER_LIMITS_MBPS = {("slow", "fast"): 40.0, ("fast", "slow"): 100.0}


def profiler_check(instance: int = 211, port: int = 29711) -> dict[str, Any]:
    """Profile a testbed whose limits are known; returns the measurement, the quotas and the
    errors: the worst bandwidth error over both directions, and the compute-ratio error (the
    devices' fastest samples, which other work on the machine disturbs least)."""
    from spantrain_worker.profilecluster import profile_testbed

    spec = ClusterSpec.model_validate({
        "name": "profiled",
        "nodes": [
            {"name": "slow", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
            {"name": "fast", "devices": [{"computeTflops": 2, "memoryBytes": "1Gi"}]},
        ],
        "links": {"matrix": [{"a": a, "b": b, "bandwidthMbps": mbps}
                             for (a, b), mbps in PROFILER_LIMITS_MBPS.items()]},
    })
    with Testbed(resolve(spec), instance=instance, cores_per_tflops=0.25) as tb:
        cores = [q.cores for q in tb.quotas]
        measured = profile_testbed(
            tb, bench_args=["--kinds", "matmul,attention", "--precisions", "fp32",
                            "--samples", "5", "--sample-seconds", "0.2"],
            probe_args=["--repeats", "5", "--target-seconds", "0.5"], port=port)
    bw_errors = []
    for (a, b), mbps in PROFILER_LIMITS_MBPS.items():
        link = measured.link(a, b)
        bw_errors.append(abs(link.bandwidth_mbps.median / mbps - 1) if link else float("inf"))
    slow, fast = measured.device("slow"), measured.device("fast")
    ratio = (fast.effective_flops(best=True) / slow.effective_flops(best=True)
             if slow and fast else float("nan"))
    return {"measurement": measured, "cores": cores, "bw_error": max(bw_errors),
            "compute_ratio": ratio, "compute_error": abs(ratio / (cores[1] / cores[0]) - 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps per run (the whole benchmark in under 10 minutes)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (default 16)")
    parser.add_argument("--keep", metavar="DIR", help="keep every run's logs and traces here")
    parser.add_argument("--only", choices=["device", "link", "jitter"], action="append",
                        help="run only this scenario (repeatable; default: all three)")
    parser.add_argument("--no-profiler", action="store_true",
                        help="skip the profiler check (its figures print as nan)")
    args = parser.parse_args()
    # long enough that moving layers can pay for a restart (about 15 s here) after a link
    # slows at step 14
    steps = 200 if args.quick else 400
    prof = profile()
    # the running job: 4 micro-batches, so that a micro-batch has rows that shares inside a
    # stage can move (with one row per device and micro-batch only a micro-batch-count change
    # could help, which the adapter does not make yet); the fresh plans: the planner's choice
    options = PlannerOptions(global_batch=args.batch, num_microbatches=4)
    fresh_options = PlannerOptions(global_batch=args.batch)
    per_core = core_tflops()
    spec = cluster(per_core)
    topo: Topology = resolve(spec)
    plan, sim = search(topo, prof, options)
    print(f"plan: {plan.pp_degree} stage(s), widths "
          f"{[len(s.devices) for s in plan.stages]}, {plan.num_microbatches} micro-batches, "
          f"predicted {sim.samples_per_second:.1f} samples/s (uncalibrated)", flush=True)
    slow = widest_stage_device(plan)
    inter = [n.uplink_if for n in _testbed_nodes(topo)]
    scenarios = [
        Scenario("device", lambda tb: tb.set_cores(slow, CORES / 2),
                 cluster(per_core, {slow: CORES / 2})),
        Scenario("link", lambda tb: tb.scale_links(0.1, inter),
                 cluster(per_core, inter_mbps=INTER_MBPS / 10)),
        Scenario("jitter", None, None, jitter=True),
    ]
    scenarios = [sc for sc in scenarios if not args.only or sc.name in args.only]
    # what the workers may re-plan with: the cluster as planned, the model, and the planner's
    # own choice of micro-batches (the running job's 4 were forced on its first plan only,
    # so that a re-balance has rows to move)
    inputs = ReplanInputs(cluster=spec, profile=prof, options=fresh_options)
    port = 29710
    rows = []
    with tempfile.TemporaryDirectory(prefix="spantrain-adapt-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        for sc in scenarios:
            with Testbed(topo, instance=INSTANCE, cores_per_tflops=1.0 / per_core) as tb:
                port += 1
                run = train(tb, plan, work / sc.name, steps=steps, port=port, adapt="replan",
                            change=sc.change, jitter=sc.jitter, inputs=inputs)
                taken = run.adaptations[0]["step"] if run.adaptations else None
                sc.result = {
                    "status": run.status,
                    "before": run.rate(BEFORE_FROM, CHANGE),
                    "during": run.rate(CHANGE + 1, taken if taken else steps),
                    "after": run.rate(taken + 2, steps) if taken else None,
                    "adaptations": len(run.adaptations),
                    "kinds": ",".join(a["kind"] for a in run.adaptations) or "-",
                    "restart_s": max(run.restarts) if run.restarts else None,
                    "adapted_at": taken,
                    "loss_spike": loss_spike(run),
                }
                if sc.fresh_cluster is not None and sc.change is not None:
                    sc.change(tb)  # the fresh job starts under the changed conditions
                    fresh_plan, _ = search(resolve(sc.fresh_cluster), prof, fresh_options)
                    port += 1
                    fresh = train(tb, fresh_plan, work / f"{sc.name}-fresh", steps=steps // 2,
                                  port=port, adapt="off")
                    sc.result["fresh"] = fresh.rate(BEFORE_FROM, steps // 2)
                    sc.result["fresh_status"] = fresh.status
                    sc.result["fresh_plan"] = [len(s.devices) for s in fresh_plan.stages]
            r = sc.result
            rows.append([sc.name, r["status"], _f(r["before"]), _f(r["during"]),
                         _f(r["after"]), _f(r.get("fresh")), str(r["adaptations"]),
                         r["kinds"], str(r["adapted_at"] or "-"), _f(r["restart_s"]),
                         str(r["loss_spike"])])
            print(f"  {sc.name}: {r}", flush=True)
    print(table(["scenario", "status", "before", "during", "after", "fresh", "adaptations",
                 "kinds", "at step", "restart s", "loss spike"], rows))
    nan = float("nan")
    check: dict[str, Any] = (
        {"bw_error": nan, "compute_ratio": nan, "cores": [1.0, nan], "compute_error": nan}
        if args.no_profiler else profiler_check())
    print(f"profiler on a testbed of known limits: bandwidth error {check['bw_error']:.1%} "
          f"(worst direction), compute ratio {check['compute_ratio']:.3f} against the quotas' "
          f"{check['cores'][1] / check['cores'][0]:g} (error {check['compute_error']:.1%})")
    results = {sc.name: sc.result for sc in scenarios}
    skipped = {"adaptations": "nan", "loss_spike": 0}
    dev, link, jit = (results.get(n, skipped) for n in ("device", "link", "jitter"))
    recovered = _ratio(link.get("after") or link.get("during"), link.get("fresh"))
    recovered_device = _ratio(dev.get("after") or dev.get("during"), dev.get("fresh"))
    spike = max(int(r["loss_spike"]) for r in (dev, link, jit))
    print(f"recovered={recovered:.3f} recovered_device={recovered_device:.3f} "
          f"jitter_changes={jit['adaptations']} loss_spike={spike} "
          f"profiler_bw_error={check['bw_error']:.3f} "
          f"profiler_compute_error={check['compute_error']:.3f}")
    return 0


def _testbed_nodes(topo: Topology) -> list[Any]:
    from spantrain_testbed.netns import plan_network

    return list(plan_network(topo, INSTANCE).nodes)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
