"""rlmt-score: the RM's own chat template, no system prompt, one BOS, scores equal to transformers.

The expected text is written out by hand from the Llama-3 template format (an independent
statement of what the RM must see); the expected scores come from transformers'
LlamaForSequenceClassification on those tokens. The CLI runs at TP=2 under torchrun.
"""

import json

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers import torchrun
from rlmt_megatron.reward.rm_template import rm_input_ids

ROWS = [
    {"messages": [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "Is the sea salty?"}],
     "response": "Yes, the sea is salty."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Tell me a joke."}], "response": "Why did the cat sit on the computer?"},
    {"messages": [{"role": "user", "content": "Count to three."}], "response": "One, two, three."},
]


def expected_text(row):
    turns = [m for m in row["messages"] if m["role"] != "system"] + [{"role": "assistant", "content": row["response"]}]
    body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in turns)
    return "<|begin_of_text|>" + body


def test_rm_template_drops_system_and_keeps_one_bos(tiny_models):
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-rm"))
    for row in ROWS:
        ids = rm_input_ids(tok, row["messages"], row["response"])
        assert tok.decode(ids) == expected_text(row)
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_score_cli_matches_transformers(tiny_models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "scores.jsonl"
    torchrun(2, ["-m", "rlmt_megatron.cli.score", "--rm", str(tiny_models / "llama-rm"), "--tp", "2",
                 "--input", str(rows), "--out", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-rm"))
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_models / "llama-rm"), dtype=torch.float32).eval()
    assert [g["messages"] for g in got] == [r["messages"] for r in ROWS]  # order kept, rows carried through
    for row, g in zip(ROWS, got):
        ids = tok(expected_text(row), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = rm(ids).logits[0, 0].item()
        assert abs(g["score"] - ref) <= 1e-4, (g["score"], ref)
