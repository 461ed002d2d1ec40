"""The engine fleet's two building blocks, against independent references: how a generation's
prompts are spread over engines (``rollout/fleet.assign``, checked against the best split found by
trying every one), and how one weight stream reaches every engine at once
(``rollout/weight_sync/fan_out``). The fleet with real engines: tests/test_rollout_vllm_engine.py
(two vLLM engines, one killed mid-rollout) and tests/test_fault_campaign.py (rlmt-train with two
hf engines, one killed, equal to a one-engine run)."""

import itertools
import random
import threading

import pytest
import torch

from rlmt_megatron.config.rlmt import RolloutConfig
from rlmt_megatron.rollout.fleet import MembersFailed, assign
from rlmt_megatron.rollout.weight_sync.fan_out import StreamFailed, fan_out


def _best_makespan(work: list[int], members: int) -> int:
    return min(max(sum(w for w, m in zip(work, owner) if m == k) for k in range(members))
               for owner in itertools.product(range(members), repeat=len(work)))


@pytest.mark.parametrize("members", [2, 3])
def test_prompts_go_longest_first_to_the_least_loaded_engine_within_grahams_bound(members):
    rng = random.Random(members)
    for _ in range(25):
        work = [rng.randint(1, 100) for _ in range(rng.randint(1, 8))]
        shares = assign(work, list(range(members)))
        # every prompt exactly once
        assert sorted(p for share in shares.values() for p in share) == list(range(len(work)))
        loads = [sum(work[p] for p in shares.get(m, [])) for m in range(members)]
        assert max(loads) <= (4 / 3 - 1 / (3 * members)) * _best_makespan(work, members) + 1e-9
    # not round-robin by prompt: the two long prompts go to different engines
    assert assign([100, 100, 1, 1], [0, 1]) == {0: [0, 2], 1: [1, 3]}
    # work already held counts: the idle engine takes the long prompt
    assert assign([50, 10], [0, 1], outstanding={0: 30}) == {0: [1], 1: [0]}


def test_a_fleet_failure_names_each_engine_and_survives_the_broadcast():
    import pickle

    error = pickle.loads(pickle.dumps(MembersFailed({1: "died", 0: "hung"}, fleet_size=3)))
    assert error.failed == {0: "hung", 1: "died"} and str(error) == "engine 0: hung; engine 1: died"
    assert str(MembersFailed({0: "hf engine process died"}, fleet_size=1)) == "hf engine process died"


def _stream(read: list, n: int = 6, fail_at: int = -1):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("export failed")
        read.append(i)
        yield [(f"w{i}", torch.full((2,), float(i)))]


def test_one_stream_reaches_every_engine_and_a_failing_engine_blocks_none():
    read, got, gate = [], {0: [], 2: []}, threading.Event()

    def keeps(index):
        def consume(buckets):
            for bucket in buckets:
                got[index].append(bucket[0][0])
                if index == 2:
                    gate.wait(5)  # a slow engine: the others go on meanwhile
        return consume

    def dies(buckets):
        next(iter(buckets))
        raise RuntimeError("engine process died")

    def stops_early(buckets):
        next(iter(buckets))  # returns after one bucket: its queue is emptied for it

    threading.Timer(0.3, gate.set).start()
    failed = fan_out(_stream(read), {0: keeps(0), 1: dies, 2: keeps(2), 3: stops_early}, depth=1)
    assert read == list(range(6))  # the collective export was read to its end, once
    assert got == {0: [f"w{i}" for i in range(6)], 2: [f"w{i}" for i in range(6)]}
    assert failed == {1: "RuntimeError: engine process died"}


@pytest.mark.parametrize("consumers", [1, 3])
def test_a_failed_export_reaches_every_engine_as_a_failure_and_the_caller_as_itself(consumers):
    seen = []

    def consume(buckets):
        try:
            for _ in buckets:
                pass
        except StreamFailed as e:
            seen.append(str(e))
            raise

    with pytest.raises(RuntimeError, match="export failed"):
        fan_out(_stream([], fail_at=3), {i: consume for i in range(consumers)})
    if consumers > 1:  # none of them took half a set of weights for a whole one
        assert seen == ["the weight export failed part-way: RuntimeError: export failed"] * consumers


def test_fleet_settings_that_cannot_work_are_refused_at_load():
    assert RolloutConfig(engines=2, engine="vllm").engines == 2
    with pytest.raises(ValueError, match="rollout.engines=2 needs each hf engine in its own process"):
        RolloutConfig(engines=2)
    with pytest.raises(ValueError, match=r"rollout.engines=3 SGLang engines need one URL each: rollout.sglang_url has 2"):
        RolloutConfig(engine="sglang", engines=3, sglang_url=["http://a:1", "http://b:1"])
    assert RolloutConfig(engine="sglang", engines=2, sglang_url=["http://a:1", "http://b:1"]).server_urls() == \
        ["http://a:1", "http://b:1"]


