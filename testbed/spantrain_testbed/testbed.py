"""The testbed object: bring an emulated cluster up, run processes in it, tear it down.

Role: the library face of ``spantrain_testbed`` (``Testbed``, ``sweep``, ``sweep_all``), used
by the CLI, ``spantrain local --emulate``, the root tests and ``bench/cee.py``. Combines
``netns`` (namespaces, bridges, token buckets) and ``cgroups`` (CPU quotas) for one *instance*
``N``: every kernel object it makes is named ``stbN-…`` (cgroups ``stbN``) and a state file
``/run/spantrain-testbed/stbN.json`` is written *before* anything is created, so
``down``/``sweep`` can always find what a crashed run left behind. ``up()`` first sweeps its
own instance and every instance whose recorded owner process is dead. Everything is
idempotent; ``with Testbed(...) as tb:`` tears down on exit.

Enforced: bandwidth per ordered node pair (``htb``/``tbf`` token buckets) and compute per
device (cgroup v1 CFS quota ∝ FLOP/s, all devices within ``budget_cores`` of this machine,
one thread per process). NOT enforced: latency (no ``netem`` in this kernel).

Must not import torch, ``spantrain_worker`` or ``spantrain_operator``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from spantrain_planner.core import contract
from spantrain_planner.inputs.cluster import Device, Topology

from . import cgroups, netns
from .cgroups import CpuQuota, plan_quotas
from .netns import NetPlan, plan_network

STATE_DIR = Path("/run/spantrain-testbed")

#: Run a command as the given device: join its cgroups (cpu + cpuacct), then its namespace.
#: ``ip netns exec`` execs in place, so the Popen's pid is the command's pid.
_ENTER = (
    'ns="$1"; echo $$ > "$2" && echo $$ > "$3" || exit 125; shift 3; '
    'exec ip netns exec "$ns" "$@"'
)


class TestbedError(RuntimeError):
    """The testbed cannot be built or used (not root, no cgroup v1, unknown device…)."""

    __test__ = False  # not a pytest class


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / "lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def state_path(instance: int) -> Path:
    return STATE_DIR / f"stb{instance}.json"


def pace_path(instance: int, index: int) -> Path:
    """The file holding a device's current CPU share (``contract.PACE_FILE``)."""
    return STATE_DIR / f"stb{instance}-d{index}.pace"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts: it cannot be ours to
    sweep). Also used by the tests' control-plane harness for its own leftovers."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_alive(pid: int | None) -> bool:
    return True if pid is None else pid_alive(pid)  # None: persistent (CLI ``up``)


def _read_state(instance: int) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(instance).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _sweep_unlocked(instance: int) -> None:
    # processes first (cgroup members, then anything else left in the namespaces), then links
    cgroups.kill(cgroups.pids(instance))
    namespaces, _ = netns.leftovers(instance)
    stray = sorted({pid for ns in namespaces for pid in netns.netns_pids(ns)})
    cgroups.kill(stray)
    cgroups.remove(instance)
    netns.remove(instance)
    with contextlib.suppress(FileNotFoundError):
        state_path(instance).unlink()
    for pace in STATE_DIR.glob(f"stb{instance}-d*.pace"):
        pace.unlink(missing_ok=True)


def instances_present() -> set[int]:
    """Instances with any state file, namespace, link or cgroup left on this machine."""
    found = netns.instances_present() | cgroups.instances_present()
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("stb*.json"):
            with contextlib.suppress(ValueError):
                found.add(int(path.stem[3:]))
    return found


def sweep(instance: int) -> None:
    """Remove everything of one instance: processes, cgroups, namespaces, links, state."""
    _require_root()
    with _locked():
        _sweep_unlocked(instance)


def sweep_all() -> list[int]:
    """Remove every testbed instance on this machine (``down --all``); returns which."""
    _require_root()
    with _locked():
        found = sorted(instances_present())
        for instance in found:
            _sweep_unlocked(instance)
    return found


def sweep_orphans() -> list[int]:
    """Remove instances whose owner process is gone (a crashed run); returns which."""
    _require_root()
    with _locked():
        gone = []
        for instance in sorted(instances_present()):
            state = _read_state(instance)
            # no state file: nobody owns it (``up`` writes it, under the lock, before creating)
            owner = state.get("owner_pid") if state else 0
            if not _pid_alive(owner):
                _sweep_unlocked(instance)
                gone.append(instance)
    return gone


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (network namespaces, tc, cgroups)")


