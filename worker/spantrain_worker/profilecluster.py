"""``spantrain profile-cluster``: measure devices and links, write a ``ClusterMeasurement``.

Role: the orchestration side of the cluster profiler (the node side is ``devprofile`` for
compute and memory and ``linkprobe`` for links; each is what a per-node pod would run).

* Without a cluster file it profiles this machine (one device), refreshes the cache
  ``spantrain local`` calibrates from (``calibration``) and prints the result.
* With ``CLUSTER.yaml --emulate`` (root) it brings up a ``spantrain_testbed`` instance for the
  cluster and measures what the kernel imposes: every device's benchmarks at once, each inside
  its namespace under its CPU quota (quotas lifted while torch loads), then every ordered node
  pair's latency and bandwidth (quotas lifted: the link, not the CPU, is measured), one pair
  at a time, then removes the instance.

A probe that fails or times out is recorded as a ``ProbeFailure`` naming the device or pair;
with ``--previous`` (default: the ``--output`` file when it exists) every fact the run could
not measure keeps its old figure (``ClusterMeasurement.updated_with``), and the exit code is 3.

Must not import kopf, the Kubernetes client or ``spantrain_operator``; torch is loaded only by
the child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from spantrain_planner.cli.report import table
from spantrain_planner.core.errors import InputError
from spantrain_planner.inputs.cluster import Topology, load_cluster, resolve
from spantrain_planner.inputs.measured import (
    ClusterMeasurement,
    DeviceMeasurement,
    LinkMeasurement,
    ProbeFailure,
    Stat,
    load_measurement,
)

PY = sys.executable
#: Ports of the link servers on the testbed (one per receiving node, in its own namespace).
LINK_PORT = 29610
#: Exit code when some probes failed (the measurement is written; old facts kept).
PARTIAL = 3


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()

    def show(self, what: str) -> None:
        width = 24
        filled = int(width * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {what} "
                f"({time.monotonic() - self.started:.0f} s)")
        if self.tty:
            print("\r\033[K" + line, end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def step(self, what: str) -> None:
        self.done += 1
        self.show(what)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str | None:
    """The next stdout line of ``proc`` before ``deadline`` (None: timed out or EOF)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                return None
            ch = os.read(proc.stdout.fileno(), 1)
            if not ch:
                return buf.decode() if buf else None
            if ch == b"\n":
                return buf.decode()
            buf += ch
    return None


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """Stop a probe process (ours); its stderr tail, for messages."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return (err or b"").decode(errors="replace")[-500:]


def node_devices(topology: Topology) -> list[tuple[int, str, int]]:
    """(device index, node, index of the device on its node) in topology order."""
    seen: dict[str, int] = {}
    out = []
    for dev in topology.devices:
        k = seen.get(dev.node, 0)
        seen[dev.node] = k + 1
        out.append((dev.index, dev.node, k))
    return out


def profile_testbed(
    tb: Any,
    *,
    bench_args: Sequence[str] = (),
    device_timeout: float = 300.0,
    probe_args: Sequence[str] = (),
    probe_timeout: float = 60.0,
    devices: bool = True,
    links: bool = True,
    port: int = LINK_PORT,
    progress: Progress | None = None,
) -> ClusterMeasurement:
    """Measure every device and ordered node pair of a live ``spantrain_testbed.Testbed``."""
    topo: Topology = tb.topology
    found: list[DeviceMeasurement] = []
    measured_links: list[LinkMeasurement] = []
    failures: list[ProbeFailure] = []

    def fail(src: str, dst: str | None, error: str) -> None:
        failures.append(ProbeFailure(src=src, dst=dst, error=error.strip()[-400:],
                                     at=datetime.now(UTC)))

    if devices:
        # every device at once, as one pod per node would: each under its own quota, and
        # whatever else slows the machine down slows them all alike (one after the other, a
        # busy moment during one device's turn skews their ratio)
        listed = node_devices(topo)
        tb.enforce_compute(False, [i for i, _, _ in listed])  # torch loads at full speed
        procs: dict[int, subprocess.Popen[bytes]] = {}
        deadline = time.monotonic() + device_timeout
        try:
            for index, node, k in listed:
                procs[index] = tb.run(
                    index, [PY, "-m", "spantrain_worker.devprofile", "--wait", "--node", node,
                            "--index", str(k), *bench_args],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if progress is not None:
                progress.show(f"{len(procs)} device(s): loading torch")
            ready = [i for i in procs if _read_line(procs[i], deadline) == "ready"]
            tb.enforce_compute(True)
            for index in procs:
                if index not in ready:
                    fail(topo.devices[index].id, None,
                         f"benchmark did not start: {_stop(procs[index])}")
            if progress is not None:
                progress.show(f"{len(ready)} device(s): benchmarks under their quotas")
            for index in ready:
                stdin = procs[index].stdin
                assert stdin is not None
                stdin.write(b"go\n")
                stdin.flush()
            for index in ready:
                name = topo.devices[index].id
                line = _read_line(procs[index], deadline)
                try:
                    if line is None:
                        raise ValueError(f"no result within {device_timeout:g} s")
                    found.append(DeviceMeasurement.model_validate_json(line))
                    procs[index].wait(timeout=30)
                except (ValueError, OSError, subprocess.TimeoutExpired) as err:
                    fail(name, None, f"{err} {_stop(procs[index])}")
                if progress is not None:
                    progress.step(f"device {name}")
        finally:
            tb.enforce_compute(True)
            for proc in procs.values():
                if proc.poll() is None:
                    _stop(proc)
    if links:
        firsts: dict[str, int] = {}
        for index, node, _ in node_devices(topo):
            firsts.setdefault(node, index)
        tb.enforce_compute(False)  # the link is measured, not the sender's CPU share
        servers: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for node, index in firsts.items():
                servers[node] = tb.run(index, [PY, "-m", "spantrain_worker.linkprobe", "serve",
                                               tb.address(index), str(port), "--timeout",
                                               str(max(probe_timeout, 30.0))],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for src, si in firsts.items():
                for dst, di in firsts.items():
                    if src == dst:
                        continue
                    if progress is not None:
                        progress.show(f"link {src} -> {dst}")
                    def start(argv: list[str], i: int = si) -> subprocess.Popen[bytes]:
                        proc: subprocess.Popen[bytes] = tb.run(
                            i, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                        return proc

                    sample = run_probe(start, tb.address(di), port, probe_args, probe_timeout)
                    if isinstance(sample, str):
                        fail(src, dst, sample)
                    else:
                        measured_links.append(link_measurement(src, dst, sample))
                    if progress is not None:
                        progress.step(f"link {src} -> {dst}")
        finally:
            for proc in servers.values():
                _stop(proc)
            tb.enforce_compute(True)
    return ClusterMeasurement(cluster=topo.name, devices=found, links=measured_links,
                              failures=failures)


def run_probe(start: Callable[[list[str]], subprocess.Popen[bytes]], addr: str, port: int,
              probe_args: Sequence[str], timeout: float) -> dict[str, Any] | str:
    """One ``linkprobe probe``: its samples, or why it failed (a string)."""
    proc = start([PY, "-m", "spantrain_worker.linkprobe", "probe", addr, str(port),
                  "--timeout", f"{timeout:g}", *probe_args])
    try:
        out, err = proc.communicate(timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g} s {_stop(proc)}".strip()
    lines = out.decode().strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        data = {}
    if proc.returncode != 0 or "error" in data or not data:
        return str(data.get("error") or err.decode(errors="replace")[-400:]
                   or f"exit {proc.returncode}")
    return dict(data)


def link_measurement(src: str, dst: str, sample: dict[str, Any]) -> LinkMeasurement:
    return LinkMeasurement(
        src=src, dst=dst, latency_ms=Stat.of([max(x, 1e-6) for x in sample["latencyMs"]]),
        bandwidth_mbps=Stat.of(sample["bandwidthMbps"]),
        payload_bytes=int(sample["payloadBytes"]), measured_at=datetime.now(UTC))


# --------------------------------------------------------------------------------------------
# reports


def devices_table(measured: ClusterMeasurement) -> str:
    rows = []
    for d in measured.devices:
        for k in d.kernels:
            st = k.flops_per_second
            rows.append([f"{d.node}/{d.device}", f"{k.kind}", k.precision,
                         f"{st.median / 1e9:.1f}", f"{st.spread * 100:.0f}%", st.count,
                         f"{k.overhead_us:.0f}"])
        rows.append([f"{d.node}/{d.device}", "weighted", "fp32",
                     f"{d.effective_flops() / 1e9:.1f}", "-", "-",
                     f"{d.overhead_us():.0f}"])
    return table(["device", "layer kind", "precision", "GFLOP/s", "spread", "n",
                  "overhead us"], rows)


def links_table(measured: ClusterMeasurement) -> str:
    rows = [[f"{x.src} -> {x.dst}", f"{x.bandwidth_mbps.median:.1f}",
             f"{x.bandwidth_mbps.spread * 100:.0f}%", x.bandwidth_mbps.count,
             f"{x.latency_ms.median:.3f}", f"{x.latency_ms.spread * 100:.0f}%",
             x.latency_ms.count] for x in measured.links]
    return table(["link", "Mbit/s", "spread", "n", "latency ms", "spread", "n"], rows)


def memory_line(measured: ClusterMeasurement) -> str:
    return "usable memory: " + ", ".join(
        f"{d.node}/{d.device} {d.memory_bytes / 2**30:.2f} GiB" for d in measured.devices
        if d.memory_bytes is not None)


# --------------------------------------------------------------------------------------------
# the command


def add_profile_cluster_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile-cluster",
        help="measure devices (compute, memory) and links (latency, bandwidth)",
        description="Measure what the planner otherwise takes from labels. Per device: "
        "forward+backward micro-benchmarks of three layer kinds (matmul: an MLP layer; conv: "
        "a residual conv block; attention: a GPT block) at fp32 and the device's reduced "
        "precision, each at two batch sizes, giving effective FLOP/s (in the planner's FLOP "
        "counting) and the fixed cost per layer and pass; and usable memory. Per ordered "
        "node pair: one-way latency from tiny round trips and bandwidth from large "
        "transfers, repeated (median, spread and count kept; both directions, since links "
        "can be asymmetric). Without CLUSTER it profiles this machine and refreshes the "
        "cache `spantrain local` calibrates from. With CLUSTER --emulate (root) it measures "
        "the cluster's devices and links as the kernel testbed imposes them. The result is a "
        "ClusterMeasurement (YAML) that `spantrain plan --measured` reads. A probe that "
        "fails or times out is named, the facts it would have replaced are kept from "
        "--previous, and the exit code is 3.",
    )
    parser.add_argument("cluster", nargs="?", metavar="CLUSTER.yaml",
                        help="cluster description (with --emulate); omit to profile this "
                        "machine")
    parser.add_argument("-o", "--output", metavar="MEASURED.yaml",
                        help="write the measurement here (default: print it)")
    parser.add_argument("--previous", metavar="MEASURED.yaml",
                        help="an earlier measurement whose facts stay where this run fails "
                        "(default: --output, when that file exists)")
    parser.add_argument("--emulate", action="store_true",
                        help="measure CLUSTER on the kernel testbed (root): one network "
                        "namespace per device, token-bucket links, cgroup CPU quotas")
    parser.add_argument("--testbed-instance", type=int, metavar="N",
                        help="testbed instance for --emulate (default: the first free one "
                        "from 100)")
    parser.add_argument("--devices-only", action="store_true", help="skip the link probes")
    parser.add_argument("--links-only", action="store_true", help="skip the device benchmarks")
    parser.add_argument("--kinds", default="matmul,conv,attention",
                        help="layer kinds to benchmark (default: all three)")
    parser.add_argument("--precisions", default="auto",
                        help="fp32,bf16,fp16 or auto (fp32 and the device's reduced "
                        "precision; default)")
    parser.add_argument("--samples", type=int, default=5,
                        help="timed samples per kind, precision and batch size (default 5)")
    parser.add_argument("--sample-seconds", type=float, default=0.1,
                        help="wall-clock length of one sample (default 0.1)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="large transfers per link (default 5)")
    parser.add_argument("--pings", type=int, default=20,
                        help="tiny round trips per link (default 20)")
    parser.add_argument("--transfer-seconds", type=float, default=0.5,
                        help="how long one large transfer should last (default 0.5)")
    parser.add_argument("--probe-timeout", type=float, default=60.0,
                        help="seconds before a link probe counts as failed (default 60)")
    parser.add_argument("--device-timeout", type=float, default=300.0,
                        help="seconds before a device benchmark counts as failed "
                        "(default 300)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter samples (3 x 0.05 s; 3 transfers of 0.25 s)")
    parser.set_defaults(func=run_profile_cluster)


def _bench_args(args: argparse.Namespace) -> list[str]:
    samples, seconds = (3, 0.05) if args.quick else (args.samples, args.sample_seconds)
    out = ["--samples", str(samples), "--sample-seconds", f"{seconds:g}", "--kinds", args.kinds]
    if args.precisions != "auto":
        out += ["--precisions", args.precisions]
    return out


def _probe_args(args: argparse.Namespace) -> list[str]:
    repeats, seconds = (3, 0.25) if args.quick else (args.repeats, args.transfer_seconds)
    return ["--count", str(args.pings), "--repeats", str(repeats), "--target-seconds",
            f"{seconds:g}"]


def run_profile_cluster(args: argparse.Namespace) -> int:
    def err(msg: str) -> int:
        print(f"spantrain profile-cluster: {msg}", file=sys.stderr)
        return 2

    if args.devices_only and args.links_only:
        return err("--devices-only and --links-only exclude each other")
    if min(args.samples, args.repeats, args.pings) < 1 or args.sample_seconds <= 0:
        return err("--samples, --repeats, --pings and --sample-seconds must be positive")
    previous_path = args.previous or (args.output if args.output and Path(args.output).exists()
                                      else None)
    try:
        previous = load_measurement(previous_path) if previous_path else None
    except InputError as e:
        return err(str(e))
    if args.cluster is None:
        if args.emulate or args.links_only:
            return err("--emulate and --links-only need a CLUSTER.yaml")
        measured = _profile_this_machine(args)
    else:
        if not args.emulate:
            return err("measuring a real cluster's nodes runs one pod per node on Kubernetes "
                       "(not this command); give --emulate to measure CLUSTER on the kernel "
                       "testbed, or no CLUSTER to profile this machine")
        if os.geteuid() != 0:
            return err("--emulate needs root (network namespaces, tc, cgroups)")
        try:
            cluster = load_cluster(args.cluster)
        except InputError as e:
            return err(str(e))
        try:
            measured = _profile_emulated(args, resolve(cluster))
        except (RuntimeError, ValueError, OSError) as e:
            return err(f"cannot profile on the testbed: {e}")
    result = previous.updated_with(measured) if previous is not None else measured
    report = sys.stderr if args.output is None else sys.stdout
    if result.devices:
        print(devices_table(result), file=report)
        print(memory_line(result), file=report)
    if result.links:
        print(links_table(result), file=report)
    for failure in measured.failures:
        kept = (previous is not None and (
            previous.link(failure.src, failure.dst) is not None if failure.dst is not None
            else any(f"{d.node}/" in failure.src for d in previous.devices)))
        print(f"FAILED {failure.what}: {failure.error} "
              f"({'kept the figures of ' + str(previous_path) if kept else 'no figure'})",
              file=sys.stderr)
    text = result.to_yaml()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=report)
    else:
        sys.stdout.write(text)
    return PARTIAL if measured.failures else 0


def _profile_this_machine(args: argparse.Namespace) -> ClusterMeasurement:
    """One device: this machine on one thread, timed by CPU time as ``spantrain local``
    calibrates from it (every kind and precision: the cache is refreshed); or, with --kinds or
    --precisions, just those, timed by the wall clock, and not cached."""
    from .calibration import measure_machine, store

    progress = Progress(1)
    progress.show("this machine: layer micro-benchmarks")
    now = datetime.now(UTC)
    full = args.kinds == "matmul,conv,attention" and args.precisions == "auto"
    try:
        if full:
            device = measure_machine(1, quick=args.quick, timeout=args.device_timeout)
        else:
            cmd = [PY, "-m", "spantrain_worker.devprofile", "--node", "localhost",
                   *_bench_args(args)]
            done = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=args.device_timeout)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-400:] or f"exit {done.returncode}")
            device = DeviceMeasurement.model_validate_json(done.stdout.strip().splitlines()[-1])
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        progress.close()
        return ClusterMeasurement(cluster="localhost", failures=[
            ProbeFailure(src="localhost", error=str(e)[-400:] or "failed", at=now)])
    progress.step("this machine")
    progress.close()
    if full:
        print(f"cached for spantrain local: {store(device)}", file=sys.stderr)
    return ClusterMeasurement(cluster="localhost", devices=[device])


def _profile_emulated(args: argparse.Namespace, topology: Topology) -> ClusterMeasurement:
    from spantrain_testbed import Testbed
    from spantrain_testbed.testbed import instances_present

    from .commands import AUTO_INSTANCES, _cores_per_tflops

    instance = args.testbed_instance
    if instance is None:
        present = instances_present()
        instance = next((n for n in AUTO_INSTANCES if n not in present), None)
        if instance is None:
            raise ValueError("no free testbed instance; remove some with `spantrain testbed "
                             "down`")
    nodes = len({d.node for d in topology.devices})
    work = (0 if args.links_only else topology.num_devices) + (
        0 if args.devices_only else nodes * (nodes - 1))
    progress = Progress(work)
    with Testbed(topology, instance=instance,
                 cores_per_tflops=_cores_per_tflops(topology)) as tb:
        print(f"testbed instance {instance}: {topology.num_devices} device(s), CPU quotas "
              + "/".join(f"{q.cores:.2f}" for q in tb.quotas) + " cores", file=sys.stderr)
        try:
            return profile_testbed(
                tb, bench_args=_bench_args(args), device_timeout=args.device_timeout,
                probe_args=_probe_args(args), probe_timeout=args.probe_timeout,
                devices=not args.links_only, links=not args.devices_only, progress=progress)
        finally:
            progress.close()
