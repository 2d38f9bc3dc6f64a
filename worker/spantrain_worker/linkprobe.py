"""Link probes of the cluster profiler: latency and bandwidth of one directed node pair.

Role: what ``spantrain profile-cluster`` runs on the two ends of a pair (inside testbed
namespaces, or one per node in a pod). ``serve`` listens on the receiving node; ``probe`` runs
on the sending node and measures the link *towards* the server:

* latency: ``count`` round trips of a tiny payload (64 bytes, ``TCP_NODELAY``) on one
  connection; each sample is half a round trip, in milliseconds;
* bandwidth: ``repeats`` transfers of a large payload (sized so one lasts about
  ``target_seconds`` at the rate a first 256 KiB transfer shows), each timed from the header
  to the server's one-byte acknowledgement after it has read every byte, minus one median
  round trip; Mbit/s of payload (goodput).

Both ends are bounded in time (``timeout``): a peer that cannot be reached or stalls makes
``probe`` fail with a message naming the address, never hang.

Standard library only (it must start fast inside a device with a tenth of a core): no torch,
no pydantic, no kopf, no Kubernetes client. Run as ``python -m spantrain_worker.linkprobe``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from typing import Any

TINY = 64
FIRST_PAYLOAD = 256 * 1024
MIN_PAYLOAD = 256 * 1024
MAX_PAYLOAD = 1 << 30
CHUNK = 1 << 20


class ProbeError(RuntimeError):
    """The peer could not be reached, or the exchange did not finish in time."""


def _read_exact(conn: socket.socket, n: int) -> bytes:
    parts = []
    left = n
    while left:
        data = conn.recv(min(left, CHUNK))
        if not data:
            raise ProbeError(f"connection closed with {left} of {n} bytes missing")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _read_line(conn: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        data = conn.recv(1)
        if not data:
            return out
        out += data
        if len(out) > 100:
            raise ProbeError("header too long")
    return out.strip()


def _drain(conn: socket.socket, n: int) -> None:
    left = n
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while left:
        got = conn.recv_into(view, min(left, CHUNK))
        if not got:
            raise ProbeError(f"connection closed with {left} of {n} bytes missing")
        left -= got


def serve(addr: str, port: int, timeout: float) -> None:
    """Answer probes until ``timeout`` seconds pass without a new connection, or a ``BYE``."""
    with socket.create_server((addr, port), reuse_port=False) as srv:
        srv.settimeout(timeout)
        print(json.dumps({"listening": f"{addr}:{port}"}), flush=True)
        while True:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                return
            with conn:
                conn.settimeout(timeout)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    if not _session(conn):
                        return
                except (OSError, ProbeError):
                    continue


def _session(conn: socket.socket) -> bool:
    """One client connection; False when the client said BYE."""
    while True:
        header = _read_line(conn)
        if not header:
            return True
        word, _, arg = header.partition(b" ")
        if word == b"BYE":
            return False
        if word == b"PING":
            for _ in range(int(arg)):
                conn.sendall(_read_exact(conn, TINY))
        elif word == b"BULK":
            _drain(conn, int(arg))
            conn.sendall(b"K")
        else:
            raise ProbeError(f"unknown request {header!r}")


def _connect(addr: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((addr, port), timeout=max(0.1, min(
                2.0, deadline - time.monotonic())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as err:  # the server may still be starting
            last = err
            time.sleep(0.05)
    raise ProbeError(f"cannot reach {addr}:{port} within {timeout:g} s ({last})")


def _bulk(sock: socket.socket, payload: memoryview, n: int) -> float:
    t0 = time.perf_counter()
    sock.sendall(b"BULK %d\n" % n)
    left = n
    while left:
        chunk = payload[: min(left, len(payload))]
        sock.sendall(chunk)
        left -= len(chunk)
    if _read_exact(sock, 1) != b"K":
        raise ProbeError("bad acknowledgement")
    return time.perf_counter() - t0


def probe(addr: str, port: int, *, count: int = 20, repeats: int = 5,
          target_seconds: float = 0.5, timeout: float = 60.0,
          payload_bytes: int | None = None, bye: bool = False) -> dict[str, Any]:
    """Latency and bandwidth samples of the link towards ``addr:port`` (see the module)."""
    deadline = time.monotonic() + timeout
    sock = _connect(addr, port, timeout)
    try:
        sock.settimeout(max(1.0, timeout))
        tiny = b"\x5a" * TINY
        rtts = []
        sock.sendall(b"PING %d\n" % (count + 1))
        for k in range(count + 1):
            t0 = time.perf_counter()
            sock.sendall(tiny)
            _read_exact(sock, TINY)
            if k:  # the first round trip wakes the server up
                rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        payload = memoryview(b"\0" * CHUNK)
        if payload_bytes is None:
            first = _bulk(sock, payload, FIRST_PAYLOAD)
            rate = FIRST_PAYLOAD / max(first - rtt, 1e-6)
            payload_bytes = int(min(MAX_PAYLOAD, max(MIN_PAYLOAD, rate * target_seconds)))
        rates: list[float] = []
        for _ in range(repeats):
            if time.monotonic() > deadline:
                raise ProbeError(f"timed out after {timeout:g} s ({len(rates)} of {repeats} "
                                 "transfers done)")
            seconds = _bulk(sock, payload, payload_bytes)
            rates.append(payload_bytes * 8 / 1e6 / max(seconds - rtt, 1e-9))
        if bye:
            sock.sendall(b"BYE\n")
    except (OSError, ValueError) as err:
        raise ProbeError(f"probe of {addr}:{port} failed: {err}") from None
    finally:
        sock.close()
    return {"latencyMs": [r / 2 * 1e3 for r in rtts], "bandwidthMbps": rates,
            "payloadBytes": payload_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spantrain_worker.linkprobe",
        description="Link probe of spantrain profile-cluster: 'serve' on the receiving node, "
        "'probe' on the sending one (prints JSON samples).")
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("addr")
    s.add_argument("port", type=int)
    s.add_argument("--timeout", type=float, default=120.0,
                   help="stop after this many seconds without a probe")
    p = sub.add_parser("probe")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=20, help="tiny round trips (latency)")
    p.add_argument("--repeats", type=int, default=5, help="large transfers (bandwidth)")
    p.add_argument("--target-seconds", type=float, default=0.5,
                   help="how long one large transfer should last")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--bye", action="store_true", help="stop the server afterwards")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        serve(args.addr, args.port, args.timeout)
        return 0
    try:
        out = probe(args.addr, args.port, count=args.count, repeats=args.repeats,
                    target_seconds=args.target_seconds, timeout=args.timeout, bye=args.bye)
    except ProbeError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
