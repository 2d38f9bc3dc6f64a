"""The hybrid pipeline runtime: one rank executes its stage's actions of a ``Plan``.

Role: given a plan, a rank and a ``Comm``, build the stage's layers, and per training step run
the stage's action list (``F<m>``, ``B<m>``, ``W<m>``, ``BW<m>``) on this rank's rows of every
micro-batch, exchanging activations (forward) and activation gradients (backward) with the
ranks of the neighbouring stages, then sum gradients inside the stage, clip by the global
norm, and step AdamW under a warm-up + cosine learning-rate schedule.

Re-sharding: stage ``s`` on ``k`` devices may feed stage ``s+1`` on ``k'`` devices with other
shares. Rows of a micro-batch are contiguous per device in plan order, so each sender ships
exactly the rows of each receiver that it holds (``boundary_transfers``) and the receiver
concatenates its pieces in row order; gradients travel the same pairs in reverse.

Gradient equivalence: the last stage's loss on its rows (a mean over those rows) is scaled by
``rows / global_batch``; summing over micro-batches and over the ranks of a stage (explicit
all-reduce, ``gradsync``, not DDP: a stage's ranks run different row counts and a
schedule-defined order of backward passes; where the plan gives ``grad_buckets`` each
bucket's sum starts as soon as its gradients are final, overlapping the rest of the backward
work) gives exactly the gradient of the mean loss over the global batch, i.e. single-process
training. The global gradient norm for clipping is the square root of the sum over stages
(each counted once, by its replica 0) of the stage's squared norm; it travels in the same
world all-reduce as the step's loss.

BatchNorm: a stage on several devices normalises each micro-batch by the statistics of all
its rows (``syncbn``, over the stage's process group), so splitting a micro-batch over devices
changes nothing; micro-batches are normalised each by its own statistics (as in GPipe). For a
model with BatchNorm the plan's gradients are therefore those of single-process training that
runs the step's micro-batches one after the other and accumulates their gradients
(``baseline.PlainTrainer(pieces=...)``), not those of one pass over the global batch.

Why not ``torch.distributed.pipelining``: its ``PipelineStage`` and schedules assume every
stage processes whole, equally sized micro-batches on one rank (the micro-batch is split with
``torch.tensor_split`` once, for all stages) and that stage ``s`` talks to exactly one rank of
stage ``s+1``. SpanTrain's plans give a stage several devices with *uneven* row shares and
neighbouring stages *different widths*, which needs per-peer row slices at every boundary and
a per-stage data-parallel gradient sum among ranks that ran different row counts; its
``_ComputationType`` actions are also bound to its own stage objects. So this module executes
the planner's action lists directly on ``torch.distributed`` P2P (``comm``); the benchmark
compares against ``torch.distributed.pipelining`` where it applies (one device per stage,
even stages).

Pure helpers (``stage_role``, ``learning_rate``, ``check_actions``) carry the decisions; the
``StageTrainer`` class is the thin stateful part. Must not import torch.distributed directly
(only through ``comm``), kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from spantrain_planner.inputs.plan import (
    Plan,
    boundary_transfers,
    grad_bucket_problem,
    parse_action,
    rank_info,
)

from . import checkpoint, gradsync, splitgrad, syncbn
from .config import TrainingConfig
from .emulation import Emulation, Emulator
from .metrics import StepStats, Timeline
from .models import build_model, layer_output_shapes

HEADER_TAG_OFFSET = 1 << 20  # emulation timestamps use tags m + this (data uses m)


class PlanError(ValueError):
    """A plan the runtime cannot execute; the message names the stage and the action."""


# --------------------------------------------------------------------------------------------
# Pure decisions


@dataclass(frozen=True)
class Peer:
    """A neighbour rank and the rows ``[row_start, row_end)`` of each micro-batch exchanged."""

    rank: int
    row_start: int
    row_end: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class StageRole:
    """Where a rank sits and whom it talks to (rank arithmetic over the plan)."""

    rank: int
    stage_index: int
    num_stages: int
    replica: int
    row_start: int
    row_end: int
    layer_start: int
    layer_end: int
    stage_ranks: tuple[int, ...]
    upstream: tuple[Peer, ...]  # they send us activations, we send them input gradients
    downstream: tuple[Peer, ...]  # we send them activations, they send us gradients
    actions: tuple[str, ...]
    microbatch_size: int
    num_microbatches: int
    global_batch: int

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    def sample_indices(self, microbatch: int) -> range:
        """Global indices (within the step) of this rank's samples of a micro-batch."""
        base = microbatch * self.microbatch_size
        return range(base + self.row_start, base + self.row_end)


