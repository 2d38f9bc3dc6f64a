"""Plan jobs one at a time, first come first served, off kopf's worker threads.

Role: planning is CPU-bound Python; run from many of kopf's worker threads at once, the plans
share the GIL and each finishes only after all of them (50 jobs applied together would all
wait for the slowest), while they hold every worker thread and starve the reconciles of jobs
that are already planned. ``PlanQueue.result`` hands a job's planning to one background thread
and returns at once -- the plan when it is done, None while it is queued or running (the
job's timer comes back) -- waiting a little only for the plan being computed right now (or
next), so a lone job is planned within one pass. A request is keyed by what the plan depends on; a
request with another key replaces the job's earlier one.

Called by ``handlers``. Must not import torch, spantrain_worker, kopf or the Kubernetes client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

T = TypeVar("T")


class PlanQueue(Generic[T]):
    def __init__(self, *, name: str = "spantrain-plan") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: dict[str, tuple[Hashable, Future[T]]] = {}
        self._lock = threading.Lock()

    def result(
        self, job: str, key: Hashable, compute: Callable[[], T], *, wait_seconds: float = 0.0
    ) -> T | None:
        """``compute()``'s value for ``job`` once done (its exception re-raised), else None."""
        with self._lock:
            pending = self._pending.get(job)
            if pending is None or pending[0] != key:
                if pending is not None:
                    pending[1].cancel()  # stale (the spec or the lost nodes changed)
                pending = (key, self._pool.submit(compute))
                self._pending[job] = pending
            future = pending[1]
            ahead = sum(1 for j, (_, f) in self._pending.items() if j != job and not f.done())
        if wait_seconds > 0 and (future.running() or not ahead):
            wait([future], timeout=wait_seconds)
        if not future.done():
            return None
        with self._lock:
            if self._pending.get(job) == pending:
                del self._pending[job]
        return future.result()

    def queued(self) -> int:
        """Requests not finished yet."""
        with self._lock:
            return sum(1 for _, f in self._pending.values() if not f.done())

    def forget(self, job: str) -> None:
        with self._lock:
            pending = self._pending.pop(job, None)
        if pending is not None:
            pending[1].cancel()
