"""Emulated slow devices and links for ``spantrain local`` (all processes on one machine).

Role: let one machine show a heterogeneous cluster's behaviour. Each worker process knows its
*slowdown* (fastest device's FLOP/s ÷ its own, from the cluster description) and the bandwidth
and latency of each of its channels (from the resolved topology), and pads:

* compute: an action that took ``c`` seconds of this thread's CPU lasts at least
  ``c * slowdown`` (so a device half as fast takes twice as long; sleeping frees the core for
  the others); measured in CPU time, a process that waited for a core (three workers and
  whatever else on two cores) is not slowed down a second time by the padding;
* links: the sender stamps each message with its send time (a one-element float64 header on
  the same ordered channel); the receiver, once the real transfer has landed, waits until
  ``max(sent, channel free) + bytes / bandwidth + latency`` — the planner's alpha-beta model
  with per-channel serialisation, overlapped with compute as on a real link;
* pacing (the kernel-level testbed, ``pace_cores``): a CFS CPU quota lets a process that
  was idle run its first quota's worth of CPU at full speed (``tests/testbed``, a quarter
  core: 2 ms of CPU after 30 ms idle took 3.2 ms instead of 8 ms), so a quota-limited device
  that idles between short actions would compute faster than its share, which a slow GPU
  does not; after each action the worker waits until the action has lasted its thread-CPU
  time / the share;
* all-reduce: a ring's ``2 (k-1)/k * bytes / slowest bandwidth + 2 (k-1) * latency`` per
  gradient bucket, the buckets one after another from their launch times.

Timestamps are wall-clock (``time.time()``), valid because every process shares one clock.
This is an emulation for demonstrations: the real kernel-level throttling (network namespaces,
token buckets, cgroup CPU quotas) is the separate testbed. ``Emulation.none()`` turns it off.

Pure apart from ``time.sleep``; must not import torch.distributed, kopf, the Kubernetes client
or ``spantrain_operator``.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from spantrain_planner.inputs.cluster import Topology
from spantrain_planner.inputs.plan import Plan

#: how often a worker re-reads its device's CPU share from ``Emulation.pace_file``
PACE_REREAD_SECONDS = 0.25


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Link(_Model):
    src: int
    dst: int
    bandwidth_bytes_per_second: float = Field(gt=0)
    latency_seconds: float = Field(0.0, ge=0)


class Emulation(_Model):
    """Per-rank slowdowns and per-rank-pair links of one plan."""

    slowdown: dict[int, float] = Field(default_factory=dict, description="rank -> factor >= 1")
    pace_cores: float | None = Field(
        None, gt=0, description="This device's CPU share on the testbed: every compute action "
        "lasts at least its CPU time / this share (no burst after idle).")
    pace_file: str | None = Field(
        None, description="A file holding the device's current CPU share (the testbed rewrites "
        "it when it changes the quota); read instead of pace_cores when present.")
    links: list[Link] = Field(default_factory=list)
    stage_ranks: list[list[int]] = Field(default_factory=list)

    @classmethod
    def none(cls) -> Emulation:
        return cls()

    def link(self, src: int, dst: int) -> Link | None:
        for link in self.links:
            if (link.src, link.dst) == (src, dst):
                return link
        return None

    def allreduce_seconds(self, rank: int, num_bytes: int) -> float:
        ranks = next((r for r in self.stage_ranks if rank in r), [rank])
        k = len(ranks)
        if k < 2:
            return 0.0
        ring = [self.link(a, b) for a, b in zip(ranks, ranks[1:] + ranks[:1], strict=True)]
        known = [x for x in ring if x is not None]
        if not known:
            return 0.0
        bw = min(x.bandwidth_bytes_per_second for x in known)
        lat = max(x.latency_seconds for x in known)
        return 2 * (k - 1) / k * num_bytes / bw + 2 * (k - 1) * lat


def emulation_for(plan: Plan, topology: Topology, *, time_scale: float = 1.0,
                  reference_flops: float | None = None) -> Emulation:
    """Slowdowns relative to ``reference_flops`` (this machine's measured speed, when the
    topology is calibrated to it) or else to the fastest device in the plan; links from the
    topology.

    ``time_scale`` multiplies link times (to make a slow WAN visible on a tiny model).
    """
    index = {dev.id: dev.index for dev in topology.devices}
    ranks = {d.rank: index[d.device_id] for st in plan.stages for d in st.devices}
    fastest = reference_flops or max(topology.devices[i].flops for i in ranks.values())
    slowdown = {r: max(1.0, fastest / topology.devices[i].flops) for r, i in ranks.items()}
    links = []
    for a, ia in ranks.items():
        for b, ib in ranks.items():
            if a != b:
                links.append(Link(
                    src=a, dst=b,
                    bandwidth_bytes_per_second=topology.bandwidth[ia][ib] / time_scale,
                    latency_seconds=topology.latency[ia][ib] * time_scale,
                ))
    return Emulation(
        slowdown=slowdown, links=links,
        stage_ranks=[[d.rank for d in st.devices] for st in plan.stages],
    )


def load_emulation(path: str | Path | None) -> Emulation:
    if not path:
        return Emulation.none()
    return Emulation.model_validate_json(Path(path).read_text())


class Emulator:
    """The stateful side: channel clocks and the sleeps (one per worker process)."""

    def __init__(self, emulation: Emulation, rank: int) -> None:
        self.spec = emulation
        self.rank = rank
        self.slowdown = emulation.slowdown.get(rank, 1.0)
        self.links_enabled = bool(emulation.links)
        self._channel_free: dict[int, float] = {}
        self._pace = emulation.pace_cores
        self._pace_read = 0.0

    def pace_cores(self) -> float | None:
        """The device's CPU share now: ``pace_file``'s value (re-read at most every quarter
        second; the testbed rewrites it when it changes the quota), else ``pace_cores``."""
        path = self.spec.pace_file
        now = time.monotonic()
        if path and now - self._pace_read >= PACE_REREAD_SECONDS:
            self._pace_read = now
            try:
                value = float(Path(path).read_text())
            except (OSError, ValueError):
                value = 0.0
            if value > 0:
                self._pace = value
        return self._pace

    def pad_compute(self, elapsed: float, cpu: float | None = None) -> float:
        """After an action of ``elapsed`` wall and ``cpu`` thread-CPU seconds: the slowdown's
        sleep, or (testbed) the wait that makes it last ``cpu / pace_cores`` at least.
        Returns the seconds added (part of the emulated device's compute time)."""
        t0 = time.perf_counter()
        if self.slowdown > 1.0:
            # the device's speed is the emulation's, whatever else holds this machine's
            # cores: an action lasts its CPU time x the slowdown (time the process waited
            # for a core counts towards it), not its wall time x the slowdown
            target = cpu * self.slowdown if cpu is not None else elapsed * self.slowdown
            if target > elapsed:
                time.sleep(target - elapsed)
        elif (pace := self.pace_cores()) is not None and cpu is not None:
            short = cpu / pace - elapsed
            if short > 0:
                time.sleep(short)
        else:
            return 0.0
        return time.perf_counter() - t0

    def arrival(self, src: int, sent_at: float, num_bytes: int) -> float:
        """Wall-clock time a message from ``src`` would land (advances the channel clock)."""
        link = self.spec.link(src, self.rank)
        if link is None:
            return sent_at
        start = max(sent_at, self._channel_free.get(src, 0.0))
        done = start + num_bytes / link.bandwidth_bytes_per_second
        self._channel_free[src] = done
        return done + link.latency_seconds

    @staticmethod
    def wait_until(when: float) -> None:
        delay = when - time.time()
        if delay > 0:
            time.sleep(delay)

    def pad_allreduce(self, launches: list[tuple[float, int]]) -> None:
        """Wait until the ring would have finished every bucket: each starts at its launch
        time or when the previous one is done, whichever is later (``gradsync``'s buckets)."""
        done = 0.0
        for at, num_bytes in launches:
            done = max(at, done) + self.spec.allreduce_seconds(self.rank, num_bytes)
        self.wait_until(done)
