"""Device micro-benchmarks of the cluster profiler: compute per layer kind, and memory.

Role: what ``spantrain profile-cluster`` (and ``spantrain local``'s calibration) measures on
one device. Each *layer kind* is one layer of a built-in family, built by ``models`` exactly as
a worker builds it, whose FLOPs the planner counts analytically
(``spantrain_planner.inputs.profiles``):

* ``matmul``: an MLP hidden layer (linear + ReLU);
* ``conv``: a ResNet basic residual block (two 3x3 convolutions, BatchNorm, ReLU);
* ``attention``: a GPT decoder block (causal self-attention and its 4x MLP).

Each runs forward and a full backward at two batch sizes, at fp32 and at the reduced precision
the device supports (bf16 autocast on CPUs with native bf16, fp16 autocast on CUDA). Every
sample is the time per iteration of a loop that lasts ``sample_seconds``: wall clock by
default, so a CPU quota or another process on the core shows (synchronised on CUDA); or, for
``spantrain local``'s emulation, which paces actions by CPU time, this thread's CPU time. The
time
against batch size is a line whose slope gives the effective FLOP/s *in the planner's FLOP
counting* and whose intercept, halved, the fixed cost per layer and pass (F and BW: two
passes). Medians, extremes and counts are kept (``spantrain_planner.inputs.measured.Stat``).

Usable memory: CUDA's free memory; on a CPU, 80 % of the memory the machine (or its cgroup)
allows. ``host_key`` names the machine (architecture, CPU/GPU model, cores, torch version, the
threads) so a cache keyed by it re-profiles on another machine.

Run as ``python -m spantrain_worker.devprofile`` (prints the ``DeviceMeasurement`` JSON; with
``--wait`` it first prints ``ready`` and waits for a line on stdin, so the caller can switch a
quota on after torch has loaded). Must not import torch.distributed, kopf, the Kubernetes
client or ``spantrain_operator``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from spantrain_planner.inputs.measured import (
    DeviceMeasurement,
    KernelKind,
    KernelMeasurement,
    Precision,
    Stat,
)
from spantrain_planner.inputs.profiles import ModelProfile, build_profile
from spantrain_planner.passes.assemble import model_ref

from .calibration import machine_key
from .models import build_model

Clock = Literal["wall", "cpu"]


@dataclass(frozen=True)
class Bench:
    """One layer kind: which built-in layer, and the two batch sizes it runs at."""

    kind: KernelKind
    family: str
    config: dict[str, Any]
    layer: int
    rows: tuple[int, int]


#: Sized so one iteration takes about 1-20 ms on one CPU core.
CPU_BENCHES: tuple[Bench, ...] = (
    Bench("matmul", "mlp", {"in_features": 512, "hidden": 512, "num_layers": 2,
                            "num_classes": 10}, 1, (64, 256)),
    Bench("conv", "resnet", {"block": "basic", "stage_blocks": [1], "width": 16,
                             "image_size": 16, "num_classes": 10}, 1, (4, 16)),
    Bench("attention", "gpt", {"num_layers": 1, "d_model": 128, "num_heads": 4, "seq_len": 64,
                               "vocab_size": 256}, 1, (2, 8)),
)
#: Large enough to keep a datacenter GPU busy.
CUDA_BENCHES: tuple[Bench, ...] = (
    Bench("matmul", "mlp", {"in_features": 4096, "hidden": 4096, "num_layers": 2,
                            "num_classes": 10}, 1, (1024, 8192)),
    Bench("conv", "resnet", {"block": "basic", "stage_blocks": [1], "width": 64,
                             "image_size": 32, "num_classes": 10}, 1, (64, 256)),
    Bench("attention", "gpt", {"num_layers": 1, "d_model": 1024, "num_heads": 16,
                               "seq_len": 512, "vocab_size": 256}, 1, (8, 32)),
)
#: Share of a CPU machine's memory a worker may plan for (as the operator's inventory).
CPU_MEMORY_FRACTION = 0.8


def _profile(bench: Bench) -> ModelProfile:
    return build_profile(bench.family, f"bench-{bench.kind}", bench.config)


def flops_per_sample(bench: Bench) -> float:
    """Forward + backward FLOPs of one sample through the bench's layer (planner counting)."""
    lp = _profile(bench).layers[bench.layer]
    return lp.forward_flops + lp.backward_input_flops + lp.backward_weight_flops


