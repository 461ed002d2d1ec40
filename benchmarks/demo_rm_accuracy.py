"""The CPU demo's reward model: held-out preference accuracy, per kind, over training seeds.

  python benchmarks/demo_rm_accuracy.py [--seeds 1234,7,99] [--workdir DIR] [--write docs/benchmarks.md]

What ``tools/run_demo.sh`` does in its stage 2, once per training seed: build the tiny models and
the demo's data (``rlmt_megatron.testing.demo_data``), train the RM with ``examples/demo/rm.yaml``
(``rlmt-train-rm``; ``seed=`` sets the order the pairs are shuffled in, the starting weights are
the tiny RM's), then score the held-out preference set with the project's scorer
(``rlmt_megatron.testing.rm_accuracy``, the ``rlmt-score`` code) and, independently, with
transformers' ``LlamaForSequenceClassification`` on the exported HF folder. It reports the
accuracy overall and per kind of bad answer from the project's scores, the largest difference
between the two scorers and how many pairs' verdicts differ, the training set's accuracy for
contrast, and the wall time of training and of the held-out scoring. Too slow for the test
suite (about a minute per seed on 2 cores), so it lives here; the data tests are in
``tests/test_demo_data.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py; must come first: it records the load at start)


def run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.REPO)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def reference_scores(rm: Path, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """(chosen, rejected) scores from transformers, one sequence at a time (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlmt_megatron.reward.rm_template import rm_input_ids

    tok = AutoTokenizer.from_pretrained(str(rm))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm), dtype=torch.float32).eval()
    out: dict[str, list[float]] = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for p in pairs:
            for side in out:
                out[side].append(model(torch.tensor([rm_input_ids(tok, p["messages"], p[side])])).logits[0, 0].item())
    return out["chosen"], out["rejected"]


def one_seed(work: Path, seed: int) -> dict:
    from rlmt_megatron.testing.rm_accuracy import accuracy_by_kind

    rm_out = work / f"rm-{seed}"
    train_s = run([sys.executable, "-m", "rlmt_megatron.cli.supervised", "rm", str(common.REPO / "examples/demo/rm.yaml"),
                   f"model={work / 'models/llama-rm'}", f"data=[{work / 'data/preferences.jsonl'}]",
                   f"out_dir={rm_out}", f"seed={seed}"])
    heldout = work / "data/heldout_preferences.jsonl"
    scored = rm_out / "heldout_scores.jsonl"
    eval_s = run([sys.executable, "-m", "rlmt_megatron.testing.rm_accuracy", "--rm", str(rm_out / "hf"),
                  "--pairs", str(heldout), "--out", str(scored), "--report", str(rm_out / "heldout_accuracy.json")])
    acc = json.loads((rm_out / "heldout_accuracy.json").read_text())
    pairs = [json.loads(line) for line in heldout.read_text().splitlines()]
    ref_c, ref_r = reference_scores(rm_out / "hf", pairs)
    ours = {(r["pair"], r["side"]): r["score"] for r in map(json.loads, scored.read_text().splitlines())}
    diff = max(max(abs(ours[i, "chosen"] - c), abs(ours[i, "rejected"] - r)) for i, (c, r) in enumerate(zip(ref_c, ref_r)))
    flips = sum((ours[i, "chosen"] > ours[i, "rejected"]) != (c > r) for i, (c, r) in enumerate(zip(ref_c, ref_r)))
    train_pairs = [json.loads(line) for line in (work / "data/preferences.jsonl").read_text().splitlines()]
    train_acc = accuracy_by_kind(train_pairs, *reference_scores(rm_out / "hf", train_pairs))["overall"]
    return {"seed": seed, "train_s": train_s, "eval_s": eval_s, "acc": acc, "max_diff": diff, "flips": flips,
            "train_acc": train_acc, "pairs": len(pairs)}


def table(rows: list[dict]) -> str:
    kinds = [k for k in rows[0]["acc"] if k != "overall"]
    lines = ["| training seed | train s | held-out scoring s | overall | " + " | ".join(kinds)
             + " | training set | max score diff vs transformers | verdicts differing |",
             "| --- " * (len(kinds) + 7) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['train_s']:.0f} | {r['eval_s']:.0f} | {r['acc']['overall']:.2f} | "
                     + " | ".join(f"{r['acc'][k]:.2f}" for k in kinds)
                     + f" | {r['train_acc']:.2f} | {r['max_diff']:.1e} | {r['flips']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1234,7,99", help="rlmt-train-rm seeds (1234: the demo's, the config default)")
    p.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir, removed)")
    p.add_argument("--write", type=Path, default=None, help="append the results to this markdown file")
    a = p.parse_args(argv)
    from rlmt_megatron.testing.demo_data import make_demo_data
    from rlmt_megatron.testing.tiny_models import build_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        build_tiny_models(work / "models", seed=0)
        make_demo_data(work / "data")
        rows = [one_seed(work, int(s)) for s in a.seeds.split(",")]
    text = table(rows)
    print(text)
    common.append_section(a.write, common.section_header("Demo reward model, held-out preference accuracy",
                                                         "benchmarks/demo_rm_accuracy.py", argv)
                          + f"{rows[0]['pairs']} held-out pairs (`demo_data.make_heldout_preferences`), "
                          "scored by `rlmt_megatron.testing.rm_accuracy`; RM trained by `rlmt-train-rm "
                          "examples/demo/rm.yaml` on the demo's `preferences.jsonl`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
