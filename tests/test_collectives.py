"""distributed/collectives.py on a real 2-rank gloo world: the rank-0 and every-rank protocols (a
value, a shared error and an unexpected error, as every rank sees them), data-parallel reductions, agreement,
sharding and the broadcasts. The expected values are written out here by hand."""

import json

import pytest

from helpers import torchrun


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    torchrun(2, ["tests/workers/collectives_worker.py", str(out)])
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]


def test_rank0_decides_gives_every_rank_the_same_outcome(seen):
    r0, r1 = seen
    assert r0["world"] == [0, 2] and r1["world"] == [1, 2] and (r0["rank0"], r1["rank0"]) == (True, False)
    # a value computed on rank 0 only
    assert r0["value"] == r1["value"] == ["value", {"answer": 42, "from": 0}]
    # an expected error: the same exception on every rank
    assert r0["shared"] == r1["shared"] == ["raised", "EngineError", "engine process died"]
    # anything else: rank 0 raises its own, the others a Rank0Failed that says what rank 0 was doing
    assert r0["fatal"] == ["raised", "KeyError", "'no such bucket'"]
    assert r1["fatal"] == ["raised", "Rank0Failed", "rank 0 failed while testing the protocol: KeyError: 'no such bucket'"]


def test_each_rank_reports_gives_every_rank_every_outcome(seen):
    r0, r1 = seen
    assert r0["each"] == r1["each"] == ["value", [["value", "value of rank 0"], ["shared", "engine process died"]]]
    assert r1["each_fatal"] == ["raised", "KeyError", "'no such bucket'"]
    assert r0["each_fatal"] == ["raised", "RankFailed", "rank 1 failed while testing the protocol: KeyError: 'no such bucket'"]


def test_reductions_agreement_sharding_and_broadcasts(seen):
    for rank, r in enumerate(seen):
        assert r["sum"] == [1.0 + 2.0, 0.0 + 10.0]
        assert r["max"] == [1.0, 0.0] and r["min"] == [0.0, -1.0]
        assert r["any"] == [True, False] and r["all_ok"] == [False, True]
        assert r["shard"] == [[0, 1], [2, 3, 4]][rank]  # contiguous, balanced
        assert r["gather"] == [0, 1, 2, 3, 4]
        assert r["from_rank0"] == "rank 0's object"
        assert r["from_last_stage"] == "stage of rank 1"
