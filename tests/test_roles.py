"""The three roles built from the same body: what each head holds and returns.

References are transformers' own classes loaded from the same files.
"""

import torch
from transformers import AutoModelForCausalLM

from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.runner.forward_only import sequence_logprobs, token_values


def test_critic_from_policy_checkpoint_has_zero_value_head(tiny_models, test_sequences, world_of_one):
    """PPO initialises the critic from the policy: body loaded, lm_head unused, head zero."""
    _, seqs = test_sequences
    critic = load_model(tiny_models / "llama-policy", "critic", world_of_one)
    policy = load_model(tiny_models / "llama-policy", "policy", world_of_one)
    body = {n: p for n, p in policy.chunks[0].named_parameters() if n != "output_layer.weight"}
    for name, param in critic.chunks[0].named_parameters():
        if name.startswith("output_layer."):  # value head weight (1, hidden) and bias (1,)
            assert param.shape in {(1, 128), (1,)} and torch.count_nonzero(param) == 0
        else:
            assert torch.equal(param, body[name]), name
    values = token_values(critic, seqs)
    assert [v.shape[0] for v in values] == [len(s) for s in seqs]
    assert all(torch.count_nonzero(v) == 0 for v in values)


def test_tied_policy_uses_embedding_as_head(tiny_models, test_sequences, world_of_one):
    _, seqs = test_sequences
    qwen = load_model(tiny_models / "qwen2-policy", "policy", world_of_one)
    assert qwen.tied_embeddings and qwen.chunks[0].output_layer.weight is None  # PP=1: one shared tensor
    assert qwen.padded_vocab_size == 1152  # 1029 rounded up to a multiple of 128 * tp
    got = sequence_logprobs(qwen, seqs)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models / "qwen2-policy"), dtype=torch.float32).eval()
    with torch.no_grad():
        for s, lp in zip(seqs, got):
            ids = torch.tensor([s])
            ref = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            assert (lp - ref).abs().max() <= 1e-4


def test_critic_exports_as_token_classifier(tiny_models, test_sequences, world_of_one, tmp_path):
    """Critic = RM body + per-token head with bias, exported as LlamaForTokenClassification."""
    from transformers import LlamaForTokenClassification

    from rlmt_megatron.checkpoint.hf_export import save_hf_folder

    _, seqs = test_sequences
    critic = load_model(tiny_models / "llama-rm", "critic", world_of_one)
    with torch.no_grad():
        critic.chunks[0].output_layer.bias.fill_(0.375)  # nonzero, so a dropped bias would show
    save_hf_folder(critic, tmp_path / "critic", tokenizer_src=tiny_models / "llama-rm")
    values = token_values(critic, seqs)
    hf = LlamaForTokenClassification.from_pretrained(str(tmp_path / "critic"), dtype=torch.float32).eval()
    assert hf.score.bias.item() == 0.375
    with torch.no_grad():
        for s, v in zip(seqs, values):
            assert (hf(torch.tensor([s])).logits[0, :, 0] - v).abs().max() <= 1e-4
    # and it loads back as a critic (score.bias consumed, nothing left over)
    again = load_model(tmp_path / "critic", "critic", world_of_one)
    assert again.chunks[0].output_layer.bias.item() == 0.375
