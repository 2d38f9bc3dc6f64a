"""The dynamic adapter inside a running job: measure, agree, re-balance in place.

Role: the worker's edge of ``spantrain_planner.passes.adapt``. After every step it notes this
rank's compute seconds per sample row (the device's measured speed under the plan it runs,
pacing of an emulated device included); at the end of each window every rank puts its
window median into one world-size vector and sums it over the world, so all ranks hold the
same figures and ``Detector.propose`` gives all of them the same answer. A re-balance is then
taken by every rank before the next step (``StageTrainer.adopt``), and rank 0 records it:
a log event, ``adaptations.jsonl`` next to ``losses.jsonl``, and the worker's metrics
(``spantrain_worker_adaptations_total``), which the operator reads into the job's status.

A re-plan (mode ``replan``, and the starter gave the planner's inputs:
``WorkerEnv.replan_inputs_path``) starts when the step time grows more than the compute
explains (``StepWatch``): every rank takes part in timing one payload per node pair of the
plan (``Comm.time_transfers``), rank 0 plans afresh with the measured links
(``decide_replan``) and tells the others whether it pays for the measured restart. If it
does, the worker loop checkpoints, rank 0 writes the ``ReplanRecord`` (``contract.REPLAN_FILE``)
and every worker exits with ``contract.REPLAN_EXIT_CODE``; the starter restarts the job on the
new plan from that checkpoint.

Must not import torch.distributed (``comm`` does the collective), kopf, the Kubernetes client
or ``spantrain_operator``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spantrain_planner.inputs.cluster import resolve
from spantrain_planner.passes.adapt import (
    AdaptPolicy,
    Detector,
    LinkProbe,
    Rebalance,
    ReplanDecision,
    ReplanInputs,
    ReplanRecord,
    ReplanRequest,
    StepWatch,
    decide_replan,
    link_key,
    link_probes,
    node_link,
    window_median,
)

from .metrics import StepStats


@dataclass(frozen=True)
class Replan:
    """Every rank's view of a re-plan that pays (``decision`` on rank 0 only)."""

    step: int  #: the step the checkpoint will hold (the next one to train)
    gain: float
    decision: ReplanDecision | None
    probes: tuple[LinkProbe, ...]
    restart_seconds: float
    remaining_steps: int
    reason: str


#: why a re-plan was weighed (``Replan.reason``, records and events)
LINKS_SLOWED = "the step time grew more than the compute explains: the links slowed"
UNEVEN_STAGES = ("after a re-balance the stages still run at uneven speeds: moving layers "
                 "between them")


