"""Plan jobs in planner processes, first come first served, off kopf's threads.

Role: planning is CPU-bound Python. Run in kopf's worker threads, plans share one GIL with the
operator's own reconciles and each other (50 jobs applied together would all finish after the
slowest); run in one background thread, they queue behind each other on one core. So each plan
runs in a process of a small pool (one per CPU by default; started by a fork server that has
already imported the planner, so a plan starts in milliseconds), and a plan has a time budget
inside the planner (``search``'s anytime ``time_budget``), so one deep model delays no other
job by more than that. ``PlanQueue.result`` submits a job's plan and returns at once -- the
plan when it is done, None while it is queued or running (the job's timer comes back) --
waiting a little only when the plan is already being computed (or a process is free), so a
lone job is planned within one pass. A request is keyed by what the plan depends on; a request
with another key replaces the job's earlier one.

Called by ``handlers``. Must not import torch, spantrain_worker, kopf or the Kubernetes client.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: imported once by the fork server, so each planner process starts with the planner loaded
PRELOAD = ["spantrain_planner.passes.search", "spantrain_planner.api"]


class PlanQueue(Generic[T]):
    def __init__(self, *, processes: int = 1, threads: bool = False) -> None:
        """``processes`` plans at once, in processes (``threads=True``: in threads, for
        callables that cannot be pickled)."""
        self.processes = max(1, processes)
        self._threads = threads
        self._pool: Executor | None = None
        self._pending: dict[str, tuple[Hashable, Future[T]]] = {}
        self._watched: set[Future[T]] = set()
        self._lock = threading.Lock()

    def _executor(self) -> Executor:
        if self._pool is None:  # started on first use: importing the handlers starts nothing
            if self._threads:
                self._pool = ThreadPoolExecutor(self.processes, thread_name_prefix="plan")
            else:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(PRELOAD)
                self._pool = ProcessPoolExecutor(self.processes, mp_context=ctx)
        return self._pool

    def result(
        self, job: str, key: Hashable, compute: Callable[..., T],
        args: Callable[[], tuple[Any, ...]], *, wait_seconds: float = 0.0,
    ) -> T | None:
        """``compute(*args())``'s value for ``job`` once done (its exception re-raised), else
        None. ``args`` is called only when a request is submitted (building the arguments can
        cost more than asking); ``compute`` and the arguments must pickle (a module-level
        function and data)."""
        with self._lock:
            pending = self._pending.get(job)
            stale = pending is not None and pending[0] != key
        if pending is None or stale:
            submitted = args()  # outside the lock: it may be slow, or raise
            with self._lock:
                pending = self._pending.get(job)
                if pending is None or pending[0] != key:
                    if pending is not None:
                        pending[1].cancel()  # stale (the spec or the lost nodes changed)
                    pending = (key, self._executor().submit(compute, *submitted))
                    self._pending[job] = pending
        assert pending is not None
        with self._lock:
            future = pending[1]
            ahead = sum(1 for j, (_, f) in self._pending.items() if j != job and not f.done())
        if wait_seconds > 0 and (future.running() or ahead < self.processes):
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

    def busy(self, job: str) -> bool:
        """Whether ``job`` has a request that is queued or running."""
        with self._lock:
            pending = self._pending.get(job)
        return pending is not None and not pending[1].done()

    def when_done(self, job: str, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (in a pool thread) once ``job``'s pending request is done, so
        its result is taken at once rather than at the job's next timer tick."""
        with self._lock:
            pending = self._pending.get(job)
            if pending is None or pending[1] in self._watched:
                return  # nothing pending, or already watched (once per request)
            self._watched.add(pending[1])

        def done(future: Future[T]) -> None:
            self._watched.discard(future)
            callback()

        pending[1].add_done_callback(done)

    def forget(self, job: str) -> None:
        with self._lock:
            pending = self._pending.pop(job, None)
        if pending is not None:
            pending[1].cancel()

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._pending.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
