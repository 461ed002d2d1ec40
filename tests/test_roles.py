"""The three roles built from the same body: what each head holds and returns.

References are transformers' own classes loaded from the same files.
"""

import torch
from transformers import AutoModelForCausalLM

from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.training.forward_only import make_micro_batches, sequence_logprobs, token_values


def test_critic_from_policy_checkpoint_has_zero_value_head(tiny_models, test_sequences, world_of_one):
    """PPO initialises the critic from the policy: body loaded, lm_head unused, head zero."""
    _, seqs = test_sequences
    critic = load_model(tiny_models / "llama-policy", "critic", world_of_one)
    policy = load_model(tiny_models / "llama-policy", "policy", world_of_one)
    body = {n: p for n, p in policy.chunks[0].named_parameters() if n != "output_layer.weight"}
    for name, param in critic.chunks[0].named_parameters():
        if name == "output_layer.weight":
            assert param.shape == (1, 128) and torch.count_nonzero(param) == 0
        else:
            assert torch.equal(param, body[name]), name
    values = token_values(critic, make_micro_batches(seqs, 64))
    assert [v.shape[0] for v in values] == [len(s) for s in seqs]
    assert all(torch.count_nonzero(v) == 0 for v in values)


def test_tied_policy_uses_embedding_as_head(tiny_models, test_sequences, world_of_one):
    _, seqs = test_sequences
    qwen = load_model(tiny_models / "qwen2-policy", "policy", world_of_one)
    assert qwen.tied_embeddings and qwen.chunks[0].output_layer.weight is None  # PP=1: one shared tensor
    assert qwen.padded_vocab_size == 1152  # 1029 rounded up to a multiple of 128 * tp
    got = sequence_logprobs(qwen, make_micro_batches(seqs, 64))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models / "qwen2-policy"), dtype=torch.float32).eval()
    with torch.no_grad():
        for s, lp in zip(seqs, got):
            ids = torch.tensor([s])
            ref = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            assert (lp - ref).abs().max() <= 1e-4
