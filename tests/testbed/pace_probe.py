"""Run inside a testbed device: wall time of 2 ms-of-CPU chunks after 30 ms idle, without and
with the worker's pacing (``SPANTRAIN_PACE_CORES`` from the device's environment).

Prints one JSON line: the device's share, the median wall seconds of each kind of chunk.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from spantrain_worker.emulation import Emulation, Emulator

CPU = 0.002
share = float(os.environ["SPANTRAIN_PACE_CORES"])
emulator = Emulator(Emulation(pace_cores=share), rank=0)


def chunk(paced: bool) -> float:
    time.sleep(0.03)
    t0, c0 = time.perf_counter(), time.thread_time()
    while time.thread_time() - c0 < CPU:
        pass
    if paced:
        emulator.pad_compute(time.perf_counter() - t0, time.thread_time() - c0)
    return time.perf_counter() - t0


walls = {kind: statistics.median(chunk(kind == "paced") for _ in range(15))
         for kind in ("unpaced", "paced")}
print(json.dumps({"share": share, "cpu": CPU, **walls}))
