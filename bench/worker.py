"""Worker runtime benchmark: overhead vs a plain loop, and zb vs 1f1b vs torch pipelining.

Run: ``python bench/worker.py [--model gpt-mini] [--steps 30]``. On this machine every
process gets one thread (``torch.set_num_threads(1)``) so the comparison is per core.

(a) ``overhead_ratio`` = samples/s of a single-device SpanTrain plan (one stage, one device, one
    micro-batch, the full runtime: rendezvous, action loop, world reduce for loss/norm,
    AdamW) / samples/s of a textbook PyTorch loop on the same model, batch and optimizer.
(b) a 3-stage plan with even stages and one device per stage: SpanTrain ``zb`` and ``1f1b``
    and ``torch.distributed.pipelining`` (``ScheduleGPipe`` and ``Schedule1F1B``, run by
    ``bench/torch_pipe.py``) on the same layers, micro-batches, training block and gloo
    backend. ``zb_vs_1f1b`` = zb / 1f1b samples/s;
    ``ours_vs_torch_pipelining`` = our best / torch's best samples/s.

Step time is the median over the second half of the steps (the first half warms up); each
configuration runs ``--repeats`` times, interleaved, and keeps its best, because this machine
is shared and load from other processes would otherwise decide the ratios. The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import torch_pipe  # noqa: E402

from spantrain_planner.inputs.cluster import ClusterSpec, resolve  # noqa: E402
from spantrain_planner.inputs.plan import Plan  # noqa: E402
from spantrain_planner.inputs.profiles import preset  # noqa: E402
from spantrain_planner.passes.assemble import StageLayout, assemble  # noqa: E402
from spantrain_worker import launch  # noqa: E402
from spantrain_worker.baseline import PlainTrainer  # noqa: E402
from spantrain_worker.config import TrainingConfig  # noqa: E402


def topology(n: int):  # type: ignore[no-untyped-def]
    return resolve(ClusterSpec.model_validate({
        "name": "bench",
        "nodes": [{"name": f"n{i}", "devices": [{"computeTflops": 0.02, "memoryBytes": "4Gi"}]}
                  for i in range(n)],
    }))


def even_cuts(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return list(itertools.pairwise(bounds))


def make_plan(model: str, cuts: list[tuple[int, int]], batch: int, microbatches: int,
              schedule: str) -> Plan:
    mbs = batch // microbatches
    layouts = [StageLayout(a, b, (i,), (mbs,)) for i, (a, b) in enumerate(cuts)]
    plan, _ = assemble(layouts, topology(len(cuts)), preset(model), schedule=schedule,
                       num_microbatches=microbatches)
    return plan


def run_ours(plan: Plan, training: dict[str, object], workdir: Path) -> float:
    """Samples/s of a plan run by the real workers (median step time of the second half)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "plan.json").write_text(plan.to_json())
    (workdir / "training.json").write_text(json.dumps(training))
    job = launch.start(workdir / "plan.json", plan.world_size, workdir / "out",
                       training_path=workdir / "training.json")
    codes = job.wait(900)
    if any(codes):
        raise RuntimeError(f"workers failed:\n{job.logs()[-3000:]}")
    rows = [json.loads(x) for x in (workdir / "out" / "losses.jsonl").read_text().splitlines()]
    tail = rows[len(rows) // 2:]
    return plan.global_batch / statistics.median(r["stepSeconds"] for r in tail)


def run_plain(model: str, cfg: TrainingConfig, batch: int) -> float:
    torch.set_num_threads(1)
    trainer = PlainTrainer(make_plan(model, [(0, preset(model).num_layers)], batch, 1,
                                     "gpipe").model, cfg, batch)
    times = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        trainer.step(step)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[len(times) // 2:])


def _plain_child(_: int, model: str, training: dict[str, object], batch: int,
                 result: dict) -> None:
    result["samples_per_second"] = run_plain(model, TrainingConfig.model_validate(training),
                                             batch)


def run_plain_process(model: str, training: dict[str, object], batch: int) -> float:
    """The plain loop in a fresh process, like the workers (same start-up, same threads)."""
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_plain_child, nprocs=1, join=True, args=(model, training, batch, result))
        return float(result["samples_per_second"])


def run_torch_pipelining(model: str, cuts: list[tuple[int, int]], batch: int,
                         microbatches: int, steps: int, schedule: str,
                         training: dict[str, object], workdir: Path) -> float:
    """Samples/s of ``torch.distributed.pipelining`` (``bench/torch_pipe.py``, one process
    per stage on 127.0.0.1), measured like ``run_ours`` from rank 0's losses.jsonl."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "losses.jsonl"
    bounds = [a for a, _ in cuts] + [cuts[-1][1]]
    commands = torch_pipe.rank_commands(
        model, ["127.0.0.1"] * len(cuts), launch.free_port(), batch, microbatches, steps, out,
        schedule=schedule, training=training, bounds=bounds)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank, (argv, env) in enumerate(commands):
            with (workdir / f"rank{rank}.log").open("wb") as log:
                procs.append(subprocess.Popen(argv, env=os.environ | env, stdout=log,
                                              stderr=subprocess.STDOUT))
        codes = [p.wait(900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        logs = "".join((workdir / f"rank{r}.log").read_text()[-1500:] for r in range(len(procs)))
        raise RuntimeError(f"torch pipelining ranks failed {codes}:\n{logs}")
    rows = torch_pipe.read_losses(out)
    tail = rows[len(rows) // 2:]
    return batch / float(statistics.median(r["stepSeconds"] for r in tail))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-mini")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lr = 1e-3
    training = {"steps": args.steps, "learningRate": lr, "warmupSteps": 0, "gradClipNorm": 0,
                "logIntervalSteps": 1000}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        num_layers = preset(args.model).num_layers
        single = make_plan(args.model, [(0, num_layers)], args.batch, 1, "gpipe")
        # alternate the two, best of ``--repeats``: other load on the machine hits both alike
        plains, ours_runs = [], []
        for r in range(args.repeats):
            plains.append(run_plain_process(args.model, training, args.batch))
            ours_runs.append(run_ours(single, training, root / f"single{r}"))
        plain, ours_single = max(plains), max(ours_runs)
        overhead = ours_single / plain
        print(f"(a) {args.model}, batch {args.batch}: SpanTrain single-device "
              f"{ours_single:.1f} samples/s, plain PyTorch loop {plain:.1f} samples/s "
              f"-> ratio {overhead:.3f}", flush=True)

        cuts = even_cuts(num_layers, 3)
        rates: dict[str, float] = {}
        plans = {s: make_plan(args.model, cuts, args.batch, args.microbatches, s)
                 for s in ("zb", "1f1b")}
        for r in range(args.repeats):  # interleaved, best of the repeats
            for schedule, plan in plans.items():
                rate = run_ours(plan, training, root / f"{schedule}{r}")
                rates[f"spantrain-{schedule}"] = max(rates.get(f"spantrain-{schedule}", 0), rate)
            for schedule in ("gpipe", "1f1b"):
                rate = run_torch_pipelining(args.model, cuts, args.batch, args.microbatches,
                                            args.steps, schedule, training,
                                            root / f"torch-{schedule}{r}")
                rates[f"torch-{schedule}"] = max(rates.get(f"torch-{schedule}", 0), rate)
        print(f"(b) {args.model}, 3 even stages {cuts}, {args.microbatches} micro-batches of "
              f"{args.batch // args.microbatches}, one process per stage:")
        for name, rate in rates.items():
            print(f"    {name:18s} {rate:8.1f} samples/s")
    zb_vs_1f1b = rates["spantrain-zb"] / rates["spantrain-1f1b"]
    ours = max(rates["spantrain-zb"], rates["spantrain-1f1b"])
    theirs = max(rates["torch-gpipe"], rates["torch-1f1b"])
    print(f"overhead_ratio={overhead:.3f} zb_vs_1f1b={zb_vs_1f1b:.3f} "
          f"ours_vs_torch_pipelining={ours / theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
