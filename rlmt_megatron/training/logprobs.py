"""Per-token log-probabilities from tensor-parallel (vocab-sharded) logits.

Megatron's vocab-parallel cross entropy already avoids gathering the vocabulary: each TP rank
reduces its shard (max, sum-exp, target logit) and the ranks all-reduce three [b, s] tensors.
logprob = -cross_entropy. Vocabulary padding rows (added so the vocab splits evenly over TP) are
masked out first, so the distribution is over the checkpoint's real vocabulary only.
"""

from __future__ import annotations

import torch


def mask_padded_vocab(logits_shard: torch.Tensor, true_vocab_size: int) -> torch.Tensor:
    """Set logits of padding rows (ids >= true_vocab_size) on this TP rank's shard to -inf."""
    from megatron.core import parallel_state

    part = logits_shard.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * part
    if start + part <= true_vocab_size:
        return logits_shard
    keep = torch.arange(start, start + part, device=logits_shard.device) < true_vocab_size
    return logits_shard.masked_fill(~keep, float("-inf"))


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor, targets: torch.Tensor, true_vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(targets) from this rank's [..., V/tp] logits; differentiable, float32 result.

    ``temperature`` divides the logits before the softmax, as the rollout engines sample.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits_shard.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = mask_padded_vocab(logits, true_vocab_size)
    if logits is logits_shard:  # the CE kernel works in place; never on the model's output
        logits = logits.clone()
    return -vocab_parallel_cross_entropy(logits, targets)
