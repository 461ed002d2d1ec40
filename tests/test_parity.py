"""Megatron models built from the tiny HF checkpoints reproduce transformers at every layout.

One real 4-process torchrun job (gloo on CPU) runs the Megatron side at TP x PP in {1x1, 2x1, 1x2,
2x2}, interleaved PP (1x2 with 2 virtual stages) and sequence parallelism (TP=2), in turn (smaller
layouts with data-parallel replicas); the reference is transformers' own
LlamaForCausalLM / Qwen2ForCausalLM / LlamaForSequenceClassification / LlamaForTokenClassification,
computed here in float32. Tolerance 1e-4 (float32 with different reduction orders across TP
shards; observed differences are ~1e-6).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForTokenClassification

from helpers import torchrun

# (tp, pp, vpp) and "sp": TP=2 with sequence parallelism.
LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2), (2, 1, "sp")]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_reference(tiny_models, test_sequences):
    _, seqs = test_sequences
    ref = {}
    with torch.no_grad():
        for name in ("llama-policy", "qwen2-policy"):
            model = AutoModelForCausalLM.from_pretrained(str(tiny_models / name), dtype=torch.float32).eval()
            ref[name] = []
            for s in seqs:
                ids = torch.tensor([s])
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
                ref[name].append(logp.gather(-1, ids[0, 1:, None])[:, 0])
        rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_models / "llama-rm"), dtype=torch.float32).eval()
        ref["llama-rm"] = [rm(torch.tensor([s])).logits[0, 0] for s in seqs]
        # The RM's body and `score` loaded as a per-token head: the critic's independent reference.
        tc = LlamaForTokenClassification.from_pretrained(str(tiny_models / "llama-rm"), dtype=torch.float32).eval()
        ref["critic-from-rm"] = [tc(torch.tensor([s])).logits[0, :, 0] for s in seqs]
    return ref


_runs: dict = {}
EXPORT_LAYOUT = (2, 2, None)


def _key(layout) -> str:
    tp, pp, extra = layout
    return f"{tp}x{pp}" + ({None: "", "sp": "sp"}.get(extra, f"vpp{extra}"))


def megatron_outputs(layout, tiny_models, test_sequences, tmp_path_factory):
    """The worker's outputs at ``layout`` (every layout is computed by one job, once)."""
    if not _runs:
        out = tmp_path_factory.mktemp("parity") / "out.json"
        export = out.parent / "export"
        torchrun(4, ["tests/workers/parity_worker.py", "--models", str(tiny_models), "--sequences",
                     str(test_sequences[0]), "--layouts", ",".join(_key(l) for l in LAYOUTS), "--out", str(out),
                     "--export-layout", _key(EXPORT_LAYOUT), "--export-dir", str(export)])
        got = json.loads(out.read_text())
        _runs["threads"] = [json.loads(Path(f"{out}.threads.{rank}").read_text()) for rank in range(4)]
        _runs.update({layout: (got[_key(layout)], export if layout == EXPORT_LAYOUT else None) for layout in LAYOUTS})
    return _runs[layout]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}" + ({None: "", "sp": "sp"}.get(l[2], f"vpp{l[2]}")))
def test_matches_transformers(layout, tiny_models, test_sequences, tmp_path_factory, hf_reference):
    got, _ = megatron_outputs(layout, tiny_models, test_sequences, tmp_path_factory)
    tp, pp, extra = layout
    assert got["ran_with"] == {"tp": tp, "pp": pp, "dp": 4 // (tp * pp), "chunks": extra if isinstance(extra, int) else 1,
                               "sequence_parallel": extra == "sp"}
    seqs = test_sequences[1]
    for name in ("llama-policy", "qwen2-policy"):
        assert len(got[name]) == len(seqs)
        for s, lp, ref in zip(seqs, got[name], hf_reference[name]):
            lp = torch.tensor(lp)
            assert lp.shape == (len(s) - 1,)
            diff = (lp - ref).abs().max().item()
            assert diff <= TOL, f"{name} logprobs differ by {diff} at {layout}"
    scores = torch.tensor(got["llama-rm"])
    ref_scores = torch.stack(hf_reference["llama-rm"])
    assert (scores - ref_scores).abs().max().item() <= TOL, (scores, ref_scores)
    assert ref_scores.std() > 0.1  # the scores really differ per sequence; a constant would not pass
    for s, values, ref in zip(seqs, got["critic-from-rm"], hf_reference["critic-from-rm"]):
        values = torch.tensor(values)
        assert values.shape == (len(s),), "the critic returns one value per token"
        assert (values - ref).abs().max().item() <= TOL


def test_shutdown_frees_every_process_group(tiny_models, test_sequences, tmp_path_factory):
    """After ``bootstrap.shutdown`` no process group's gloo threads run on any rank (they ran
    before it): a group left alive is destroyed at interpreter exit, where it has aborted a rank
    of a finished run (SIGABRT, "terminate called without an active exception")."""
    megatron_outputs(LAYOUTS[0], tiny_models, test_sequences, tmp_path_factory)
    for rank, threads in enumerate(_runs["threads"]):
        assert any("gloo" in name for name in threads["before"]), (rank, threads["before"])
        assert not [name for name in threads["after"] if "gloo" in name], (rank, threads["after"])


def test_export_from_tp2_pp2_is_bit_exact(tiny_models, test_sequences, tmp_path_factory):
    """HF -> Megatron (TP2 x PP2, gathered from 4 ranks) -> HF gives back the same tensors."""
    _, export = megatron_outputs((2, 2, None), tiny_models, test_sequences, tmp_path_factory)
    for name in ("llama-policy", "qwen2-policy", "llama-rm"):
        original = load_file(str(tiny_models / name / "model.safetensors"))
        exported = load_file(str(export / name / "model.safetensors"))
        assert sorted(exported) == sorted(original), set(exported) ^ set(original)
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
        # And transformers loads the folder as the same architecture.
        cfg = json.loads((export / name / "config.json").read_text())
        assert cfg["architectures"] == json.loads((tiny_models / name / "config.json").read_text())["architectures"]