def reduced_precision(device: torch.device) -> Precision | None:
    """The reduced precision this device computes natively, if any."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(bench: Bench, rows: int, device: torch.device,
             precision: Precision) -> Callable[[], None]:
    """One forward + full backward of the bench layer on ``rows`` samples."""
    profile = _profile(bench)
    built = build_model(model_ref(profile), seed=0, layer_indices=[bench.layer - 1,
                                                                    bench.layer],
                        device=device, with_data=False)
    first, layer = built.layers[bench.layer - 1], built.layers[bench.layer]
    gen = torch.Generator().manual_seed(0)
    if bench.family == "gpt":
        idx = torch.randint(0, bench.config["vocab_size"], (rows, bench.config["seq_len"]),
                            generator=gen)
        with torch.no_grad():
            x = first(idx.to(device))
    elif bench.family == "resnet":
        size = bench.config["image_size"]
        with torch.no_grad():
            x = first(torch.randn(rows, 3, size, size, generator=gen).to(device))
    else:
        with torch.no_grad():
            x = first(torch.randn(rows, bench.config["in_features"], generator=gen).to(device))
    x = x.detach().requires_grad_(True)
    layer.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        with torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
            out = layer(x)
        out.float().sum().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return step


#: with a duty cycle, the loop computes in bursts of at least this long between sleeps: about
#: one pipeline action of a small model on a CPU (a stage's forward or backward of a
#: micro-batch), whose start pays for caches the other workers used while it slept
BURST_SECONDS = 0.025


def _timed_loop(step: Callable[[], None], device: torch.device, sample_seconds: float,
                timer: Callable[[], float], duty: float) -> float:
    """Seconds per iteration over a loop of ``sample_seconds`` of computing (see
    ``_samples``)."""
    n = 0
    busy = 0.0
    spent = 0.0
    burst = 0.0
    while True:
        t0, c0 = time.perf_counter(), timer()
        step()
        _sync(device)
        n += 1
        wall = time.perf_counter() - t0
        spent += timer() - c0
        busy += wall
        burst += wall
        if duty < 1 and burst >= BURST_SECONDS:
            time.sleep(burst * (1 / duty - 1))
            burst = 0.0
        if busy >= sample_seconds:
            return spent / n


def _samples(steps: Sequence[Callable[[], None]], device: torch.device, samples: int,
             sample_seconds: float, clock: Clock = "wall",
             duty: float = 1.0) -> list[list[float]]:
    """Seconds per iteration of each of ``steps``, ``samples`` times, each over a loop of
    ``sample_seconds`` of computing; timed by the wall clock or by this thread's CPU time
    (``clock``). The steps take turns (step 0's first sample, step 1's first, ..., step 0's
    second...), so that a slow spell of the machine lands on all of them alike instead of
    bending the line between them.

    ``duty`` < 1 paces the loop as ``spantrain local``'s sleep padding paces a device: after
    each burst of at least ``BURST_SECONDS`` the thread sleeps until the burst took
    1/``duty`` of its wall time. A thread that computes in bursts between sleeps starts each
    burst with caches other processes have used, and so takes more CPU time per iteration
    than a hot loop (on the development machine +20 % for a GPT block's forward at duty 0.4,
    one forward per burst): the calibration of an emulated device measures what the emulated
    device will pay."""
    if not 0 < duty <= 1:
        raise ValueError(f"duty must be in (0, 1], got {duty}")
    for step in steps:
        step()
        step()  # warm-up: allocations, kernel selection, autocast caches
    _sync(device)
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    out: list[list[float]] = [[] for _ in steps]
    for _ in range(samples):
        for k, step in enumerate(steps):
            out[k].append(_timed_loop(step, device, sample_seconds, timer, duty))
    return out


def measure_kernel(bench: Bench, precision: Precision, device: torch.device, *,
                   samples: int = 5, sample_seconds: float = 0.1,
                   clock: Clock = "wall", duty: float = 1.0) -> KernelMeasurement:
    """Effective FLOP/s and per-pass overhead of one layer kind (see the module)."""
    small, large = bench.rows
    t_small, t_large = _samples(
        [_step_fn(bench, small, device, precision), _step_fn(bench, large, device, precision)],
        device, samples, sample_seconds, clock, duty)
    per_sample = flops_per_sample(bench)
    # the line through the medians; its intercept is the fixed cost of the two passes
    mid_small, mid_large = statistics.median(t_small), statistics.median(t_large)
    slope = (mid_large - mid_small) / (large - small)
    fixed = mid_small - small * slope
    if slope <= 0 or fixed < 0:  # noise: no fixed cost, plain throughput
        fixed = 0.0
    rates = [per_sample * large / max(t - fixed, 1e-12) for t in t_large]
    return KernelMeasurement(kind=bench.kind, precision=precision,
                             flops_per_second=Stat.of(rates), overhead_us=fixed / 2 * 1e6)


def usable_memory(device: torch.device) -> int:
    """Bytes a worker on this device may plan for (see the module)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total * CPU_MEMORY_FRACTION)


