"""Loss parity of FP8 against bf16 training: the same model, weights and data, a few hundred steps.

  python benchmarks/fp8_parity.py [--steps 300] [--recipes bf16,fp8-tensorwise,fp8-delayed]
                                  [--out-dir DIR] [--plot] [--write docs/benchmarks.md]

Every recipe trains a Llama-shaped model from the same random HF weights (``common.write_random_model``)
on the same token stream, with LM next-token loss through ``ModelRunner`` (AdamW, Megatron's
distributed optimizer, warmup then cosine decay), each in its own process:

- ``bf16``: bf16 weights, Megatron Transformer Engine spec;
- ``fp8-tensorwise`` / ``fp8-delayed``: the same plus TE FP8 (hybrid E4M3/E5M2) with per-tensor
  current scaling / delayed scaling from an amax history;
- ``fp32``: float32 weights, local spec with SDPA attention (the CPU recipe: it runs the plumbing
  in the tests, with tiny shapes).

The data is a fixed-seed first-order Markov source: each token has ``--branching`` distinct
successors with Zipf probabilities, so the loss falls from ln(vocab) towards the source's entropy
rate (printed as the floor) and every step of every recipe sees the same batch. Reported per
recipe: final loss (mean of the last ``--final-window`` steps), its relative difference from the
reference recipe, the largest |loss - loss_ref| / loss_ref step by step over the last
``--window`` steps, steps/s (the first 10% of steps, kernel compilation and warm-up, left out),
the speedup over the reference, and peak memory. The curves go to ``DIR/fp8_parity_curves.csv``
(and ``.png`` with ``--plot``). A recipe that cannot run here is a "skipped: <why>" row.

Defaults follow the device. GPU: 8 layers, hidden 1024 (8 heads of 128, 2 KV heads), FFN 3584,
vocab 32768, 8 x 1024 tokens a step, 300 steps, recipes bf16 + both FP8. CPU: 2 layers, hidden 64,
vocab 512, 4 x 64 tokens, 30 steps, fp32 only.

How to run on the GPU machine (Transformer Engine travels as wheels; see
benchmarks/te_setup/README.md): after the pieces are stashed, one device call carrying
``.whl/base`` runs
``bash benchmarks/te_setup/install_on_gpu.sh && PYTHONPATH=/tmp/site python3 benchmarks/fp8_parity.py
--out-dir $OUT --plot``. Estimated (not yet measured): ~30 ms a step at the GPU defaults (7.4
TFLOP of model FLOPs a step), so 2-3 minutes for the three recipes with their start-up, after the
~2-minute TE build.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import REPO


@dataclass(frozen=True)
class Recipe:
    params_dtype: str
    fp8: Optional[str]
    backend: str  # ModelBuildConfig.attention_backend
    needs_cuda: bool

    @property
    def needs_te(self) -> bool:
        return self.backend == "te"


RECIPES = {
    "fp32": Recipe("float32", None, "sdpa", needs_cuda=False),
    "bf16": Recipe("bfloat16", None, "te", needs_cuda=True),
    "fp8-tensorwise": Recipe("bfloat16", "tensorwise", "te", needs_cuda=True),
    "fp8-delayed": Recipe("bfloat16", "delayed", "te", needs_cuda=True),
}

DEFAULTS = {
    "cuda": dict(layers=8, hidden=1024, ffn=3584, heads=8, kv_heads=2, vocab=32768, seq=1024, batch=8,
                 steps=300, lr=1e-3, recipes="bf16,fp8-tensorwise,fp8-delayed", reference="bf16", window=100),
    "cpu": dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=512, seq=64, batch=4,
                steps=30, lr=3e-3, recipes="fp32", reference="fp32", window=10),
}


# --------------------------------------------------------------------------- data

class MarkovSource:
    """First-order Markov chain over ``vocab`` tokens: token s is followed by one of ``branching``
    distinct tokens, the k-th with probability proportional to 1/(k+1). Successors are
    ``(base[s] + offset[k]) % vocab`` with distinct offsets, hence distinct, so the entropy rate
    is exactly that of the probability vector whatever the stationary distribution.

    ``base[s]`` is drawn Zipf-distributed over the ids, so the chain lives mostly on a few
    thousand tokens (at vocab 32768, unigram entropy ~6.3 nats against ln(vocab) = 10.4): the
    loss first falls fast (token frequencies), then slowly (the transitions), as in LM training,
    instead of sitting near ln(vocab) while a uniform table of transitions is memorised."""

    def __init__(self, vocab: int, branching: int, seed: int):
        if not 1 <= branching < vocab:
            raise ValueError(f"branching must be in [1, vocab) = [1, {vocab}), got {branching}")
        g = torch.Generator().manual_seed(seed)
        zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
        base = torch.multinomial(zipf, vocab, replacement=True, generator=g)
        offsets = torch.randperm(vocab - 1, generator=g)[:branching] + 1  # distinct, never 0
        self.vocab, self.seed = vocab, seed
        self.successors = (base[:, None] + offsets[None, :]) % vocab  # [vocab, branching]
        weights = 1.0 / torch.arange(1, branching + 1, dtype=torch.float64)
        self.probs = weights / weights.sum()
        self._cdf = torch.cumsum(self.probs, 0)

    def entropy_rate(self) -> float:
        """Nats per token: the loss of a model that knows the source."""
        return float(-(self.probs * self.probs.log()).sum())

    def batch(self, step: int, rows: int, length: int) -> torch.Tensor:
        """Token ids [rows, length] of training step ``step``: a function of (seed, step) alone,
        so every recipe (and a shorter run) sees the same batches."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = torch.empty(rows, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab, (rows,), generator=g)
        u = torch.rand(rows, length - 1, generator=g, dtype=torch.float64)
        choice = torch.searchsorted(self._cdf, u, right=True).clamp_(max=len(self.probs) - 1)
        for t in range(length - 1):
            out[:, t + 1] = self.successors[out[:, t], choice[:, t]]
        return out


