"""One RLMT GRPO step on one device, broken down by phase, from the trainer's own ``timing/*`` metrics.

  python benchmarks/grpo_step.py [--steps 3] [--prompts-per-step P] [--samples N] [--max-new-tokens T]
                                 [--models tiny|random] [--layers 16 --hidden 1536 --ffn 4096 --heads 12
                                 --kv-heads 4 --vocab 32000] [--prompts auto|synthetic|wildchat|FILE]
                                 [--attention auto|te|sdpa] [--override key=value ...] [--workdir DIR]
                                 [--json FILE] [--write docs/benchmarks.md]

What it does: writes a policy and a same-size reward model (HF folders), an rlmt-train config
(GRPO, the built-in HF engine colocated on the same device, ``--samples`` per prompt,
``--prompts-per-step``, ``--max-new-tokens``), runs ``rlmt-train`` under torchrun with one process
for ``--steps`` steps, reads ``metrics.jsonl`` of the run and prints, per step, every ``timing/*``
phase the trainer logged (seconds and share of the step), "other" (the step minus its named
phases: prompt sampling, the engine's sleep, anything not inside a phase), and throughputs:
generated tokens/s over the rollout phase, trained response tokens/s over the train phase and
response tokens/s over the whole step (response tokens = ``response/len_mean`` x rollouts). Step
1 is warm-up (allocator, kernels, first compile) and is shown apart from the mean of steps 2..N.
``timing/*`` keys other than the top-level phases (rollout, reward, train, sync: see
``rlmt_megatron/trainer/loop.py``) are finer phases nested in one of them: listed, never summed.

Models: ``--models random`` (the GPU default) writes a Llama-shaped policy of ``--layers`` x
``--hidden`` (about 0.5 B parameters by default, vocab 32000, random bf16 weights, the small test
tokenizer: decoding skips ids above it, so rewards are of noise text, which does not matter for
timing) and a reward model of the same shape. ``--models tiny`` (the CPU default) uses the
project's tiny models (``rlmt_megatron/testing/tiny_models.py``). Prompts: ``auto`` reads
``../shared/data/wildchat-if`` (the paper's prompts) when present, else the bundled synthetic ones.

How to run on one H100 (from the repository root)::

    python benchmarks/grpo_step.py                       # 0.5 B policy + RM, 16 prompts x 8 samples x 512 tokens
    python benchmarks/grpo_step.py --override build.performance.recompute=selective
    python benchmarks/grpo_step.py --write docs/benchmarks.md   # append the section (configuration + table)

On CPU the defaults are the tiny models, 2 prompts x 2 samples x 8 tokens (a smoke run: the
numbers say nothing about a GPU). ``--attention te`` without Transformer Engine is not run: the
table says it was skipped and why. ``--json FILE`` writes the exact numbers of the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import REPO

SCRIPT = "benchmarks/grpo_step.py"
SYNTHETIC_PROMPTS = REPO / "examples" / "data" / "synthetic_prompts.jsonl"
WILDCHAT_PROMPTS = REPO.parent / "shared" / "data" / "wildchat-if" / "wildchat-if_train.parquet"
# The loop's top-level phases inside timing/step (rlmt_megatron/trainer/loop.py), in loop order.
TOP_LEVEL_PHASES = ("rollout", "reward", "train", "sync")

DEFAULTS = {
    "cpu": dict(models="tiny", prompts_per_step=2, samples=2, max_new_tokens=8, max_prompt_tokens=48,
                params_dtype="float32"),
    "cuda": dict(models="random", prompts_per_step=16, samples=8, max_new_tokens=512, max_prompt_tokens=1024,
                 params_dtype="bfloat16"),
}


# --------------------------------------------------------------------------- arguments


def _override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"override {text!r}: expected key.sub=value (an rlmt-train override)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=common.positive_int, default=3, help="GRPO steps to run; step 1 is reported as warm-up")
    p.add_argument("--prompts-per-step", type=common.positive_int, default=None, help="prompts per step (default 16 GPU, 2 CPU)")
    p.add_argument("--samples", type=common.positive_int, default=None, help="samples per prompt, >= 2 (default 8 GPU, 2 CPU)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=None,
                   help="longest response in tokens (default 512 GPU, 8 CPU)")
    p.add_argument("--max-prompt-tokens", type=common.positive_int, default=None,
                   help="prompts are left-truncated to this (default 1024 GPU as in the paper, 48 CPU)")
    p.add_argument("--prompts", default="auto",
                   help="auto (wildchat-if when ../shared/data has it, else synthetic), synthetic, wildchat, or a "
                        "prompt file rlmt-train reads (jsonl/parquet)")
    p.add_argument("--models", choices=["tiny", "random"], default=None,
                   help="tiny: the project's tiny test models (CPU default); random: a Llama-shaped policy and "
                        "reward model of the shape below with random weights (GPU default)")
    p.add_argument("--layers", type=common.positive_int, default=16, help="--models random: decoder layers")
    p.add_argument("--hidden", type=common.positive_int, default=1536, help="--models random: hidden size")
    p.add_argument("--ffn", type=common.positive_int, default=4096, help="--models random: MLP intermediate size")
    p.add_argument("--heads", type=common.positive_int, default=12, help="--models random: attention heads")
    p.add_argument("--kv-heads", type=common.positive_int, default=4, help="--models random: key/value heads (GQA)")
    p.add_argument("--vocab", type=common.positive_int, default=32000, help="--models random: vocabulary size")
    p.add_argument("--params-dtype", choices=["float32", "bfloat16"], default=None,
                   help="Megatron parameter dtype of every role (default bfloat16 GPU, float32 CPU)")
    p.add_argument("--attention", choices=["auto", "te", "sdpa"], default="auto",
                   help="build.attention_backend; te without Transformer Engine installed is skipped, not run")
    p.add_argument("--override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="extra rlmt-train override (repeatable), e.g. build.performance.recompute=selective")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where models, config, run and log go (kept); default: a temporary directory, removed")
    p.add_argument("--json", type=Path, default=None, help="write the exact numbers of the table to this file")
    p.add_argument("--write", type=Path, default=None, help="append the results section to this markdown file")
    return p


def parse_args(argv=None, cuda: bool | None = None) -> argparse.Namespace:
    """Parse, fill the device-dependent defaults, and reject what the trainer would refuse later."""
    p = build_parser()
    a = p.parse_args(argv)
    common.device_defaults(a, DEFAULTS, cuda)
    if a.samples < 2:
        p.error(f"--samples {a.samples}: GRPO compares the samples of one prompt, it needs at least 2")
    if a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")
    try:
        a.prompt_file = resolve_prompts(a.prompts)
    except FileNotFoundError as e:
        p.error(str(e))
    return a


def resolve_prompts(choice: str) -> Path:
    if choice == "auto":
        return WILDCHAT_PROMPTS if WILDCHAT_PROMPTS.is_file() else SYNTHETIC_PROMPTS
    if choice == "synthetic":
        return SYNTHETIC_PROMPTS
    if choice == "wildchat":
        if not WILDCHAT_PROMPTS.is_file():
            raise FileNotFoundError(f"--prompts wildchat: {WILDCHAT_PROMPTS} does not exist")
        return WILDCHAT_PROMPTS
    path = Path(choice)
    if not path.exists():
        raise FileNotFoundError(f"--prompts {choice}: no such file (expected auto, synthetic, wildchat or a path)")
    return path.resolve()


# --------------------------------------------------------------------------- models

def random_shape(a: argparse.Namespace) -> dict:
    """LlamaConfig keys overriding the 8B shape in ``common.llama_config``."""
    return dict(hidden_size=a.hidden, intermediate_size=a.ffn, num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads)


def write_random_reward_model(folder: Path, layers: int, vocab: int, device: str = "cpu", seed: int = 1,
                              **shape) -> int:
    """Like ``common.write_random_model``, as a one-label LlamaForSequenceClassification (what rlmt
    loads as a reward model: ``architectures`` names it). Returns the weight bytes."""
    from transformers import LlamaForSequenceClassification

    from rlmt_megatron.checkpoint.safetensors_io import write_safetensors_folder
    from rlmt_megatron.testing.tiny_models import train_tokenizer

    tokenizer = train_tokenizer(1024)
    config = common.llama_config(layers, vocab, **shape)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id  # HF finds each sequence's last token by it
    config.architectures = ["LlamaForSequenceClassification"]
    with torch.device("meta"):
        names = {n: tuple(t.shape) for n, t in LlamaForSequenceClassification(config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shp in names.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shp, dtype=torch.bfloat16)
        else:
            state[name] = torch.empty(shp, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen).cpu()
    write_safetensors_folder(state, folder)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in state.values())


def count_parameters(folder: Path) -> int:
    """Parameters stored in an HF folder's safetensors files (headers only)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def build_models(a: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """(policy folder, reward folder, one line describing them)."""
    if a.models == "tiny":
        from rlmt_megatron.testing.tiny_models import build_tiny_models

        folders = build_tiny_models(work / "tiny", seed=0)
        policy, reward = folders["llama-policy"], folders["llama-rm"]
        what = "the project's tiny models (rlmt_megatron/testing/tiny_models.py: llama-policy, llama-rm)"
    else:
        policy, reward = work / "policy", work / "reward"
        common.write_random_model(policy, a.layers, a.vocab, a.device, seed=0, **random_shape(a))
        write_random_reward_model(reward, a.layers, a.vocab, a.device, seed=1, **random_shape(a))
        what = (f"random bf16 Llama-shaped policy and same-shape reward model: {a.layers} layers, hidden {a.hidden}, "
                f"FFN {a.ffn}, {a.heads} heads / {a.kv_heads} KV heads of {a.hidden // a.heads}, vocab {a.vocab}")
    return policy, reward, (f"{what}; policy {count_parameters(policy) / 1e6:.1f} M parameters, "
                            f"reward model {count_parameters(reward) / 1e6:.1f} M")


