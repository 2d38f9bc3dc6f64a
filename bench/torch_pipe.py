"""PyTorch's own pipelining (``torch.distributed.pipelining``) as a baseline rank process.

Role: the "what PyTorch gives you" comparison of the benchmarks. One process per pipeline stage,
one device per stage, layers split evenly by count, ``PipelineStage`` + ``Schedule1F1B``
(default) or ``ScheduleGPipe``, gloo. Everything else is SpanTrain's, so only the pipeline
engine differs: the model is ``spantrain_worker.models.build_model`` of the same ``ModelRef``
(same ordered layers, same per-layer seeds, same loss), the data is the same deterministic
dataset (micro-batch ``m`` holds global rows ``m*mbs … (m+1)*mbs-1`` of the step, as in a
SpanTrain plan with one device per stage), the optimizer is AdamW with the worker's training
block (``TrainingConfig``: betas, eps, weight decay, warm-up + cosine learning rate, global-norm
clipping), and every step ends, like the worker's, with one world all-reduce of (squared grad
norm, loss) before the optimizer step. Rank 0 appends one JSON line per step to ``--out`` in
the worker's ``losses.jsonl`` format (``step``, ``loss``, ``stepSeconds``, ``samplesPerSecond``,
``gradNorm``, ``learningRate``), flushed after every step, so ``bench/cee.py`` and
``bench/worker.py`` measure it exactly as they measure SpanTrain.

Run one process per rank (``python bench/torch_pipe.py --help``) with ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE`` set; gloo binds to ``GLOO_SOCKET_IFNAME`` when set
(the testbed sets it to the device's interface). ``rank_commands`` builds the argv and
environment of every rank for a launcher (``Testbed.run`` or ``subprocess.Popen``).

Needs torch (the ``worker`` extra). Must not import kopf, the Kubernetes client or
``spantrain_operator``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic.alias_generators import to_snake

from spantrain_planner.core import contract
from spantrain_planner.inputs.cluster import load_document
from spantrain_planner.inputs.plan import ModelRef
from spantrain_planner.inputs.profiles import build_profile, preset
from spantrain_planner.passes.assemble import model_ref
from spantrain_planner.passes.partition import even_shares
from spantrain_worker.config import TrainingConfig, load_training

#: A model as the benchmarks name it: a preset ("gpt-mini"), a ``ModelRef`` (a plan's
#: ``model`` section), a mapping (a ModelRef, a whole plan, or ``{"family", "name",
#: "config"}``), or a JSON string / file path holding one of those.
ModelSpec = str | ModelRef | Mapping[str, Any]

SCHEDULES = ("1f1b", "gpipe")
SCRIPT = Path(__file__).resolve()


def resolve_model(spec: ModelSpec) -> ModelRef:
    """The ``ModelRef`` a SpanTrain plan would carry for ``spec``."""
    if isinstance(spec, ModelRef):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            return resolve_model(json.loads(text))
        if Path(text).is_file():
            return resolve_model(load_document(text))
        return model_ref(preset(text))
    doc = dict(spec)
    if "stages" in doc and isinstance(doc.get("model"), Mapping):  # a whole plan
        return ModelRef.model_validate(doc["model"])
    if "numLayers" in doc or "num_layers" in doc:
        return ModelRef.model_validate(doc)
    if "family" in doc:
        return model_ref(build_profile(str(doc["family"]), str(doc.get("name", doc["family"])),
                                       dict(doc.get("config") or {})))
    raise ValueError(f"cannot read a model from {sorted(doc)}; give a preset name, a plan's "
                     "model section, or {family, name, config}")


def even_bounds(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries of equal layer counts (earlier stages get the extra layer), as the
    planner's ``gpipe-even``/``1f1b-even`` baselines cut."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    return [0, *itertools.accumulate(even_shares(num_stages, num_layers))]


def rank_commands(
    model: ModelSpec,
    addresses: Sequence[str],
    port: int,
    batch: int,
    microbatches: int,
    steps: int,
    out: str | Path,
    *,
    schedule: str = "1f1b",
    seed: int = 0,
    training: Mapping[str, Any] | None = None,
    bounds: Sequence[int] | None = None,
    python: str = sys.executable,
    timeout: float = 300.0,
) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, env) of every rank; rank ``r`` runs on the device whose address is
    ``addresses[r]`` (rank 0 serves the rendezvous at ``addresses[0]:port``).

    ``training`` is a worker training block (camelCase, as in ``training.json``); ``steps``
    and ``seed`` override its fields. ``bounds`` are the stage boundaries (default: even
    layer counts). The env holds only the rendezvous and thread settings: ``Testbed.run``
    adds the device's ``GLOO_SOCKET_IFNAME``; launch elsewhere with ``os.environ | env``.
    """
    ref = resolve_model(model)
    world = len(addresses)
    cuts = list(bounds) if bounds is not None else even_bounds(ref.num_layers, world)
    check_bounds(cuts, ref.num_layers, world)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    argv = [
        python, str(SCRIPT),
        "--model", ref.model_dump_json(by_alias=True),
        "--batch", str(batch), "--microbatches", str(microbatches), "--steps", str(steps),
        "--seed", str(seed), "--schedule", schedule, "--out", str(out),
        "--bounds", ",".join(map(str, cuts)), "--timeout", str(timeout),
    ]
    if training:
        argv += ["--training", json.dumps(dict(training))]
    base = {
        "MASTER_ADDR": addresses[0], "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
        contract.NUM_THREADS: "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    return [(list(argv), dict(base, RANK=str(r), LOCAL_RANK="0")) for r in range(world)]


def check_bounds(bounds: Sequence[int], num_layers: int, world: int) -> None:
    if (len(bounds) != world + 1 or bounds[0] != 0 or bounds[-1] != num_layers
            or any(a >= b for a, b in itertools.pairwise(bounds))):
        raise ValueError(f"stage bounds {list(bounds)} must rise from 0 to {num_layers} in "
                         f"{world} steps (one stage per rank)")


def read_losses(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``losses.jsonl`` (this script's or the worker's)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# -- the rank process ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/torch_pipe.py",
        description="One rank of a torch.distributed.pipelining run (one stage per rank) on "
                    "SpanTrain's model, data and optimizer. Reads MASTER_ADDR, MASTER_PORT, "
                    f"RANK, WORLD_SIZE (and GLOO_SOCKET_IFNAME, {contract.NUM_THREADS}) from the "
                    "environment; rank 0 writes one JSON line per step to --out.")
    parser.add_argument("--model", required=True,
                        help="preset name, ModelRef/plan JSON, {family,name,config} JSON, or a "
                             "file holding one")
    parser.add_argument("--batch", type=int, required=True, help="global batch per step")
    parser.add_argument("--microbatches", type=int, required=True,
                        help="micro-batches per step (>= WORLD_SIZE; must divide --batch)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--out", required=True, help="losses.jsonl written by rank 0")
    parser.add_argument("--training", default=None,
                        help="worker training block (JSON or a file): learningRate, "
                             "warmupSteps, gradClipNorm, weightDecay…; --steps/--seed win")
    parser.add_argument("--lr", type=float, default=None, help="overrides learningRate")
    parser.add_argument("--bounds", default=None,
                        help="stage boundaries, e.g. 0,3,6,8 (default: even layer counts)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the other ranks (rendezvous, collectives)")
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    if args.training is None:
        block: dict[str, Any] = {}
    elif args.training.strip().startswith("{"):
        block = json.loads(args.training)
    else:
        block = load_training(args.training).model_dump(by_alias=True)
    block.update(steps=args.steps, seed=args.seed)
    if args.lr is not None:
        block["learningRate"] = args.lr
    return TrainingConfig.model_validate(block)


def run_rank(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Train as rank ``RANK`` of ``WORLD_SIZE``; returns the exit code."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from spantrain_worker.models import build_model, example_input, layer_output_shapes
    from spantrain_worker.runtime import clip_coefficient, dtype_of, learning_rate

    env = dict(os.environ if env is None else env)
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    torch.set_num_threads(contract.integer(env, contract.NUM_THREADS, 1, minimum=1))
    ref = resolve_model(args.model)
    cfg = training_config(args)
    if cfg.precision == "bf16":
        raise SystemExit("torch_pipe: precision bf16 is not supported (fp32 or fp64)")
    dtype = dtype_of(cfg.precision)
    bounds = ([int(b) for b in args.bounds.split(",")] if args.bounds
              else even_bounds(ref.num_layers, world))
    check_bounds(bounds, ref.num_layers, world)
    if args.batch % args.microbatches:
        raise SystemExit(f"torch_pipe: --microbatches {args.microbatches} must divide --batch "
                         f"{args.batch}")
    start, end = bounds[rank], bounds[rank + 1]
    first, last = rank == 0, rank == world - 1
    mbs = args.batch // args.microbatches

    # torch 2.9: the warm-up exchange that initialises NCCL communicators sends an int64
    # scalar into a float32 buffer, which gloo rejects ("8 vs 4"); gloo needs no warm-up.
    PipelineStage._get_init_p2p_neighbors_ops = lambda self: []  # type: ignore[method-assign]
    timeout = timedelta(seconds=max(args.timeout, 30.0))
    dist.init_process_group("gloo", init_method=f"tcp://{env['MASTER_ADDR']}:"
                            f"{env['MASTER_PORT']}", rank=rank, world_size=world,
                            timeout=timeout)
    # the end-of-step reduce gets its own group: never share one with the P2P traffic
    step_group = dist.new_group(backend="gloo", timeout=timeout)

    built = build_model(ref, seed=cfg.seed, layer_indices=range(start, end), dtype=dtype,
                        corpus=cfg.data.corpus, with_data=first or last)
    module = torch.nn.Sequential(*built.stage(start, end))
    # explicit shapes: no lazy shape inference (its metadata exchange is not needed)
    shapes = layer_output_shapes(ref, seed=cfg.seed)
    if first:
        one = example_input(ref.family, {to_snake(k): v for k, v in ref.config.items()})
        example = one.expand(mbs, *one.shape[1:])
        example = example.to(dtype) if example.is_floating_point() else example
    else:
        example = torch.zeros(mbs, *shapes[start - 1], dtype=dtype)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), input_args=(example,),
                          output_args=(torch.zeros(mbs, *shapes[end - 1], dtype=dtype),))
    schedule_cls = Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe
    # scale_grads (default): gradients are averaged over micro-batches, so with a mean loss
    # per micro-batch they are the global-batch mean, as in SpanTrain and a plain loop
    sched = schedule_cls(stage, args.microbatches, loss_fn=built.loss_fn)
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    out = Path(args.out)
    if first:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        losses: list[Any] = []
        x, y = built.dataset.batch(step, range(args.batch)) if built.dataset else (None, None)
        if x is not None and x.is_floating_point():
            x = x.to(dtype)
        if first and last:
            sched.step(x, target=y, losses=losses)
        elif first:
            sched.step(x)
        elif last:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        loss_sum = sum(float(loss.detach()) for loss in losses) / args.microbatches
        grads = [p.grad for p in params if p.grad is not None]
        sq = (float(torch.stack(torch._foreach_norm(grads)).double().pow(2).sum())
              if grads else 0.0)
        reduced = torch.tensor([sq, loss_sum], dtype=torch.float64)
        dist.all_reduce(reduced, group=step_group)
        total_norm, loss_value = math.sqrt(float(reduced[0])), float(reduced[1])
        coef = clip_coefficient(total_norm, cfg.grad_clip_norm)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if first:
            with out.open("a") as fh:
                fh.write(json.dumps({
                    "step": step, "loss": loss_value, "stepSeconds": seconds,
                    "samplesPerSecond": args.batch / seconds if seconds else 0.0,
                    "gradNorm": total_norm, "learningRate": lr,
                }) + "\n")
    print(f"torch_pipe rank={rank} stage={rank} layers={start}-{end - 1} "
          f"schedule={args.schedule} event=done steps={cfg.steps} "
          f"ifname={env.get('GLOO_SOCKET_IFNAME', '-')}", file=sys.stderr, flush=True)
    dist.barrier(group=step_group)
    dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
               if k not in os.environ]
    if missing:
        print(f"torch_pipe: environment lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    return run_rank(args)


if __name__ == "__main__":
    sys.exit(main())
