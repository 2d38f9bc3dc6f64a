"""The dynamic adapter inside a running job: measure, agree, re-balance in place.

Role: the worker's edge of ``spantrain_planner.passes.adapt``. After every step it notes this
rank's compute seconds per sample row (the device's measured speed under the plan it runs,
pacing of an emulated device included); at the end of each window every rank puts its
window median into one world-size vector and sums it over the world, so all ranks hold the
same figures and ``Detector.propose`` gives all of them the same answer. A re-balance is then
taken by every rank before the next step (``StageTrainer.adopt``), and rank 0 records it:
a log event, ``adaptations.jsonl`` next to ``losses.jsonl``, and the worker's metrics
(``spantrain_worker_adaptations_total``), which the operator reads into the job's status.

Only ``rebalance`` happens in process; a re-plan moves layers and is the operator's (through
the checkpoint and a restart).

Must not import torch.distributed (``comm`` does the collective), kopf, the Kubernetes client
or ``spantrain_operator``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from spantrain_planner.passes.adapt import (
    AdaptPolicy,
    Detector,
    Rebalance,
    window_median,
)

from .metrics import StepStats


class Adapter:
    """One rank's adapter over a ``StageTrainer`` (``runtime``)."""

    def __init__(self, trainer: Any, mode: str, *, start_step: int,
                 policy: AdaptPolicy | None = None, out_dir: Path | None = None) -> None:
        self.trainer = trainer
        self.enabled = mode in ("rebalance", "replan")
        self.detector = Detector(policy or AdaptPolicy(), start=start_step)
        self.out_dir = out_dir
        self._window: list[float] = []
        self.history: list[dict[str, Any]] = []

    def after_step(self, step: int, stats: StepStats) -> Rebalance | None:
        """Call on every rank after every step; returns the re-balance taken, if any."""
        if not self.enabled:
            return None
        role = self.trainer.role
        if self.detector.measuring(step):
            rows = role.num_rows * role.num_microbatches
            self._window.append(stats.compute_seconds / rows)
        if not self.detector.due(step):
            return None
        world = self.trainer.plan.world_size
        figures = torch.zeros(world, dtype=torch.float64)
        figures[role.rank] = window_median(self._window)
        self._window.clear()
        self.trainer.comm.all_reduce_world(figures)
        measured = {r: float(figures[r]) for r in range(world)}
        proposal = self.detector.propose(self.trainer.plan, measured)
        self._trace(step, measured)
        if proposal is None:
            return None
        self.trainer.adopt(proposal.plan)
        self.detector.adopted(step)
        self._record(step, proposal)
        return proposal

    def _trace(self, step: int, measured: dict[int, float]) -> None:
        """Rank 0 appends each window's figures to ``adapter.jsonl``: what the adapter saw
        (seconds per row, per rank), the gain a re-balance would promise, and its streak."""
        if self.out_dir is None or self.trainer.role.rank != 0:
            return
        with (self.out_dir / "adapter.jsonl").open("a") as fh:
            fh.write(json.dumps({
                "step": step, "secondsPerRow": {str(r): v for r, v in measured.items()},
                "gain": round(self.detector.last_gain, 4),
                "streak": self.detector.streak}) + "\n")

    def _record(self, step: int, proposal: Rebalance) -> None:
        entry = {
            "step": step + 1, "time": time.time(), "kind": "rebalance",
            "reason": "measured device speeds departed from the plan's shares",
            "gain": round(proposal.gain, 4),
            "measuredSecondsPerRow": {str(r): v for r, v in proposal.seconds_per_row.items()},
            "sharesBefore": {str(r): v for r, v in proposal.old_shares.items()},
            "sharesAfter": {str(r): v for r, v in proposal.new_shares.items()},
            "stageSecondsBefore": proposal.stage_seconds_before,
            "stageSecondsAfter": proposal.stage_seconds_after,
        }
        self.history.append(entry)
        if self.out_dir is not None and self.trainer.role.rank == 0:
            with (self.out_dir / "adaptations.jsonl").open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
