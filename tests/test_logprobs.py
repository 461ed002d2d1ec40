"""Vocab-parallel logprobs/entropy: values and gradients against a float64 full-vocabulary reference.

The reference is plain ``log_softmax`` on the whole (gathered) vocabulary in float64, with
autograd for the gradients. Covered: temperature, vocabulary padding rows, chunking smaller
than the batch, and TP=2 (two real processes, each holding half the vocabulary). Last, the
``rlmt-logprobs`` CLI on a model folder without tokenizer files, against transformers.
"""

import json
import shutil

import pytest
import torch

from helpers import run_cli, torchrun
from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs_and_entropy


def reference(logits64, targets, true_vocab, temperature, w_lp, w_ent):
    z = logits64[:, :true_vocab] / temperature
    logp_all = torch.log_softmax(z, -1)
    lp = logp_all.gather(-1, targets[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    (w_lp * lp + w_ent * ent).sum().backward()
    return lp, ent


def case(seed=0, n=37, vocab=50, true_vocab=45):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, true_vocab, (n,), generator=g)
    w_lp, w_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    return logits, targets, w_lp, w_ent


@pytest.mark.parametrize("temperature, chunk", [(1.0, 1024), (0.7, 8), (1.3, 5)])
def test_single_rank_matches_float64(world_of_one, temperature, chunk):
    logits, targets, w_lp, w_ent = case()
    ref_in = logits.clone().requires_grad_(True)
    ref_lp, ref_ent = reference(ref_in, targets, 45, temperature, w_lp, w_ent)
    x = logits.float().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_and_entropy(x, targets, 45, temperature, chunk_tokens=chunk)
    (w_lp.float() * lp + w_ent.float() * ent).sum().backward()
    assert (lp.double() - ref_lp).abs().max() < 1e-5
    assert (ent.double() - ref_ent).abs().max() < 1e-5
    assert (x.grad.double() - ref_in.grad).abs().max() < 1e-5
    assert torch.count_nonzero(x.grad[:, 45:]) == 0  # padding rows get no gradient


def test_logprob_only_and_leading_shape(world_of_one):
    logits, targets, w_lp, _ = case(n=24)
    x = logits.float().view(4, 6, 50).requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_and_entropy(x, targets.view(4, 6), 45, with_entropy=False)
    assert ent is None and lp.shape == (4, 6)
    ref_in = logits.clone().requires_grad_(True)
    ref_lp, _ = reference(ref_in, targets, 45, 1.0, w_lp, torch.zeros(24, dtype=torch.float64))
    (w_lp.float().view(4, 6) * lp).sum().backward()
    assert (lp.reshape(-1).double() - ref_lp).abs().max() < 1e-5
    assert (x.grad.reshape(24, 50).double() - ref_in.grad).abs().max() < 1e-5


def test_tensor_parallel_two_ranks(tmp_path):
    logits, targets, w_lp, w_ent = case(seed=3, n=29, vocab=64, true_vocab=61)
    torch.save({"logits": logits, "targets": targets, "w_lp": w_lp, "w_ent": w_ent}, tmp_path / "case.pt")
    torchrun(2, ["tests/workers/logprob_worker.py", str(tmp_path / "case.pt"), str(tmp_path), "61", "0.8"])
    ref_in = logits.clone().requires_grad_(True)
    ref_lp, ref_ent = reference(ref_in, targets, 61, 0.8, w_lp, w_ent)
    halves = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, h in enumerate(halves):
        assert (h["lp"].double() - ref_lp).abs().max() < 1e-5
        assert (h["ent"].double() - ref_ent).abs().max() < 1e-5
        assert (h["grad"].double() - ref_in.grad[:, 32 * r: 32 * (r + 1)]).abs().max() < 1e-5


# --------------------------------------------------------------------------- rlmt-logprobs CLI

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def test_cli_needs_no_tokenizer_for_rows_given_as_ids(tiny_models, tmp_path):
    """Rows made of ``prompt_ids``/``response_ids`` only: a model folder without tokenizer files
    serves them, and the logprobs are transformers' (float32); one text row needs the tokenizer
    and gets the one-line error naming the folder."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "llama-policy"
    shutil.copytree(tiny_models / "llama-policy", model_dir)
    removed = [name for name in TOKENIZER_FILES if (model_dir / name).exists()]
    for name in removed:
        (model_dir / name).unlink()
    assert "tokenizer.json" in removed and not any(model_dir.glob("tokenizer*"))
    g = torch.Generator().manual_seed(11)
    rows = [{"prompt_ids": torch.randint(0, 1024, (n,), generator=g).tolist(),
             "response_ids": torch.randint(0, 1024, (m,), generator=g).tolist()} for n, m in ((5, 7), (1, 3), (12, 1))]
    ids_only = tmp_path / "ids.jsonl"
    ids_only.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lp.jsonl"
    proc = run_cli("rlmt_megatron.cli.logprobs", ["--model", str(model_dir), "--input", str(ids_only), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models / "llama-policy"), dtype=torch.float32).eval()
    assert len(got) == len(rows)
    for row, want in zip(got, rows):
        ids = torch.tensor([want["prompt_ids"] + want["response_ids"]])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        ref = ref[len(want["prompt_ids"]) - 1:]
        assert row["prompt_ids"] == want["prompt_ids"] and row["response_ids"] == want["response_ids"]
        assert len(row["logprobs"]) == len(want["response_ids"])
        assert (torch.tensor(row["logprobs"]) - ref).abs().max().item() <= 1e-4
        assert row["sum_logprob"] == pytest.approx(ref.sum().item(), abs=1e-3)

    with_text = tmp_path / "text.jsonl"
    with_text.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt_ids": [1, 2], "response": "Blue."}) + "\n")
    proc = run_cli("rlmt_megatron.cli.logprobs", ["--model", str(model_dir), "--input", str(with_text),
                                                  "--out", str(tmp_path / "never.jsonl")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {model_dir}: cannot load the tokenizer" in proc.stderr
    assert not (tmp_path / "never.jsonl").exists()