def test_asynchronous_settings_that_cannot_work_are_refused_at_load():
    from rlmt_megatron.config.rlmt import RLMTConfig

    def config(**sections):
        tree = {"models": {"policy": "p", "reward": "r"}, "data": {"prompts": ["x.jsonl"]},
                "rollout": {"max_staleness": 1, "engine_process": "subprocess"},
                "algorithm": {"rollout_correction": {"mode": "tis"}}}
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        return RLMTConfig.model_validate(tree)

    assert config().rollout.max_staleness == 1
    with pytest.raises(ValueError, match=r"rollout.max_staleness=1 \(asynchronous rollouts\) samples from weights older "
                                         r"than the ones trained: set algorithm.rollout_correction.mode"):
        config(algorithm={"rollout_correction": {"mode": "none"}})
    with pytest.raises(ValueError, match="cannot be combined with algorithm.dynamic_sampling"):
        config(algorithm={"dynamic_sampling": {"enabled": True}})
    with pytest.raises(ValueError, match="applies to grpo and ppo"):
        config(algorithm={"name": "dpo", "rollout_correction": {"mode": "none"}})
    with pytest.raises(ValueError, match=r"needs the hf engine in its own process \(rollout.engine_process=subprocess\)"):
        config(rollout={"engine_process": "inline"})


def test_request_seeds_are_distinct_in_range_and_do_not_cancel_when_derived_again():
    from rlmt_megatron.rollout.fleet import request_seeds

    assert request_seeds(None, 3) is None
    seeds = [s for base in range(200) for s in request_seeds(base, 64)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    # per-sample seeds derived from per-prompt seeds (SGLang's requests) stay distinct from both
    prompt_seeds = request_seeds(11, 8)
    sample_seeds = [s for p in prompt_seeds for s in request_seeds(p, 4)]
    assert len(set(sample_seeds + prompt_seeds + [11])) == 8 * 4 + 8 + 1
    assert request_seeds(11, 8) == prompt_seeds  # a resumed run derives the same ones


def test_stage_senders_are_the_owners_of_each_engines_feeding_replica():
    """Which stage owners send to which engine when every stage sends its own layers
    (``EngineHosts.fed_by``), and on which nodes they sit (``sender_nodes``, what
    ``weight_sync.master_address`` is checked against), for layouts written out by hand."""
    from rlmt_megatron.distributed.collectives import StageOwners
    from rlmt_megatron.trainer.engine_hosts import EngineHosts

    # 8 ranks, TP2 x PP2 x DP2, replica r on node r: ranks 0,1 | 2,3 are replica 0's stages 0 | 1.
    layout = StageOwners(replica=[0, 0, 0, 0, 1, 1, 1, 1], stage=[0, 0, 1, 1, 0, 0, 1, 1],
                         owner={(0, 0): 0, (0, 1): 2, (1, 0): 4, (1, 1): 6})
    hosts = EngineHosts(host={0: 0, 1: 4, 2: 0}, slot={0: 0, 1: 0, 2: 1}, layout=layout,
                        rank_node=[0, 0, 0, 0, 1, 1, 1, 1], rank_gpu=[0, 1, 2, 3, 0, 1, 2, 3])
    assert hosts.node == {0: 0, 1: 1, 2: 0} and hosts.replica == {0: 0, 4: 1}
    assert hosts.feeds([0, 1, 2]) == {0: 0, 4: 1}
    assert hosts.stages == 2
    assert [hosts.feeding(m) for m in range(3)] == [0, 1, 0]
    assert {r: hosts.fed_by(r, [0, 1, 2]) for r in range(8)} == {
        0: [0, 2], 1: [], 2: [0, 2], 3: [], 4: [1], 5: [], 6: [1], 7: []}
    assert hosts.fed_by(2, [1]) == []  # rank 2 owns a stage of replica 0 only
    assert hosts.sender_nodes([0, 2]) == {0} and hosts.sender_nodes([0, 1, 2]) == {0, 1}
    # one replica whose second stage sits on another node: its engine is synced from two nodes
    split = EngineHosts(host={0: 0}, slot={0: 0},
                        layout=StageOwners([0, 0, 0, 0], [0, 0, 1, 1], {(0, 0): 0, (0, 1): 2}),
                        rank_node=[0, 0, 1, 1], rank_gpu=[0, 1, 0, 1])
    assert split.sender_nodes([0]) == {0, 1}