# --------------------------------------------------------------------------- statistics

def final_loss(curve: Sequence[float], final_window: int) -> float:
    """Mean loss of the last ``final_window`` steps."""
    tail = list(curve)[-final_window:]
    return sum(tail) / len(tail)


def max_relative_gap(curve: Sequence[float], reference: Sequence[float], window: int) -> float:
    """max over the last ``window`` steps of |curve - reference| / reference, step by step."""
    if len(curve) != len(reference):
        raise ValueError(f"curves of {len(curve)} and {len(reference)} steps cannot be compared step by step")
    pairs = list(zip(curve, reference))[-window:]
    return max(abs(a - b) / b for a, b in pairs)


def steps_per_second(step_seconds: Sequence[float]) -> float:
    """Steps/s with the first 10% of the steps (at least one when there are two or more) left out:
    they include kernel compilation, FP8 scale set-up and allocator warm-up."""
    skip = min(max(1, len(step_seconds) // 10), len(step_seconds) - 1)
    timed = list(step_seconds)[skip:]
    return len(timed) / sum(timed)


def summarize(results: list[dict], reference: str, window: int, final_window: int) -> list[dict]:
    """Table rows: each result plus final loss, gaps to the reference and speed."""
    ref = next((r for r in results if r["recipe"] == reference and "losses" in r), None)
    rows = []
    for r in results:
        row = dict(r)
        if "losses" in r:
            row["final"] = final_loss(r["losses"], final_window)
            row["steps_per_s"] = steps_per_second(r["step_seconds"])
            if ref is not None:
                ref_final = final_loss(ref["losses"], final_window)
                row["final_rel"] = (row["final"] - ref_final) / ref_final
                row["max_rel_gap"] = max_relative_gap(r["losses"], ref["losses"], window)
                row["speedup"] = row["steps_per_s"] / steps_per_second(ref["step_seconds"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- arguments



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = p.add_argument_group("model and data (defaults: GPU / CPU)")
    for name, what in [("layers", "decoder layers"), ("hidden", "hidden size"), ("ffn", "MLP intermediate size"),
                       ("heads", "attention heads"), ("kv-heads", "KV heads (GQA)"), ("vocab", "vocabulary size"),
                       ("seq", "tokens per sequence"), ("batch", "sequences per step")]:
        key = name.replace("-", "_")
        shape.add_argument(f"--{name}", type=common.positive_int, default=None,
                           help=f"{what} (default {DEFAULTS['cuda'][key]} / {DEFAULTS['cpu'][key]})")
    shape.add_argument("--branching", type=common.positive_int, default=4, help="successors per token in the Markov source")
    shape.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data stream")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=common.positive_int, default=None, help="optimizer steps (default 300 / 30)")
    train.add_argument("--lr", type=common.positive_float, default=None, help="peak learning rate (default 1e-3 / 3e-3)")
    train.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default steps // 10)")
    train.add_argument("--recipes", default=None,
                       help=f"comma-separated, of {', '.join(RECIPES)} (default bf16,fp8-tensorwise,fp8-delayed / fp32)")
    train.add_argument("--reference", default=None, help="recipe the others are compared with (default bf16 / fp32)")
    stats = p.add_argument_group("statistics and output")
    stats.add_argument("--final-window", type=common.positive_int, default=20, help="final loss = mean of this many last steps")
    stats.add_argument("--window", type=common.positive_int, default=None,
                       help="trailing steps over which the largest relative gap is taken (default 100 / 10)")
    stats.add_argument("--out-dir", type=Path, default=REPO / "runs" / "benchmarks" / "fp8_parity",
                       help="where fp8_parity_curves.csv (and .png) go")
    stats.add_argument("--plot", action="store_true", help="also draw the curves to a PNG (matplotlib)")
    stats.add_argument("--write", type=Path, default=None, help="append the results to this markdown file")
    return p


def parse_args(argv=None, cuda: bool | None = None) -> argparse.Namespace:
    """Parse, fill the device's defaults and reject what cannot run or be compared."""
    p = build_parser()
    a = p.parse_args(argv)
    common.device_defaults(a, DEFAULTS, cuda)
    a.recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    unknown = [r for r in a.recipes if r not in RECIPES]
    if unknown or not a.recipes:
        p.error(f"--recipes: unknown recipe(s) {unknown or a.recipes}; choose from {', '.join(RECIPES)}")
    if len(set(a.recipes)) != len(a.recipes):
        p.error(f"--recipes: each recipe once, got {','.join(a.recipes)}")
    if a.reference not in a.recipes:
        p.error(f"--reference {a.reference} is not among --recipes {','.join(a.recipes)}")
    if a.warmup is None:
        a.warmup = a.steps // 10
    if not 0 <= a.warmup < a.steps:
        p.error(f"--warmup must be in [0, --steps {a.steps}), got {a.warmup}")
    if a.final_window > a.steps:
        p.error(f"--final-window {a.final_window} is longer than --steps {a.steps}")
    if a.window > a.steps:
        p.error(f"--window {a.window} is longer than --steps {a.steps}")
    if a.hidden % a.heads:
        p.error(f"--heads {a.heads} must divide --hidden {a.hidden}")
    if a.heads % a.kv_heads:
        p.error(f"--kv-heads {a.kv_heads} must divide --heads {a.heads}")
    if a.seq < 2:
        p.error(f"--seq must be at least 2 (one predicted token), got {a.seq}")
    if a.branching >= a.vocab:
        p.error(f"--branching {a.branching} must be smaller than --vocab {a.vocab}")
    return a


def skip_reason(recipe: str, cuda: bool, te_available: bool) -> Optional[str]:
    """Why ``recipe`` cannot run here, or None."""
    r = RECIPES[recipe]
    if r.needs_te and not te_available:
        return "skipped: no transformer_engine"
    if r.needs_cuda and not cuda:
        return "skipped: needs a CUDA GPU"
    return None


# --------------------------------------------------------------------------- one recipe (worker)

def train_recipe(recipe: str, model_dir: Path, a: argparse.Namespace) -> dict:
    """Train ``recipe`` in this process (a world of one); its losses and step times."""
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, PrecisionConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.runner.batching import Sample
    from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
    from rlmt_megatron.runner.model_runner import ModelRunner
    from rlmt_megatron.runner.losses import sft_loss_fn

    r = RECIPES[recipe]
    if r.fp8:  # a clear row instead of a TE assertion deep in the first forward
        import transformer_engine.pytorch as te

        ok, why = te.is_fp8_available(return_reason=True)
        if not ok:
            return {"recipe": recipe, "skipped": f"skipped: FP8 unavailable ({why})"}
    build = ModelBuildConfig(precision=PrecisionConfig(params_dtype=r.params_dtype, fp8=r.fp8),
                             attention_backend=r.backend)
    bootstrap.initialize(build.parallel, seed=a.seed)
    try:
        built = load_model(model_dir, "policy", build)
        engine = ModelRunner(built, OptimConfig(
            lr=a.lr, min_lr=a.lr / 10, lr_schedule="cosine", warmup_steps=a.warmup, total_steps=a.steps,
            weight_decay=0.1, adam_beta2=0.95, clip_grad=1.0), BatchingConfig(train_tokens_per_microbatch=a.batch * a.seq))
        loss_fn = sft_loss_fn(built.spec.vocab_size)
        source = MarkovSource(a.vocab, a.branching, a.seed)
        mask = torch.ones(a.seq - 1)
        losses, seconds = [], []
        common.reset_peak_memory(a.device)
        for step in range(a.steps):
            samples = [Sample(row, {"loss_mask": mask}) for row in source.batch(step, a.batch, a.seq)]
            common.synchronize(a.device)
            start = time.perf_counter()
            metrics = engine.train_step(samples, loss_fn)  # returns host floats: synchronised
            seconds.append(time.perf_counter() - start)
            losses.append(metrics["loss"])
        peak = common.peak_memory(a.device)
    finally:
        bootstrap.shutdown()
    return {"recipe": recipe, "losses": losses, "step_seconds": seconds, "peak_gib": peak / 2**30}


def run_isolated(recipe: str, model_dir: Path, argv: list[str], work: Path) -> dict:
    """``train_recipe`` in a fresh process (own Megatron/TE state and peak memory); a failure
    becomes a row with the error's last line."""
    out = work / f"{recipe}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_worker", recipe,
           "--_model", str(model_dir), "--_result", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stderr[-4000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
        return {"recipe": recipe, "skipped": f"failed: {lines[-1][:160]}"}
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- output

def table(rows: list[dict], reference: str, window: int, final_window: int) -> str:
    def pct(x):
        return "" if x is None else f"{100 * x:+.2f}%"

    lines = [f"| recipe | weights / spec | final loss (last {final_window}) | vs {reference} "
             f"| max rel. gap, last {window} steps | steps/s | speedup | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rec = RECIPES[r["recipe"]]
        what = f"{rec.params_dtype}{' + FP8 ' + rec.fp8 if rec.fp8 else ''}, {'TE' if rec.needs_te else 'local/SDPA'}"
        if "losses" not in r:
            lines.append(f"| {r['recipe']} | {what} | {r['skipped']} | | | | | |")
            continue
        gap, speedup = r.get("max_rel_gap"), r.get("speedup")
        gap_text = "" if gap is None else f"{100 * gap:.2f}%"
        speedup_text = "" if speedup is None else f"{speedup:.2f}x"
        lines.append(f"| {r['recipe']} | {what} | {r['final']:.4f} | {pct(r.get('final_rel'))} "
                     f"| {gap_text} | {r['steps_per_s']:.2f} | {speedup_text} | {r['peak_gib']:.2f} |")
    return "\n".join(lines)


def write_curves(rows: list[dict], path: Path) -> None:
    """CSV: step, then one loss column per recipe that ran."""
    ran = [r for r in rows if "losses" in r]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *(r["recipe"] for r in ran)])
        for i in range(max((len(r["losses"]) for r in ran), default=0)):
            w.writerow([i + 1, *(repr(r["losses"][i]) for r in ran)])


def plot_curves(rows: list[dict], reference: str, floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if "losses" in r]
    ref = next((r for r in ran if r["recipe"] == reference), None)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    for r in ran:
        steps = range(1, len(r["losses"]) + 1)
        top.plot(steps, r["losses"], label=r["recipe"], linewidth=1)
        if ref is not None and r is not ref:
            bottom.plot(steps, [100 * (a - b) / b for a, b in zip(r["losses"], ref["losses"])], label=r["recipe"], linewidth=1)
    top.axhline(floor, color="gray", linestyle=":", label="source entropy")
    top.set_ylabel("LM loss (nats/token)")
    top.legend()
    bottom.axhline(0, color="gray", linewidth=0.5)
    bottom.set_ylabel(f"loss vs {reference} (%)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def _worker_args(argv):
    """Split off the hidden worker flags (the rest is the user's command line, parsed alike)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--_worker")
    p.add_argument("--_model", type=Path)
    p.add_argument("--_result", type=Path)
    return p.parse_known_args(argv)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    hidden, user_argv = _worker_args(argv)
    a = parse_args(user_argv)
    if hidden._worker:
        result = train_recipe(hidden._worker, hidden._model, a)
        hidden._result.write_text(json.dumps(result))
        return [result]

    from rlmt_megatron.models.layer_specs import transformer_engine_available

    te = transformer_engine_available()
    cuda = a.device == "cuda"
    floor = MarkovSource(a.vocab, a.branching, a.seed).entropy_rate()
    results = []
    with tempfile.TemporaryDirectory(prefix="fp8_parity_") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        # weights drawn on the host: the parent never touches the GPU, each recipe has it whole
        common.write_random_model(model_dir, a.layers, a.vocab, device="cpu", seed=a.seed,
                                  hidden_size=a.hidden, intermediate_size=a.ffn, num_attention_heads=a.heads,
                                  num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads)
        for recipe in a.recipes:
            why = skip_reason(recipe, cuda, te)
            results.append({"recipe": recipe, "skipped": why} if why else run_isolated(recipe, model_dir, user_argv, work))
            r = results[-1]
            print(f"{recipe}: " + (r["skipped"] if "losses" not in r else
                                   f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} in {len(r['losses'])} steps"), flush=True)
    rows = summarize(results, a.reference, a.window, a.final_window)
    text = table(rows, a.reference, a.window, a.final_window)
    tokens = a.batch * a.seq
    note = (f"\n{a.layers} layers, hidden {a.hidden}, FFN {a.ffn}, {a.heads} heads / {a.kv_heads} KV heads, "
            f"vocab {a.vocab}; {a.batch} x {a.seq} = {tokens} tokens a step, {a.steps} steps, AdamW lr {a.lr:g} "
            f"(warmup {a.warmup}, cosine to {a.lr / 10:g}). Markov source with {a.branching} successors per token: "
            f"loss floor {floor:.4f} nats, start ln(vocab) = {math.log(a.vocab):.4f}.")
    print(text + "\n" + note)
    csv_path = a.out_dir / "fp8_parity_curves.csv"
    write_curves(rows, csv_path)
    print(f"curves: {csv_path}")
    if a.plot:
        plot_curves(rows, a.reference, floor, csv_path.with_suffix(".png"))
        print(f"plot: {csv_path.with_suffix('.png')}")
    if a.write:
        common.append_section(a.write, common.section_header("FP8 vs bf16 loss parity", "benchmarks/fp8_parity.py", user_argv)
                              + text + "\n" + note)
    return rows


if __name__ == "__main__":
    main()
