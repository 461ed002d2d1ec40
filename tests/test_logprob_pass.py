"""Chunked-head logprobs (training/chunked_logprobs.py) and benchmarks/logprob_pass.py.

The reference is transformers' own LlamaForCausalLM / Qwen2ForCausalLM (tied embeddings) in
float64: log_softmax over the full vocabulary, gathered at the next token. The Megatron side is
float32, so 1e-5 bounds reduction-order differences only.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks import logprob_pass as lpb
from helpers import torchrun
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.optim import BatchingConfig
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.runner.chunked_logprobs import (
    chunked_head_logprobs,
    final_hidden_states,
    head_weight,
    sequence_logprobs_chunked,
)
from rlmt_megatron.runner.model_runner import ModelRunner

TOL = 1e-5
POLICIES = ("llama-policy", "qwen2-policy")  # untied and tied output weights


def hf_logprobs(model, seq) -> torch.Tensor:
    ids = torch.tensor([seq])
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return {name: AutoModelForCausalLM.from_pretrained(str(tiny_models / name), dtype=torch.float64).eval()
            for name in POLICIES}


@pytest.fixture(scope="module")
def hf_reference(hf_models, test_sequences):
    _, seqs = test_sequences
    return {name: [hf_logprobs(m, s) for s in seqs] for name, m in hf_models.items()}


@pytest.fixture(scope="module")
def policies(world_of_one, tiny_models):
    return {name: load_model(tiny_models / name, "policy", world_of_one) for name in POLICIES}


# --------------------------------------------------------------------------- library, TP=1

@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("chunk", [1, 6, 30, 7, 64])  # 1, 6, 30 divide the 30 tokens; 7 and 64 do not
def test_chunked_head_matches_transformers(policies, hf_models, name, chunk):
    built = policies[name]
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, built.spec.vocab_size, (2, 16), generator=g)
    model = built.chunks[0].eval()
    with torch.no_grad(), final_hidden_states(built.chunks):
        hidden = model(ids, torch.arange(16).expand(2, 16), None)
    assert hidden.shape == (2, 16, built.spec.hidden_size)  # [b, s, h], not logits
    lp = chunked_head_logprobs(hidden[:, :-1], ids[:, 1:], head_weight(model), built.spec.vocab_size, chunk_tokens=chunk)
    assert lp.shape == (2, 15) and lp.dtype == torch.float32
    for row in range(2):
        diff = (lp[row].double() - hf_logprobs(hf_models[name], ids[row].tolist())).abs().max().item()
        assert diff <= TOL, f"{name} chunk {chunk} row {row}: {diff}"


@pytest.mark.parametrize("name", POLICIES)
def test_sequence_logprobs_chunked_matches_transformers(policies, hf_reference, test_sequences, name):
    _, seqs = test_sequences
    # 48-token budget: several right-padded micro-batches; chunks of 5 straddle sequence ends.
    for chunk in (5, 1024):
        runner = ModelRunner(policies[name], None, BatchingConfig(logprob_tokens_per_microbatch=48))
        got = sequence_logprobs_chunked(runner, seqs, chunk_tokens=chunk)
        assert len(got) == len(seqs)
        for s, lp, ref in zip(seqs, got, hf_reference[name]):
            assert lp.shape == (len(s) - 1,)
            assert (lp.double() - ref).abs().max().item() <= TOL


def test_temperature_divides_the_logits(policies, hf_models):
    seq = list(range(3, 40, 2))
    got = sequence_logprobs_chunked(policies["llama-policy"], [seq], chunk_tokens=4, temperature=0.7)[0]
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = hf_models["llama-policy"](ids).logits[0, :-1].double() / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert (got.double() - ref).abs().max().item() <= TOL


def test_output_layer_is_restored_even_after_an_error(policies):
    built = policies["llama-policy"]
    model = built.chunks[0].eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(RuntimeError, match="boom"):
        with final_hidden_states(built.chunks):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="already active"):
        with final_hidden_states(built.chunks), final_hidden_states(built.chunks):
            pass
    with torch.no_grad():
        logits = model(ids, torch.arange(4)[None], None)
    assert logits.shape == (1, 4, built.padded_vocab_size)
    assert "forward" not in vars(model.output_layer)


def test_refuses_scalar_heads_and_bad_chunks(world_of_one, tiny_models, policies):
    critic = load_model(tiny_models / "llama-rm", "critic", world_of_one)
    with pytest.raises(RLMTError, match="ScalarHead"):
        with final_hidden_states(critic.chunks):
            pass
    with pytest.raises(ValueError, match="chunk_tokens"):
        sequence_logprobs_chunked(policies["llama-policy"], [[1, 2, 3]], chunk_tokens=0)
    weight = head_weight(policies["llama-policy"].chunks[0])
    with pytest.raises(ValueError, match="do not line up"):
        chunked_head_logprobs(torch.zeros(4, weight.shape[1]), torch.zeros(3, dtype=torch.long), weight, 10)


# --------------------------------------------------------------------------- library, 2 ranks

def test_two_ranks_tp_sp_pp(tiny_models, test_sequences, hf_reference, tmp_path):
    path, seqs = test_sequences
    out = tmp_path / "out.json"
    torchrun(2, ["tests/workers/chunked_logprob_worker.py", "--models", str(tiny_models), "--sequences", str(path),
                 "--out", str(out)])
    got = json.loads(out.read_text())
    assert sorted(got) == ["pp2", "tp2", "tp2sp"]
    for layout, per_model in got.items():
        for name in POLICIES:
            for chunk, lps in per_model[name].items():
                for s, lp, ref in zip(seqs, lps, hf_reference[name], strict=True):
                    diff = (torch.tensor(lp, dtype=torch.float64) - ref).abs().max().item()
                    assert len(lp) == len(s) - 1 and diff <= TOL, f"{layout} {name} chunk {chunk}: {diff}"


# --------------------------------------------------------------------------- benchmark script

TINY = ["--layers", "2", "--vocab", "300", "--params-dtype", "float32", "--repeats", "1",
        "--shape", "hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,head_dim=16"]


def test_defaults_follow_the_device():
    gpu = lpb.parse_args([], cuda=True)
    assert (gpu.layers, gpu.vocab, gpu.batches, gpu.shape, gpu.params_dtype) == (4, 128256, [(4, 4096)], {}, "bfloat16")
    assert gpu.variants == ["fused", "full-logits", "fused-chunked-head"]
    cpu = lpb.parse_args([], cuda=False)
    assert (cpu.layers, cpu.vocab, cpu.batches) == (2, 32768, [(2, 512)])
    sweep = lpb.parse_args(["--tokens-list", "4x2048,4x4096,8x4096", "--variants", "fused,full-logits"], cuda=True)
    assert sweep.batches == [(4, 2048), (4, 4096), (8, 4096)] and sweep.variants == ["fused", "full-logits"]


@pytest.mark.parametrize("argv, message", [
    (["--tokens-list", "4by2048"], "is not SEQUENCESxSEQ_LEN"),
    (["--tokens-list", "4x1"], "at least 2 tokens"),
    (["--tokens-list", "4x64", "--seq-len", "64"], "not both"),
    (["--seq-len", "1"], "at least 2"),
    (["--variants", "fused,naive"], "unknown variant"),
    (["--chunk-tokens", "0"], "positive integer"),
    (["--layers", "two"], "positive integer"),
    (["--shape", "hidden=64"], "KEY=VALUE"),
    (["--shape", "num_attention_heads=6,num_key_value_heads=4"], "do not divide"),
])
def test_rejected_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        lpb.parse_args(argv, cuda=False)
    assert message in capsys.readouterr().err


def test_goal_verdict_and_ratio():
    rows = [{"batch": "4×4096", "variant": "full-logits", "peak_above_gib": 20.0},
            {"batch": "4×4096", "variant": "fused", "peak_above_gib": 8.0},
            {"batch": "4×4096", "variant": "fused-chunked-head", "peak_above_gib": 3.0},
            {"batch": "8×4096", "variant": "fused", "peak_above_gib": 1.0},  # its full-logits row failed
            {"batch": "8×4096", "variant": "full-logits", "error": "CUDA out of memory"}]
    out = lpb.add_comparisons(rows)
    assert out[1]["ratio"] == pytest.approx(0.4) and out[1]["goal"] == "missed by 1.6×"
    assert out[2]["ratio"] == pytest.approx(0.15) and out[2]["goal"] == "met"
    assert "ratio" not in out[0] and "ratio" not in out[3]


@pytest.mark.skipif(lpb.backend_or_skip("te")[1] is None, reason="Transformer Engine is installed here")
def test_missing_transformer_engine_is_a_stated_skip(capsys, tmp_path):
    lpb.main([*TINY, "--attention-backend", "te", "--workdir", str(tmp_path)])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 2×512 |")]
    assert len(rows) == 2 * 3  # streamed, then in the final table
    assert all("skipped: transformer_engine is not installed" in ln for ln in rows)


def test_benchmark_end_to_end_on_cpu(capsys, tmp_path):
    report = tmp_path / "results.md"
    lpb.main([*TINY, "--tokens-list", "2x40", "--chunk-tokens", "16", "--workdir", str(tmp_path), "--write", str(report)])
    final = capsys.readouterr().out.split("| batch |")[-1]
    header = ["batch"] + [c.strip() for c in final.splitlines()[0].split("|")[:-1]]
    rows = {}
    for line in final.splitlines()[2:]:
        if line.startswith("| 2×40 |"):
            cells = dict(zip(header, (c.strip() for c in line.split("|")[1:-1])))
            rows[cells["variant"]] = cells
    assert sorted(rows) == sorted(lpb.VARIANTS)
    for variant, cells in rows.items():
        assert not cells["tokens/s"].startswith("failed"), cells
        assert float(cells["tokens/s"].replace(",", "")) > 0 and float(cells["peak above weights GiB"]) >= 0
        if variant != "full-logits":
            assert cells["goal ≤ ¼"] == "met" or cells["goal ≤ ¼"].startswith("missed by "), cells
            # float32: every variant computes the same logprobs from the same weights and tokens
            assert float(cells["max abs Δ logprob vs full"]) <= 1e-5, cells
    written = report.read_text()
    assert "## Logprob pass (forward only)" in written and "Command: `python benchmarks/logprob_pass.py" in written
    assert "--write" not in written and written.count("| 2×40 |") == 3
