"""The worker's ``spantrain`` subcommands: ``worker`` (pod entrypoint) and ``local``.

Role: registered under the ``spantrain.commands`` entry-point group, so the planner's
dispatcher finds them without importing the worker.

* ``spantrain worker`` runs one rank from the environment the operator injects (see
  ``config``); it is the container command of every worker pod.
* ``spantrain local JOB.yaml [--devices CLUSTER.yaml]`` runs a whole SpanTrainJob on this
  machine: it calibrates the emulated devices to this machine (its device profile, measured
  once and cached by ``calibration``: the devices keep their relative speeds, in this
  machine's units, the fastest at ``LOCAL_SPEED_SHARE`` of a core), plans the job on them
  (``make_plan``), prints the plan table,
  starts one worker process per device on 127.0.0.1 with emulated device speeds and links
  (``emulation``), shows a progress line (step, loss, samples/s), prints the final throughput
  and writes the measured timeline as a PNG drawn by the planner's chart function. Ctrl-C
  stops every worker (one process group, see ``launch``) and exits 130. Checkpoints go to the
  manifest's ``spec.training.checkpoint.path`` (default ``<out>/checkpoints``); a directory
  that already holds one is resumed with ``--resume``, discarded with ``--fresh``, and
  otherwise the command refuses to start rather than overwrite it. With ``--emulate`` (root)
  the devices are emulated by the kernel instead of by sleep padding: the command brings up a
  ``spantrain_testbed`` instance for the cluster (one network namespace per device,
  token-bucket links, cgroup CPU quotas), starts each rank inside its device's namespace and
  cgroup, and removes the instance afterwards, also on Ctrl-C or an error.
* ``spantrain profile MODULE:FUNCTION|PRESET`` measures a model's layer profile (see
  ``profiling``) and writes the YAML the planner reads (``spantrain plan --model``, or
  ``model.profile`` of a SpanTrainJob with ``model.entrypoint``).

Must not import kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from spantrain_planner.api import load_job, planner_inputs
from spantrain_planner.cli.report import plan_table
from spantrain_planner.core import contract
from spantrain_planner.core.contract import REPLAN_EXIT_CODE, REPLAN_FILE, REPLAN_INPUTS_FILE
from spantrain_planner.inputs.cluster import ClusterSpec, Topology, load_cluster, resolve
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.passes.adapt import ReplanInputs, ReplanRecord
from spantrain_planner.passes.search import make_plan

from . import checkpoint, launch
from .emulation import emulation_for
from .metrics import read_timelines

if TYPE_CHECKING:
    from .profiling import Measurement

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
        f"MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, {contract.PLAN} (plan.json), and "
        f"optionally {contract.TRAINING} (training block or SpanTrainJob manifest), "
        f"{contract.JOB}, {contract.CHECKPOINT_DIR}, {contract.METRICS_PORT} (default "
        f"{contract.WORKER_METRICS_PORT}), {contract.RENDEZVOUS_TIMEOUT} (seconds, default "
        f"{contract.RENDEZVOUS_TIMEOUT_SECONDS:g}), {contract.DEVICE} (auto|cpu|cuda).",
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
        "to its CPU time x the device's slowdown and each transfer to the link's time (real "
        "throttling is --emulate's job). The devices are first calibrated to this machine "
        "(layer micro-benchmarks, measured once and cached under ~/.cache/spantrain), so "
        "the predicted throughput is this run's. Shows progress, prints the throughput "
        "against the prediction and writes the measured timeline chart. Ctrl-C stops every "
        "worker.",
    )
    parser.add_argument("job", metavar="JOB.yaml", help="SpanTrainJob manifest")
    parser.add_argument("--devices", metavar="CLUSTER.yaml",
                        help="emulated device description (default: built-in local-cpu)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default: ./spantrain-local/<job name>)")
    parser.add_argument("--steps", type=int, help="override training.steps")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue from the newest checkpoint in the checkpoint "
                          "directory (spec.training.checkpoint.path, default DIR/checkpoints)")
    existing.add_argument("--fresh", action="store_true",
                          help="delete the checkpoints in the checkpoint directory and start "
                          "from step 0 (without --resume or --fresh, an existing checkpoint "
                          "stops the command)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--no-emulation", action="store_true",
                     help="run every process at full speed with no link delays")
    how.add_argument("--emulate", action="store_true",
                     help="emulate the devices with the kernel instead of sleep padding "
                     "(root): one network namespace per device, token-bucket links, cgroup "
                     "CPU quotas in proportion to FLOP/s (spantrain testbed); latency is not "
                     "emulated")
    parser.add_argument("--testbed-instance", type=int, metavar="N",
                        help="testbed instance for --emulate: names stbN-*, subnet "
                        f"10.210.N.0/24 (default: the first free one from {AUTO_INSTANCES[0]})")
    calibrate = parser.add_mutually_exclusive_group()
    calibrate.add_argument("--no-calibrate", action="store_true",
                           help="plan with the description's FLOP/s as written (by default "
                           "the emulated devices keep their relative speeds but are put in "
                           "this machine's measured units, so the prediction is of this run)")
    calibrate.add_argument("--recalibrate", action="store_true",
                           help="profile this machine again instead of using the cached "
                           "profile (spantrain profile-cluster without a cluster does too)")
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


class _Follower:
    """The rows appended to a JSON-lines file since the last call (a progress tick reads
    what is new, not the whole file again); a half-written last line waits for the next."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def draw_measured_timeline(plan: Plan, out: Path) -> Path | None:
    """Draw the recorded step of every rank with the planner's chart function."""
    from spantrain_planner.cli.chart import draw_timeline
    from spantrain_planner.evaluation.simulator import Interval

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


