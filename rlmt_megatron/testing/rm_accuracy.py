"""Preference accuracy of a reward model on a file of pairs: the CPU demo's held-out check.

    python -m rlmt_megatron.testing.rm_accuracy --rm RM_DIR --pairs heldout_preferences.jsonl [--report acc.json]

Both answers of every pair (``messages``, ``chosen``, ``rejected``, optional ``kind``) are scored
by the project's own scorer, the ``rlmt-score`` code (``cli/score.py``, run in this process: the
RM's chat template, Megatron's forward, the head at the last token, as in GRPO). A pair counts
as right when the chosen answer scores strictly higher. It prints one line, the accuracy overall
and per kind, and writes the scored rows (pair index, side, kind, score) next to the pairs file
(``--out``). The demo's held-out set and what it covers: ``demo_data.make_heldout_preferences``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from collections import defaultdict
from pathlib import Path


def accuracy_by_kind(pairs: list[dict], chosen_scores: list[float], rejected_scores: list[float]) -> dict[str, float]:
    """Fraction of pairs whose chosen answer scores strictly higher: ``overall``, then per ``kind``
    in order of first appearance."""
    wins: dict[str, list[bool]] = defaultdict(list)
    for row, c, r in zip(pairs, chosen_scores, rejected_scores, strict=True):
        wins["overall"].append(c > r)
        wins[row.get("kind") or "unlabelled"].append(c > r)
    return {kind: sum(w) / len(w) for kind, w in wins.items()}


def accuracy_line(acc: dict[str, float]) -> str:
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "overall")
    return f"reward model held-out preference accuracy: {acc['overall']:.2f} overall; per kind: {kinds}"


def score_pairs(rm: str | Path, pairs_path: str | Path, scores_path: str | Path) -> tuple[list[dict], list[float], list[float]]:
    """(pairs, chosen scores, rejected scores), by ``rlmt-score``; its rows go to ``scores_path``."""
    from rlmt_megatron.cli import score
    from rlmt_megatron.data.jsonl import read_jsonl, write_jsonl

    pairs = [row for _, row in read_jsonl(pairs_path)]
    responses = [{"messages": p["messages"], "response": p[side], "pair": i, "side": side, "kind": p.get("kind")}
                 for i, p in enumerate(pairs) for side in ("chosen", "rejected")]
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "responses.jsonl"
        write_jsonl(rows_path, responses)
        with contextlib.redirect_stdout(io.StringIO()):  # its "wrote N rows" line
            score.main(["--rm", str(rm), "--input", str(rows_path), "--out", str(scores_path)])
    scores = {(r["pair"], r["side"]): r["score"] for _, r in read_jsonl(scores_path)}
    return pairs, [scores[i, "chosen"] for i in range(len(pairs))], [scores[i, "rejected"] for i in range(len(pairs))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlmt_megatron.testing.rm_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rm", required=True, help="reward model: HF *ForSequenceClassification folder or rlmt checkpoint")
    p.add_argument("--pairs", required=True, help="preference jsonl: messages, chosen, rejected, optional kind")
    p.add_argument("--out", default=None, help="scored rows (default: the pairs file's name + .scores.jsonl)")
    p.add_argument("--report", default=None, help="also write the accuracies here as JSON")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.pairs).with_suffix(".scores.jsonl")
    acc = accuracy_by_kind(*score_pairs(a.rm, a.pairs, out))
    if a.report:
        Path(a.report).write_text(json.dumps(acc, indent=1) + "\n", encoding="utf-8")
    print(accuracy_line(acc))


if __name__ == "__main__":
    from rlmt_megatron.cli.common import run_main

    run_main(main)