# --------------------------------------------------------------------------- the run

def train_config(a: argparse.Namespace, policy: Path, reward: Path, out: Path) -> dict:
    """The rlmt-train config: GRPO with the built-in HF engine colocated; everything else the
    trainer's defaults (the paper's recipe), so the step measured is the recipe's step."""
    return {
        "run": {"out_dir": str(out), "total_steps": a.steps, "save_every": 0, "resume": "never", "export_hf": False},
        "models": {"policy": str(policy), "reward": str(reward)},
        "build": {"attention_backend": a.attention, "precision": {"params_dtype": a.params_dtype}},
        "data": {"prompts": [str(a.prompt_file)], "max_prompt_tokens": a.max_prompt_tokens,
                 "prompts_per_step": a.prompts_per_step},
        "rollout": {"engine": "hf", "placement": "colocated", "samples_per_prompt": a.samples,
                    "max_new_tokens": a.max_new_tokens},
        "algorithm": {"name": "grpo"},
        "monitoring": {"tensorboard": False, "wandb": {"mode": "disabled"}},
    }


def run_training(config: Path, overrides: list[str], log: Path) -> tuple[int, float]:
    """rlmt-train under torchrun with one process; (exit status, wall seconds). Output goes to ``log``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "rlmt_megatron.cli.train", str(config), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    return code, time.perf_counter() - start


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: line {number} is not JSON ({e})") from None
    if not rows:
        raise SystemExit(f"{path}: no steps were logged")
    return rows


# --------------------------------------------------------------------------- the report

def _phase_names(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(top-level phases present, finer phases present) across the rows, in a fixed order."""
    keys = {k[len("timing/"):] for r in rows for k in r if k.startswith("timing/")} - {"step"}
    return [p for p in TOP_LEVEL_PHASES if p in keys], sorted(keys - set(TOP_LEVEL_PHASES))


