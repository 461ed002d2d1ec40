"""Under torchrun (2 ranks, gloo): exercises distributed/collectives.py and writes what each rank
saw to <out>/rank_<r>.json, for tests/test_collectives.py to compare with the expected values."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.distributed import collectives as c
from rlmt_megatron.rollout.engine import EngineError


def outcome(fn):
    """What rank0_decides did on this rank: ("value", v) or ("raised", type name, message)."""
    try:
        return ["value", c.rank0_decides(fn, "testing the protocol", shared=(EngineError,))]
    except Exception as e:  # noqa: BLE001 - recorded for the test
        return ["raised", type(e).__name__, str(e)]


def each_outcome(fn):
    """What each_rank_reports did on this rank: ("value", [[kind, text], ...]) or ("raised", type, message)."""
    try:
        return ["value", [[kind, str(payload)] for kind, payload in
                          c.each_rank_reports(fn, "testing the protocol", shared=(EngineError,))]]
    except Exception as e:  # noqa: BLE001 - recorded for the test
        return ["raised", type(e).__name__, str(e)]


def main(out: Path) -> None:
    bootstrap.initialize(ParallelConfig())  # DP = 2
    rank = dist.get_rank()
    seen = {"world": [c.world_rank(), c.world_size()], "rank0": c.is_rank0()}
    seen["value"] = outcome(lambda: {"answer": 42, "from": c.world_rank()})  # fn runs on rank 0 only

    def engine_failed():
        raise EngineError("engine process died")

    def bug():
        raise KeyError("no such bucket")

    seen["shared"] = outcome(engine_failed)
    seen["fatal"] = outcome(bug)
    # each_rank_reports: every rank's outcome on every rank; rank 1's expected error travels, and
    # an unexpected one on rank 1 ends every rank
    seen["each"] = each_outcome(lambda: f"value of rank {rank}" if rank == 0 else engine_failed())
    seen["each_fatal"] = each_outcome(lambda: bug() if rank == 1 else "fine")
    seen["sum"] = c.dp_all_reduce([1.0 + rank, 10.0 * rank])
    seen["max"] = c.dp_all_reduce([float(rank), -float(rank)], op="max")
    seen["min"] = c.dp_all_reduce([float(rank), -float(rank)], op="min")
    seen["any"] = [c.any_rank(rank == 1), c.any_rank(False)]
    seen["all_ok"] = [c.all_ranks_ok(rank == 0), c.all_ranks_ok(True)]
    items = list(range(5))
    seen["shard"] = c.dp_shard(items)
    seen["gather"] = c.dp_gather(c.dp_shard(items))
    seen["from_rank0"] = c.broadcast_from_rank0(f"rank {rank}'s object")
    bootstrap.initialize(ParallelConfig(pp=2))  # the last stage is rank 1
    seen["from_last_stage"] = c.broadcast_from_last_stage(f"stage of rank {rank}")
    (out / f"rank_{rank}.json").write_text(json.dumps(seen))
    bootstrap.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
