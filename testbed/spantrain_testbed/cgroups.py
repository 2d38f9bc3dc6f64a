"""Compute side of the testbed: cgroup v1 CPU quotas, one group per emulated device.

Role: ``plan_quotas`` (pure) scales each device's FLOP/s to a CPU share of this machine;
``create`` makes ``/sys/fs/cgroup/cpu/stbN/d<i>`` (and the same under ``cpuacct`` for usage
accounting) with ``cpu.cfs_quota_us / cpu.cfs_period_us`` = that share; ``remove`` kills what
runs inside (only processes the testbed put there) and deletes the groups. Called by
``testbed.Testbed`` only.

The parent group ``stbN`` carries the total budget as its own quota, so the devices together
can never take more than it, and a raised ``cpu.shares`` so that, on a shared machine, other
load does not eat into the devices' quotas (the quota, not the weight, is what caps them).

Must not import torch, ``spantrain_worker`` or ``spantrain_operator``; standard library only.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
CPUACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")
# Short CFS periods. With the default 100 ms a device that waits on a link for most of a
# period spends its whole quota at full core speed when the data lands: a pipeline stage with
# bubbles then computes up to 1/cores times faster than the same device alone, and the testbed
# stops emulating a device of fixed speed (measured steps came out 1.8x faster than the
# calibrated prediction). A 5 ms period bounds such a burst to one quota (~1 ms); SpanTrain's
# worker paces that last quota away (``contract.PACE_CORES`` from ``Testbed.device_env``).
PERIOD_US = 5_000
MAX_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel's floor for cfs_quota_us
DEFAULT_BUDGET_CORES = 1.8
DEFAULT_SHARES = 8192
GROUP_RE = re.compile(r"^stb(\d{1,3})$")


class CgroupError(RuntimeError):
    """cgroup v1 is missing or a group could not be created/removed."""


@dataclass(frozen=True)
class CpuQuota:
    """One device's CPU limit: ``cores`` of one CPU (quota_us / period_us)."""

    index: int
    device_id: str
    cores: float

    @property
    def period_us(self) -> int:
        """The shortest period whose quota is at least the kernel's minimum."""
        return min(MAX_PERIOD_US, max(PERIOD_US, math.ceil(MIN_QUOTA_US / self.cores)))

    @property
    def quota_us(self) -> int:
        return max(MIN_QUOTA_US, round(self.cores * self.period_us))


def plan_quotas(
    device_ids: Sequence[str],
    flops: Sequence[float],
    *,
    budget_cores: float = DEFAULT_BUDGET_CORES,
    cores_per_tflops: float | None = None,
) -> list[CpuQuota]:
    """CPU share per device, proportional to its FLOP/s (pure).

    Default: the fastest devices are scaled so that all together take ``budget_cores``.
    With ``cores_per_tflops`` the scale is fixed instead (so that several clusters emulated one
    after the other keep the same speed per TFLOP/s) and must still fit in ``budget_cores``.
    """
    if len(device_ids) != len(flops) or not flops:
        raise ValueError("plan_quotas: one FLOP/s figure per device, at least one device")
    if any(f <= 0 for f in flops):
        raise ValueError(f"every device needs FLOP/s > 0, got {list(flops)}")
    ncpu = os.cpu_count() or 1
    if not 0 < budget_cores <= ncpu:
        raise ValueError(f"budget_cores must be in (0, {ncpu}] on this machine, got {budget_cores}")
    total_tflops = sum(flops) / 1e12
    if cores_per_tflops is None:
        cores_per_tflops = budget_cores / total_tflops
    cores = [f / 1e12 * cores_per_tflops for f in flops]
    if sum(cores) > budget_cores * 1.0001:
        raise ValueError(
            f"{len(cores)} devices at {cores_per_tflops:g} cores per TFLOP/s need "
            f"{sum(cores):.2f} cores, more than the budget of {budget_cores:g}; lower "
            f"cores_per_tflops to at most {budget_cores / total_tflops:.4g}"
        )
    if max(cores) > 1.0:
        raise ValueError(
            f"a device would get {max(cores):.2f} cores but processes run with one thread; "
            f"lower cores_per_tflops or budget_cores"
        )
    tiny = [d for d, c in zip(device_ids, cores, strict=True) if c * MAX_PERIOD_US < MIN_QUOTA_US]
    if tiny:
        raise ValueError(
            f"devices {tiny} would get less than {MIN_QUOTA_US / MAX_PERIOD_US:.0%} of a core, "
            f"below the kernel's minimum quota; raise budget_cores or drop them"
        )
    return [CpuQuota(i, d, c) for i, (d, c) in enumerate(zip(device_ids, cores, strict=True))]


def group(instance: int, root: Path = CPU_ROOT) -> Path:
    return root / f"stb{instance}"


