"""The worker process: environment -> rendezvous -> stage -> training loop -> exit code.

Role: the pod entrypoint (``spantrain worker`` and ``python -m spantrain_worker.worker``) and
what ``spantrain local`` starts once per emulated device. Reads the environment contract
(``config``), meets the other ranks (``comm.rendezvous``), builds its ``StageTrainer``, resumes
from the newest checkpoint, trains, logs, exports metrics, checkpoints, and writes its
artefacts (losses, timeline, optional gradient dumps for tests) to ``WorkerEnv.output_dir``.

Must not import kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spantrain_planner.core.contract import REPLAN_EXIT_CODE, REPLAN_FILE, TERMINATION_LOG
from spantrain_planner.passes.adapt import Rebalance, ReplanInputs

from .adapter import Adapter, Replan
from .comm import (
    Comm,
    RendezvousEnv,
    RendezvousError,
    device_and_backend,
    init_process_group,
    set_socket_ifname,
)
from .comm import rendezvous as meet
from .config import WorkerEnv, load_plan, load_training
from .emulation import load_emulation
from .metrics import WorkerMetrics, log_event, make_logger
from .runtime import StageTrainer, stage_role


def _timeline_steps(raw: str | None, first: int, steps: int) -> set[int]:
    if raw:
        return {int(x) for x in raw.split(",") if x.strip()}
    return {max(first, steps - 2)}


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where there is none)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text()
                    .splitlines() if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return max(0.0, time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")))


def load_replan_inputs(path: str | None, log: Any) -> ReplanInputs | None:
    """What this worker may re-plan with (None: re-balance only, said in the log)."""
    if not path:
        return None
    try:
        return ReplanInputs.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        log_event(log, "replan-disabled", path=path, error=str(err)[:300])
        return None


def run(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    wenv = WorkerEnv.from_env(env)
    if wenv.num_threads is not None:
        torch.set_num_threads(wenv.num_threads)
    renv = RendezvousEnv.from_env(env)
    plan = load_plan(wenv.plan_path)
    cfg = load_training(wenv.training_path)
    role = stage_role(plan, renv.rank)
    log = make_logger(wenv.job, role.stage_index, renv.rank)
    if plan.world_size != renv.world_size:
        log_event(log, "error", reason="world size differs from the plan",
                  plan=plan.world_size, env=renv.world_size)
        return 2
    device, backend = device_and_backend(wenv.device)
    names = {d.rank: f"{d.device_id} on {d.node}" for st in plan.stages for d in st.devices}
    try:
        store = meet(renv, plan, names)
    except RendezvousError as err:
        log_event(log, "rendezvous-failed", error=str(err))
        print(f"spantrain worker: {err}", file=sys.stderr)
        return 3
    ifnames = set_socket_ifname(env)
    if ifnames:
        log_event(log, "socket-interface", **{k.lower(): v for k, v in ifnames.items()})
    init_process_group(store, renv, backend, device)
    comm = Comm(plan, renv.rank)
    emulation = load_emulation(wenv.emulation_path)
    if wenv.pace_cores is not None:
        emulation = emulation.model_copy(update={"pace_cores": wenv.pace_cores,
                                                 "pace_file": wenv.pace_file})
    trainer = StageTrainer(
        plan, renv.rank, cfg, comm, device=device,
        emulation=emulation,
        checkpoint_dir=wenv.checkpoint_dir or cfg.checkpoint.path,
    )
    out = Path(wenv.output_dir) if wenv.output_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    dump_step = wenv.dump_grads_step
    if dump_step is not None and out is not None:
        def dump(step: int, grads: dict[str, torch.Tensor]) -> None:
            if step == dump_step:
                torch.save(grads, out / f"grads-step{step}-stage{role.stage_index}.pt")
        trainer.grad_hook = dump
    resumed = trainer.restore()
    port = wenv.metrics_port
    metrics = WorkerMetrics(
        wenv.job, role.stage_index, renv.rank, port=port, namespace=wenv.namespace,
        device=next(d.device_id for st in plan.stages for d in st.devices
                    if d.rank == renv.rank),
    )
    adapter = Adapter(trainer, cfg.adapt, start_step=trainer.start_step, out_dir=out,
                      # a re-plan restarts the job: only with a checkpoint to restart from
                      replan_inputs=(load_replan_inputs(wenv.replan_inputs_path, log)
                                     if trainer.checkpoint_dir else None),
                      total_steps=cfg.steps)
    trainer.record_steps = _timeline_steps(wenv.timeline_steps, trainer.start_step, cfg.steps)
    log_event(log, "start", world=plan.world_size, backend=backend, device=str(device),
              layers=f"{role.layer_start}-{role.layer_end - 1}",
              rows=f"{role.row_start}-{role.row_end - 1}", schedule=plan.schedule,
              resumed_from=resumed if resumed is not None else "none")
    interval = cfg.checkpoint.interval_steps
    for step in range(trainer.start_step, cfg.steps):
        stats = trainer.train_step(step)
        metrics.observe(stats, trainer.role.num_rows * trainer.role.num_microbatches)
        metrics.add_bytes(*trainer.last_bytes)
        if step == trainer.start_step:  # what a restart costs: start to the first step done
            adapter.restart_seconds = process_age()
        taken = adapter.after_step(step, stats)
        replan = taken if isinstance(taken, Replan) else None
        if isinstance(taken, Rebalance):
            metrics.adapted("rebalance", taken.gain, step + 1)
            log_event(log, "rebalanced", step=step + 1, gain=round(taken.gain, 3),
                      rows=f"{trainer.role.row_start}-{trainer.role.row_end - 1}",
                      shares=",".join(f"{r}:{n}" for r, n in sorted(taken.new_shares.items())))
        if out is not None and renv.rank == 0:
            with (out / "losses.jsonl").open("a") as fh:
                fh.write(json.dumps({
                    "step": step, "loss": stats.loss, "stepSeconds": stats.step_seconds,
                    "samplesPerSecond": stats.samples_per_second, "gradNorm": stats.grad_norm,
                    "learningRate": stats.learning_rate,
                }) + "\n")
        if step % cfg.log_interval_steps == 0 or step == cfg.steps - 1:
            log_event(log, "step", step=step, loss=stats.loss, step_seconds=stats.step_seconds,
                      samples_per_second=stats.samples_per_second,
                      compute_seconds=stats.compute_seconds,
                      communication_seconds=stats.communication_seconds,
                      idle_seconds=stats.idle_seconds)
        done = step + 1
        if replan is not None:
            return _stop_for_replan(replan, trainer, adapter, metrics, comm, out, log)
        if interval and done % interval == 0 and done < cfg.steps:
            trainer.save(done)
    if trainer.start_step < cfg.steps:
        trainer.save(cfg.steps)
    if out is not None:
        trainer.timeline.write(out / f"timeline-rank{renv.rank}.json")
    log_event(log, "done", steps=cfg.steps)
    comm.barrier()
    comm.shutdown()
    return 0


def _stop_for_replan(replan: Replan, trainer: StageTrainer, adapter: Adapter,
                     metrics: WorkerMetrics, comm: Comm, out: Path | None, log: Any) -> int:
    """Checkpoint at the agreed step, leave the record (rank 0), and exit for the restart."""
    trainer.save(replan.step)
    metrics.adapted("replan", replan.gain, replan.step)
    if trainer.role.rank == 0 and out is not None:
        adapter.record_replan(replan)
        adapter.write_replan(replan, out / REPLAN_FILE)
    termination = Path(TERMINATION_LOG)
    if termination.exists():  # in a pod: the operator reads the request from the pod status
        with contextlib.suppress(OSError):
            termination.write_text(adapter.request(replan).model_dump_json(by_alias=True))
    log_event(log, "replanning", step=replan.step, gain=round(replan.gain, 3),
              restart_seconds=round(replan.restart_seconds, 2),
              links=",".join(f"{p.src}->{p.dst}:{p.mbps:.1f}Mbps" for p in replan.probes))
    if out is not None:
        trainer.timeline.write(out / f"timeline-rank{trainer.role.rank}.json")
    comm.barrier()
    comm.shutdown()
    return REPLAN_EXIT_CODE


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
