"""This machine's device profile, cached: what calibrates ``spantrain local``'s predictions.

Role: ``spantrain local`` emulates a cluster's devices as shares of *this* machine, so its
prediction needs this machine's speed in the planner's units. ``machine_profile`` returns the
``DeviceMeasurement`` of ``devprofile`` (one thread, as every local worker), measured once and
cached as JSON under ``$XDG_CACHE_HOME/spantrain/device-profiles/<host key>.json`` (default
``~/.cache``): the key names the architecture, CPU model, core count, torch version, threads
and clock, so another machine (or another torch) profiles afresh; a profile older than
``max_age`` is measured again too. The benchmarks run in a child process, so the caller's
torch threads and memory are left alone.

Must not import torch (the parent of the workers never loads it), torch.distributed, kopf, the
Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from spantrain_planner.inputs.measured import DeviceMeasurement

#: A cached profile older than this is measured again.
CACHE_MAX_AGE = timedelta(days=1)

#: With sleep padding, the fastest emulated device of ``spantrain local`` runs at this share of
#: one core's measured speed: every device is paced by CPU time, and the rest of the core is
#: headroom for the other workers (and whatever else runs on this machine), so contention does
#: not show. The one-thread profile is measured at this duty cycle too (``devprofile --duty``):
#: a device that computes in bursts between sleeps pays cold caches that a hot loop does not.
LOCAL_SPEED_SHARE = 0.4


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spantrain" / "device-profiles"


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown-cpu"


def machine_key(threads: int = 1) -> str:
    """A short stable name of this machine: architecture, CPU model, cores, torch, threads
    (without loading torch)."""
    parts = [platform.machine(), _cpu_model(), str(os.cpu_count()), _torch_version(),
             f"threads={threads}"]
    return f"{platform.machine()}-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def cache_key(threads: int = 1) -> str:
    """The cache file's name for this machine: its key and the clock the profile used."""
    return f"{machine_key(threads)}-{'cpu-paced' if threads == 1 else 'wall'}"


def cached_profile(threads: int = 1, *, now: datetime | None = None,
                   max_age: timedelta = CACHE_MAX_AGE) -> DeviceMeasurement | None:
    """The cached profile of this machine, or None (absent, unreadable or too old)."""
    path = cache_dir() / f"{cache_key(threads)}.json"
    try:
        measured = DeviceMeasurement.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None
    if (now or datetime.now(UTC)) - measured.measured_at > max_age:
        return None
    return measured


def measure_machine(threads: int = 1, *, quick: bool = False,
                    timeout: float = 600.0) -> DeviceMeasurement:
    """Run ``devprofile`` (every layer kind, fp32 and the reduced precision) in a child
    process on ``threads`` threads, timed by CPU time on one thread: the emulation paces
    every action by its CPU time, so CPU time is the unit it needs, and it moves less than
    the wall clock when other processes share the machine. On one thread the loops run at
    the emulation's duty cycle (``LOCAL_SPEED_SHARE``), as the fastest emulated device does."""
    cmd = [sys.executable, "-m", "spantrain_worker.devprofile", "--node", "localhost",
           "--threads", str(threads)]
    if threads == 1:  # the emulation paces by CPU time: measure in CPU time too
        # more samples than a node profile: this machine's speed drifts by +-15 % over
        # seconds, and the prediction is only as good as this one number
        cmd += ["--clock", "cpu", "--duty", str(LOCAL_SPEED_SHARE), "--samples", "7"]
    if quick:
        cmd += ["--samples", "3", "--sample-seconds", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"device profile failed (exit {done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    return DeviceMeasurement.model_validate_json(done.stdout.strip().splitlines()[-1])


def machine_profile(
    threads: int = 1,
    *,
    refresh: bool = False,
    max_age: timedelta = CACHE_MAX_AGE,
    say: Callable[[str], None] | None = None,
) -> tuple[DeviceMeasurement, bool]:
    """(this machine's profile, whether it came from the cache); measures and caches it when
    there is none (or ``refresh``)."""
    if not refresh and (hit := cached_profile(threads, max_age=max_age)) is not None:
        return hit, True
    path = cache_dir() / f"{cache_key(threads)}.json"
    if say is not None:
        say(f"profiling this machine (layer micro-benchmarks, about 20 s; cached in {path})")
    measured = measure_machine(threads)
    store(measured, threads)
    return measured, False


def store(measured: DeviceMeasurement, threads: int = 1) -> Path:
    """Write a profile of this machine where ``cached_profile`` finds it."""
    path = cache_dir() / f"{cache_key(threads)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(measured.model_dump_json(by_alias=True, indent=1))
    tmp.replace(path)
    return path
