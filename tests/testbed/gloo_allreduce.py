"""torch.distributed gloo all-reduce, run inside testbed namespaces by the root tests.

``python gloo_allreduce.py RANK WORLD PORT``: rendezvous at ``tcp://$MASTER_ADDR:PORT`` (device
0's testbed address), all-reduce ``[rank + 1] * 4`` and a 4 MB tensor over gloo bound to
``$GLOO_SOCKET_IFNAME``, print JSON with the results and the seconds the big one took.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{port}", rank=rank,
        world_size=world, timeout=timedelta(seconds=60),
    )
    small = torch.full((4,), float(rank + 1))
    dist.all_reduce(small)
    big = torch.ones(1_000_000)
    dist.barrier()
    start = time.monotonic()
    dist.all_reduce(big)
    seconds = time.monotonic() - start
    print(json.dumps({"rank": rank, "small": small.tolist(), "big_sum": float(big.sum()),
                      "big_seconds": seconds, "ifname": os.environ["GLOO_SOCKET_IFNAME"]}),
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
