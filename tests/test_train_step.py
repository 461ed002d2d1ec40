"""Training steps through Megatron DDP + the distributed optimizer, at every split and layout.

One global batch of 8 variable-length samples (loss on the "response" tokens only) is trained
for 2 steps with the masked NLL averaged over the loss tokens of the whole global batch.
- The split must not matter: micro-batches of 8, 4 and 1 samples, DP=2, TP=2, PP=2 and
  interleaved PP (1x2, 2 virtual stages) all give the same weights (float32, 1e-6).
- Independent reference: transformers' LlamaForCausalLM with torch.optim.Adam on the same loss
  (and torch's clip_grad_norm_ for the clipped run) gives the same weights (1e-5).
Adam runs with eps=1 so its update is a smooth function of the gradient (~lr*g/(|g|+1)):
float32 reduction-order noise then stays ~1e-8 instead of flipping lr*sign(g) where g ~ 0.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import max_abs_diff, run_worker_once

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from train_worker import global_batch  # noqa: E402

RUNS = {
    # the one-process variants share one job (start-up is most of a run's cost)
    "1x1": (1, ["--variants", "mb8:8:0,mb4:4:0,mb1:1:0,clip:8:1.0"]),
    "dp2-mb2": (2, ["--mbs", "2"]),
    "tp2": (2, ["--tp", "2"]),
    "pp2-mb2": (2, ["--pp", "2", "--mbs", "2"]),
    "pp2-vpp2-mb3": (2, ["--pp", "2", "--vpp", "2", "--mbs", "3"]),
    "tp2-pp2-clip": (4, ["--tp", "2", "--pp", "2", "--mbs", "3", "--clip", "1.0"]),
}
_results: dict = {}


def run(name, tiny_models, tmp_path_factory):
    """A run's result; ``1x1-<variant>`` is one variant of the one-process job."""
    job, _, variant = name.partition("-") if name.startswith("1x1-") else (name, "", "")
    got = run_worker_once(_results, "train_worker.py", RUNS, job, tiny_models / "llama-policy", tmp_path_factory)
    return got[variant] if variant else got


def reference_weights(model_dir, clip):
    """Plain transformers + torch.optim.Adam on the same global batch and loss."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, eps=1.0, weight_decay=0.0)
    samples = global_batch(1024)
    total = sum(float(s.fields["loss_mask"].sum()) for s in samples)
    for _ in range(2):
        opt.zero_grad()
        loss = 0.0
        for s in samples:
            ids = s.input_ids[None]
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            loss = loss - (logp * s.fields["loss_mask"]).sum() / total
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["1x1-mb4", "1x1-mb1", "dp2-mb2", "tp2", "pp2-mb2", "pp2-vpp2-mb3"])
def test_split_and_layout_do_not_change_the_update(name, tiny_models, tmp_path_factory):
    base = run("1x1-mb8", tiny_models, tmp_path_factory)
    other = run(name, tiny_models, tmp_path_factory)
    assert max_abs_diff(other["state"], base["state"]) <= 1e-6
    for h_base, h in zip(base["history"], other["history"]):
        assert h["loss"] == pytest.approx(h_base["loss"], abs=1e-5)
        assert h["grad_norm"] == pytest.approx(h_base["grad_norm"], rel=1e-5)


def test_matches_transformers_and_torch_adam(tiny_models, tmp_path_factory):
    got = run("1x1-mb8", tiny_models, tmp_path_factory)
    ref = reference_weights(tiny_models / "llama-policy", clip=0.0)
    assert max_abs_diff(got["state"], ref) <= 1e-5
    first, second = got["history"]
    assert second["loss"] < first["loss"]  # the step really moved the weights downhill


def test_clipping_matches_torch_at_tp2_pp2(tiny_models, tmp_path_factory):
    """The grad norm counts TP shards, replicated norms and both PP stages exactly once."""
    ref = reference_weights(tiny_models / "llama-policy", clip=1.0)
    single = run("1x1-clip", tiny_models, tmp_path_factory)
    split = run("tp2-pp2-clip", tiny_models, tmp_path_factory)
    assert single["history"][0]["grad_norm"] > 1.0  # clipping is active
    assert max_abs_diff(single["state"], ref) <= 1e-5
    assert max_abs_diff(split["state"], ref) <= 1e-5