def stage_role(plan: Plan, rank: int) -> StageRole:
    info = rank_info(plan, rank)
    s = info.stage_index
    stage = plan.stages[s]
    up = tuple(sorted(
        (Peer(t.src, t.row_start, t.row_end)
         for t in (boundary_transfers(plan, s - 1) if s > 0 else []) if t.dst == rank),
        key=lambda p: p.row_start,
    ))
    down = tuple(sorted(
        (Peer(t.dst, t.row_start, t.row_end)
         for t in (boundary_transfers(plan, s) if s + 1 < plan.pp_degree else [])
         if t.src == rank),
        key=lambda p: p.row_start,
    ))
    return StageRole(
        rank=rank, stage_index=s, num_stages=plan.pp_degree, replica=info.replica,
        row_start=info.row_start, row_end=info.row_end,
        layer_start=stage.layer_start, layer_end=stage.layer_end,
        stage_ranks=info.stage_ranks, upstream=up, downstream=down,
        actions=tuple(stage.actions), microbatch_size=plan.microbatch_size,
        num_microbatches=plan.num_microbatches, global_batch=plan.global_batch,
    )


def check_actions(actions: tuple[str, ...], num_microbatches: int, stage_index: int) -> None:
    """Every micro-batch: one F, then one BW or a B followed later by a W; F and B in order.

    In-order F and B per stage is what lets every channel carry its messages in micro-batch
    order (see ``comm``).
    """
    seen: dict[str, list[int]] = {"F": [], "B": [], "W": []}
    for action in actions:
        kind, m = parse_action(action)
        if not 0 <= m < num_microbatches:
            raise PlanError(f"stage {stage_index}: {action} names a micro-batch outside "
                            f"0..{num_microbatches - 1}")
        if kind in ("B", "BW") and m not in seen["F"]:
            raise PlanError(f"stage {stage_index}: {action} runs before F{m}")
        if kind == "W" and m not in seen["B"]:
            raise PlanError(f"stage {stage_index}: {action} runs before B{m}")
        if kind == "BW":
            seen["B"].append(m)
            seen["W"].append(m)
        else:
            seen[kind].append(m)
    for kind in ("F", "B"):
        if seen[kind] != list(range(num_microbatches)):
            raise PlanError(f"stage {stage_index}: {kind} passes must cover micro-batches "
                            f"0..{num_microbatches - 1} in order, got {seen[kind]}")
    if sorted(seen["W"]) != list(range(num_microbatches)):
        raise PlanError(f"stage {stage_index}: weight passes cover {sorted(seen['W'])}")


def learning_rate(step: int, cfg: TrainingConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_learning_rate_ratio * peak``."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = peak * cfg.min_learning_rate_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` applies (1.0 when clipping is off)."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def dtype_of(precision: str) -> torch.dtype:
    return torch.float64 if precision == "fp64" else torch.float32


def adamw(params: Iterable[Tensor], cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW as ``cfg`` sets it; the fused kernel where torch has one for the parameters'
    device (CPU and CUDA). One kernel over all tensors instead of a loop of small ops per
    tensor: on one CPU thread 1.3 ms instead of 4.1 ms per step for a 0.83 M-parameter stage
    (a GPT-cee half), a difference that every CPU-quota device multiplies."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, fused=fused or None,
    )


# --------------------------------------------------------------------------------------------
# The stateful part


@dataclass
class _Pending:
    peer: int
    buffer: Tensor
    work: Any
    header: Tensor | None = None
    header_work: Any = None


@dataclass
class _StepClock:
    compute: float = 0.0
    communication: float = 0.0
    idle: float = 0.0
    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)


