"""Weight sync into the embedded HF engine after a real training step, at TP x PP layouts.

One 4-rank job runs every layout in turn against one engine (tests/workers/rollout_worker.py).
At each, the trainer takes one optimizer step, exports HF-named buckets (several per pipeline stage,
256 KiB budget) to rank 0, where the HF engine loads them. Then:
- the engine holds exactly the trainer's weights: equal checksums, and tensor by tensor;
- the weights really changed (the sync did not just keep the start-up folder's);
- the engine's logprobs of its own samples (temperature 0.8) equal the trainer's logprobs of the
  same tokens within 1e-4: the same function of the same float32 weights computed by two
  implementations (SDPA + fused vocab-parallel logprobs vs transformers + log_softmax), which
  differ by float32 rounding (~1e-6 observed);
- every sample carries the synced weight version.
"""

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_worker_once

LAYOUTS = ["1x1", "2x1", "1x2", "2x2"]
RUNS = {"all": (4, ["--engine", "hf", "--layouts", ",".join(LAYOUTS)])}
_cache: dict = {}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hf_engine_holds_trainer_weights_and_agrees_on_logprobs(layout, tiny_models, tmp_path_factory):
    got = run_worker_once(_cache, "rollout_worker.py", RUNS, "all", tiny_models / "llama-policy", tmp_path_factory)[layout]
    assert got["engine_checksum"] == got["trainer_checksum"]
    engine, trainer = got["engine_state"], got["trainer_state"]
    assert set(trainer) <= set(engine)
    for name, tensor in trainer.items():
        assert torch.equal(engine[name].detach(), tensor), name
    start = load_file(str(tiny_models / "llama-policy" / "model.safetensors"))
    assert not torch.equal(trainer["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    assert len(got["logprob_diffs"]) == 4 and max(got["logprob_diffs"]) <= 1e-4
    assert got["versions"] == [got["version"]] * 4  # the layout's own sync
    assert all(n >= 1 for n in got["lengths"])


def test_sync_errors_and_stops(tiny_models):
    from rlmt_megatron.rollout.engine import EngineError
    from rlmt_megatron.rollout.hf_engine import HFEngine
    from rlmt_megatron.rollout.types import SamplingParams

    engine = HFEngine(tiny_models / "llama-policy")
    weights = load_file(str(tiny_models / "llama-policy" / "model.safetensors"))
    partial = [(n, t) for n, t in weights.items() if n != "model.norm.weight"]
    with pytest.raises(EngineError, match=r"weight sync v5 is incomplete; missing \['model.norm.weight'\]"):
        engine.update_weights([partial], version=5)
    with pytest.raises(EngineError, match="sent 'model.extra.weight'"):
        engine.update_weights([[("model.extra.weight", torch.zeros(1))]], version=6)
    with pytest.raises(EngineError, match="has shape"):
        engine.update_weights([[("model.norm.weight", torch.zeros(3))]], version=7)
    engine.update_weights([list(weights.items())[:10], list(weights.items())[10:]], version=8)
    prompt = [1018, 40, 41, 42]
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 6 and greedy.weight_version == 8
    # stopping at the first greedy token keeps it and reports "stop"
    stopped = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[greedy.token_ids[0]]))[0][0]
    assert stopped.token_ids == greedy.token_ids[:1] and stopped.finish_reason == "stop"
    # greedy logprobs are those of the argmax under transformers' own forward
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + greedy.token_ids])).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits, -1).max(-1)
    assert ref.indices.tolist() == greedy.token_ids
    assert (torch.tensor(greedy.logprobs) - ref.values).abs().max() <= 1e-5


def test_engine_dtype_by_name(tiny_models):
    from rlmt_megatron.rollout.engine import EngineError
    from rlmt_megatron.rollout.hf_engine import HFEngine

    engine = HFEngine(tiny_models / "llama-policy", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    with pytest.raises(EngineError, match="unknown dtype 'bf17'"):
        HFEngine(tiny_models / "llama-policy", device="cpu", dtype="bf17")
