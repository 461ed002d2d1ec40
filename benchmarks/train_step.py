"""One policy train step (forward + backward + AdamW), Megatron against a transformers baseline.

How to run (on one H100/H200; every variant in its own fresh process, side by side in one run):

  python benchmarks/train_step.py [--device cuda|cpu] [--layers auto|N] [--seq-len 4096]
      [--sequences 4] [--micro-batch-tokens 8192] [--steps 10] [--warmup 3]
      [--baseline-params fp32|bf16] [--variants megatron-sdpa-bf16,...,transformers]
      [--recompute none|selective|full] [--fusions auto|off] [--overlap-grad-reduce]
      [--json rows.json] [--write docs/benchmarks.md]

Without CUDA the same script runs a tiny float32 model (2 layers, hidden 256, vocab 1024,
4 x 128 tokens) in seconds: that is what its tests do; the numbers mean nothing there.

Model: Llama-3.1-8B-shaped layers (hidden 4096, FFN 14336, 32 heads / 8 KV heads of 128,
llama3 RoPE, vocab 128256, untied head) with random weights, written once as an HF folder
(``common.write_random_model``); both stacks load that same folder. Batch: ``--sequences`` x
``--seq-len`` random tokens as a GRPO batch (the first eighth of each sequence is the prompt,
no loss), split by the token budget ``--micro-batch-tokens`` exactly as the trainer splits it
(``make_train_micro_batches``) for both stacks.

Variants:
- ``megatron-sdpa-bf16``: our policy (local spec + SDPA core attention), bf16 params, fp32 grad
  buffer, ``ModelRunner`` with Megatron's distributed optimizer (AdamW lr 1e-6, wd 0.01 on
  matrices only, clip 1.0) and the trainer's own default GRPO loss (``trainer/updates.py``: PPO
  clip 0.2 + dual clip 3, k3 KL 0.001 to the reference logprobs, entropy bonus 0.001,
  temperature 0.7, token mean) through the fused vocab-parallel logprobs;
- ``megatron-te-bf16``, ``megatron-te-fp8-tensorwise``, ``megatron-te-fp8-delayed``: the same
  on the Transformer Engine spec, bf16 or FP8 (hybrid) linears; one "skipped" row states why
  when transformer_engine does not import;
- ``transformers``: ``LlamaForCausalLM`` (``attn_implementation="sdpa"``), ``torch.optim.AdamW``
  (fused on CUDA, the same hyperparameters and the same no-decay rule for 1-D weights),
  ``clip_grad_norm_(1.0)``, and the same loss from full logits: ``logits.float()`` / T ->
  ``log_softmax`` -> gather, entropy from the full distribution. This is what the RLMT authors'
  FSDP trainer runs per GPU. Precision (decided): by default as verl's FSDP mixed precision,
  fp32 master params + ``torch.autocast(bfloat16)`` (fp32 grads and Adam states);
  ``--baseline-params bf16`` keeps pure bf16 params (and bf16 Adam states) instead.
``--recompute``/``--fusions`` (-> ``ModelBuildConfig.performance``) and ``--overlap-grad-reduce``
(-> ``OptimConfig``) apply to the Megatron rows only.

Per variant: ``--warmup`` untimed steps, then ``--steps`` timed ones (median); tokens/s; model
TFLOP/s (``common.DecoderShape.train_flops_per_token``: no recomputation counted); MFU against
the bf16 matmul peak measured once in the same run (``common.matmul_peak_tflops``); peak memory
over all steps (``torch.cuda.max_memory_allocated``: weights + optimizer state + activations);
ratios to the baseline. A goals block follows: bf16 >= 1.15x the baseline's tokens/s, FP8 >=
1.4x, peak memory <= 0.6x the baseline's, bf16 MFU >= 65%; each "met" or "missed by".

``--layers auto`` (the GPU default): the full 32 layers do not fit one 80 GB GPU with fp32
master weights and Adam states, so the script takes the most 8B-shaped layers every selected
stack fits in 90% of the GPU's memory, from bytes per parameter + activation and logits
allowances (``MEMORY``; the arithmetic is printed). The GPU default micro-batch is 8192 tokens
(two micro-batches of 2 x 4096 per 16K-token step): one 16K-token micro-batch leaves the
baseline no room for even one layer, since its full-vocabulary loss alone takes ~24 bytes per
token per vocabulary entry (50 GB at 16K x 128K).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import LLAMA31_8B, LLAMA31_8B_LAYERS, LLAMA31_8B_VOCAB, REPO, DecoderShape

WORKER = Path(__file__).resolve().parent / "train_step_worker.py"
SCRIPT = "benchmarks/train_step.py"

# name -> how the worker builds it
VARIANTS: dict[str, dict] = {
    "megatron-sdpa-bf16": dict(stack="megatron", attention_backend="sdpa", fp8=None),
    "megatron-te-bf16": dict(stack="megatron", attention_backend="te", fp8=None),
    "megatron-te-fp8-tensorwise": dict(stack="megatron", attention_backend="te", fp8="tensorwise"),
    "megatron-te-fp8-delayed": dict(stack="megatron", attention_backend="te", fp8="delayed"),
    "transformers": dict(stack="transformers"),
}
TE_VARIANTS = [n for n, v in VARIANTS.items() if v.get("attention_backend") == "te"]
BASELINE = "transformers"

TINY = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
DEFAULTS = {
    "cuda": dict(layers="auto", vocab=LLAMA31_8B_VOCAB, seq_len=4096, sequences=4, micro_batch_tokens=8192,
                 steps=10, warmup=3, shape="llama31-8b"),
    "cpu": dict(layers="2", vocab=1024, seq_len=128, sequences=4, micro_batch_tokens=None, steps=3, warmup=1,
                shape="tiny"),
}
MAX_LAYERS = LLAMA31_8B_LAYERS

# The goals (docs/benchmarks.md): (what, variants it applies to, target, higher is better)
SPEED_BF16, SPEED_FP8, MEMORY_RATIO, MFU_BF16 = 1.15, 1.4, 0.6, 0.65


# --------------------------------------------------------------------------- memory arithmetic

@dataclass(frozen=True)
class MemoryModel:
    """GPU bytes one stack needs, per parameter and per token.

    ``per_param``: weights + grads + optimizer state; ``activations``: bytes per token, per
    hidden unit, per layer, kept for backward (counted with ``saved_tensors_hooks`` on CPU at the
    8B ratios: transformers under autocast 59, transformers bf16 49, Megatron local spec bf16 61;
    here x1.2 for backward's transients); ``logits``: bytes per token per vocabulary entry at the
    loss's peak (measured on CPU: the full-logits loss peaks 20 bytes above the bf16 logits and
    their gradient); ``extra``: fixed bytes (the fused logprobs' two float32 chunk buffers).
    """

    label: str
    per_param: float
    activations: float
    logits: float
    extra: float = 0.0


MEMORY = {
    # fp32 params 4 + fp32 grads 4 + Adam m, v 8 + autocast's bf16 weight copies 2 (kept for backward)
    "transformers-fp32": MemoryModel("transformers, fp32 master + autocast bf16", 18, 72, 24),
    # bf16 params 2 + grads 2 + Adam m, v in bf16 4
    "transformers-bf16": MemoryModel("transformers, bf16 params", 8, 60, 24),
    # bf16 params 2 + fp32 grad buffer 4 + fp32 main params 4 + Adam 8; logits bf16, the
    # sliced copy the loss reads, and both gradients
    "megatron-bf16": MemoryModel("Megatron bf16", 18, 72, 8, 2 * 256 * 2**20),
    # + FP8 weight copies and their transposes (2 bytes per parameter, an allowance)
    "megatron-fp8": MemoryModel("Megatron FP8", 20, 72, 8, 2 * 256 * 2**20),
}


def param_counts(shape: DecoderShape) -> tuple[int, int]:
    """(parameters per decoder layer, parameters outside the layers) of an untied Llama."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = shape.hidden * (q + 2 * kv) + q * shape.hidden + 3 * shape.hidden * shape.ffn + 2 * shape.hidden
    return per_layer, 2 * shape.vocab * shape.hidden + shape.hidden


def microbatch_tokens(seq_len: int, sequences: int, budget: int) -> int:
    """Padded tokens of the largest micro-batch the token-budget packing makes of equal sequences."""
    return max(1, min(sequences, budget // seq_len)) * seq_len


def memory_models(variants: list[str], baseline_params: str) -> list[str]:
    keys = []
    for name in variants:
        v = VARIANTS[name]
        key = (f"transformers-{baseline_params}" if v["stack"] == "transformers"
               else "megatron-fp8" if v.get("fp8") else "megatron-bf16")
        if key not in keys:
            keys.append(key)
    return keys


def auto_layers(memory_bytes: float, shape: DecoderShape, tokens: int, models: list[str],
                margin: float = 0.10, cap: int = MAX_LAYERS) -> tuple[int, list[str]]:
    """The most layers every stack in ``models`` fits in ``(1 - margin) * memory_bytes`` with
    ``tokens`` per micro-batch; and the arithmetic, line by line. Raises ValueError naming the
    stack that does not fit one layer."""
    usable = (1 - margin) * memory_bytes
    per_layer_params, fixed_params = param_counts(shape)
    lines = [f"layers auto: usable {usable / 1e9:.1f} GB = {1 - margin:.0%} of {memory_bytes / 1e9:.1f} GB; "
             f"{per_layer_params / 1e6:.1f} M params per layer, {fixed_params / 1e6:.1f} M embedding + head; "
             f"{tokens} tokens per micro-batch"]
    fits = []
    for key in models:
        m = MEMORY[key]
        fixed = fixed_params * m.per_param + tokens * shape.vocab * m.logits + m.extra
        layer = per_layer_params * m.per_param + tokens * shape.hidden * m.activations
        n = math.floor((usable - fixed) / layer)
        lines.append(
            f"  {m.label}: fixed {fixed_params / 1e6:.1f} M x {m.per_param:g} B + logits {tokens} x {shape.vocab} x "
            f"{m.logits:g} B{f' + {m.extra / 1e9:.2f} GB' if m.extra else ''} = {fixed / 1e9:.1f} GB; per layer "
            f"{per_layer_params / 1e6:.1f} M x {m.per_param:g} B + activations {tokens} x {shape.hidden} x "
            f"{m.activations:g} B = {layer / 1e9:.2f} GB; ({usable / 1e9:.1f} - {fixed / 1e9:.1f}) / "
            f"{layer / 1e9:.2f} -> {n} layers")
        if n < 1:
            raise ValueError("\n".join(lines) + f"\n{m.label} does not fit one layer at {tokens} tokens per "
                             "micro-batch: lower --micro-batch-tokens (or --seq-len / --vocab)")
        fits.append(n)
    layers = min(min(fits), cap)
    lines.append(f"  -> {layers} layers (the fewest of the stacks, at most {cap})")
    return layers, lines


# --------------------------------------------------------------------------- arguments


def _layers(text: str) -> str:
    if text != "auto":
        common.positive_int(text)
    return text




def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--layers", type=_layers, default=None,
                   help="decoder layers, or 'auto': the most that fit every stack on this GPU (GPU default; CPU: 2)")
    p.add_argument("--vocab", type=common.positive_int, default=None, help="vocabulary (GPU 128256, CPU 1024)")
    p.add_argument("--seq-len", type=common.positive_int, default=None, help="tokens per sequence (GPU 4096, CPU 128)")
    p.add_argument("--sequences", type=common.positive_int, default=None, help="sequences per step (4)")
    p.add_argument("--micro-batch-tokens", type=common.positive_int, default=None,
                   help="token budget per micro-batch (GPU 8192: see the module docstring; CPU: the whole step)")
    p.add_argument("--steps", type=common.positive_int, default=None, help="timed steps (GPU 10, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 3, CPU 1)")
    p.add_argument("--baseline-params", choices=["fp32", "bf16"], default="fp32",
                   help="transformers params on GPU: fp32 master + autocast bf16 (default) or pure bf16")
    p.add_argument("--variants", type=common.name_list(VARIANTS), default=list(VARIANTS), help="comma-separated, default all")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default=None,
                   help="ModelBuildConfig.performance.recompute (Megatron rows)")
    p.add_argument("--fusions", choices=["auto", "off"], default=None,
                   help="ModelBuildConfig.performance.fusions (Megatron rows)")
    p.add_argument("--overlap-grad-reduce", action="store_true", help="OptimConfig.overlap_grad_reduce (Megatron rows)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (the paper's 1e-6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="record the logprobs of one sequence after the last step in --json (tests)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the model (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None, help="write the rows, goals and arithmetic as JSON here")
    p.add_argument("--write", type=Path, default=None, help="append the results section to this markdown file")
    return p


def performance_section(recompute: str | None, fusions: str | None) -> dict | None:
    """``ModelBuildConfig.performance`` from the flags (None when neither is given); validated
    against the config, ValueError when this checkout's config has no such section or field."""
    given = {k: v for k, v in (("recompute", recompute), ("fusions", fusions)) if v is not None}
    if not given:
        return None
    from pydantic import ValidationError

    from rlmt_megatron.config.model_build import ModelBuildConfig

    if "performance" not in ModelBuildConfig.model_fields:
        raise ValueError(f"--{'/--'.join(given)}: ModelBuildConfig has no 'performance' section in this checkout "
                         "(rlmt_megatron/config/model_build.py); run without these flags")
    try:
        ModelBuildConfig(performance=given)
    except ValidationError as e:
        raise ValueError(f"--{'/--'.join(given)} rejected by ModelBuildConfig.performance: {e}") from None
    return given


def parse_args(argv=None, cuda: bool | None = None) -> argparse.Namespace:
    """Parse and fill the device defaults; ``layers`` stays 'auto' until the device is probed."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.device is None:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        a.device = "cuda" if cuda else "cpu"
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.micro_batch_tokens is None:
        a.micro_batch_tokens = a.seq_len * a.sequences
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.seq_len < 2:
        p.error("--seq-len must be at least 2 (a sample predicts its next token)")
    if a.micro_batch_tokens < a.seq_len:
        p.error(f"--micro-batch-tokens {a.micro_batch_tokens} is below --seq-len {a.seq_len}: "
                "a sequence would get a micro-batch of its own anyway; give at least one sequence's tokens")
    if a.layers == "auto" and a.device == "cpu":
        p.error("--layers auto sizes the model for the GPU's memory; on CPU give a number")
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if BASELINE not in a.variants:
        print(f"note: no '{BASELINE}' row: ratios and goals need it", file=sys.stderr)
    try:
        a.performance = performance_section(a.recompute, a.fusions)
    except ValueError as e:
        p.error(str(e))
    a.layers = a.layers if a.layers == "auto" else int(a.layers)
    return a


def decoder_shape(a: argparse.Namespace, layers: int) -> DecoderShape:
    s = LLAMA31_8B if a.shape == "llama31-8b" else TINY
    return DecoderShape(layers, s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                        s["num_key_value_heads"], s["head_dim"], a.vocab)


# --------------------------------------------------------------------------- runs

def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def _failure(proc: subprocess.CompletedProcess) -> str:
    sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output (killed: out of memory?)"]
    return lines[-1][:200]


def probe(device: str, out: Path) -> dict:
    """The device's matmul peak, memory and TE status; on GPU in a process of its own, so this
    one never holds a CUDA context while the variants run."""
    if device == "cpu":
        from benchmarks.train_step_worker import probe as probe_here

        return probe_here("cpu")
    proc = subprocess.run([sys.executable, str(WORKER), "--probe", device, "--out", str(out)],
                          capture_output=True, text=True, env=_env(), cwd=REPO)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"probing the device failed: {_failure(proc)}")
    return json.loads(out.read_text())


def worker_config(name: str, a: argparse.Namespace, model_dir: Path) -> dict:
    v = VARIANTS[name]
    cfg = dict(stack=v["stack"], model=str(model_dir), device=a.device,
               dtype="bfloat16" if a.device == "cuda" else "float32", seq_len=a.seq_len, sequences=a.sequences,
               micro_batch_tokens=a.micro_batch_tokens, lr=a.lr, warmup=a.warmup, steps=a.steps, seed=a.seed,
               check=a.check)
    if v["stack"] == "megatron":
        cfg.update(attention_backend=v["attention_backend"], fp8=v["fp8"], performance=a.performance,
                   overlap_grad_reduce=a.overlap_grad_reduce)
    else:
        cfg.update(baseline_params=a.baseline_params)
    return cfg


def precision_label(name: str, a: argparse.Namespace) -> str:
    v = VARIANTS[name]
    if a.device == "cpu":
        return "float32"
    if v["stack"] == "transformers":
        return "fp32 master + autocast bf16" if a.baseline_params == "fp32" else "bf16 params"
    return f"FP8 {v['fp8']} (bf16 params)" if v["fp8"] else "bf16 params, fp32 grads/main/Adam"


def run_variant(name: str, a: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    """One variant in a fresh process: its measurements, or a row saying why it failed."""
    row = {"variant": name, "precision": precision_label(name, a)}
    cfg = json.dumps(worker_config(name, a, model_dir))
    proc = subprocess.run([sys.executable, str(WORKER), "--config", cfg, "--out", str(out)],
                          capture_output=True, text=True, env=_env(), cwd=REPO)
    if proc.returncode != 0 or not out.is_file():
        return {**row, "error": f"failed: {_failure(proc)}"}
    return {**row, **json.loads(out.read_text())}


def add_rates(rows: list[dict], shape: DecoderShape, seq_len: int, sequences: int, peak_tflops: float) -> list[dict]:
    """tokens/s, model TFLOP/s, MFU against the measured peak, ratios to the baseline row."""
    tokens = seq_len * sequences
    flops = tokens * shape.train_flops_per_token(seq_len)
    for r in rows:
        if "error" not in r:
            r["tokens_per_s"] = tokens / r["median_s"]
            r["tflops"] = flops / r["median_s"] / 1e12
            r["mfu"] = r["tflops"] / peak_tflops
    base = next((r for r in rows if r["variant"] == BASELINE and "error" not in r), None)
    for r in rows:
        if "error" not in r and base is not None:
            r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """Each goal for each variant it applies to: met, missed by how much, or not measured."""
    by_name = {name: r for r in rows for name in r.get("variants", [r["variant"]])}
    base = by_name.get(BASELINE)
    base_error = None if base is not None and "error" not in base else (base or {}).get("error", "no baseline row")
    out = []

    def add(variant, goal, key, target, higher, unit):
        r = by_name.get(variant)
        g = {"variant": variant, "goal": goal, "target": target}
        if r is None or "error" in r:
            g["status"] = f"not measured ({r['error'] if r else 'not run'})"
        elif key not in r:
            g["status"] = f"not measured (baseline: {base_error})"
        else:
            value = r[key]
            gap = (target - value) if higher else (value - target)
            g.update(value=value, met=gap <= 0, missed_by=max(gap, 0.0))
            shown = f"{value * 100:.1f}%" if unit == "%" else f"{value:.2f}x"
            gap_shown = f"{gap * 100:.1f} points" if unit == "%" else f"{gap:.2f}x"
            g["status"] = f"met ({shown})" if gap <= 0 else f"missed by {gap_shown} ({shown})"
        out.append(g)

    megatron = [n for n in VARIANTS if n in by_name and VARIANTS[n]["stack"] == "megatron"]
    for n in megatron:
        fp8 = VARIANTS[n]["fp8"]
        target = SPEED_FP8 if fp8 else SPEED_BF16
        add(n, f"tokens/s >= {target:.2f}x baseline", "speed_ratio", target, True, "x")
        add(n, f"peak memory <= {MEMORY_RATIO:.2f}x baseline", "memory_ratio", MEMORY_RATIO, False, "x")
        if not fp8:
            add(n, f"MFU >= {MFU_BF16:.0%} of the measured matmul peak", "mfu", MFU_BF16, True, "%")
    return out


# --------------------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    lines = ["| variant | precision | micro-batches | median ms | tokens/s | TFLOP/s | MFU | peak GiB "
             "| × baseline tokens/s | × baseline peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['precision']} | {r['error']} | | | | | | | |")
            continue
        ratio = (f"{r['speed_ratio']:.2f} | {r['memory_ratio']:.2f}" if "speed_ratio" in r else " | ")
        lines.append(f"| {r['variant']} | {r['precision']} | {r['micro_batches']} | {r['median_s'] * 1e3:.1f} "
                     f"| {r['tokens_per_s']:.0f} | {r['tflops']:.3g} | {r['mfu'] * 100:.1f}% "
                     f"| {r['peak_bytes'] / 2**30:.2f} | {ratio} |")
    return "\n".join(lines)


def goals_text(items: list[dict]) -> str:
    return "\n".join(["Goals:"] + [f"- {g['variant']}: {g['goal']}: {g['status']}" for g in items])


def skipped_te_row(names: list[str], reason: str) -> dict:
    """One row for the Transformer Engine variants asked for, saying why none of them ran."""
    return {"variant": ", ".join(names), "variants": names, "precision": "TE bf16 / FP8", "error": f"skipped: {reason}"}


def describe(a: argparse.Namespace, shape: DecoderShape, probed: dict, weight_bytes: int) -> str:
    what = ("Llama-3.1-8B-shaped layers (hidden 4096, FFN 14336, 32 heads / 8 KV heads of 128)"
            if a.shape == "llama31-8b" else f"tiny Llama (hidden {shape.hidden}, FFN {shape.ffn})")
    return (f"Model: {what}, {shape.layers} layers, vocab {shape.vocab}, random weights "
            f"({weight_bytes / 1e9:.3g} GB bf16 on disk), the same HF folder for every variant. Step: "
            f"{a.sequences} x {a.seq_len} tokens, micro-batches of at most {a.micro_batch_tokens} tokens, "
            f"{a.warmup} warm-up + {a.steps} timed steps (median). Measured {probed['peak_dtype']} matmul peak: "
            f"{probed['peak_tflops']:.3g} TFLOP/s (MFU is against it).")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rlmt-train-step-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        probed = probe(a.device, work / "probe.json")
        te_reason = probed["te_error"] or (None if a.device == "cuda" else "Transformer Engine needs CUDA")
        run = [n for n in a.variants if not (te_reason and n in TE_VARIANTS)]
        arithmetic = []
        if a.layers == "auto":
            tokens = microbatch_tokens(a.seq_len, a.sequences, a.micro_batch_tokens)
            try:
                a.layers, arithmetic = auto_layers(probed["total_memory"], decoder_shape(a, 1), tokens,
                                                   memory_models(run, a.baseline_params))
            except ValueError as e:
                sys.exit(f"error: {e}")
            print("\n".join(arithmetic), flush=True)
        shape = decoder_shape(a, a.layers)
        model_dir = work / "model"
        overrides = {} if a.shape == "llama31-8b" else TINY
        print(f"writing a {a.layers}-layer, vocab {a.vocab} model to {model_dir} ...", flush=True)
        weight_bytes = common.write_random_model(model_dir, a.layers, a.vocab, "cpu", a.seed, **overrides)
        rows = []
        skipped = [n for n in a.variants if n not in run]
        if skipped:
            rows.append(skipped_te_row(skipped, te_reason))
        for name in run:
            print(f"running {name} ...", flush=True)
            rows.append(run_variant(name, a, model_dir, work / f"{name}.json"))
        add_rates(rows, shape, a.seq_len, a.sequences, probed["peak_tflops"])
        achieved = goals(rows)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n\n".join([describe(a, shape, probed, weight_bytes), table(rows), goals_text(achieved)])
    if arithmetic:
        text += "\n\n" + "\n".join(["```", *arithmetic, "```"])
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"layers": a.layers, "probe": probed, "arithmetic": arithmetic,
                                      "rows": rows, "goals": achieved}, indent=1))
    if a.write:
        title = f"Policy train step: Megatron vs transformers, {a.layers} layers, {a.sequences}x{a.seq_len} tokens"
        common.append_section(a.write, common.section_header(title, SCRIPT, argv) + text)


if __name__ == "__main__":
    main()