@dataclass
class _StepState:
    """What one ``train_step`` carries between its actions."""

    step: int
    record: bool
    clock: _StepClock
    acts: dict[int, list[_Pending]]  # micro-batch -> pending receives of its activations
    grads: dict[int, list[_Pending]]  # micro-batch -> pending receives of its gradients
    scale: float  # this rank's rows / global batch: the loss weight of its samples
    sends: list[Any] = field(default_factory=list)
    saved: dict[int, tuple[Tensor | None, Tensor]] = field(default_factory=dict)
    loss_sum: float = 0.0


class StageTrainer:
    """Executes one rank's share of the plan, step after step."""

    def __init__(
        self,
        plan: Plan,
        rank: int,
        cfg: TrainingConfig,
        comm: Any,  # comm.Comm (kept untyped so this module never imports torch.distributed)
        *,
        device: torch.device | None = None,
        emulation: Emulation | None = None,
        checkpoint_dir: str | None = None,
    ) -> None:
        self.plan = plan
        self.cfg = cfg
        self.comm = comm
        self.role = role = stage_role(plan, rank)
        check_actions(role.actions, plan.num_microbatches, role.stage_index)
        self.device = device or torch.device("cpu")
        self.dtype = dtype_of(cfg.precision)
        self.emulator = Emulator(emulation or Emulation.none(), rank)
        self.checkpoint_dir = checkpoint_dir or cfg.checkpoint.path
        built = build_model(
            plan.model, seed=cfg.seed, layer_indices=range(role.layer_start, role.layer_end),
            dtype=self.dtype, device=self.device, corpus=cfg.data.corpus,
            with_data=role.is_first or role.is_last,
        )
        self.layer_map = built.layers
        if len(role.stage_ranks) > 1:
            # a micro-batch's BatchNorm statistics span the stage's devices (``syncbn``)
            for i in range(role.layer_start, role.layer_end):
                self.layer_map[i] = syncbn.convert(
                    self.layer_map[i], replica=role.replica, width=len(role.stage_ranks),
                    reduce=self._reduce_stage)
        self.layers = built.stage(role.layer_start, role.layer_end)
        self.loss_fn = built.loss_fn
        self.dataset = built.dataset
        shapes = layer_output_shapes(plan.model, seed=cfg.seed)
        self.in_shape = shapes[role.layer_start - 1] if not role.is_first else None
        self.out_shape = shapes[role.layer_end - 1]
        self.named_params = [
            (f"{i}.{n}", p) for i in range(role.layer_start, role.layer_end)
            for n, p in self.layer_map[i].named_parameters()
        ]
        self.params = [p for _, p in self.named_params]
        self.optimizer = adamw(self.params, cfg)
        # zero-bubble split: only when the schedule has separate B and W passes
        self.split_microbatches = {
            m for kind, m in map(parse_action, role.actions) if kind == "B"
        }
        self.split = splitgrad.SplitState()
        self.b_inputs: list[Tensor] = []
        # bf16 runs under autocast; the split GEMMs would need autocast-aware casts, so a
        # bf16 zero-bubble schedule runs each B as a full backward (correct, not deferred)
        self.autocast = cfg.precision == "bf16"
        if self.autocast:
            self.split_microbatches = set()
        if self.split_microbatches:
            weights = {id(w) for w in splitgrad.install(self.layers, self.split)}
            self.b_inputs = [p for p in self.params if id(p) not in weights]
            if role.is_first and not self.b_inputs:
                self.split_microbatches = set()  # nothing to compute in B: run B as BW
        # the stage's gradient sum: the plan's buckets during the last weight pass (stages on
        # accelerators), else one flat all-reduce after the actions
        stage_plan = plan.stages[role.stage_index]
        problem = grad_bucket_problem(stage_plan)
        if problem:
            raise PlanError(problem)
        self.grad_sync: gradsync.GradientSync | None = None
        if len(role.stage_ranks) > 1 and self.params:
            overlap = bool(stage_plan.grad_buckets)
            buckets = ([[p for i in bucket for p in self.layer_map[i].parameters()]
                        for bucket in stage_plan.grad_buckets] if overlap else [self.params])
            self.grad_sync = gradsync.GradientSync(
                buckets, passes=role.num_microbatches, launch=comm.all_reduce_stage_async)
            if overlap:
                self.grad_sync.install_hooks()
                self.split.on_grad = self.grad_sync.grad_ready
        self.start_step = 0
        self.timeline = Timeline(rank)
        self.record_steps: set[int] = set()
        self.grad_hook: Callable[[int, dict[str, Tensor]], None] | None = None
        self.last_bytes: tuple[dict[int, int], dict[int, int]] = ({}, {})

    def adopt(self, plan: Plan) -> None:
        """Take a re-balanced plan in place, between two steps that every rank agrees on.

        Same stages, layers, devices, micro-batches and actions; only the rows each device
        holds of a micro-batch change. No weights or optimizer state move, the gradients stay
        exact (each stage still sums over the same samples), and channels the new row ranges
        need are created (a collective: every rank adopts the same plan at the same step).
        """
        role = stage_role(plan, self.role.rank)
        old = self.role
        same = (role.layer_start, role.layer_end, role.stage_ranks, role.actions,
                role.num_microbatches, role.global_batch)
        if same != (old.layer_start, old.layer_end, old.stage_ranks, old.actions,
                    old.num_microbatches, old.global_batch):
            raise PlanError("adopt: only the shares inside stages may change in place; "
                            "layers, devices, micro-batches and schedule need a restart")
        self.comm.add_channels(plan)
        self.plan, self.role = plan, role

    def _reduce_stage(self, tensor: Tensor) -> None:
        """Sum ``tensor`` in place over this rank's stage (blocking; BatchNorm statistics)."""
        work = self.comm.all_reduce_stage_async(tensor)
        if work is not None:
            work.wait()

    # ---------------------------------------------------------------------------------------
    # Checkpoints

    def restore(self) -> int | None:
        """Resume from the newest checkpoint, if any; returns its step."""
        step = checkpoint.latest_step(self.checkpoint_dir)
        if step is None:
            return None
        assert self.checkpoint_dir is not None
        checkpoint.load_layers(
            self.checkpoint_dir, step, self.layer_map, self.optimizer,
            model_name=self.plan.model.name, num_layers=self.plan.model.num_layers,
        )
        self.start_step = step
        return step

    def save(self, step: int) -> None:
        """Collective: every rank must call it for the same step."""
        if not self.checkpoint_dir:
            return
        if self.role.replica == 0:
            checkpoint.save_layers(self.checkpoint_dir, step, self.layer_map, self.optimizer)
        self.comm.barrier()
        if self.role.rank == 0:
            checkpoint.commit(self.checkpoint_dir, step, {
                "model": self.plan.model.name, "numLayers": self.plan.model.num_layers,
                "planDigest": self.plan.digest(),
            })
        self.comm.barrier()

    # ---------------------------------------------------------------------------------------
    # One step

    def _post_receives(self, clock: _StepClock) -> tuple[dict[int, list[_Pending]],
                                                         dict[int, list[_Pending]]]:
        role = self.role
        acts: dict[int, list[_Pending]] = {m: [] for m in range(role.num_microbatches)}
        grads: dict[int, list[_Pending]] = {m: [] for m in range(role.num_microbatches)}
        for peers, shape, table in ((role.upstream, self.in_shape, acts),
                                    (role.downstream, self.out_shape, grads)):
            for peer in peers:
                assert shape is not None
                for m in range(role.num_microbatches):
                    table[m].append(self._irecv(peer, shape, m))
        return acts, grads

    def _irecv(self, peer: Peer, shape: tuple[int, ...], m: int) -> _Pending:
        header = header_work = None
        if self.emulator.links_enabled:
            header = torch.zeros(1, dtype=torch.float64, device=self.device)
            header_work = self.comm.irecv(header, peer.rank, m + HEADER_TAG_OFFSET)
        buf = torch.empty((peer.num_rows, *shape), dtype=self.dtype, device=self.device)
        work = self.comm.irecv(buf, peer.rank, m)
        return _Pending(peer.rank, buf, work, header, header_work)

    def _wait(self, pending: list[_Pending], clock: _StepClock) -> Tensor:
        t0 = time.perf_counter()
        for p in pending:
            if p.header_work is not None:
                p.header_work.wait()
            p.work.wait()
            nbytes = p.buffer.numel() * p.buffer.element_size()
            clock.received[p.peer] = clock.received.get(p.peer, 0) + nbytes
            if p.header is not None:
                self.emulator.wait_until(
                    self.emulator.arrival(p.peer, float(p.header.item()), nbytes))
        clock.idle += time.perf_counter() - t0
        pieces = [p.buffer for p in pending]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _send(self, tensor: Tensor, peer: int, m: int, sends: list[Any],
              clock: _StepClock) -> None:
        data = tensor.detach().contiguous()
        if self.emulator.links_enabled:
            header = torch.tensor([time.time()], dtype=torch.float64, device=self.device)
            sends.append((self.comm.isend(header, peer, m + HEADER_TAG_OFFSET), header))
        sends.append((self.comm.isend(data, peer, m), data))
        clock.sent[peer] = clock.sent.get(peer, 0) + data.numel() * data.element_size()

    def _run_layers(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def train_step(self, step: int) -> StepStats:
        """One optimizer step: the rank's actions in plan order, then the gradient sync, the
        global norm and loss, and the update."""
        role = self.role
        t_start = time.perf_counter()
        clock = _StepClock()
        acts, grads = self._post_receives(clock)
        st = _StepState(step=step, record=step in self.record_steps, clock=clock, acts=acts,
                        grads=grads, scale=role.num_rows / role.global_batch)
        for action in role.actions:
            kind, m = parse_action(action)
            if kind == "F":
                w0, elapsed, cpu = self._forward(st, m)
            elif kind == "W":
                w0, elapsed, cpu = self._weight_gradients(m)
            else:  # B or BW
                w0, elapsed, cpu = self._backward(st, kind, m)
            # an emulated device's pacing is part of its compute time
            clock.compute += elapsed + self.emulator.pad_compute(elapsed, cpu)
            if st.record:
                self.timeline.add(step, kind, m, w0, time.time())
        total_norm, loss_value = self._reduce_gradients(st)
        lr = self._update(st, total_norm)
        step_seconds = time.perf_counter() - t_start
        self.last_bytes = (clock.sent, clock.received)
        return StepStats(
            step=step, loss=loss_value, step_seconds=step_seconds,
            compute_seconds=clock.compute, communication_seconds=clock.communication,
            idle_seconds=clock.idle,
            samples_per_second=role.global_batch / step_seconds if step_seconds else 0.0,
            grad_norm=total_norm, learning_rate=lr,
        )

    def _forward(self, st: _StepState, m: int) -> tuple[float, float, float]:
        """F of micro-batch ``m``: input (data or the upstream boundary), this stage's layers,
        the loss on the last stage, the output sent downstream. Returns (wall start, seconds,
        CPU seconds) of the compute alone, after the wait for inputs."""
        role = self.role
        if role.is_first:
            assert self.dataset is not None
            x, _ = self.dataset.batch(st.step, role.sample_indices(m))
            x = x.to(self.device)
            if x.is_floating_point():
                x = x.to(self.dtype)
            x_in: Tensor | None = None
        else:
            x = self._wait(st.acts[m], st.clock)
            x.requires_grad_(True)
            x_in = x
        w0 = time.time()  # timeline bars start after the wait for inputs
        t0 = time.perf_counter()
        c0 = time.thread_time()
        with self.split.record(m if m in self.split_microbatches else None), \
                torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = self._run_layers(x)
        if out.dtype != self.dtype:
            out = out.to(self.dtype)  # boundaries and the loss use the master dtype
        if role.is_last:
            assert self.dataset is not None
            _, labels = self.dataset.batch(st.step, role.sample_indices(m))
            loss = self.loss_fn(out, labels.to(self.device)) * st.scale
            st.loss_sum += float(loss.detach())
            out = loss
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        for peer in role.downstream:
            lo, hi = peer.row_start - role.row_start, peer.row_end - role.row_start
            self._send(out[lo:hi], peer.rank, m, st.sends, st.clock)
        st.saved[m] = (x_in, out)
        return w0, elapsed, cpu

    def _weight_gradients(self, m: int) -> tuple[float, float, float]:
        """W of micro-batch ``m`` (zero-bubble schedules): the deferred weight gradients."""
        w0 = time.time()
        t0 = time.perf_counter()
        c0 = time.thread_time()
        self.split.flush(m)
        return w0, time.perf_counter() - t0, time.thread_time() - c0

    def _backward(self, st: _StepState, kind: str, m: int) -> tuple[float, float, float]:
        """B (input gradients only, weights deferred to W) or BW of micro-batch ``m``; the
        input gradient is sent upstream."""
        role = self.role
        x_in, out = st.saved.pop(m)
        grad_out = None if role.is_last else self._wait(st.grads[m], st.clock)
        w0 = time.time()
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if kind == "B" and m in self.split_microbatches:
            wanted = ([x_in] if x_in is not None else []) + self.b_inputs
            with self.split.defer(m):
                torch.autograd.backward(out, grad_out, inputs=wanted)
        else:
            torch.autograd.backward(out, grad_out)
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        if x_in is not None:
            assert x_in.grad is not None
            for peer in role.upstream:
                lo, hi = peer.row_start - role.row_start, peer.row_end - role.row_start
                self._send(x_in.grad[lo:hi], peer.rank, m, st.sends, st.clock)
        return w0, elapsed, cpu

    def _reduce_gradients(self, st: _StepState) -> tuple[float, float]:
        """Finish the sends and the stage's gradient all-reduce; the global gradient norm and
        the step's loss, summed over the world (each counted once: replica 0's norm)."""
        role = self.role
        t0 = time.perf_counter()
        w0 = time.time()
        for work, _ in st.sends:
            work.wait()
        if self.grad_sync is not None:
            self.emulator.pad_allreduce(self.grad_sync.finish())
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.grad_hook is not None and role.replica == 0:
            self.grad_hook(st.step, {n: p.grad.detach().clone() for n, p in self.named_params
                                     if p.grad is not None})
        sq = 0.0
        if role.replica == 0 and self.params:
            norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
            sq = float(torch.stack(norms).double().pow(2).sum())
        reduced = torch.tensor([sq, st.loss_sum], dtype=torch.float64, device=self.device)
        self.comm.all_reduce_world(reduced)
        st.clock.communication += time.perf_counter() - t0
        if st.record:
            self.timeline.add(st.step, "AR", -1, w0, time.time())
        return math.sqrt(float(reduced[0])), float(reduced[1])

    def _update(self, st: _StepState, total_norm: float) -> float:
        """Clip by the global norm, set the scheduled learning rate, step the optimizer;
        returns the learning rate."""
        t0 = time.perf_counter()
        c0 = time.thread_time()
        w0 = time.time()
        coef = clip_coefficient(total_norm, self.cfg.grad_clip_norm)
        lr = learning_rate(st.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if coef < 1.0:
            for p in self.params:
                assert p.grad is not None
                p.grad.mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        st.clock.compute += elapsed + self.emulator.pad_compute(elapsed, time.thread_time() - c0)
        if st.record:
            self.timeline.add(st.step, "OPT", -1, w0, time.time())
        return lr
