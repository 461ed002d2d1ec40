"""Reward-model training (Bradley–Terry) through the real engine vs transformers + torch.optim.Adam.

The RM is a Megatron model with a scalar head; the loss reads the score at each sequence's last
real token. The reference recomputes the same step with ``LlamaForSequenceClassification``
(which also scores the last non-pad token) and the BT loss written out here.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers import max_abs_diff


def pairs(tokenizer):
    convo = [{"role": "user", "content": "Name a colour."}]
    answers = [("Blue, like the sky.", "no"), ("Green is calm.", "I refuse to answer that question"),
               ("Red!", "colour colour colour colour colour")]
    from rlmt_megatron.reward.rm_template import rm_input_ids

    return [(rm_input_ids(tokenizer, convo, c), rm_input_ids(tokenizer, convo, r)) for c, r in answers]


def test_bradley_terry_step_matches_transformers(tiny_models, world_of_one):
    from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.runner.batching import Sample
    from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
    from rlmt_megatron.runner.model_runner import ModelRunner
    from rlmt_megatron.runner.losses import reward_model_loss_fn

    rm_dir = tiny_models / "llama-rm"
    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    data = pairs(tok)
    samples = []
    for c, r in data:
        for ids in (c, r):
            mask = torch.zeros(len(ids) - 1)
            mask[-1] = 1.0
            samples.append(Sample(torch.tensor(ids), {"loss_mask": mask}))
    states, losses = [], []
    for per_mb in (6, 2):  # whole batch in one micro-batch vs one pair per micro-batch
        engine = ModelRunner(load_model(rm_dir, "reward", world_of_one),
                             OptimConfig(lr=0.01, adam_eps=1.0, weight_decay=0.0, clip_grad=0.0),
                             BatchingConfig(max_samples_per_microbatch=per_mb))
        m = engine.train_step(samples, reward_model_loss_fn(), unit_size=2)
        losses.append(m["loss"])
        states.append(gather_hf_state_dict(engine.built))
    assert max_abs_diff(states[0], states[1]) <= 1e-6

    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=1.0)
    ref_loss = 0.0
    for c, r in data:
        sc = model(torch.tensor([c])).logits[0, 0]
        sr = model(torch.tensor([r])).logits[0, 0]
        ref_loss = ref_loss + (-F.logsigmoid(sc - sr)) / len(data)
    ref_loss.backward()
    opt.step()
    assert losses[0] == pytest.approx(ref_loss.item(), abs=1e-5)
    ref = {k: v.detach() for k, v in model.state_dict().items()}
    assert max_abs_diff(states[0], ref) <= 1e-5
