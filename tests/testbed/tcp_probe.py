"""TCP throughput probe run inside testbed namespaces by the root tests (not a test module).

``python tcp_probe.py recv ADDR PORT SECONDS`` accepts one connection on ADDR (a testbed
address), reads until EOF or SECONDS, and prints JSON: bytes, seconds, and the steady-state
rate (bytes between the first 0.5 s and the last byte, so the token bucket's initial burst
does not count). ``python tcp_probe.py send ADDR PORT SECONDS MAX_BYTES`` connects (retrying
while the receiver starts) and sends until SECONDS or MAX_BYTES. Both are bounded in time and
bytes and only ever talk to the address they are given. Standard library only.
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 64 * 1024
WARMUP_SECONDS = 0.5


def recv(addr: str, port: int, seconds: float) -> None:
    with socket.create_server((addr, port)) as srv:
        srv.settimeout(10.0)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(1.0)
            total = 0
            start = time.monotonic()
            mark_time, mark_bytes = None, 0
            last = start
            while time.monotonic() - start < seconds:
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                if not data:
                    break
                total += len(data)
                last = time.monotonic()
                if mark_time is None and last - start >= WARMUP_SECONDS:
                    mark_time, mark_bytes = last, total
    steady = None
    if mark_time is not None and last > mark_time:
        steady = (total - mark_bytes) / (last - mark_time)
    print(json.dumps({"bytes": total, "seconds": last - start, "rate": steady}), flush=True)


def send(addr: str, port: int, seconds: float, max_bytes: int) -> None:
    deadline = time.monotonic() + 10.0
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=2.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    payload = b"\0" * CHUNK
    sent = 0
    start = time.monotonic()
    with sock:
        sock.settimeout(2.0)
        while sent < max_bytes and time.monotonic() - start < seconds:
            try:
                sent += sock.send(payload)
            except TimeoutError:
                continue
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "recv":
        recv(addr, port, float(sys.argv[4]))
    else:
        send(addr, port, float(sys.argv[4]), int(sys.argv[5]))