def checkpoint_entries(ckpt: Path) -> list[Path]:
    """What ``checkpoint`` writes under a checkpoint root (committed or interrupted)."""
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.iterdir()
                  if p.name == checkpoint.LATEST or (p.is_dir() and p.name.startswith("step-")))


def prepare_checkpoints(ckpt: Path, *, resume: bool, fresh: bool) -> str:
    """Decide what happens to an existing checkpoint directory; returns a line to print.

    Never deletes anything the user did not ask to delete: without ``resume`` or ``fresh``
    a directory holding checkpoint files raises ``checkpoint.CheckpointError``; ``fresh``
    removes only what ``checkpoint`` writes (``latest`` and ``step-*``), not other files.
    """
    entries = checkpoint_entries(ckpt)
    step = checkpoint.latest_step(ckpt)
    if resume:
        if step is None:
            return f"checkpoints: {ckpt} holds no checkpoint; starting from step 0"
        return f"checkpoints: resuming from step {step} in {ckpt}"
    if entries and not fresh:
        what = (f"a checkpoint at step {step}" if step is not None
                else f"incomplete checkpoint files ({', '.join(p.name for p in entries[:3])})")
        raise checkpoint.CheckpointError(
            f"{ckpt} already holds {what}; pass --resume to continue from it, or --fresh to "
            "delete it and start from step 0 (or set spec.training.checkpoint.path to "
            "another directory)")
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if entries:
        return f"checkpoints: deleted the old checkpoint in {ckpt} (--fresh); writing there"
    return f"checkpoints: {ckpt}"


