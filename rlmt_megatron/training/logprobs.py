"""Per-token log-probabilities and entropies from tensor-parallel (vocab-sharded) logits.

Each TP rank holds logits for a slice of the vocabulary. Nothing is gathered: per token, the
ranks all-reduce four scalars (max, sum of exp, target logit, sum of p*z) and each rank computes
its own gradient slice from the saved log-sum-exp, so backward needs no communication at all.

Memory: the work is done in chunks of ``chunk_tokens`` tokens, so the float32 temporaries are
``chunk_tokens x V/tp`` however long the batch; the only full-size tensors are the logits
themselves (kept by autograd anyway) and their gradient. For a 128K vocabulary the naive
``log_softmax`` of 8K tokens allocates several 4 GB float32 tensors; see benchmarks/.

Temperature divides the logits first, exactly as the rollout engines sample. Vocabulary padding
rows (added so the vocabulary splits evenly over TP) get probability zero.

Gradients: with z the tempered logits, p = softmax(z), lp = z_t - lse, H = lse - sum p z,
  d lp / d z = onehot(t) - p,       d H / d z = -p * (z - lse + H),
each multiplied by 1/temperature for d/d logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 1024


def _tp_group_rank_size():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, true_vocab, temperature, chunk_tokens, with_entropy):
        group, rank, _ = _tp_group_rank_size()
        n, part = logits.shape
        start = rank * part
        valid = (torch.arange(start, start + part, device=logits.device) < true_vocab) if start + part > true_vocab else None
        local_t = targets - start
        owns = (local_t >= 0) & (local_t < part)
        local_t = local_t.clamp(0, part - 1)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for a in range(0, n, chunk_tokens):
            b = min(a + chunk_tokens, n)
            z = logits[a:b].float() / temperature
            if valid is not None:
                z = z.masked_fill(~valid, float("-inf"))
            m = _all_reduce(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
            e = torch.exp(z - m[:, None])
            s = e.sum(-1)
            tz = torch.where(owns[a:b], z.gather(-1, local_t[a:b, None])[:, 0], torch.zeros_like(m))
            if with_entropy:
                # sum p*z without -inf * 0: padded rows contribute exactly 0
                pz = torch.where(e > 0, e * z, torch.zeros_like(e)).sum(-1)
                stacked = _all_reduce(torch.stack([s, tz, pz]), group)
                s, tz, pz = stacked[0], stacked[1], stacked[2]
            else:
                stacked = _all_reduce(torch.stack([s, tz]), group)
                s, tz = stacked[0], stacked[1]
            lse[a:b] = m + torch.log(s)
            logp[a:b] = tz - lse[a:b]
            if with_entropy:
                ent[a:b] = lse[a:b] - pz / s
        ctx.save_for_backward(logits, local_t, owns, lse, ent if with_entropy else lse)
        ctx.valid = valid
        ctx.temperature, ctx.chunk_tokens, ctx.with_entropy = temperature, chunk_tokens, with_entropy
        return logp, ent if with_entropy else torch.empty(0, device=logits.device)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, local_t, owns, lse, ent = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(logits)
        n = logits.shape[0]
        for a in range(0, n, ctx.chunk_tokens):
            b = min(a + ctx.chunk_tokens, n)
            z = logits[a:b].float() / temperature
            if ctx.valid is not None:
                z = z.masked_fill(~ctx.valid, float("-inf"))
            p = torch.exp(z - lse[a:b, None])
            g = -p * grad_logp[a:b, None]
            rows = torch.nonzero(owns[a:b], as_tuple=True)[0]
            g[rows, local_t[a:b][rows]] += grad_logp[a:b][rows]
            if ctx.with_entropy and grad_ent is not None and grad_ent.numel():
                zc = torch.where(p > 0, z - lse[a:b, None] + ent[a:b, None], torch.zeros_like(z))
                g -= p * zc * grad_ent[a:b, None]
            grad[a:b] = (g / temperature).to(grad.dtype)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    true_vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(targets) and the entropy of p, from this rank's ``[..., V/tp]`` logits.

    Differentiable w.r.t. the logits (both outputs); results are float32 with the leading shape
    of ``targets``. ``entropy`` is None when ``with_entropy`` is False.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = targets.shape
    flat = logits_shard.reshape(-1, logits_shard.shape[-1])
    logp, ent = _VocabParallelLogprobEntropy.apply(
        flat, targets.reshape(-1), true_vocab_size, float(temperature), int(chunk_tokens), with_entropy
    )
    return logp.view(lead), (ent.view(lead) if with_entropy else None)


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor, targets: torch.Tensor, true_vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(targets) only (see :func:`vocab_parallel_logprobs_and_entropy`)."""
    return vocab_parallel_logprobs_and_entropy(logits_shard, targets, true_vocab_size, temperature, with_entropy=False)[0]
