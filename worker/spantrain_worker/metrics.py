"""Worker metrics (Prometheus), structured logs and the measured action timeline.

Role: make a running worker observable. ``WorkerMetrics`` owns one Prometheus registry per
process and serves it on ``WorkerEnv.metrics_port``:

  spantrain_worker_step_seconds            histogram of training-step wall time
  spantrain_worker_samples_total           samples of the global batch this rank computed
                                           (its rows of every micro-batch); summed over one
                                           stage's ranks it is the job's samples
  spantrain_worker_samples_per_second      global samples / step time (every rank reports it)
  spantrain_worker_compute_seconds_total   time in F/B/W/optimizer work
  spantrain_worker_communication_seconds_total  gradient all-reduce, loss/norm reduce, sends
  spantrain_worker_idle_seconds_total      waiting for a peer's activations or gradients
                                           (pipeline bubbles plus un-overlapped transfer time)
  spantrain_worker_sent_bytes_total{peer}, spantrain_worker_received_bytes_total{peer}
  spantrain_worker_loss                    global mean training loss of the last step
  spantrain_worker_step                    last completed step
  spantrain_worker_adaptations_total{kind}  adaptations taken (``rebalance``)
  spantrain_worker_adaptation_gain         predicted step-time gain of the last adaptation
  spantrain_worker_adaptation_step         first step trained under the last adaptation

All carry ``spantrain_namespace`` and ``spantrain_job`` (the SpanTrainJob; not ``job`` and
``namespace``, which Prometheus scrape configs set as target labels and would rename to
``exported_*``), ``stage``, ``rank`` and ``device`` (the plan's device id), so every series
names its job whatever scrapes it; the operator's per-job series use the same two names.
``log_event`` writes one line per event,
``job=<job> stage=<s> rank=<r> event=<name> key=value ...``, so logs of many pods interleave
readably and grep well. ``Timeline`` records each action's wall-clock start and end; the chart
module draws it with the planner's ``Interval`` type, like a simulated timeline.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def make_logger(job: str, stage: int, rank: int) -> logging.Logger:
    logger = logging.getLogger(f"spantrain.worker.{rank}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s job={job} stage={stage} rank={rank} %(message)s"
        ))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def format_fields(event: str, **fields: Any) -> str:
    parts = [f"event={event}"]
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def log_event(logger: logging.Logger, event: str, **fields: Any) -> None:
    logger.info(format_fields(event, **fields))


@dataclass(frozen=True)
class StepStats:
    """What one rank measured in one step (seconds, bytes)."""

    step: int
    loss: float
    step_seconds: float
    compute_seconds: float
    communication_seconds: float
    idle_seconds: float
    samples_per_second: float
    grad_norm: float
    learning_rate: float


#: The label names every worker series carries (``spantrain_job``: the SpanTrainJob's name).
LABELS = ("spantrain_namespace", "spantrain_job", "stage", "rank", "device")


class WorkerMetrics:
    def __init__(
        self, job: str, stage: int, rank: int, port: int = 0, *,
        namespace: str = "", device: str = "",
    ) -> None:
        self.registry = CollectorRegistry()
        labels = dict(zip(LABELS, (namespace, job, str(stage), str(rank), device), strict=True))
        names = list(labels)
        self._labels = labels

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        self.step_seconds = Histogram(
            "spantrain_worker_step_seconds", "Wall time of one training step.", names,
            buckets=STEP_BUCKETS, registry=self.registry,
        ).labels(**labels)
        self.samples = counter(
            "spantrain_worker_samples",
            "Samples of the global batch this rank computed (its rows of every micro-batch).")
        self.samples_per_second = gauge(
            "spantrain_worker_samples_per_second", "Global samples per second (last step).")
        self.compute = counter(
            "spantrain_worker_compute_seconds", "Seconds in forward/backward/optimizer work.")
        self.communication = counter(
            "spantrain_worker_communication_seconds",
            "Seconds in all-reduces and waiting for sends to finish.")
        self.idle = counter(
            "spantrain_worker_idle_seconds",
            "Seconds waiting for a peer's activations or gradients.")
        self.loss = gauge("spantrain_worker_loss", "Global mean training loss (last step).")
        self.step = gauge("spantrain_worker_step", "Last completed training step.")
        self._sent = Counter(
            "spantrain_worker_sent_bytes", "Bytes sent to a peer rank.", [*names, "peer"],
            registry=self.registry,
        )
        self._received = Counter(
            "spantrain_worker_received_bytes", "Bytes received from a peer rank.",
            [*names, "peer"], registry=self.registry,
        )
        self._adaptations = Counter(
            "spantrain_worker_adaptations", "Adaptations of the running plan, by kind.",
            [*names, "kind"], registry=self.registry,
        )
        self.adaptation_gain = gauge(
            "spantrain_worker_adaptation_gain",
            "Predicted step-time gain (old/new - 1) of the last adaptation.")
        self.adaptation_step = gauge(
            "spantrain_worker_adaptation_step", "First step trained under the last adaptation.")
        if port:
            start_http_server(port, registry=self.registry)

    def adapted(self, kind: str, gain: float, step: int) -> None:
        self._adaptations.labels(**self._labels, kind=kind).inc()
        self.adaptation_gain.set(gain)
        self.adaptation_step.set(step)

    def add_bytes(self, sent: dict[int, int], received: dict[int, int]) -> None:
        for peer, n in sent.items():
            self._sent.labels(**self._labels, peer=str(peer)).inc(n)
        for peer, n in received.items():
            self._received.labels(**self._labels, peer=str(peer)).inc(n)

    def observe(self, stats: StepStats, samples: int = 0) -> None:
        """Record one step; ``samples`` is how many of its samples this rank computed."""
        self.step_seconds.observe(stats.step_seconds)
        self.samples.inc(samples)
        self.samples_per_second.set(stats.samples_per_second)
        self.compute.inc(stats.compute_seconds)
        self.communication.inc(stats.communication_seconds)
        self.idle.inc(stats.idle_seconds)
        self.loss.set(stats.loss)
        self.step.set(stats.step)


@dataclass(frozen=True)
class TimedAction:
    rank: int
    step: int
    kind: str  # F, B, W, BW, AR (gradient sync), OPT
    microbatch: int
    start: float  # wall clock, seconds
    end: float


class Timeline:
    """Per-action wall-clock intervals of the steps a rank chose to record."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.actions: list[TimedAction] = []

    def add(self, step: int, kind: str, microbatch: int, start: float, end: float) -> None:
        self.actions.append(TimedAction(self.rank, step, kind, microbatch, start, end))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps([asdict(a) for a in self.actions]))


def read_timelines(paths: list[Path]) -> list[TimedAction]:
    actions: list[TimedAction] = []
    for p in paths:
        actions.extend(TimedAction(**row) for row in json.loads(p.read_text()))
    return actions
