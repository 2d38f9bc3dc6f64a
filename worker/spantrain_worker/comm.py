"""Everything that talks to ``torch.distributed``: rendezvous, process groups, P2P, collectives.

Role: the one module of the worker that calls ``torch.distributed`` (the runtime, checkpoint
and metrics modules stay testable without process groups). It provides

* ``rendezvous()`` — a ``TCPStore`` served by rank 0; every rank announces itself and its plan
  digest, and a rank that waits too long gets an error naming the ranks (and their devices)
  that never arrived, *before* ``init_process_group`` would hang without saying who is missing;
* ``Comm`` — the process groups one plan needs: one group per stage of width > 1 (gradient
  all-reduce), and one two-rank group per *channel* (an ordered sender/receiver pair at a
  stage boundary, one for activations and one for gradients). A channel carries its messages
  in micro-batch order on both ends, so a receiver can post every receive of a step up front
  and no send can wait behind a message of the other direction: this holds for gloo (where
  tags alone would suffice) and for NCCL (which serialises all P2P traffic of a communicator
  on one stream and ignores tags), so CPU and GPU share one code path.

Backend: NCCL when the worker's device is CUDA, else gloo (``device_and_backend``).

Interface: gloo and NCCL announce the address they get by resolving the host name, which in a
``hostNetwork`` pod on a node whose network namespace differs from its UTS host name is an
address the peers cannot reach. ``set_socket_ifname`` (called before ``init_process_group``)
sets ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` to the interface holding the pod's IP
(``contract.POD_IP``, from ``status.podIP``) unless the user set them; the choice
(``socket_ifname_env``) is pure, reading the interfaces (``local_addresses``) is not.

Must not import kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

# torch.distributed re-exports these from torch._C without ``as`` (no explicit re-export in
# its stubs); the public path is the supported one, so only the stub check is silenced.
from torch.distributed import PrefixStore, Store, TCPStore  # type: ignore[attr-defined]

from spantrain_planner.core import contract
from spantrain_planner.inputs.plan import Plan, boundary_transfers

Direction = Literal["act", "grad"]


class RendezvousError(RuntimeError):
    """Some ranks never arrived (or disagree on the plan); the message names them."""


@dataclass(frozen=True)
class RendezvousEnv:
    """What the operator (or ``spantrain local``) puts in every worker's environment."""

    master_addr: str
    master_port: int
    world_size: int
    rank: int
    timeout_seconds: float = 300.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RendezvousEnv:
        env = dict(os.environ if env is None else env)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK") if k not in env]
        if missing:
            raise RendezvousError(
                f"environment lacks {', '.join(missing)}; the operator sets them in every pod "
                "(spantrain local sets them for local processes)"
            )
        return cls(
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            world_size=int(env["WORLD_SIZE"]),
            rank=int(env["RANK"]),
            timeout_seconds=contract.number(
                env, contract.RENDEZVOUS_TIMEOUT, contract.RENDEZVOUS_TIMEOUT_SECONDS),
        )


def device_and_backend(wanted: str = "auto") -> tuple[torch.device, str]:
    """CUDA + NCCL if a GPU is visible (or ``wanted`` is cuda), else CPU + gloo."""
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "nccl"
    return torch.device("cpu"), "gloo"


SIOCGIFADDR = 0x8915  # linux/sockios.h: get an interface's (primary) IPv4 address


def _ipv4_of(ifname: str) -> str | None:
    """The primary IPv4 address of ``ifname`` (ioctl SIOCGIFADDR), None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(
                sock.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15])
            )
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _ipv6_addresses(path: Path = Path("/proc/net/if_inet6")) -> dict[str, list[str]]:
    """IPv6 addresses by interface from ``/proc/net/if_inet6`` (empty where it is missing)."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and len(fields[0]) == 32:
                addr = str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
                out.setdefault(fields[5], []).append(addr)
    return out


