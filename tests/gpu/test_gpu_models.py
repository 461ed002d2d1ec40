"""GPU checks, run on an H100/H200 when one is available; skipped elsewhere.

- bf16 parity: Megatron logprobs of the tiny Llama/Qwen2 models within bf16 tolerance of
  transformers in bf16 (both compute in bf16; the tolerance covers two different bf16 kernels).
- 8B-shaped layers (hidden 4096, 32 heads, 8 KV heads, FFN 14336, vocab 128256) run
  forward+backward at 4x4096 tokens with the SDPA spec without running out of memory; the time
  and peak memory are printed (run with -s) for the record.
"""

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def one_gpu_world():
    from rlmt_megatron.config.model_build import ModelBuildConfig, PrecisionConfig
    from rlmt_megatron.distributed import bootstrap

    build = ModelBuildConfig(precision=PrecisionConfig(params_dtype="bfloat16"), attention_backend="sdpa")
    bootstrap.initialize(build.parallel)
    yield build
    bootstrap.shutdown()


@pytest.mark.parametrize("name", ["llama-policy", "qwen2-policy"])
def test_bf16_parity(one_gpu_world, tiny_models, test_sequences, name):
    from transformers import AutoModelForCausalLM

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.runner.forward_only import sequence_logprobs

    _, seqs = test_sequences
    built = load_model(tiny_models / name, "policy", one_gpu_world)
    got = sequence_logprobs(built, seqs)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models / name), dtype=torch.bfloat16).cuda().eval()
    worst = 0.0
    with torch.no_grad():
        for s, lp in zip(seqs, got):
            ids = torch.tensor([s], device="cuda")
            ref = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
            worst = max(worst, (lp - ref).abs().max().item())
    print(f"{name}: bf16 max |logprob diff| = {worst:.4f}")
    assert worst < 0.1


def test_8b_shaped_layers_forward_backward(one_gpu_world):
    from rlmt_megatron.models.builder import build_model
    from rlmt_megatron.models.hf_config import parse_hf_config
    from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
    spec = parse_hf_config(cfg, "8b-shaped")
    built = build_model(spec, "policy", one_gpu_world)
    model = built.chunks[0]
    ids = torch.randint(0, spec.vocab_size, (4, 4096), device="cuda")
    pos = torch.arange(4096, device="cuda").expand(4, -1)
    for step in range(3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        logits = model(ids, pos, None)
        loss = -vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], spec.vocab_size).mean()
        loss.backward()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"4 Llama-3.1-8B-shaped layers + 128K head, 4x4096 tokens, SDPA spec, bf16: {elapsed * 1e3:.1f} ms, peak {peak:.1f} GiB")
    assert torch.isfinite(loss)


def test_bf16_train_steps_reduce_the_loss(one_gpu_world, tiny_models):
    """bf16 weights with fp32 main params in Megatron's distributed optimizer, on one GPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
    from train_worker import global_batch, nll_token_mean

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.optim import OptimConfig
    from rlmt_megatron.runner.model_runner import ModelRunner

    engine = ModelRunner(load_model(tiny_models / "llama-policy", "policy", one_gpu_world), OptimConfig(lr=1e-3))
    losses = [engine.train_step(global_batch(1024), nll_token_mean)["loss"] for _ in range(5)]
    print("bf16 losses", losses)
    assert losses[-1] < losses[0]