def column(rows: list[dict], rollouts_per_step: int, label: str) -> dict:
    """Mean seconds per step of every phase over ``rows``, the rest of the step as "other", and
    token rates as total tokens over total seconds. A phase a step did not log counts as 0 there."""
    top, finer = _phase_names(rows)
    for r in rows:
        if not isinstance(r.get("timing/step"), (int, float)):
            raise SystemExit(f"metrics.jsonl step {r.get('step')}: no timing/step (got {r.get('timing/step')!r})")
    n = len(rows)

    def mean(key):
        return sum(r.get(key) or 0.0 for r in rows) / n

    step = mean("timing/step")
    phases = {p: mean(f"timing/{p}") for p in top}
    other = step - sum(phases.values())
    lengths = [r.get("response/len_mean") for r in rows]
    tokens = None if any(x is None for x in lengths) else sum(lengths) * rollouts_per_step / n
    trained = None if tokens is None else sum(
        0.0 if r.get("skipped_update") else r["response/len_mean"] * rollouts_per_step for r in rows) / n

    def rate(count, seconds):
        return count / seconds if count is not None and seconds else None

    return {
        "label": label, "steps": [r["step"] for r in rows], "step_s": step,
        "phases_s": phases, "other_s": other, "finer_s": {p: mean(f"timing/{p}") for p in finer},
        "shares": {**{p: s / step for p, s in phases.items()}, "other": other / step},
        "response_tokens": tokens,
        "generated_tokens_per_s": rate(tokens, phases.get("rollout")),
        "trained_tokens_per_s": rate(trained, phases.get("train")),
        "step_tokens_per_s": rate(tokens, step),
    }


def report(rows: list[dict], rollouts_per_step: int) -> list[dict]:
    """One column per step, then the mean of steps 2..N (step 1 is warm-up)."""
    cols = [column([r], rollouts_per_step, f"step {r['step']}" + (" (warm-up)" if i == 0 else ""))
            for i, r in enumerate(rows)]
    if len(rows) > 2:
        cols.append(column(rows[1:], rollouts_per_step, f"mean of steps {rows[1]['step']}-{rows[-1]['step']}"))
    return cols


