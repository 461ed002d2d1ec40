"""Two ranks, one stuck: the watchdog reports both, and the collective timeout ends the wait.

Rank 1 spends --sleep seconds in its 'slow work' phase; rank 0 waits for it in a barrier. The
process group's timeout is --timeout-s; the watchdog's is --watchdog-s. Rank 0 writes what the
barrier raised to --out.
"""

import argparse
import json
import time
from pathlib import Path

import torch.distributed as dist

from rlmt_megatron.distributed.bootstrap import init_process_group
from rlmt_megatron.trainer.watchdog import Watchdog, activity


def _slow_work(seconds: float) -> None:
    time.sleep(seconds)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--timeout-s", type=float, required=True)
    p.add_argument("--watchdog-s", type=float, required=True)
    p.add_argument("--sleep", type=float, required=True)
    a = p.parse_args()
    out = Path(a.out)
    init_process_group(timeout_minutes=a.timeout_s / 60)
    rank = dist.get_rank()
    with Watchdog(a.watchdog_s, out / "watchdog"), activity("step 1"):
        if rank == 1:
            with activity("slow work on rank 1"):
                _slow_work(a.sleep)
        else:
            error = None
            with activity("barrier: waiting for rank 1"):
                try:
                    dist.barrier()
                except RuntimeError as e:  # the collective timeout
                    error = f"{type(e).__name__}: {e}"
            (out / "rank0_result.json").write_text(json.dumps({"error": error}))


if __name__ == "__main__":
    main()