def run_local(args: argparse.Namespace) -> int:
    if args.emulate and os.geteuid() != 0:
        print("spantrain local: --emulate needs root (network namespaces, cgroups); run "
              "without --emulate for the in-process emulation", file=sys.stderr)
        return 2
    if args.testbed_instance is not None and not args.emulate:
        print("spantrain local: --testbed-instance needs --emulate", file=sys.stderr)
        return 2
    job = load_job(args.job)
    inputs = planner_inputs(job.spec)
    out = Path(args.out or Path("spantrain-local") / job.name).resolve()
    configured = job.spec.training.checkpoint.path
    ckpt = Path(configured).resolve() if configured else out / "checkpoints"
    cluster = load_cluster(args.devices) if args.devices else ClusterSpec.model_validate(
        DEFAULT_DEVICES)
    reference: float | None = None
    if not args.no_calibrate:
        cluster, reference = _calibrated(cluster, args, inputs.profile.family,
                                         job.spec.training.precision)
    topology = resolve(cluster)
    plan = make_plan(topology, inputs.profile, inputs.options)
    try:  # after planning, so a job that cannot be planned deletes nothing
        ckpt_line = prepare_checkpoints(ckpt, resume=args.resume, fresh=args.fresh)
    except checkpoint.CheckpointError as err:
        print(f"spantrain local: {err}", file=sys.stderr)
        return 2
    print(plan_table(plan))
    print(ckpt_line)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("timeline*"), *out.glob("rank*.log"), out / "losses.jsonl",
                  out / "adaptations.jsonl", out / "adapter.jsonl", out / REPLAN_FILE]:
        stale.unlink(missing_ok=True)
    training = job.spec.training.model_dump(mode="json", by_alias=True)
    training["adapt"] = job.spec.planner.adapt  # the workers' adapter (a run-time knob)
    if args.steps:
        training["steps"] = args.steps
        training["warmupSteps"] = min(training["warmupSteps"], args.steps)
    steps = int(training["steps"])
    (out / "plan.json").write_text(plan.to_json())
    (out / "training.json").write_text(json.dumps(training, indent=2))
    if args.emulate:  # the kernel emulates the devices: no sleep padding
        # real token buckets and CPU quotas can change under the job there (`tc`, cgroups):
        # the workers may re-plan, with the cluster as planned, the model and the options
        replan_inputs = out / REPLAN_INPUTS_FILE
        replan_inputs.write_text(ReplanInputs(
            cluster=cluster, profile=inputs.profile, options=inputs.options,
        ).model_dump_json(by_alias=True))
        return _train_on_testbed(plan, topology, out, job.name, ckpt, steps,
                                 args.testbed_instance, replan_inputs)
    emulation = None
    if not args.no_emulation:
        emulation = out / "emulation.json"
        emulation.write_text(emulation_for(plan, topology, reference_flops=reference)
                             .model_dump_json(by_alias=True))
    return _train(plan, out, job.name, ckpt, steps, emulation)


def _calibrated(cluster: ClusterSpec, args: argparse.Namespace, family: str,
                precision: str) -> tuple[ClusterSpec, float | None]:
    """The emulated devices in this machine's measured units (see
    ``spantrain_planner.inputs.measured.calibrate_emulated``) and, with sleep padding, the speed the
    slowdowns are relative to; prints what it did."""
    from spantrain_planner.inputs.measured import FAMILY_KIND, calibrate_emulated

    from .calibration import LOCAL_SPEED_SHARE, machine_profile

    machine, cached = machine_profile(refresh=args.recalibrate, say=print)
    kind = FAMILY_KIND.get(family)
    fastest = max(g.compute_tflops for n in cluster.nodes for g in n.devices)
    speeds: dict[str, float] | None = {
        n.name: LOCAL_SPEED_SHARE * max(g.compute_tflops for g in n.devices) / fastest
        for n in cluster.nodes}
    reference: float | None = machine.effective_flops(kind, precision)
    how = (f"paced by CPU time in proportion to the description's FLOP/s, the fastest at "
           f"{LOCAL_SPEED_SHARE:g} of a core")
    if args.no_emulation:
        reference = None
        speeds = {n.name: 1.0 for n in cluster.nodes}
        how = "every device at full speed (--no-emulation)"
    elif args.emulate:
        from spantrain_testbed.cgroups import plan_quotas

        reference = None
        topo = resolve(cluster)
        quotas = plan_quotas([d.id for d in topo.devices], [d.flops for d in topo.devices],
                             cores_per_tflops=_cores_per_tflops(topo))
        speeds = {}
        for dev, quota in zip(topo.devices, quotas, strict=True):
            speeds[dev.node] = max(speeds.get(dev.node, 0.0), min(quota.cores, 1.0))
        how = "CPU quotas (--emulate)"
    calibrated = calibrate_emulated(cluster, machine, speeds, layer_kind=kind,
                                    precision=precision)
    age = datetime.now(UTC) - machine.measured_at
    print(f"calibrated: this machine {machine.effective_flops(kind, precision) / 1e9:.1f} "
          f"GFLOP/s and {machine.overhead_us(kind, precision):.0f} us per layer and pass "
          f"({kind or 'weighted'} {precision}, one thread; "
          f"{'cached, ' + _age(age) + ' old' if cached else 'measured now'}); devices: "
          + ", ".join(f"{n.name} {n.devices[0].compute_tflops * 1e3:.1f}"
                      for n in calibrated.nodes)
          + f" GFLOP/s ({how}; --no-calibrate plans with the description's figures)")
    return calibrated, reference


