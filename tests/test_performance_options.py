"""build.performance (fusions, activation recomputation) changes speed and memory, not results.

Each option builds the tiny Llama policy and runs forward + backward of the summed next-token
logprobs on CPU in float32. The logprobs are compared with transformers' LlamaForCausalLM (an
independent implementation); the gradients with those of the same model built without the option
(whose gradients test_train_step.py checks against transformers).
"""

import pytest
import torch

from rlmt_megatron.config.model_build import ModelBuildConfig, PerformanceConfig


def _logprobs_and_grads(model_dir, perf: PerformanceConfig, ids):
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs

    built = load_model(model_dir, "policy", ModelBuildConfig(performance=perf))
    model = built.chunks[0]
    model.train()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    logits = model(ids, pos, None)  # [b, s, V]
    logp = vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], built.spec.vocab_size)
    logp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), grads, model.config


@pytest.fixture(scope="module")
def batch_and_reference(tiny_models):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 500, (2, 24), generator=g)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models / "llama-policy"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return ids, ref


@pytest.fixture(scope="module")
def baseline(world_of_one, tiny_models, batch_and_reference):
    ids, _ = batch_and_reference
    return _logprobs_and_grads(tiny_models / "llama-policy", PerformanceConfig(fusions="off"), ids)


@pytest.mark.parametrize("perf", [
    PerformanceConfig(fusions="on"),
    PerformanceConfig(fusions="off", recompute="selective"),
    PerformanceConfig(fusions="off", recompute="full", recompute_layers=2),
    PerformanceConfig(fusions="on", recompute="full", recompute_layers=1),
], ids=["fused-swiglu", "selective", "full-2", "fused+full-1"])
def test_option_keeps_logprobs_and_gradients(world_of_one, tiny_models, batch_and_reference, baseline, perf):
    ids, ref = batch_and_reference
    base_logp, base_grads, _ = baseline
    logp, grads, _ = _logprobs_and_grads(tiny_models / "llama-policy", perf, ids)
    assert (logp.double() - ref).abs().max() < 1e-4
    assert (base_logp.double() - ref).abs().max() < 1e-4
    assert grads.keys() == base_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, base_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("perf, expected", [
    # CPU + auto: nothing fused (the unfused path is the one compared with transformers).
    (PerformanceConfig(), dict(bias_activation_fusion=False, apply_rope_fusion=False,
                               gradient_accumulation_fusion=False, recompute_granularity=None)),
    # 'on' without Transformer Engine: only the torch-compiled SwiGLU exists.
    (PerformanceConfig(fusions="on"), dict(bias_activation_fusion=True, apply_rope_fusion=False,
                                           gradient_accumulation_fusion=False)),
    (PerformanceConfig(recompute="selective"), dict(recompute_granularity="selective", recompute_modules=["core_attn"])),
    (PerformanceConfig(recompute="full", recompute_layers=3),
     dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3)),
])
def test_options_reach_the_transformer_config(world_of_one, perf, expected):
    from rlmt_megatron.models.builder import transformer_config
    from rlmt_megatron.models.hf_config import parse_hf_config

    spec = parse_hf_config(dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256,
                                hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                max_position_embeddings=128), "inline")
    config = transformer_config(spec, ModelBuildConfig(attention_backend="sdpa", performance=perf))
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_unknown_option_is_rejected():
    with pytest.raises(Exception, match="recompute"):
        ModelBuildConfig.model_validate({"performance": {"recompute": "sometimes"}})


@pytest.mark.parametrize("fp8, tp, sp, expected", [
    (None, 1, False, 1), (None, 2, True, 2), (None, 2, False, 1),
    # Transformer Engine's FP8 GEMMs need the token dimension divisible by 16 (mxfp8: 32)
    ("tensorwise", 1, False, 16), ("delayed", 2, True, 32), ("mxfp8", 1, False, 32), ("mxfp8", 2, True, 64),
])
def test_sequence_multiple(fp8, tp, sp, expected):
    from rlmt_megatron.config.model_build import ParallelConfig, PrecisionConfig
    from rlmt_megatron.models.builder import BuiltModel

    build = ModelBuildConfig(precision=PrecisionConfig(params_dtype="bfloat16", fp8=fp8),
                             parallel=ParallelConfig(tp=tp, sequence_parallel=sp))
    assert BuiltModel(spec=None, build=build, role="policy", chunks=[], padded_vocab_size=0).sequence_multiple == expected


@pytest.mark.parametrize("apex, expected", [(False, False), (True, True)])
def test_wgrad_fusion_only_with_apex_kernel(monkeypatch, apex, expected):
    """On a GPU with the TE spec: GPTModel's output layer is Megatron's own ColumnParallelLinear,
    which needs Apex's fused_weight_gradient_mlp_cuda for the model-wide flag."""
    from rlmt_megatron.models import builder, layer_specs

    monkeypatch.setattr(layer_specs, "uses_te_spec", lambda build: True)
    monkeypatch.setattr(builder, "_apex_wgrad_kernel_available", lambda: apex)
    options = builder._performance_options(ModelBuildConfig(), on_cpu=False)
    assert options["gradient_accumulation_fusion"] is expected
    assert options["apply_rope_fusion"] is True and options["bias_activation_fusion"] is True
