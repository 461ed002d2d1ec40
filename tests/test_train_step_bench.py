"""benchmarks/train_step.py: both stacks do the same work (against a float64 reference and each
other), the layers-auto arithmetic, argument handling, the goals block, and the script end to end
on CPU (tiny float32 model; Transformer Engine rows skipped)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import train_step as ts
from benchmarks.common import DecoderShape
from benchmarks.train_step_worker import synthetic_samples
from helpers import REPO

SEQ_LEN, SEQUENCES, VOCAB = 128, 4, 1024


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The script once, on CPU, at its tiny defaults with a learning rate large enough to see:
    1 warm-up + 2 timed steps, the logprobs of one sequence recorded after the last."""
    work = tmp_path_factory.mktemp("train-step")
    out = work / "rows.json"
    cmd = [sys.executable, "benchmarks/train_step.py", "--device", "cpu", "--lr", "1e-3", "--warmup", "1",
           "--steps", "2", "--check", "--workdir", str(work), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    result["model"] = work / "model"
    result["rows"] = {r["variant"]: r for r in result["rows"]}
    return result


# --------------------------------------------------------------------------- same work

def reference_loss(model, samples):
    """The trainer's default GRPO objective, written out by hand in float64: logits / 0.7,
    PPO clip 0.2 with dual clip 3, k3 KL to the reference (coef 0.001), entropy bonus 0.001,
    mean over the loss tokens of the batch."""
    total, count = 0.0, sum(float(s.fields["loss_mask"].sum()) for s in samples)
    for s in samples:
        ids = s.input_ids[None]
        z = model(input_ids=ids).logits[0, :-1].double() / 0.7
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, ids[0, 1:, None])[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        f = {k: v.double() for k, v in s.fields.items()}
        a, m = f["advantages"], f["loss_mask"]
        ratio = torch.exp((logp - f["old_logp"]).clamp(-20, 20))
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
        pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg)
        d = (f["ref_logp"] - logp).clamp(-20, 20)
        k3 = (torch.exp(d) - d - 1).clamp(-10, 10)
        total = total + ((pg + 0.001 * k3 - 0.001 * entropy) * m).sum() / count
    return total


def test_trainer_defaults_are_the_reference_constants():
    from benchmarks.train_step_worker import trainer_defaults

    d = trainer_defaults()
    a = d.algorithm
    assert (a.clip_low, a.clip_high, a.dual_clip_c, a.kl_coef, a.kl_estimator, a.entropy_coef, a.aggregation,
            d.rollout.temperature) == (0.2, 0.2, 3.0, 0.001, "k3", 0.001, "token_mean", 0.7)


def test_first_step_loss_and_grad_norm_match_float64(cpu_run):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(cpu_run["model"]), dtype=torch.float64)
    loss = reference_loss(model, synthetic_samples(SEQ_LEN, SEQUENCES, VOCAB, seed=0))
    loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    for name in ("megatron-sdpa-bf16", "transformers"):
        first = cpu_run["rows"][name]["history"][0]
        assert first["loss"] == pytest.approx(loss.detach().item(), rel=1e-5, abs=1e-7), name
        assert first["grad_norm"] == pytest.approx(grad_norm, rel=1e-5), name
    assert grad_norm > 1.0  # clipping is in play, so both clip the same way