def accelerator_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def host_key(device: torch.device, threads: int) -> str:
    """A short stable name of this machine as a benchmark sees it (see the module); on a
    CPU the key ``calibration`` caches this machine's profile under (plus the clock)."""
    key = machine_key(threads)
    if device.type == "cuda":
        name = accelerator_name(device).encode()
        key += "-" + hashlib.sha256(name).hexdigest()[:8]
    return key


def measure_device(
    *,
    node: str | None = None,
    index: int = 0,
    device: str = "cpu",
    threads: int = 1,
    kinds: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    samples: int = 5,
    sample_seconds: float = 0.1,
    clock: Clock = "wall",
    duty: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> DeviceMeasurement:
    """Run the micro-benchmarks on this device (``precisions`` None: fp32 and the device's
    reduced precision for matmul and attention; conv at fp32 only)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if clock == "cpu" and (dev.type != "cpu" or threads != 1):
        raise ValueError("clock='cpu' times one CPU thread; use the wall clock with "
                         f"device {device!r} and {threads} thread(s)")
    benches = CUDA_BENCHES if dev.type == "cuda" else CPU_BENCHES
    reduced = reduced_precision(dev)
    todo: list[tuple[Bench, Precision]] = []
    for bench in benches:
        if kinds is not None and bench.kind not in kinds:
            continue
        if precisions is None:
            chosen: list[Precision] = ["fp32"]
            if reduced is not None and bench.kind != "conv":
                chosen.append(reduced)
        else:
            known: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
            chosen = [p for p in known if p in precisions]
        todo.extend((bench, p) for p in chosen)
    if not todo:
        raise ValueError(f"nothing to measure: kinds {kinds}, precisions {precisions}")
    kernels = []
    for k, (bench, precision) in enumerate(todo):
        if progress is not None:
            progress(f"{k}/{len(todo)} {bench.kind} {precision}")
        kernels.append(measure_kernel(bench, precision, dev, samples=samples,
                                      sample_seconds=sample_seconds, clock=clock,
                                      duty=duty))
    if progress is not None:
        progress(f"{len(todo)}/{len(todo)} done")
    return DeviceMeasurement(
        node=node or socket.gethostname(), device=index, accelerator=accelerator_name(dev),
        host=host_key(dev, threads), threads=threads, kernels=kernels,
        memory_bytes=usable_memory(dev), measured_at=datetime.now(UTC),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spantrain_worker.devprofile",
        description="Device micro-benchmarks of spantrain profile-cluster: prints one "
        "DeviceMeasurement as JSON.")
    parser.add_argument("--node", help="node name to record (default: the host name)")
    parser.add_argument("--index", type=int, default=0, help="device index on the node")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", help="comma-separated subset of matmul,conv,attention")
    parser.add_argument("--precisions", help="comma-separated subset of fp32,bf16,fp16")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--sample-seconds", type=float, default=0.1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall (default: sees CPU quotas and other processes) or cpu "
                        "(this thread's CPU time: one CPU thread only)")
    parser.add_argument("--duty", type=float, default=1.0,
                        help="share of the time each benchmark loop computes, sleeping the "
                        "rest after every iteration (default 1: a hot loop; spantrain local's "
                        "calibration measures at its devices' pace)")
    parser.add_argument("--wait", action="store_true",
                        help="print 'ready' once loaded and wait for a line on stdin")
    args = parser.parse_args(argv)
    if args.wait:
        print("ready", flush=True)
        sys.stdin.readline()
    measured = measure_device(
        node=args.node, index=args.index, device=args.device, threads=args.threads,
        kinds=args.kinds.split(",") if args.kinds else None,
        precisions=args.precisions.split(",") if args.precisions else None,
        samples=args.samples, sample_seconds=args.sample_seconds, clock=args.clock,
        duty=args.duty)
    print(measured.model_dump_json(by_alias=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