class Adapter:
    """One rank's adapter over a ``StageTrainer`` (``runtime``)."""

    def __init__(self, trainer: Any, mode: str, *, start_step: int,
                 policy: AdaptPolicy | None = None, out_dir: Path | None = None,
                 replan_inputs: ReplanInputs | None = None, total_steps: int = 0) -> None:
        self.trainer = trainer
        self.enabled = mode in ("rebalance", "replan")
        policy = policy or AdaptPolicy()
        self.detector = Detector(policy, start=start_step)
        self.steps = StepWatch(policy)
        self.replan_inputs = replan_inputs if mode == "replan" else None
        self.total_steps = total_steps
        #: the measured cost of a restart (process start to the end of its first step); the
        #: worker sets it after its first step
        self.restart_seconds: float | None = None
        self.out_dir = out_dir
        self._check_after_rebalance = False
        self._window: list[tuple[float, float, float]] = []
        self.history: list[dict[str, Any]] = []

    def after_step(self, step: int, stats: StepStats) -> Rebalance | Replan | None:
        """Call on every rank after every step; returns the re-balance taken (already in
        effect) or the re-plan to carry out (checkpoint, exit), if any."""
        if not self.enabled:
            return None
        role = self.trainer.role
        if self.detector.measuring(step):
            rows = role.num_rows * role.num_microbatches
            self._window.append((stats.compute_seconds / rows, stats.compute_seconds,
                                 stats.step_seconds))
        if not self.detector.due(step):
            return None
        world = self.trainer.plan.world_size
        figures = torch.zeros(3 * world, dtype=torch.float64)
        for k in range(3):
            figures[k * world + role.rank] = window_median([w[k] for w in self._window])
        self._window.clear()
        self.trainer.comm.all_reduce_world(figures)
        measured = {r: float(figures[r]) for r in range(world)}
        compute = max(float(figures[world + r]) for r in range(world))
        step_seconds = window_median([float(figures[2 * world + r]) for r in range(world)])
        proposal = self.detector.propose(self.trainer.plan, measured)
        links_slowed = proposal is None and self.steps.observe(step_seconds, compute)
        self._trace(step, measured, step_seconds, compute)
        if proposal is not None:
            self.trainer.adopt(proposal.plan)
            self.detector.adopted(step)
            self.steps.reset()
            self._record(step, proposal)
            # shares inside stages are the cheap fix; whether moving layers pays too is
            # weighed on the next window, measured under the new shares
            self._check_after_rebalance = True
            return proposal
        if self.replan_inputs is None:
            return None
        if links_slowed:
            return self._consider_replan(step, measured, probe=True, reason=LINKS_SLOWED)
        if self._check_after_rebalance:
            self._check_after_rebalance = False
            return self._consider_replan(step, measured, probe=False, reason=UNEVEN_STAGES)
        return None

    def _consider_replan(self, step: int, measured: dict[int, float], *, probe: bool,
                         reason: str) -> Replan | None:
        """Collective: time the plan's node pairs (``probe``), and (rank 0) plan afresh with
        them and the measured device speeds."""
        assert self.replan_inputs is not None
        trainer = self.trainer
        plan = trainer.plan
        timed: tuple[LinkProbe, ...] = ()
        if probe:
            probes = link_probes(plan, resolve(self.replan_inputs.cluster))
            seconds = trainer.comm.time_transfers(
                [(p.src_rank, p.dst_rank, p.num_bytes) for p in probes], trainer.device)
            timed = tuple(LinkProbe(p.src, p.dst, p.src_rank, p.dst_rank, p.num_bytes, t)
                          for p, t in zip(probes, seconds, strict=True))
        remaining = max(0, self.total_steps - step - 1)
        restart = self.restart_seconds if self.restart_seconds is not None else float("inf")
        decision = None
        flag = torch.zeros(2, dtype=torch.float64)
        if trainer.role.rank == 0:
            decision = decide_replan(plan, self.replan_inputs, timed,
                                     remaining_steps=remaining, restart_seconds=restart,
                                     seconds_per_row=measured)
            flag[0] = 1.0 if decision.pays else 0.0
            flag[1] = decision.gain
            self._trace_replan(step, timed, decision, restart, remaining, reason)
        trainer.comm.all_reduce_world(flag)
        # the running plan stays: the next windows compare against the slower links
        self.steps.reset()
        if flag[0] < 0.5:
            return None
        return Replan(step + 1, float(flag[1]), decision, timed, restart, remaining, reason)

    def _trace(self, step: int, measured: dict[int, float], step_seconds: float,
               compute: float) -> None:
        """Rank 0 appends each window's figures to ``adapter.jsonl``: what the adapter saw
        (seconds per row, per rank; the step and the slowest compute), the gain a re-balance
        would promise and its streak, and the step time the compute does not explain."""
        if self.out_dir is None or self.trainer.role.rank != 0:
            return
        with (self.out_dir / "adapter.jsonl").open("a") as fh:
            fh.write(json.dumps({
                "step": step, "secondsPerRow": {str(r): v for r, v in measured.items()},
                "stepSeconds": round(step_seconds, 6), "computeSeconds": round(compute, 6),
                "gain": round(self.detector.last_gain, 4),
                "streak": self.detector.streak,
                "unexplained": round(self.steps.last_excess, 4),
                "unexplainedStreak": self.steps.streak}) + "\n")

    def _trace_replan(self, step: int, probes: tuple[LinkProbe, ...],
                      decision: ReplanDecision, restart: float, remaining: int,
                      reason: str) -> None:
        if self.out_dir is None:
            return
        with (self.out_dir / "adapter.jsonl").open("a") as fh:
            fh.write(json.dumps({
                "step": step, "replanConsidered": True, "reason": reason,
                "measuredLinks": {link_key(p.src, p.dst): round(p.mbps, 3) for p in probes},
                "stepSecondsBefore": round(decision.before_seconds, 6),
                "stepSecondsAfter": round(decision.after_seconds, 6),
                "restartSeconds": round(restart, 3), "remainingSteps": remaining,
                "pays": decision.pays}) + "\n")

    def request(self, replan: Replan) -> ReplanRequest:
        """What every rank tells its starter (the pod's termination message)."""
        return ReplanRequest(
            step=replan.step, gain=replan.gain, restart_seconds=replan.restart_seconds,
            reason=replan.reason,
            measured_links={link_key(p.src, p.dst): p.mbps for p in replan.probes})

    def write_replan(self, replan: Replan, path: Path) -> None:
        """Rank 0: the ``ReplanRecord`` its starter restarts the job from."""
        decision = replan.decision
        assert decision is not None and self.replan_inputs is not None
        topology = resolve(self.replan_inputs.cluster)
        record = ReplanRecord(
            **self.request(replan).model_dump(),
            assumed_links={link_key(p.src, p.dst): node_link(topology, p.src, p.dst)[0]
                           for p in replan.probes},
            step_seconds_before=decision.before_seconds,
            step_seconds_after=decision.after_seconds,
            remaining_steps=replan.remaining_steps,
            cluster=decision.cluster, plan=json.loads(decision.plan.to_json()))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.model_dump_json(by_alias=True, indent=1))
        tmp.replace(path)

    def record_replan(self, replan: Replan) -> dict[str, Any]:
        """Rank 0: the ``adaptations.jsonl`` entry of a re-plan about to be carried out."""
        decision = replan.decision
        assert decision is not None
        entry = {
            "step": replan.step, "time": time.time(), "kind": "replan",
            "reason": replan.reason,
            "gain": round(replan.gain, 4),
            "measuredLinks": {link_key(p.src, p.dst): round(p.mbps, 3) for p in replan.probes},
            "stepSecondsBefore": decision.before_seconds,
            "stepSecondsAfter": decision.after_seconds,
            "restartSeconds": replan.restart_seconds,
            "remainingSteps": replan.remaining_steps,
            "stagesAfter": [len(s.devices) for s in decision.plan.stages],
        }
        self.history.append(entry)
        if self.out_dir is not None:
            with (self.out_dir / "adaptations.jsonl").open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        return entry

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
