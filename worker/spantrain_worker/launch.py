"""Start one worker process per rank of a plan on this machine, and stop them all.

Role: the process side of ``spantrain local``, the tests and the benchmark. Workers get the
same environment the operator gives pods (``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``contract.WorkerEnv``). All workers share ONE new process group (the
first worker leads it), so ``stop()`` ends every one of them with a single ``killpg`` — Ctrl-C
in the terminal reaches only the launcher, which then stops the group; each worker also asks
the kernel to SIGTERM it if the launcher dies (``PR_SET_PDEATHSIG``), so nothing is orphaned.
If one worker fails, the others would block in a collective until a timeout, so ``wait()``
stops the group as soon as any worker exits non-zero. ``spawn`` lets a caller start each rank
some other way (``spantrain local --emulate`` starts it inside its device's network namespace
and cgroup on the testbed); the process group and the parent-death signal stay the same.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spantrain_planner.core.contract import WorkerEnv, rendezvous_env

PR_SET_PDEATHSIG = 1

#: ``spawn(rank, argv, env, popen_kwargs)`` starts one worker and returns its Popen; the
#: keyword arguments (log file, process group, pre-exec hook) must reach ``subprocess.Popen``.
Spawn = Callable[[int, list[str], dict[str, str], dict[str, Any]], "subprocess.Popen[bytes]"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LocalJob:
    """Worker processes of one plan on this machine."""

    procs: list[subprocess.Popen[bytes]]
    out_dir: Path
    pgid: int
    log_files: list[Path] = field(default_factory=list)

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def stop(self, grace_seconds: float = 5.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after ``grace_seconds``."""
        for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
            if all(code is not None for code in self.poll()):
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(c is None for c in self.poll()):
                time.sleep(0.05)

    def wait(
        self, timeout: float | None = None, on_tick: Callable[[], None] | None = None
    ) -> list[int]:
        """Wait for every worker; stop them all on the first failure or on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = self.poll()
            if on_tick is not None:
                on_tick()
            if all(c is not None for c in codes):
                return [int(c) for c in codes if c is not None]
            if any(c not in (None, 0) for c in codes):
                self.stop()
                return [int(c) if c is not None else -9 for c in self.poll()]
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"workers still running after {timeout}s; stopped them. "
                                   f"Logs: {', '.join(map(str, self.log_files))}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}"
                         for p in self.log_files if p.exists())


def start(
    plan_path: str | Path,
    world_size: int,
    out_dir: str | Path,
    *,
    training_path: str | Path | None = None,
    job: str = "local",
    checkpoint_dir: str | Path | None = None,
    emulation_path: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
    python: str = sys.executable,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    spawn: Spawn | None = None,
    replan_inputs_path: str | Path | None = None,
) -> LocalJob:
    """Start ``world_size`` workers (default: on 127.0.0.1, as plain child processes; see
    ``spawn``); their logs go to ``out_dir/rank<r>.log``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port() if master_port is None else master_port
    worker = WorkerEnv(
        plan_path=str(plan_path), training_path=str(training_path) if training_path else None,
        job=job, output_dir=str(out), metrics_port=0, num_threads=1, device="cpu",
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        emulation_path=str(emulation_path) if emulation_path else None,
        replan_inputs_path=str(replan_inputs_path) if replan_inputs_path else None,
    )
    base = dict(os.environ)
    base.update({
        **rendezvous_env(master_addr, port, world_size, 0), **worker.to_env(),
        "OMP_NUM_THREADS": "1",
    })
    del base["RANK"]
    base.update(extra_env or {})
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    pgid = 0
    for rank in range(world_size):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), PET_NODE_RANK=str(rank))
        log_path = out / f"rank{rank}.log"
        logs.append(log_path)
        with log_path.open("wb") as log:
            argv = [python, "-m", "spantrain_worker.worker"]
            popen: dict[str, Any] = {
                "stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL,
                "process_group": pgid, "preexec_fn": _die_with_parent,
            }
            if spawn is None:
                proc = subprocess.Popen(argv, env=env, **popen)
            else:
                proc = spawn(rank, argv, env, popen)
        if rank == 0:
            pgid = proc.pid
        procs.append(proc)
    return LocalJob(procs, out, pgid, logs)