def _number(x: float) -> str:
    """4 significant digits, without exponents for large values (token rates on a GPU)."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


_seconds = _number


def _share(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(x) -> str:
    return "n/a" if x is None else _number(x)


def table(cols: list[dict]) -> str:
    """Markdown: a row per phase, a seconds and a share column per step column."""
    names = list(dict.fromkeys(p for c in cols for p in c["phases_s"]))
    finer = list(dict.fromkeys(p for c in cols for p in c["finer_s"]))
    head = "| phase | " + " | ".join(f"{c['label']} s | share" for c in cols) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(cols))]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for p in names:
        row(p, [v for c in cols for v in (_seconds(c["phases_s"].get(p, 0.0)), _share(c["shares"].get(p, 0.0)))])
    row("other (step - phases above)", [v for c in cols for v in (_seconds(c["other_s"]), _share(c["shares"]["other"]))])
    row("**step**", [v for c in cols for v in (_seconds(c["step_s"]), _share(1.0))])
    for p in finer:  # nested in a phase above: already counted there
        row(f"{p} (within a phase above)",
            [v for c in cols for v in (_seconds(c["finer_s"].get(p, 0.0)), _share(c["finer_s"].get(p, 0.0) / c["step_s"]))])
    row("response tokens", [v for c in cols for v in (_rate(c["response_tokens"]), "")])
    row("generated tokens/s (rollout)", [v for c in cols for v in (_rate(c["generated_tokens_per_s"]), "")])
    row("trained response tokens/s (train)", [v for c in cols for v in (_rate(c["trained_tokens_per_s"]), "")])
    row("response tokens/s (whole step)", [v for c in cols for v in (_rate(c["step_tokens_per_s"]), "")])
    return "\n".join(lines)


def te_skip_reason(attention: str) -> str | None:
    from rlmt_megatron.models.layer_specs import transformer_engine_available

    if attention == "te" and not transformer_engine_available():
        return "skipped: --attention te but Transformer Engine (transformer_engine) is not installed"
    return None


def attention_line(attention: str) -> str:
    from rlmt_megatron.models.layer_specs import transformer_engine_available

    if attention == "auto":
        return ("auto -> Transformer Engine spec" if transformer_engine_available()
                else "auto -> local SDPA spec (Transformer Engine not installed)")
    return attention


def configuration(a: argparse.Namespace, models: str) -> str:
    extra = ", ".join(f"`{o}`" for o in a.override) or "none"
    return (f"Models: {models}.\n"
            f"GRPO, built-in HF engine colocated on the {a.device.upper()}, {a.prompts_per_step} prompts x "
            f"{a.samples} samples per step, max {a.max_new_tokens} new tokens, prompts <= {a.max_prompt_tokens} "
            f"tokens from {a.prompt_file.name}; Megatron params {a.params_dtype}, attention "
            f"{attention_line(a.attention)}; other settings the trainer's defaults; overrides: {extra}.\n")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    header = common.section_header("RLMT GRPO step by phase, one " + ("GPU" if a.device == "cuda" else "CPU process"),
                                   SCRIPT, argv)
    skipped = te_skip_reason(a.attention)
    if skipped:
        text = f"| variant | result |\n| --- | --- |\n| attention te | {skipped} |"
        print(text)
        common.append_section(a.write, header + text)
        return
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rlmt-grpo-step-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing models to {work} ...", flush=True)
        policy, reward, models = build_models(a, work)
        import yaml

        config = work / "grpo.yaml"
        out = work / "run"
        config.write_text(yaml.safe_dump(train_config(a, policy, reward, out), sort_keys=False))
        log = work / "train.log"
        print(f"running rlmt-train for {a.steps} steps (log: {log}) ...", flush=True)
        code, wall = run_training(config, a.override, log)
        if code != 0:
            sys.stderr.write("\n".join(log.read_text().splitlines()[-40:]) + "\n")
            raise SystemExit(f"rlmt-train failed with exit status {code} (the end of its log is above)")
        rows = read_metrics(out / "metrics.jsonl")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    cols = report(rows, a.prompts_per_step * a.samples)
    steps_s = sum(r["timing/step"] for r in rows)
    text = (configuration(a, models)
            + f"rlmt-train wall time {wall:.1f} s, of which {len(rows)} steps {steps_s:.1f} s (the rest: start-up, "
              f"model loading, the final checkpoint).\n\n" + table(cols))
    print(text)
    if a.json:
        a.json.write_text(json.dumps({"columns": cols, "wall_s": wall}, indent=1))
    common.append_section(a.write, header + text)


if __name__ == "__main__":
    main()
