"""One variant of the train-step benchmark, in a fresh process: build, step, time, measure.

Started by ``benchmarks/train_step.py`` (``python benchmarks/train_step_worker.py --config JSON
--out FILE``); ``--probe`` instead measures the device once (matmul peak, memory, whether
Transformer Engine imports) so the parent never touches the GPU and keeps no CUDA context
while the variants run.

Both stacks train on the same synthetic GRPO batch (``synthetic_samples``) from the same HF
folder with the trainer's default GRPO objective (``trainer_policy_loss``); one step is
forward + backward over token-budget micro-batches + clipped AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal, Optional

import torch
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import matmul_peak_tflops, peak_memory, reset_peak_memory, synchronize
from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.runner.batching import Sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class WorkerConfig(StrictModel):
    """What one variant runs (written as JSON by the parent)."""

    stack: Literal["megatron", "transformers"]
    model: str
    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "bfloat16"] = "float32"
    # megatron
    attention_backend: Literal["sdpa", "te"] = "sdpa"
    fp8: Optional[Literal["tensorwise", "delayed"]] = None
    performance: Optional[dict] = None  # ModelBuildConfig.performance, passed through as given
    overlap_grad_reduce: bool = False
    # transformers: fp32 = fp32 master params + autocast(bf16) when dtype is bfloat16
    baseline_params: Literal["fp32", "bf16"] = "fp32"
    # both
    seq_len: PositiveInt
    sequences: PositiveInt
    micro_batch_tokens: PositiveInt
    lr: PositiveFloat = 1e-6
    warmup: NonNegativeInt = 1
    steps: PositiveInt = 1
    seed: int = 0
    check: bool = False  # also return the logprobs of the first sequence after the last step


# --------------------------------------------------------------------------- shared inputs

def synthetic_samples(seq_len: int, sequences: int, vocab: int, seed: int = 0) -> list[Sample]:
    """A GRPO batch as the trainer builds it (``policy_sample``): random token ids, the first
    eighth of each sequence a prompt (no loss), the rest a response whose actions carry one
    group-normalised advantage; old and reference log p scattered around the uniform
    ``-log V`` (a random model's scale), so ratios straddle the clip range."""
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(sequences, generator=g, dtype=torch.float64)
    adv = (adv - adv.mean()) / (adv.std() + 1e-6) if sequences > 1 else adv.sign()
    prompt = max(1, seq_len // 8)
    samples = []
    for i in range(sequences):
        ids = torch.randint(0, vocab, (seq_len,), generator=g)
        mask = torch.zeros(seq_len - 1)
        mask[prompt - 1:] = 1.0  # action t predicts token t + 1: the response tokens
        old = -math.log(vocab) + 0.3 * torch.randn(seq_len - 1, generator=g)
        ref = -math.log(vocab) + 0.3 * torch.randn(seq_len - 1, generator=g)
        samples.append(Sample(ids, {"loss_mask": mask, "old_logp": old, "ref_logp": ref,
                                    "advantages": mask * float(adv[i])}))
    return samples


def trainer_defaults():
    """The GRPO objective settings rlmt-train uses by default (AlgorithmConfig, rollout temperature)."""
    from rlmt_megatron.config.rlmt import AlgorithmConfig, RolloutConfig

    return SimpleNamespace(algorithm=AlgorithmConfig(), rollout=RolloutConfig())


def trainer_policy_loss(vocab: int):
    """The trainer's own GRPO loss function for the Megatron engine (trainer/updates.py)."""
    from rlmt_megatron.trainer.updates import _policy_loss

    d = trainer_defaults()
    return _policy_loss(d.algorithm, vocab, d.rollout.temperature, d.rollout.max_new_tokens)


def full_logits_loss(logits: torch.Tensor, mb, norms, vocab: int) -> tuple[torch.Tensor, dict]:
    """The same objective from full logits, as an FSDP trainer computes it: ``logits.float()``,
    divide by the temperature, ``log_softmax`` over the vocabulary, gather the targets; the
    entropy from the full distribution; then the shared per-token objective and aggregation."""
    from rlmt_megatron.algorithms import aggregate, policy_objective
    from rlmt_megatron.algorithms.policy_loss import PolicyLossConfig

    d = trainer_defaults()
    a = d.algorithm
    cfg = PolicyLossConfig(clip_low=a.clip_low, clip_high=a.clip_high, dual_clip_c=a.dual_clip_c,
                           kl_in_loss=a.kl_coef > 0, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                           entropy_coef=a.entropy_coef)
    f = mb.fields
    z = logits[:, :-1, :vocab].float() / (d.rollout.temperature or 1.0)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, mb.targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    total, _ = policy_objective(logp, f["old_logp"], f.get("ref_logp"), entropy, f["advantages"], f["loss_mask"], cfg)
    return aggregate(total, f["loss_mask"], norms, a.aggregation), {}


def _norms(samples: list[Sample]):
    from rlmt_megatron.algorithms.aggregation import GlobalNormalizers

    masks = [s.fields["loss_mask"] for s in samples]
    return GlobalNormalizers(num_tokens=float(sum(m.sum() for m in masks)),
                             num_seqs=float(sum(1 for m in masks if m.sum() > 0)))


# --------------------------------------------------------------------------- measuring

def measure(step: Callable[[], dict], cfg: WorkerConfig) -> dict:
    """``warmup`` then ``steps`` timed steps; peak memory over all of them (absolute: weights,
    optimizer state and activations), each step's loss and grad norm."""
    base = reset_peak_memory(cfg.device)
    history, seconds = [], []
    for i in range(cfg.warmup + cfg.steps):
        synchronize(cfg.device)
        start = time.perf_counter()
        metrics = step()
        synchronize(cfg.device)
        if i >= cfg.warmup:
            seconds.append(time.perf_counter() - start)
        history.append({"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])})
    return {"median_s": statistics.median(seconds), "step_s": seconds, "peak_bytes": peak_memory(cfg.device),
            "setup_bytes": base, "history": history}


def run_megatron(cfg: WorkerConfig) -> dict:
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig, PrecisionConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.runner.batching import make_train_micro_batches
    from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
    from rlmt_megatron.runner.model_runner import ModelRunner
    from rlmt_megatron.runner.forward_only import sequence_logprobs

    bootstrap.initialize(ParallelConfig(), seed=cfg.seed)
    try:
        extra = {"performance": cfg.performance} if cfg.performance is not None else {}
        build = ModelBuildConfig(attention_backend=cfg.attention_backend,
                                 precision=PrecisionConfig(params_dtype=cfg.dtype, fp8=cfg.fp8), **extra)
        built = load_model(cfg.model, "policy", build)
        optim = OptimConfig(lr=cfg.lr, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=True,
                            overlap_grad_reduce=cfg.overlap_grad_reduce)
        batching = BatchingConfig(train_tokens_per_microbatch=cfg.micro_batch_tokens,
                                  logprob_tokens_per_microbatch=cfg.micro_batch_tokens)
        engine = ModelRunner(built, optim, batching)
        vocab = built.spec.vocab_size
        samples = synthetic_samples(cfg.seq_len, cfg.sequences, vocab, cfg.seed)
        loss_fn = trainer_policy_loss(vocab)
        row = measure(lambda: engine.train_step(samples, loss_fn), cfg)
        row["micro_batches"] = len(make_train_micro_batches(samples, cfg.micro_batch_tokens))
        row["params"] = sum(p.numel() for chunk in built.chunks for p in chunk.parameters())
        if cfg.check:
            row["check_logp"] = sequence_logprobs(engine, [samples[0].input_ids.tolist()])[0].double().tolist()
        return row
    finally:
        bootstrap.shutdown()


def run_transformers(cfg: WorkerConfig) -> dict:
    """LlamaForCausalLM (sdpa) + torch AdamW + clip_grad_norm_, the same loss from full logits.

    Weight decay skips 1-D parameters (the norms), as Megatron's optimizer does by default, so
    both stacks apply the same update."""
    from transformers import LlamaForCausalLM

    from rlmt_megatron.runner.batching import make_train_micro_batches

    torch.manual_seed(cfg.seed)
    params_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" and cfg.baseline_params == "bf16" else torch.float32
    autocast = cfg.dtype == "bfloat16" and params_dtype == torch.float32
    model = LlamaForCausalLM.from_pretrained(cfg.model, dtype=params_dtype, attn_implementation="sdpa").to(cfg.device)
    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=cfg.device == "cuda")
    vocab = model.config.vocab_size
    samples = synthetic_samples(cfg.seq_len, cfg.sequences, vocab, cfg.seed)

    def step() -> dict:
        norms = _norms(samples)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=cfg.device)
        for mb in make_train_micro_batches(samples, cfg.micro_batch_tokens):
            mb = mb.to(cfg.device)
            with torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=mb.input_ids).logits
            share, _ = full_logits_loss(logits, mb, norms, vocab)
            share.backward()
            total += share.detach()
            del logits, share
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"loss": total, "grad_norm": grad_norm}

    row = measure(step, cfg)
    row["micro_batches"] = len(make_train_micro_batches(samples, cfg.micro_batch_tokens))
    row["params"] = sum(p.numel() for p in model.parameters())
    if cfg.check:
        with torch.no_grad():
            ids = samples[0].input_ids[None].to(cfg.device)
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        row["check_logp"] = lp.cpu().tolist()
    return row


def probe(device: str) -> dict:
    """The device's measured matmul peak (in the benchmark's compute dtype), its memory, and
    whether Transformer Engine imports here."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = {"device": device, "peak_tflops": matmul_peak_tflops(device, dtype), "peak_dtype": str(dtype).split(".")[-1]}
    if device == "cuda":
        out["total_memory"] = torch.cuda.get_device_properties(0).total_memory
        out["name"] = torch.cuda.get_device_name()
    try:
        import transformer_engine.pytorch  # noqa: F401

        out["te_error"] = None
    except Exception as e:  # noqa: BLE001 - any failure means the TE variants cannot run
        out["te_error"] = "transformer_engine not installed" if isinstance(e, ModuleNotFoundError) \
            else f"transformer_engine does not import: {type(e).__name__}: {str(e)[:120]}"
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="one train-step benchmark variant (started by train_step.py)")
    p.add_argument("--config", help="WorkerConfig as JSON")
    p.add_argument("--probe", choices=["cpu", "cuda"], help="measure the device instead of a variant")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.probe:
        result = probe(a.probe)
    else:
        cfg = WorkerConfig.model_validate_json(a.config)
        result = (run_megatron if cfg.stack == "megatron" else run_transformers)(cfg)
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