def test_stacks_agree_step_after_step(cpu_run):
    meg, hf = cpu_run["rows"]["megatron-sdpa-bf16"], cpu_run["rows"]["transformers"]
    assert len(meg["history"]) == len(hf["history"]) == 3
    for m, h in zip(meg["history"], hf["history"]):
        assert m["loss"] == pytest.approx(h["loss"], rel=1e-5, abs=1e-6)
        assert m["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-5)
    assert meg["params"] == hf["params"]


def test_weights_agree_after_the_updates(cpu_run):
    # Logprobs of one sequence after 3 AdamW steps at lr 1e-3: equal in both stacks, and far
    # from the start, so the comparison sees the updates (AdamW, clip, no decay on norms).
    from transformers import LlamaForCausalLM

    meg = torch.tensor(cpu_run["rows"]["megatron-sdpa-bf16"]["check_logp"], dtype=torch.float64)
    hf = torch.tensor(cpu_run["rows"]["transformers"]["check_logp"], dtype=torch.float64)
    model = LlamaForCausalLM.from_pretrained(str(cpu_run["model"]), dtype=torch.float64)
    ids = synthetic_samples(SEQ_LEN, SEQUENCES, VOCAB, seed=0)[0].input_ids[None]
    with torch.no_grad():
        start = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert (meg - hf).abs().max() < 1e-4
    assert (meg - start).abs().max() > 1e-2


# --------------------------------------------------------------------------- end to end

def test_script_prints_every_variant_and_the_goals(cpu_run):
    out = cpu_run["stdout"]
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    for name in ts.VARIANTS:
        assert any(name in ln for ln in table[2:]), name
    te = next(ln for ln in table if "megatron-te-fp8-delayed" in ln)
    assert "skipped: " in te
    sdpa = next(ln for ln in table if ln.startswith("| megatron-sdpa-bf16 "))
    assert "failed" not in sdpa and "skipped" not in sdpa
    assert "Goals:" in out
    assert "- megatron-sdpa-bf16: tokens/s >= 1.15x baseline: " in out
    assert "- megatron-te-fp8-tensorwise: tokens/s >= 1.40x baseline: not measured (skipped: " in out
    assert cpu_run["layers"] == 2 and "2 layers, vocab 1024" in out


# --------------------------------------------------------------------------- arguments

def test_defaults_follow_the_device():
    cpu = ts.parse_args([], cuda=False)
    assert (cpu.device, cpu.layers, cpu.vocab, cpu.seq_len, cpu.sequences, cpu.micro_batch_tokens) == \
        ("cpu", 2, 1024, 128, 4, 512)
    gpu = ts.parse_args([], cuda=True)
    assert (gpu.device, gpu.layers, gpu.vocab, gpu.seq_len, gpu.sequences, gpu.micro_batch_tokens, gpu.shape) == \
        ("cuda", "auto", 128256, 4096, 4, 8192, "llama31-8b")
    assert gpu.variants == list(ts.VARIANTS) and gpu.performance is None and gpu.lr == 1e-6


@pytest.mark.parametrize("argv, cuda, message", [
    (["--layers", "auto"], False, "on CPU give a number"),
    (["--layers", "0"], False, "positive integer"),
    (["--layers", "many"], True, "positive integer, got 'many'"),
    (["--variants", "megatron-sdpa-bf16,vllm"], False, "unknown variant(s) ['vllm']"),
    (["--seq-len", "256", "--micro-batch-tokens", "128"], False, "is below --seq-len 256"),
    (["--warmup", "-1"], False, "--warmup must be >= 0"),
    (["--lr", "0"], False, "--lr must be > 0"),
    (["--baseline-params", "fp16"], True, "invalid choice: 'fp16'"),
    (["--recompute", "some"], True, "invalid choice: 'some'"),
])
def test_rejected_arguments(argv, cuda, message, capsys):
    with pytest.raises(SystemExit):
        ts.parse_args(argv, cuda=cuda)
    assert message in capsys.readouterr().err


def test_performance_flags_need_the_config_section(capsys, monkeypatch):
    from pydantic import BaseModel

    from rlmt_megatron.config import model_build

    # The section exists in this checkout: the flags pass through as given and validate.
    assert "performance" in model_build.ModelBuildConfig.model_fields
    a = ts.parse_args(["--recompute", "full", "--fusions", "off"], cuda=True)
    assert a.performance == {"recompute": "full", "fusions": "off"}
    model_build.ModelBuildConfig(performance=a.performance)
    assert ts.parse_args([], cuda=True).performance is None  # no flag: the config's defaults
    # A config without the section (as before it existed): the flags are refused by name.
    class WithoutPerformance(BaseModel):
        attention_backend: str = "auto"

    monkeypatch.setattr(model_build, "ModelBuildConfig", WithoutPerformance)
    with pytest.raises(SystemExit):
        ts.parse_args(["--recompute", "full"], cuda=True)
    assert "--recompute: ModelBuildConfig has no 'performance' section" in capsys.readouterr().err
    assert ts.parse_args([], cuda=True).performance is None  # without the flags nothing is asked of it


def test_auto_layers_by_hand():
    # Llama-3.1-8B per layer: q 4096x4096, k and v 1024x4096, o 4096x4096, gate/up/down
    # 3 x 4096x14336, two norms: 218,112,000. Embedding + head 2 x 128256 x 4096, final norm.
    assert ts.param_counts(DecoderShape.llama31_8b(layers=1)) == (218_112_000, 1_050_677_248)
    # 80 GB at 8192 tokens per micro-batch, 90% usable = 72e9 B:
    # transformers fp32+autocast: fixed 1_050_677_248*18 + 8192*128256*24 = 44_128_346_112;
    #   per layer 218_112_000*18 + 8192*4096*72 = 6_341_935_104 -> floor(27.87e9 / 6.34e9) = 4
    # Megatron bf16: fixed 1_050_677_248*18 + 8192*128256*8 + 2*256 MiB = 27_854_446_592 -> floor(6.96) = 6
    layers, lines = ts.auto_layers(80e9, DecoderShape.llama31_8b(layers=1), 8192,
                                   ["megatron-bf16", "transformers-fp32"])
    assert layers == 4
    assert lines[1].endswith("-> 6 layers") and lines[2].endswith("-> 4 layers") and "-> 4 layers" in lines[-1]
    # bf16 baseline: fixed 1_050_677_248*8 + 8192*128256*24 = 33_621_573_632; per layer
    # 218_112_000*8 + 8192*4096*60 = 3_758_161_920 -> floor(10.21) = 10; Megatron's 6 rules.
    assert ts.auto_layers(80e9, DecoderShape.llama31_8b(layers=1), 8192, ["megatron-bf16", "transformers-bf16"])[0] == 6
    # 200 GB would take more than the model has: capped at 32
    assert ts.auto_layers(2e12, DecoderShape.llama31_8b(layers=1), 8192, ["megatron-bf16"])[0] == 32


def test_auto_layers_refuses_when_the_baseline_fits_no_layer():
    # One 16K-token micro-batch: the baseline's fixed part is 18.9 GB + 16384*128256*24 = 69.3 GB.
    with pytest.raises(ValueError, match="transformers, fp32 master \\+ autocast bf16 does not fit one layer at "
                                         "16384 tokens per micro-batch: lower --micro-batch-tokens"):
        ts.auto_layers(85e9, DecoderShape.llama31_8b(layers=1), 16384, ["megatron-bf16", "transformers-fp32"])


def test_memory_models_follow_the_variants():
    assert ts.memory_models(list(ts.VARIANTS), "fp32") == ["megatron-bf16", "megatron-fp8", "transformers-fp32"]
    assert ts.memory_models(["transformers", "megatron-te-bf16"], "bf16") == ["transformers-bf16", "megatron-bf16"]
    assert ts.microbatch_tokens(4096, 4, 8192) == 8192
    assert ts.microbatch_tokens(4096, 4, 5000) == 4096  # one sequence per micro-batch
    assert ts.microbatch_tokens(4096, 4, 10**6) == 16384  # never more than the step holds


# --------------------------------------------------------------------------- rates and goals

def test_rates_by_hand():
    shape = DecoderShape(layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, head_dim=4, vocab=32)
    flops = shape.train_flops_per_token(10)
    rows = [{"variant": "megatron-sdpa-bf16", "median_s": 0.5, "peak_bytes": 3e9},
            {"variant": "transformers", "median_s": 1.0, "peak_bytes": 6e9},
            {"variant": "megatron-te-fp8-delayed", "error": "failed: boom"}]
    ts.add_rates(rows, shape, seq_len=10, sequences=4, peak_tflops=2e-9)
    meg, base, failed = rows
    assert meg["tokens_per_s"] == pytest.approx(80) and base["tokens_per_s"] == pytest.approx(40)
    assert meg["tflops"] == pytest.approx(40 * flops / 0.5 / 1e12)
    assert meg["mfu"] == pytest.approx(meg["tflops"] / 2e-9)
    assert (meg["speed_ratio"], meg["memory_ratio"]) == (pytest.approx(2.0), pytest.approx(0.5))
    assert "tokens_per_s" not in failed


def test_goals_met_and_missed_by_the_right_amount():
    rows = [
        {"variant": "megatron-sdpa-bf16", "speed_ratio": 1.07, "memory_ratio": 0.65, "mfu": 0.58},
        {"variant": "megatron-te-bf16", "speed_ratio": 1.20, "memory_ratio": 0.55, "mfu": 0.70},
        {"variant": "megatron-te-fp8-tensorwise", "speed_ratio": 1.25, "memory_ratio": 0.60, "mfu": 0.5},
        {"variant": "megatron-te-fp8-delayed", "error": "failed: CUDA out of memory"},
        {"variant": "transformers", "speed_ratio": 1.0, "memory_ratio": 1.0, "mfu": 0.4},
    ]
    got = {(g["variant"], g["goal"].split(" ")[0]): g for g in ts.goals(rows)}
    sdpa_speed, sdpa_mem, sdpa_mfu = (got["megatron-sdpa-bf16", k] for k in ("tokens/s", "peak", "MFU"))
    assert not sdpa_speed["met"] and sdpa_speed["missed_by"] == pytest.approx(0.08)
    assert sdpa_speed["status"] == "missed by 0.08x (1.07x)"
    assert not sdpa_mem["met"] and sdpa_mem["missed_by"] == pytest.approx(0.05)
    assert not sdpa_mfu["met"] and sdpa_mfu["status"] == "missed by 7.0 points (58.0%)"
    assert all(got["megatron-te-bf16", k]["met"] for k in ("tokens/s", "peak", "MFU"))
    assert got["megatron-te-bf16", "tokens/s"]["status"] == "met (1.20x)"
    fp8 = got["megatron-te-fp8-tensorwise", "tokens/s"]
    assert fp8["target"] == 1.4 and fp8["missed_by"] == pytest.approx(0.15)
    assert got["megatron-te-fp8-tensorwise", "peak"]["met"]  # exactly at the limit counts as met
    assert ("megatron-te-fp8-tensorwise", "MFU") not in got  # the MFU goal is for bf16
    assert got["megatron-te-fp8-delayed", "tokens/s"]["status"] == "not measured (failed: CUDA out of memory)"
    assert not any(v == "transformers" for v, _ in got)


def test_goals_without_a_baseline_say_so():
    rows = [{"variant": "megatron-sdpa-bf16", "mfu": 0.7}, {"variant": "transformers", "error": "failed: OOM"}]
    got = {(g["variant"], g["goal"].split(" ")[0]): g["status"] for g in ts.goals(rows)}
    assert got["megatron-sdpa-bf16", "tokens/s"] == "not measured (baseline: failed: OOM)"
    assert got["megatron-sdpa-bf16", "MFU"] == "met (70.0%)"


def test_gpu_flow_sizes_the_model_and_configures_every_variant(monkeypatch, tmp_path, capsys):
    # The GPU path's wiring, with the device, the model writer and the workers faked: layers
    # auto from the probed memory (85 GB, TE importable: the FP8 stack counts too), the model
    # written with that many layers, each variant's worker config valid and in bf16.
    from benchmarks.train_step_worker import WorkerConfig

    written, configs = {}, {}
    probed = {"device": "cuda", "peak_tflops": 800.0, "peak_dtype": "bfloat16", "total_memory": 85e9, "te_error": None}
    monkeypatch.setattr(ts, "probe", lambda device, out: probed)
    monkeypatch.setattr(ts.common, "write_random_model",
                        lambda folder, layers, vocab, device, seed, **shape: written.update(layers=layers, vocab=vocab,
                                                                                            shape=shape) or 1)

    def fake_run(name, a, model_dir, out):
        configs[name] = WorkerConfig.model_validate(ts.worker_config(name, a, model_dir))
        fast = ts.VARIANTS[name]["stack"] == "megatron"
        return {"variant": name, "precision": ts.precision_label(name, a), "median_s": 1.0 if fast else 1.5,
                "peak_bytes": 40e9 if fast else 70e9, "micro_batches": 2}

    monkeypatch.setattr(ts, "run_variant", fake_run)
    out = tmp_path / "rows.json"
    ts.main(["--device", "cuda", "--workdir", str(tmp_path), "--json", str(out)])
    # 90% of 85 GB = 76.5 GB; Megatron bf16 (76.5 - 27.85) / 6.34 -> 7, FP8 (76.5 - 29.96) / 6.78 -> 6,
    # transformers (76.5 - 44.13) / 6.34 -> 5
    assert written == {"layers": 5, "vocab": 128256, "shape": {}}
    result = json.loads(out.read_text())
    assert result["layers"] == 5 and [ln.split("-> ")[-1] for ln in result["arithmetic"][1:4]] == \
        ["7 layers", "6 layers", "5 layers"]
    assert set(configs) == set(ts.VARIANTS)
    assert all(c.dtype == "bfloat16" and c.device == "cuda" and c.micro_batch_tokens == 8192 and c.seq_len == 4096
               and c.lr == 1e-6 for c in configs.values())
    assert configs["megatron-te-fp8-delayed"].fp8 == "delayed" and configs["megatron-te-bf16"].attention_backend == "te"
    assert configs["transformers"].baseline_params == "fp32"
    text = capsys.readouterr().out
    assert "5 layers, vocab 128256" in text and "| fp32 master + autocast bf16 |" in text
    assert "- megatron-sdpa-bf16: tokens/s >= 1.15x baseline: met (1.50x)" in text
    assert "- megatron-sdpa-bf16: peak memory <= 0.60x baseline: met (0.57x)" in text