def _age(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _train(plan: Plan, out: Path, job_name: str, ckpt: Path, steps: int,
           emulation: Path | None, testbed: Any = None, replan_inputs: Path | None = None,
           attempt: int = 0) -> int:
    """Start the workers, show progress until they finish, print the throughput.

    With ``testbed`` (a live ``spantrain_testbed.Testbed``) every rank starts inside its
    device's namespace and cgroup, the rank-0 device's address is the rendezvous, and the CPU
    quotas are lifted until step 0 is done (importing torch at a tenth of a core takes a
    minute) and enforced from then on.

    With ``replan_inputs`` the workers may stop for a re-plan (exit ``REPLAN_EXIT_CODE``
    after a checkpoint, leaving ``REPLAN_FILE``): the job then restarts on the plan they
    left, from that checkpoint (``attempt`` counts the restarts).
    """
    spawn: launch.Spawn | None = None
    master_addr, master_port = "127.0.0.1", None
    if testbed is not None:
        by_rank = {d.rank: d.device_id for st in plan.stages for d in st.devices}
        # own namespace; a restart gets its own port (the last one may linger in TIME_WAIT)
        master_addr, master_port = testbed.address(by_rank[0]), 29500 + attempt

        def spawn(rank: int, argv: list[str], env: dict[str, str],
                  popen: dict[str, Any]) -> Any:
            device = by_rank[rank]
            # the device's interface and thread settings win over this shell's environment
            env = {**env, **testbed.device_env(device), "MASTER_ADDR": master_addr}
            return testbed.run(device, argv, env=env, start_new_session=False, **popen)

    done_rows = len(_read_rows(out / "losses.jsonl")) if attempt else 0
    gate = (testbed.startup_gate(out / "losses.jsonl", after_rows=done_rows)
            if testbed is not None else None)
    workers = launch.start(
        out / "plan.json", plan.world_size, out, training_path=out / "training.json",
        job=job_name, checkpoint_dir=ckpt, emulation_path=emulation,
        master_addr=master_addr, master_port=master_port, spawn=spawn,
        replan_inputs_path=replan_inputs,
    )
    (out / "workers.json").write_text(json.dumps(
        {"pgid": workers.pgid, "pids": [p.pid for p in workers.procs]}))
    print(f"started {plan.world_size} workers (process group {workers.pgid}); logs in {out}")
    tty = sys.stdout.isatty()
    state: dict[str, Any] = {"shown": -1, "first": None}
    started = time.monotonic()
    losses = _Follower(out / "losses.jsonl")

    def tick() -> None:
        if gate is not None:
            gate.poll()  # step 0 done everywhere: quotas from now on
        rows = losses.new_rows()
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
    if codes and all(c == REPLAN_EXIT_CODE for c in codes):
        record = ReplanRecord.model_validate_json((out / REPLAN_FILE).read_text())
        new = record.new_plan()
        (out / "plan.json").write_text(new.to_json())
        print(f"re-plan at step {record.step}: {record.reason}; predicted "
              f"{record.step_seconds_before:.3f} -> {record.step_seconds_after:.3f} s/step; "
              "restarting from the checkpoint on the new plan:")
        print(plan_table(new))
        for log in workers.log_files:  # the next attempt's logs start afresh
            log.replace(log.with_name(f"{log.stem}.attempt{attempt}.log"))
        return _train(new, out, job_name, ckpt, steps, emulation, testbed, replan_inputs,
                      attempt + 1)
    if any(codes):
        print(f"workers failed (exit codes {codes}); last log lines:\n"
              f"{workers.logs()[-3000:]}", file=sys.stderr)
        return 1
    rows = _read_rows(out / "losses.jsonl")
    if rows:
        tail = rows[len(rows) // 2:]
        rate = len(tail) * plan.global_batch / sum(r["stepSeconds"] for r in tail)
        predicted = plan.predicted.samples_per_second if plan.predicted else float("nan")
        print(f"trained {len(rows)} steps in {time.monotonic() - started:.1f}s: loss "
              f"{rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}; throughput {rate:.1f} "
              f"samples/s (over the last {len(tail)} steps; predicted {predicted:.1f}, "
              f"{(predicted / rate - 1) * 100:+.0f} %)")
    chart = draw_measured_timeline(plan, out)
    if chart:
        print(f"measured timeline: {chart}")
    return 0


#: ``--emulate`` without ``--testbed-instance`` takes the first of these with nothing on the
#: machine (``spantrain testbed up`` defaults to 0, the testbed's tests use 201 and up).
AUTO_INSTANCES = range(100, 200)


def _train_on_testbed(plan: Plan, topology: Topology, out: Path, job_name: str, ckpt: Path,
                      steps: int, instance: int | None,
                      replan_inputs: Path | None = None) -> int:
    """``--emulate``: bring up a testbed for the cluster, train in it, always tear it down."""
    from spantrain_testbed import Testbed
    from spantrain_testbed.testbed import instances_present, status

    try:
        if instance is None:
            present = instances_present()
            free = [n for n in AUTO_INSTANCES if n not in present]
            if not free:
                raise ValueError(f"no free testbed instance in {AUTO_INSTANCES.start}.."
                                 f"{AUTO_INSTANCES.stop - 1}; remove some with "
                                 "`spantrain testbed down`")
            instance = free[0]
        else:
            for entry in status(instance):
                if entry["state"] and entry["owner_alive"]:
                    owner = entry["owner_pid"]
                    raise ValueError(
                        f"testbed instance {instance} is in use ("
                        f"{'persistent' if owner is None else f'owner pid {owner}'}); pick "
                        "another --testbed-instance")
        tb = Testbed(topology, instance=instance,
                     cores_per_tflops=_cores_per_tflops(topology))
        tb.up()
    except (RuntimeError, ValueError, OSError) as err:  # TestbedError, cgroup/tc failures
        print(f"spantrain local: cannot bring up the testbed: {err}", file=sys.stderr)
        return 2
    try:
        print(_testbed_line(tb))
        return _train(plan, out, job_name, ckpt, steps, None, testbed=tb,
                      replan_inputs=replan_inputs)
    finally:
        with _no_sigint():  # a second Ctrl-C must not leave namespaces and cgroups behind
            tb.down()
        print(f"testbed instance {tb.instance} removed")


def _cores_per_tflops(topology: Topology) -> float | None:
    """None (fill the testbed's CPU budget in proportion to FLOP/s) unless that would give
    the fastest device more than the one core a one-thread worker can use (a cluster of one
    or two very unequal devices): then the fastest gets just under one core."""
    from spantrain_testbed.cgroups import DEFAULT_BUDGET_CORES

    tflops = [d.flops / 1e12 for d in topology.devices]
    if DEFAULT_BUDGET_CORES / sum(tflops) * max(tflops) <= 1.0:
        return None
    return 0.99 / max(tflops)


def _testbed_line(tb: Any) -> str:
    """One line: what the testbed enforces and what it does not."""
    rates = sorted({c.bits_per_second for s in tb.net.shaping for c in s.classes})
    if not rates:
        links = "links unshaped (none below 10 Gbit/s)"
    else:
        shown = [f"{r / 1e6:g}" for r in rates]
        links = (f"links {'/'.join(shown) if len(shown) <= 4 else f'{shown[0]}-{shown[-1]}'}"
                 " Mbit/s (token buckets)")
    cores = [q.cores for q in tb.quotas]
    shares = ("/".join(f"{c:.2f}" for c in cores) if len(cores) <= 6
              else f"{min(cores):.2f}-{max(cores):.2f}")
    n = len(tb.net.devices)
    return (f"emulating {tb.topology.name} on the kernel testbed (instance {tb.instance}): "
            f"{n} network namespace{'s' if n != 1 else ''}, {links}, CPU quotas {shares} cores "
            f"(in proportion to FLOP/s, {sum(cores):.2f} cores in all); latency is not "
            f"emulated (no netem)")


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------------------------
# spantrain profile


def add_profile_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure a model's layer profile (for user models given as module:function)",
        description="Build MODEL -- a user entry point module:function returning (layers, "
        "loss_fn, dataset), or a built-in preset -- run forward and backward on one real batch "
        "of its dataset on one CPU thread, and measure per layer: forward, input-gradient (B) "
        "and weight-gradient (W) time, parameters, boundary activation bytes per sample and "
        "the activation bytes autograd stashes per sample. Times become FLOP-equivalents by "
        "multiplying with this machine's measured fp32 matmul speed (printed and written in "
        "the file). The YAML goes to --output or stdout; it is what `spantrain plan --model` "
        "reads, and what a SpanTrainJob with model.entrypoint takes under model.profile. The "
        "module is imported from PYTHONPATH or the current directory.",
    )
    parser.add_argument("model", metavar="MODULE:FUNCTION|PRESET",
                        help="user entry point (e.g. examples.models.tiny_cnn:build) or preset")
    parser.add_argument("--batch", type=int, default=16,
                        help="samples in the measured batch (default 16)")
    parser.add_argument("--output", "-o", metavar="PROFILE.yaml",
                        help="write the profile here (default: print it)")
    parser.add_argument("--config", metavar="JSON", default="{}",
                        help="keyword arguments of the entry point, as a JSON object "
                        "(recorded in the profile, passed again by every worker)")
    parser.add_argument("--name", help="profile name (default: the module's or preset's name)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed when building")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per pass and layer; the fastest counts (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as each `spantrain local` worker)")
    parser.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from spantrain_planner.inputs.plan import API_VERSION
    from spantrain_planner.inputs.profiles import preset_names

    from .models import ModelError
    from .profiling import MATMUL_SIZE, measure_matmul_speed, profile_entrypoint, profile_preset

    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        print("spantrain profile: --batch, --repeats and --threads must be >= 1",
              file=sys.stderr)
        return 2
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as err:
        print(f"spantrain profile: --config is not JSON: {err}", file=sys.stderr)
        return 2
    if not isinstance(config, dict):
        print("spantrain profile: --config must be a JSON object", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    speed = measure_matmul_speed()
    try:
        if ":" in args.model:
            measured = profile_entrypoint(
                args.model, config, batch=args.batch, name=args.name, seed=args.seed,
                repeats=args.repeats, flops_per_second=speed)
        elif args.model in preset_names():
            if config:
                print("spantrain profile: --config applies to entry points only",
                      file=sys.stderr)
                return 2
            measured = profile_preset(args.model, batch=args.batch, seed=args.seed,
                                      repeats=args.repeats, flops_per_second=speed)
        else:
            print(f"spantrain profile: {args.model!r} is neither module:function nor a "
                  f"preset ({', '.join(preset_names())})", file=sys.stderr)
            return 2
    except ModelError as err:
        print(f"spantrain profile: {err}", file=sys.stderr)
        return 2
    profile = measured.profile
    how = (f"{speed / 1e9:.1f} GFLOP/s ({MATMUL_SIZE}x{MATMUL_SIZE} fp32 matmul, "
           f"{measured.threads} thread{'s' if measured.threads > 1 else ''}, "
           f"{platform.machine()}, torch {torch.__version__})")
    header = (
        f"# Measured by `spantrain profile {args.model} --batch {args.batch}` "
        "on this machine.\n"
        f"# FLOPs are FLOP-equivalents: measured seconds per sample x {how};\n"
        "# bytes are exact (parameters, boundary output per sample, autograd stash per sample).\n"
    )
    body = {"apiVersion": API_VERSION, "kind": "ModelProfile",
            **profile.model_dump(mode="json", by_alias=True)}
    text = header + yaml.safe_dump(body, sort_keys=False)
    report = sys.stdout if args.output else sys.stderr
    print(_profile_table(measured), file=report)
    print(f"calibration: {how}", file=report)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({profile.num_layers} layers, {profile.param_count:,} "
              "parameters)", file=report)
    else:
        sys.stdout.write(text)
    return 0


def _profile_table(measured: Measurement) -> str:
    rows = [f"{'layer':<24} {'params':>10} {'F ms':>8} {'B ms':>8} {'W ms':>8} "
            f"{'out B/sample':>13} {'stash B/sample':>15}"]
    batch = measured.batch
    for lp, t in zip(measured.profile.layers, measured.timings, strict=True):
        rows.append(f"{lp.name[:24]:<24} {lp.param_count:>10,} {t.forward * batch * 1e3:>8.3f} "
                    f"{t.backward_input * batch * 1e3:>8.3f} "
                    f"{t.backward_weight * batch * 1e3:>8.3f} "
                    f"{lp.output_bytes:>13,} {lp.stash_bytes:>15,}")
    rows.append(f"(times per batch of {batch}; the profile stores them per sample as FLOPs)")
    return "\n".join(rows)
