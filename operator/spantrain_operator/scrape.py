"""Read a worker's Prometheus endpoint: the operator's only HTTP client besides the API.

Role: ``Scraper.poll`` fetches ``http://<pod IP>:<port>/metrics`` of one job's rank 0 with a
short timeout, at most every ``interval`` seconds per job, backing off (doubling up to
``max_backoff``) while nothing answers -- a worker still starting, a network the operator
cannot reach, or KWOK's fake pods where nothing listens -- and never raises: progress is
advisory, a reconcile must not fail or stall because of it. Parsing is ``status``'s (pure).

Called by ``handlers``. Must not import torch, spantrain_worker or kopf.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from . import status

log = logging.getLogger(__name__)

#: Bytes read at most from one metrics page (a worker's page is a few KiB).
MAX_PAGE_BYTES = 1 << 20

# No proxies: pod IPs are reached directly, whatever HTTP(S)_PROXY the operator runs with.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(ip: str, port: int, *, timeout: float) -> str | None:
    """The text at ``http://ip:port/metrics``; None on any failure (logged at debug level)."""
    host = f"[{ip}]" if ":" in ip else ip
    url = f"http://{host}:{port}/metrics"
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            body: bytes = resp.read(MAX_PAGE_BYTES)
    except (OSError, ValueError, http.client.HTTPException) as err:
        log.debug("metrics %s: %s", url, err)
        return None
    return body.decode("utf-8", "replace")


@dataclass
class _Due:
    at: float = 0.0
    failures: int = 0


class Scraper:
    """Rate-limited, backing-off progress reads, keyed by job uid (thread-safe)."""

    def __init__(
        self,
        *,
        interval: float,
        timeout: float,
        max_backoff: float = 300.0,
        fetcher: Callable[..., str | None] = fetch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._fetch = fetcher
        self._clock = clock
        self._due: dict[str, _Due] = {}
        self._lock = threading.Lock()

    def poll(self, key: str, ip: str, port: int) -> status.WorkerReport | None:
        """The worker's report if one is due and it answered with one, else None."""
        now = self._clock()
        with self._lock:
            due = self._due.setdefault(key, _Due())
            if now < due.at:
                return None
            due.at = now + self.interval  # claimed: a concurrent call waits its turn
        text = self._fetch(ip, port, timeout=self.timeout)
        report = status.worker_report(text) if text is not None else None
        with self._lock:
            if text is None:
                due.failures += 1
                wait = min(self.interval * 2 ** min(due.failures, 16), self.max_backoff)
                due.at = self._clock() + wait
            else:
                due.failures = 0
        return report

    def forget(self, key: str) -> None:
        with self._lock:
            self._due.pop(key, None)