@dataclass
class Testbed:
    """One emulated cluster on this machine.

    ``instance`` picks the names (``stbN-``) and the subnet (10.210.N.0/24); ``persistent``
    (the CLI's ``up``) records no owner, so no other run's start-up sweep removes it.
    ``bandwidth_scale`` multiplies every link rate; ``cores_per_tflops`` fixes the compute
    scale (default: all devices together get ``budget_cores``).
    """

    __test__ = False  # not a pytest class

    topology: Topology
    instance: int = 0
    budget_cores: float = cgroups.DEFAULT_BUDGET_CORES
    cores_per_tflops: float | None = None
    bandwidth_scale: float = 1.0
    shares: int = cgroups.DEFAULT_SHARES
    persistent: bool = False
    #: networks reached through a device (device index -> CIDRs), shaped like the device
    routed: Mapping[int, Sequence[str]] | None = None

    def __post_init__(self) -> None:
        self.net: NetPlan = plan_network(
            self.topology, self.instance, self.bandwidth_scale, self.routed
        )
        self.quotas: list[CpuQuota] = plan_quotas(
            [d.id for d in self.topology.devices],
            [d.flops for d in self.topology.devices],
            budget_cores=self.budget_cores,
            cores_per_tflops=self.cores_per_tflops,
        )
        self._up = False

    # -- lifecycle -----------------------------------------------------------------------

    def up(self) -> Testbed:
        """Create everything (after sweeping leftovers); on any failure remove it again."""
        _require_root()
        cgroups.check_available()
        sweep_orphans()
        with _locked():
            _sweep_unlocked(self.instance)
            state_path(self.instance).write_text(json.dumps(self.describe(), indent=1))
            try:
                cgroups.create(self.instance, self.quotas, self.shares)
                for q in self.quotas:
                    pace_path(self.instance, q.index).write_text(f"{q.cores:.6g}\n")
                netns.apply(self.net)
            except BaseException:
                _sweep_unlocked(self.instance)
                raise
        self._up = True
        return self

    def down(self) -> None:
        """Remove everything of this instance (idempotent; safe if ``up`` never ran)."""
        sweep(self.instance)
        self._up = False

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- devices -------------------------------------------------------------------------

    def device_index(self, device: int | str) -> int:
        if isinstance(device, int):
            if not 0 <= device < len(self.net.devices):
                raise TestbedError(f"device index {device} out of 0..{len(self.net.devices) - 1}")
            return device
        for dev in self.net.devices:
            if device in (dev.device_id, dev.netns):
                return dev.index
        known = ", ".join(d.device_id for d in self.net.devices)
        raise TestbedError(f"unknown device {device!r}; this testbed has: {known}")

    def address(self, device: int | str) -> str:
        return self.net.devices[self.device_index(device)].address

    def ifname(self, device: int | str) -> str:
        return self.net.devices[self.device_index(device)].ns_if

    def netns_name(self, device: int | str) -> str:
        return self.net.devices[self.device_index(device)].netns

    def device_env(self, device: int | str) -> dict[str, str]:
        """What a process on ``device`` needs: its interface and address, one thread, and its
        CPU share (``contract.PACE_CORES``: SpanTrain's worker pads each compute action to at
        least its CPU time / this share, because a CFS quota lets a process that was idle run
        its first quota's worth of CPU at full speed, which a slow GPU does not do: at a
        quarter core, 2 ms of CPU after 30 ms idle took 3.2 ms instead of 8 ms)."""
        index = self.device_index(device)
        dev = self.net.devices[index]
        return {
            contract.PACE_CORES: f"{self.quotas[index].cores:.6g}",
            contract.PACE_FILE: str(pace_path(self.instance, index)),
            "GLOO_SOCKET_IFNAME": dev.ns_if,
            "TP_SOCKET_IFNAME": dev.ns_if,
            contract.DEVICE_ADDR: dev.address,
            contract.TESTBED_DEVICE: dev.device_id,
            contract.TESTBED_INSTANCE: str(self.instance),
            "MASTER_ADDR": self.net.devices[0].address,
            contract.NUM_THREADS: "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }

    def run(
        self,
        device: int | str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the device's namespace and cgroups; returns its Popen.

        Environment: this process's, then ``device_env`` (``GLOO_SOCKET_IFNAME``,
        ``MASTER_ADDR`` = device 0's address, one thread…), then ``env`` (wins).
        Extra keyword arguments go to ``subprocess.Popen`` (stdout, cwd…).
        """
        index = self.device_index(device)
        if not argv:
            raise TestbedError("run: empty command")
        dev = self.net.devices[index]
        cpu_procs, acct_procs = cgroups.procs_files(self.instance, index)
        if not cpu_procs.exists():
            raise TestbedError(f"testbed instance {self.instance} is not up (no {cpu_procs})")
        full_env = dict(os.environ)
        full_env.update(self.device_env(index))
        full_env.update(env or {})
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("start_new_session", True)
        proc = subprocess.Popen(
            ["sh", "-c", _ENTER, "testbed-enter", dev.netns, str(cpu_procs), str(acct_procs),
             *argv],
            env=full_env,
            **popen,
        )
        # return only once the process is inside its cgroup, so that a ``down`` right after
        # finds it (the shell writes its pid before it execs the command)
        deadline = time.monotonic() + 10.0
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if str(proc.pid) in cpu_procs.read_text().split():
                    break
            time.sleep(0.002)
        return proc

    def enforce_compute(
        self, enforced: bool = True, devices: Iterable[int | str] | None = None
    ) -> None:
        """Switch the per-device CPU quotas on (default) or off (all devices together still
        within ``budget_cores``) for ``devices`` (default: all); measure only while they are
        on."""
        chosen = (self.quotas if devices is None
                  else [self.quotas[self.device_index(d)] for d in devices])
        cgroups.set_limits(self.instance, chosen, enforced)

    def set_cores(self, device: int | str, cores: float) -> None:
        """Change a device's CPU quota now, also under a running process (a device that
        slows down: the adapter benchmark halves one mid-run)."""
        index = self.device_index(device)
        self.quotas[index] = replace(self.quotas[index], cores=cores)
        cgroups.set_limits(self.instance, [self.quotas[index]])
        # the workers' pacing follows (their actions last at least CPU time / share)
        pace_path(self.instance, index).write_text(f"{cores:.6g}\n")

    def scale_links(self, factor: float, interfaces: Iterable[str] | None = None) -> None:
        """Set the token buckets of ``interfaces`` (default: every shaped one) to ``factor``
        times their planned rates now, traffic flowing or not (``1.0`` restores them)."""
        wanted = None if interfaces is None else set(interfaces)
        for shaping in self.net.shaping:
            if wanted is None or shaping.interface in wanted:
                for cmd in netns.rate_commands(shaping, factor):
                    netns.run_cmd(cmd)

    def startup_gate(
        self, losses: Path, devices: Iterable[int | str] | None = None, *, after_rows: int = 0
    ) -> StartupGate:
        """Lift ``devices``' quotas (default: all) until a run writes its first row to
        ``losses`` (a restarted run: a row past its first ``after_rows``); see
        ``StartupGate``."""
        return StartupGate(self, losses, None if devices is None else tuple(devices),
                           after_rows=after_rows)

    # -- reporting -----------------------------------------------------------------------

    def cpu_seconds(self, device: int | str) -> float:
        return cgroups.usage_seconds(self.instance, self.device_index(device))

    def describe(self) -> dict[str, Any]:
        """Everything about the instance as plain data (the state file, ``status``)."""
        topo = self.topology
        return {
            "instance": self.instance,
            "cluster": topo.name,
            "owner_pid": None if self.persistent else os.getpid(),
            "subnet": netns.subnet(self.instance),
            "bandwidth_scale": self.bandwidth_scale,
            "budget_cores": self.budget_cores,
            "latency_emulated": False,
            "latency_note": self.net.notes[0],
            "devices": [
                {
                    **asdict(dev),
                    "tflops": topo.devices[dev.index].flops / 1e12,
                    "cores": self.quotas[dev.index].cores,
                    "quota_us": self.quotas[dev.index].quota_us,
                    "period_us": self.quotas[dev.index].period_us,
                }
                for dev in self.net.devices
            ],
            "nodes": [asdict(node) for node in self.net.nodes],
            "shaping": [asdict(s) for s in self.net.shaping],
            "topology": {
                "bandwidth": [list(row) for row in topo.bandwidth],
                "latency": [list(row) for row in topo.latency],
            },
        }

    @classmethod
    def from_state(cls, instance: int) -> Testbed:
        """The live instance ``instance`` as recorded by its ``up`` (for CLI ``run``)."""
        state = _read_state(instance)
        if state is None:
            raise TestbedError(
                f"testbed instance {instance} is not up (no {state_path(instance)}); "
                f"run `spantrain testbed up CLUSTER.yaml --instance {instance}` first"
            )
        return cls._from_description(state)

    @classmethod
    def _from_description(cls, state: dict[str, Any]) -> Testbed:
        nodes = state["nodes"]
        devs = tuple(
            Device(index=d["index"], id=d["device_id"], node=nodes[d["node_index"]]["name"],
                   tier="", zone=None, arch="", accelerator="", flops=d["tflops"] * 1e12,
                   memory_bytes=0)
            for d in state["devices"]
        )
        topo = Topology(
            state["cluster"], devs,
            tuple(tuple(r) for r in state["topology"]["bandwidth"]),
            tuple(tuple(r) for r in state["topology"]["latency"]),
        )
        cores = [d["cores"] for d in state["devices"]]
        tb = cls(
            topo,
            instance=state["instance"],
            budget_cores=state["budget_cores"],
            cores_per_tflops=cores[0] / devs[0].flops * 1e12,
            bandwidth_scale=state["bandwidth_scale"],
            persistent=state["owner_pid"] is None,
        )
        tb._up = True
        return tb


@dataclass
class StartupGate:
    """CPU quotas lifted while a training run starts, enforced from its first step's end on.

    Importing torch and meeting at the rendezvous take a 0.1-core device minutes, and nothing
    of that is measured; step 0 is excluded from measurements anyway. Made lifted; ``poll()``
    (call it every tick) enforces the quotas once ``losses`` holds a row — rank 0 writes it
    when step 0 is done everywhere; ``close()`` enforces them whatever happened.
    """

    testbed: Testbed
    losses: Path
    devices: tuple[int | str, ...] | None = None
    enforced: bool = False
    after_rows: int = 0  #: rows already there (a restart): enforce from the next one on

    def __post_init__(self) -> None:
        self.testbed.enforce_compute(False, self.devices)

    def poll(self) -> bool:
        """Enforce once the first (new) row is there; True from then on."""
        if not self.enforced:
            with contextlib.suppress(OSError):
                if len(self.losses.read_text().splitlines()) > self.after_rows:
                    self.close()
        return self.enforced

    def close(self) -> None:
        self.testbed.enforce_compute(True, self.devices)
        self.enforced = True


def status(instance: int | None = None) -> list[dict[str, Any]]:
    """What is on this machine: per instance, its state and which objects are present."""
    out = []
    wanted = sorted(instances_present()) if instance is None else [instance]
    for inst in wanted:
        state = _read_state(inst)
        namespaces, links = netns.leftovers(inst)
        entry: dict[str, Any] = {
            "instance": inst,
            "state": state is not None,
            "cluster": state.get("cluster") if state else None,
            "owner_pid": state.get("owner_pid") if state else None,
            "owner_alive": _pid_alive(state.get("owner_pid")) if state else False,
            "namespaces": len(namespaces),
            "links": len(links),
            "cgroups": inst in cgroups.instances_present(),
            "processes": len(cgroups.pids(inst)),
        }
        if state:
            devices = []
            for dev in state["devices"]:
                usage = None
                with contextlib.suppress(OSError):
                    usage = round(cgroups.usage_seconds(inst, dev["index"]), 3)
                devices.append({"device": dev["device_id"], "netns": dev["netns"],
                                "address": dev["address"], "ifname": dev["ns_if"],
                                "cores": round(dev["cores"], 4), "cpu_seconds": usage})
            entry["devices"] = devices
            entry["shaping"] = [
                {"interface": s["interface"], "netns": s["netns"], "kind": s["kind"],
                 "classes": [f"{c['label']}: {c['bits_per_second'] / 1e6:g} Mbit/s"
                             for c in s["classes"]]}
                for s in state["shaping"]
            ]
        out.append(entry)
    return out