def device_group(instance: int, index: int, root: Path = CPU_ROOT) -> Path:
    return group(instance, root) / f"d{index}"


def check_available() -> None:
    for root in (CPU_ROOT, CPUACCT_ROOT):
        if not (root / "tasks").exists():
            raise CgroupError(
                f"{root} is not a cgroup v1 hierarchy; the testbed needs the cpu and cpuacct "
                f"controllers mounted (cgroup v1) and root"
            )


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror}") from None


def create(instance: int, quotas: Sequence[CpuQuota], shares: int = DEFAULT_SHARES) -> None:
    check_available()
    total_us = round(sum(q.cores for q in quotas) * PERIOD_US)
    for root in (CPU_ROOT, CPUACCT_ROOT):
        group(instance, root).mkdir(exist_ok=True)
        for q in quotas:
            device_group(instance, q.index, root).mkdir(exist_ok=True)
    parent = group(instance)
    _write(parent / "cpu.cfs_period_us", str(PERIOD_US))
    _write(parent / "cpu.cfs_quota_us", str(total_us))
    _write(parent / "cpu.shares", str(shares))
    for q in quotas:
        path = device_group(instance, q.index)
        # unlimited first: the kernel checks every (quota, period) pair it is given against
        # the parent's ratio, and the old quota with the new period may not pass
        _write(path / "cpu.cfs_quota_us", "-1")
        _write(path / "cpu.cfs_period_us", str(q.period_us))
        _write(path / "cpu.cfs_quota_us", str(q.quota_us))
        burst = path / "cpu.cfs_burst_us"
        if burst.exists():
            _write(burst, "0")


def set_limits(instance: int, quotas: Sequence[CpuQuota], enforced: bool = True) -> None:
    """Apply the devices' quotas, or (``enforced=False``) let each device use up to the whole
    budget of the parent group — e.g. while processes import torch, which at a tenth of a core
    takes a minute; the parent's quota still caps all devices together."""
    for q in quotas:
        path = device_group(instance, q.index)
        if enforced:  # a quota changed at run time may need another period (``CpuQuota``)
            _write(path / "cpu.cfs_period_us", str(q.period_us))
        _write(path / "cpu.cfs_quota_us", str(q.quota_us if enforced else -1))


def procs_files(instance: int, index: int) -> tuple[Path, Path]:
    """The ``cgroup.procs`` files a device's process must be written to (cpu, cpuacct)."""
    return (
        device_group(instance, index, CPU_ROOT) / "cgroup.procs",
        device_group(instance, index, CPUACCT_ROOT) / "cgroup.procs",
    )


def usage_seconds(instance: int, index: int) -> float:
    """CPU time used by everything that ran in the device's group."""
    path = device_group(instance, index, CPUACCT_ROOT) / "cpuacct.usage"
    return int(path.read_text()) / 1e9


def throttle_stats(instance: int, index: int) -> dict[str, int]:
    path = device_group(instance, index) / "cpu.stat"
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def instances_present() -> set[int]:
    found: set[int] = set()
    for root in (CPU_ROOT, CPUACCT_ROOT):
        if root.is_dir():
            for child in root.iterdir():
                match = GROUP_RE.match(child.name)
                if match and child.is_dir():
                    found.add(int(match.group(1)))
    return found


def _groups_bottom_up(instance: int) -> list[Path]:
    paths: list[Path] = []
    for root in (CPU_ROOT, CPUACCT_ROOT):
        top = group(instance, root)
        if top.is_dir():
            paths += sorted((p for p in top.iterdir() if p.is_dir()), reverse=True)
            paths.append(top)
    return paths


def pids(instance: int) -> list[int]:
    """Processes inside the instance's groups (all put there by the testbed)."""
    found: set[int] = set()
    for path in _groups_bottom_up(instance):
        with contextlib.suppress(OSError):
            found.update(int(x) for x in (path / "cgroup.procs").read_text().split())
    return sorted(found)


def kill(pids_to_kill: Sequence[int], grace_seconds: float = 3.0) -> None:
    """SIGTERM, wait up to ``grace_seconds``, then SIGKILL; each by its own pid."""
    remaining = list(pids_to_kill)
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while remaining and time.monotonic() < deadline:
            remaining = [p for p in remaining if _alive(p)]
            if remaining:
                time.sleep(0.05)
        if not remaining:
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead; its parent reaps it


def remove(instance: int, timeout: float = 10.0) -> None:
    """Kill the processes inside and remove the instance's groups (idempotent)."""
    kill(pids(instance))
    deadline = time.monotonic() + timeout
    for path in _groups_bottom_up(instance):
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY while an exiting task (e.g. a zombie) still counts as a member
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {path}: {err.strerror}") from None
                kill(pids(instance), grace_seconds=0.5)
                time.sleep(0.05)
