"""rlmt-convert round trips, with the Megatron checkpoint written and read at different layouts.

HF -> Megatron distributed checkpoint at TP2 x PP2 (4 processes) -> HF in one process must give
back every tensor bit for bit (original dtype), for the untied Llama policy, the tied Qwen2
policy (whose vocab 1029 is padded for TP) and the reward model. The checkpoint is then read at
a third layout (TP1 x PP2) by rlmt-logprobs and checked against transformers.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import REPO, torchrun


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    # One 4-process job writes the three checkpoints, one plain process reads them back
    # (tests/workers/convert_worker.py runs rlmt-convert's main once per model).
    root = tmp_path_factory.mktemp("convert")
    names = ("llama-policy", "qwen2-policy", "llama-rm")
    torchrun(4, ["tests/workers/convert_worker.py", *(
        f"hf-to-mcore --hf {tiny_models / name} --out {root / 'mcore' / name} --tp 2 --pp 2" for name in names)])
    proc = subprocess.run([sys.executable, "tests/workers/convert_worker.py", *(
        f"mcore-to-hf --ckpt {root / 'mcore' / name} --out {root / 'hf' / name}" for name in names)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.parametrize("name", ["llama-policy", "qwen2-policy", "llama-rm"])
def test_round_trip_is_bit_exact(converted, tiny_models, name):
    original = load_file(str(tiny_models / name / "model.safetensors"))
    exported = load_file(str(converted / "hf" / name / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    meta = json.loads((converted / "mcore" / name / "rlmt_model.json").read_text())
    assert meta["role"] == {"llama-rm": "reward"}.get(name, "policy")
    # The exported folder is self-contained: tokenizer files travel with it.
    assert (converted / "hf" / name / "tokenizer.json").is_file()


def test_checkpoint_loads_at_another_layout(converted, tiny_models, tmp_path):
    """Saved at TP2 x PP2, read at TP1 x PP2 (the padded vocab recorded in the checkpoint)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Name a colour."}], "response": "<think>\nsky\n</think>\n\nBlue.<|eot_id|>"},
        {"prompt_ids": [1018, 40, 41, 42], "response_ids": [50, 51, 52, 53, 54]},
    ]) + "\n")
    out = tmp_path / "lp.jsonl"
    torchrun(2, ["-m", "rlmt_megatron.cli.logprobs", "--model", str(converted / "mcore" / "qwen2-policy"),
                 "--input", str(rows), "--out", str(out), "--pp", "2"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models / "qwen2-policy"), dtype=torch.float32).eval()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 2
    # messages rows are rendered with the model's chat template and a generation prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models / "qwen2-policy"))
    expected = tok.apply_chat_template(got[0]["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert got[0]["prompt_ids"] == expected["input_ids"]
    assert tok.decode(got[0]["response_ids"]) == got[0]["response"]
    for row in got:
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        ref = ref[row["prompt_len"] - 1:]
        assert len(row["logprobs"]) == len(row["response_ids"])
        assert (torch.tensor(row["logprobs"]) - ref).abs().max().item() <= 1e-4
        assert row["sum_logprob"] == pytest.approx(ref.sum().item(), abs=1e-3)