def local_addresses() -> dict[str, list[str]]:
    """The addresses of this network namespace's interfaces, by interface name (stdlib only:
    ``socket.if_nameindex`` + SIOCGIFADDR for IPv4, ``/proc/net/if_inet6`` for IPv6)."""
    out: dict[str, list[str]] = {}
    for _, name in socket.if_nameindex():
        ipv4 = _ipv4_of(name)
        if ipv4 is not None:
            out.setdefault(name, []).append(ipv4)
    for name, addrs in _ipv6_addresses().items():
        out.setdefault(name, []).extend(addrs)
    return out


def interface_for_ip(ip: str, addresses: Mapping[str, list[str]]) -> str | None:
    """The interface holding ``ip`` (first by name, for determinism), or None."""
    try:
        wanted = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    for name in sorted(addresses):
        for addr in addresses[name]:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(addr.split("%")[0]) == wanted:
                    return name
    return None


def socket_ifname_env(
    env: Mapping[str, str], addresses: Mapping[str, list[str]]
) -> dict[str, str]:
    """The ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` to set: the interface holding
    the pod's IP (``contract.POD_IP``), for each variable the user left unset (or set
    empty). Empty when the pod IP is unknown or no interface holds it (torch then resolves
    the host name). NCCL reads its variable as a prefix list, so it gets ``=name`` (exactly
    this interface)."""
    pod_ip = env.get(contract.POD_IP, "").strip()
    if not pod_ip:
        return {}
    ifname = interface_for_ip(pod_ip, addresses)
    if ifname is None:
        return {}
    wanted = {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": f"={ifname}"}
    return {k: v for k, v in wanted.items() if not env.get(k)}


def set_socket_ifname(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Put ``socket_ifname_env``'s choice into ``os.environ`` (read by gloo and NCCL when the
    process group is created); returns what it set."""
    chosen = socket_ifname_env(os.environ if env is None else env, local_addresses())
    os.environ.update(chosen)
    return chosen


def missing_ranks(store: Store, world_size: int) -> list[int]:
    """Ranks whose arrival key is not in the store."""
    return [r for r in range(world_size) if not store.check([f"arrived/{r}"])]


def rendezvous(
    env: RendezvousEnv, plan: Plan, device_names: dict[int, str] | None = None
) -> Store:
    """Meet every rank at the store; fail with the names of the ranks that never came."""
    names = device_names or {}
    timeout = timedelta(seconds=env.timeout_seconds)
    try:
        store = TCPStore(
            env.master_addr, env.master_port, None, env.rank == 0, timeout,
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as err:
        raise RendezvousError(
            f"rank {env.rank}: cannot reach the rendezvous store at {env.master_addr}:"
            f"{env.master_port} served by rank 0 ({names.get(0, 'device unknown')}) within "
            f"{env.timeout_seconds:.0f}s: {err}. Rank 0 never came up, or MASTER_ADDR/"
            "MASTER_PORT are wrong; raise " + contract.RENDEZVOUS_TIMEOUT + " for slow starts"
        ) from None
    digest = plan.digest()
    store.set(f"plan/{env.rank}", digest)
    store.set(f"arrived/{env.rank}", "1")
    deadline = time.monotonic() + env.timeout_seconds
    keys = [f"arrived/{r}" for r in range(env.world_size)]
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = missing_ranks(store, env.world_size)
            who = ", ".join(f"rank {r} ({names.get(r, '?')})" for r in missing)
            raise RendezvousError(
                f"rank {env.rank}: after {env.timeout_seconds:.0f}s these ranks never "
                f"arrived at {env.master_addr}:{env.master_port}: {who}. Check their pods "
                "(scheduling, image pull, crash) or raise " + contract.RENDEZVOUS_TIMEOUT
            )
        time.sleep(0.05)
    other = store.get("plan/0").decode()
    if other != digest:
        raise RendezvousError(
            f"rank {env.rank} runs plan {digest} but rank 0 runs plan {other}; every worker "
            "must mount the same plan.json (the operator restarts pods after a re-plan)"
        )
    return store


def init_process_group(
    store: Store, env: RendezvousEnv, backend: str, device: torch.device
) -> None:
    dist.init_process_group(
        backend,
        store=PrefixStore("spantrain/pg", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=max(env.timeout_seconds, 60.0)),
        # NCCL binds the communicator to the device eagerly; gloo takes no device
        device_id=device if backend == "nccl" else None,
    )


@dataclass(frozen=True)
class Channel:
    """An ordered pair at stage boundary ``boundary`` carrying ``direction`` traffic."""

    boundary: int  # stage s -> s+1
    src: int
    dst: int
    direction: Direction


def plan_channels(plan: Plan) -> list[Channel]:
    """Every channel of a plan in one deterministic order (every rank creates the same groups)."""
    channels: list[Channel] = []
    for s in range(plan.pp_degree - 1):
        for t in boundary_transfers(plan, s):
            channels.append(Channel(s, t.src, t.dst, "act"))
            channels.append(Channel(s, t.dst, t.src, "grad"))
    return channels


#: tags of ``Comm.time_transfers`` (above every tag the runtime's transfers use)
PROBE_TAG = 1 << 24


class Comm:
    """Process groups and the operations the runtime uses, for one rank of one plan."""

    def __init__(self, plan: Plan, rank: int) -> None:
        self.rank = rank
        self.world_size = plan.world_size
        self.stage_group: dist.ProcessGroup | None = None
        for stage in plan.stages:
            if stage.dp_degree > 1:
                group = dist.new_group([d.rank for d in stage.devices])
                if rank in (d.rank for d in stage.devices):
                    self.stage_group = group
        self._channels: dict[tuple[int, int], dist.ProcessGroup] = {}
        self._made: set[tuple[int, int]] = set()
        self.add_channels(plan)

    def add_channels(self, plan: Plan) -> None:
        """The channels ``plan`` needs that do not exist yet (a re-balanced plan may pair
        other ranks). Collective: every rank calls it with the same plan."""
        for ch in plan_channels(plan):
            if (ch.src, ch.dst) in self._made:
                continue
            self._made.add((ch.src, ch.dst))
            group = dist.new_group([ch.src, ch.dst])
            if self.rank in (ch.src, ch.dst):
                self._channels[(ch.src, ch.dst)] = group

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> dist.Work:
        group = self._channels[(self.rank, dst)]
        work = dist.isend(tensor, dst=dst, group=group, tag=tag)
        assert work is not None
        return work

    def irecv(self, tensor: torch.Tensor, src: int, tag: int) -> dist.Work:
        group = self._channels[(src, self.rank)]
        work = dist.irecv(tensor, src=src, group=group, tag=tag)
        assert work is not None
        return work

    def all_reduce_stage_async(self, tensor: torch.Tensor) -> dist.Work | None:
        """Start a sum over this rank's stage; ``wait()`` on the handle (None: width 1)."""
        if self.stage_group is None:
            return None
        work: dist.Work | None = dist.all_reduce(
            tensor, op=dist.ReduceOp.SUM, group=self.stage_group, async_op=True)
        assert work is not None
        return work

    def all_reduce_world(self, tensor: torch.Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def time_transfers(self, transfers: Sequence[tuple[int, int, int]],
                       device: torch.device) -> list[float]:
        """Collective (every rank, same list): for each ``(src, dst, num_bytes)``, ``src``
        sends a one-element marker and then ``num_bytes`` to ``dst``, which times from the
        marker's arrival to the payload's -- the payload's time on the link, whatever either
        rank did before. Every rank gets every transfer's seconds."""
        seconds = torch.zeros(len(transfers), dtype=torch.float64)
        for k, (src, dst, num_bytes) in enumerate(transfers):
            if self.rank not in (src, dst):
                continue
            marker = torch.zeros(1, device=device)
            payload = torch.empty(max(1, num_bytes // 4), dtype=torch.float32, device=device)
            if self.rank == src:
                dist.send(marker, dst, tag=PROBE_TAG)
                dist.send(payload, dst, tag=PROBE_TAG + 1)
            else:
                dist.recv(marker, src, tag=PROBE_TAG)
                t0 = time.perf_counter()
                dist.recv(payload, src, tag=PROBE_TAG + 1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[k] = time.perf_counter() - t0
        self.all_reduce_world(seconds)
        return [float(x) for x in seconds]

    @staticmethod
    def shutdown() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
