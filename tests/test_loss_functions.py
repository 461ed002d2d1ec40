"""Every training loss through the real engine: split invariance, layouts, an HF reference, bad input.

Runs tests/workers/loss_modes_worker.py (one optimizer step per loss from fresh weights): the PPO
objective under each aggregation mode, the critic's clipped value loss, SFT and DPO. The same
global batch split into micro-batches of 8, 4 and 1 samples, over DP=2, TP=2 and PP=2 must give
the same weights. The token-mean PPO step is also recomputed with transformers and
torch.optim.Adam as an independent reference.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import max_abs_diff, run_worker_once

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from loss_modes_worker import LOSSES, POLICY, global_batch  # noqa: E402

RUNS = {"base": (1, []), "dp2": (2, ["--mbs", "4,1"]), "tp2": (2, ["--tp", "2", "--mbs", "4"]),
        "pp2": (2, ["--pp", "2", "--mbs", "2"])}
_cache: dict = {}


def run(name, tiny_models, tmp_path_factory):
    return run_worker_once(_cache, "loss_modes_worker.py", RUNS, name, tiny_models / "llama-policy", tmp_path_factory)


@pytest.mark.parametrize("layout", list(RUNS))
def test_every_loss_is_split_and_layout_invariant(layout, tiny_models, tmp_path_factory):
    base = run("base", tiny_models, tmp_path_factory)
    got = run(layout, tiny_models, tmp_path_factory)
    for key, result in got.items():
        ref = base[key.split("/")[0] + "/8"]
        assert max_abs_diff(result["state"], ref["state"]) <= 1e-6, key
        for metric, value in ref["metrics"].items():
            assert result["metrics"][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, metric)
    assert {k.split("/")[0] for k in got} == set(LOSSES)


def reference_ppo_loss(model, batch):
    """The worker's token-mean PPO objective (``POLICY``), written out by hand in float64: logits
    / 0.7; ratio clipped to [1 - 0.2, 1 + 0.28]; dual clip at 3 |A| for negative advantages; k3
    KL to the reference (log-ratio clamped to ±20, value to ±10) with coefficient 0.1 in the
    loss; entropy bonus 0.01; the sum over loss tokens divided by the batch's loss tokens."""
    count = sum(float(s.fields["loss_mask"].sum()) for s in batch)
    total = 0.0
    for s in batch:
        ids = s.input_ids[None]
        z = torch.log_softmax(model(ids).logits[0, :-1].double() / 0.7, -1)
        logp = z.gather(-1, ids[0, 1:, None])[:, 0]
        entropy = -(z.exp() * z).sum(-1)
        f = {k: v.double() for k, v in s.fields.items()}
        a, m = f["advantages"], f["loss_mask"]
        ratio = torch.exp((logp - f["old_logp"]).clamp(-20, 20))
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - 0.2, 1 + 0.28))
        pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg)
        d = (f["ref_logp"] - logp).clamp(-20, 20)
        k3 = (torch.exp(d) - d - 1).clamp(-10, 10)
        total = total + ((pg + 0.1 * k3 - 0.01 * entropy) * m).sum() / count
    return total


def test_ppo_step_matches_transformers_reference(tiny_models, tmp_path_factory):
    # the constants reference_ppo_loss writes out are the worker's
    assert (POLICY.loss, POLICY.clip_low, POLICY.clip_high, POLICY.dual_clip_c, POLICY.kl_in_loss, POLICY.kl_coef,
            POLICY.kl_estimator, POLICY.entropy_coef) == ("ppo_clip", 0.2, 0.28, 3.0, True, 0.1, "k3", 0.01)
    got = run("base", tiny_models, tmp_path_factory)["token_mean/8"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models / "llama-policy"), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, eps=1.0)
    loss = reference_ppo_loss(model, global_batch())
    loss.backward()
    opt.step()
    assert got["metrics"]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert max_abs_diff(got["state"], {k: v.detach() for k, v in model.state_dict().items()}) <= 1e-5


# ---------------------------------------------------------------------------------------------
# In-process (one rank): bad input and the LR schedule.


@pytest.fixture(scope="module")
def engine(tiny_models, world_of_one):
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.optim import OptimConfig
    from rlmt_megatron.runner.model_runner import ModelRunner

    optim = OptimConfig(lr=1e-3, min_lr=1e-4, lr_schedule="cosine", warmup_steps=2, total_steps=6, clip_grad=0.0)
    return ModelRunner(load_model(tiny_models / "llama-policy", "policy", world_of_one), optim)


def policy_loss():
    from rlmt_megatron.runner.losses import policy_loss_fn

    return policy_loss_fn(POLICY, 1024)


def test_bad_batches_are_refused(engine):
    batch = global_batch()[:2]
    with pytest.raises(ValueError, match="empty batch"):
        engine.train_step([], policy_loss())
    masked = [type(s)(s.input_ids, {**s.fields, "loss_mask": torch.zeros_like(s.fields["loss_mask"])}) for s in batch]
    with pytest.raises(ValueError, match="every token of the global batch is masked out"):
        engine.train_step(masked, policy_loss())
    nan = [type(s)(s.input_ids, dict(s.fields)) for s in batch]
    nan[1].fields["advantages"] = nan[1].fields["advantages"].clone()
    nan[1].fields["advantages"][3] = float("nan")
    with pytest.raises(ValueError, match="field 'advantages' of sample 1 on this rank contains NaN/inf"):
        engine.train_step(nan, policy_loss())
    half = [type(s)(s.input_ids, {**s.fields, "loss_mask": s.fields["loss_mask"] * 0.5}) for s in batch]
    with pytest.raises(ValueError, match="field 'loss_mask' of sample 0 on this rank is not 0/1"):
        engine.train_step(half, policy_loss())
    from rlmt_megatron.runner.losses import dpo_loss_fn

    with pytest.raises(ValueError, match=r"pairs must stay together"):
        engine.train_step(global_batch()[:4], dpo_loss_fn(1024))  # unit_size=2 forgotten
    # A loss that turns NaN inside the step (not from a NaN input): refused before the optimizer
    # step, either by the engine's loss check or by Megatron DDP's NaN-gradient check.
    before = {n: p.detach().clone() for n, p in engine.model[0].named_parameters()}

    def nan_loss(output, mb, counts):
        loss, metrics = policy_loss()(output, mb, counts)
        return loss * float("nan"), metrics

    with pytest.raises((ValueError, RuntimeError), match=r"(?i)nan"):
        engine.train_step(batch, nan_loss)
    assert all(torch.equal(p, before[n]) for n, p in engine.model[0].named_parameters())
    assert engine.step_count == 0  # nothing was applied


def test_cosine_schedule_with_warmup(engine):
    """The lr each step applies: linear warmup to 1e-3 over 2 steps (step 1 already at half),
    then cosine down to 1e-4 at step 6 and flat after (formula written here)."""
    import math

    def expected(step):  # lr applied by optimizer step number `step` (1-based)
        if step <= 2:
            return 1e-3 * step / 2
        progress = (step - 2) / (6 - 2)
        return 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    weight = engine.built.chunks[0].decoder.final_layernorm.weight
    before = weight.detach().clone()
    lrs = [engine.train_step(global_batch()[:2], policy_loss())["lr"]]
    assert not torch.equal(before, weight.detach())  # step 1 of the warmup really moved the weights
    lrs += [engine.train_step(global_batch()[:2], policy_loss())["lr"] for _ in range(6)]
    assert lrs == pytest.approx([expected(s) for s in range(1, 8)], rel=1e-9)
