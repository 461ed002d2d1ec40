"""rlmt-sft, rlmt-train-rm and rlmt-generate as a user runs them.

The losses themselves are checked against transformers in test_loss_functions.py and
test_reward_training.py; here the stages run end to end (SFT at DP=2 under torchrun) and their
outputs are checked with transformers and with the answer-extraction rule written out again.
"""

import json

import torch
from safetensors.torch import load_file

from helpers import REPO, run_cli, torchrun
from rlmt_megatron.testing.demo_data import make_demo_data


def _changed(a_dir, b_dir) -> float:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sft_at_dp2_trains_only_assistant_tokens_and_exports(tiny_models, tmp_path):
    out = tmp_path / "sft"
    torchrun(2, ["-m", "rlmt_megatron.cli.supervised", "sft", str(REPO / "examples/demo/sft.yaml"),
                 f"model={tiny_models / 'llama-policy'}", f"data=[{REPO / 'examples/data/sft_thinking.jsonl'}]",
                 f"out_dir={out}", "epochs=1", "batch_size=32"], timeout=600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # 64 rows / 32 per step
    assert rows[1]["loss/sft"] < rows[0]["loss/sft"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "hf"))  # loads
    assert _changed(out / "hf", tiny_models / "llama-policy") > 1e-4


def test_reward_model_stage_learns_the_preferences(tiny_models, tmp_path):
    data = make_demo_data(tmp_path / "data", pref_rows=64)
    out = tmp_path / "rm"
    proc = run_cli("rlmt_megatron.cli.supervised", ["rm", str(REPO / "examples/demo/rm.yaml"), f"model={tiny_models / 'llama-rm'}",
                                                    f"data=[{data['preferences']}]", f"out_dir={out}", "epochs=2"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rm/accuracy"] > rows[0]["rm/accuracy"] or rows[-1]["rm/accuracy"] == 1.0
    # the saved RM prefers the chosen answers (transformers, its own template, one BOS)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "hf"))
    rm = AutoModelForSequenceClassification.from_pretrained(str(out / "hf")).eval()
    wins = 0
    pairs = [json.loads(line) for line in data["preferences"].read_text().splitlines()][:16]
    for p in pairs:
        scores = []
        for key in ("chosen", "rejected"):
            text = tok.apply_chat_template(p["messages"] + [{"role": "assistant", "content": p[key]}], tokenize=False)
            with torch.no_grad():
                scores.append(float(rm(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, 0]))
        wins += scores[0] > scores[1]
    assert wins >= 14


def _answer_rule(text: str) -> tuple[str, bool]:
    """The paper's non-strict extraction, written out: text after the first </think>, left-stripped;
    the whole text when it is missing."""
    head, sep, tail = text.partition("</think>")
    return (tail.lstrip(), True) if sep else (text, False)


def test_generate_separates_thinking_and_answer(tiny_models, tmp_path):
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n"
                           for i, q in enumerate(["Say hello.", "Plan a picnic.", "What is rain?"])))
    out = tmp_path / "answers.jsonl"
    proc = run_cli("rlmt_megatron.cli.generate", ["--model", str(tiny_models / "llama-policy"), "--input", str(src),
                                                  "--out", str(out), "--max-new-tokens", "12", "--temperature", "1.0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert (r["answer"], r["format_ok"]) == _answer_rule(r["output"])
        assert 0 < r["num_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
