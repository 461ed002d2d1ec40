"""Per-token log-probabilities and entropies from tensor-parallel (vocab-sharded) logits.

Each TP rank holds logits for a slice of the vocabulary. Nothing is gathered: per token, the
ranks all-reduce four scalars (max, sum of exp, target logit, sum of p*z) and each rank computes
its own gradient slice from the saved log-sum-exp, so backward needs no communication at all.

Memory: the work is done in chunks of tokens (by default 256 MiB of float32 per chunk buffer,
at most two buffers alive), however long the batch; the only full-size tensors are the logits
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

DEFAULT_CHUNK_BYTES = 256 * 2**20  # float32 work per chunk; two such buffers live at a time


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


def _tempered(logits: torch.Tensor, temperature: float, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """A float32 copy of a logits chunk divided by the temperature, padding rows at -inf."""
    z = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    if valid is not None:
        z.masked_fill_(~valid, float("-inf"))
    return z


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Forward per chunk, with m the all-reduced max and e = exp(z - m) (in place over z):
    s = sum e, logp = (z_t - m) - log s, H = log s - sum(e * (z - m)) / s, where
    e * (z - m) = xlogy(e, e) is exactly 0 on padding rows. Backward recomputes p per chunk."""

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
            z = _tempered(logits[a:b], temperature, valid)
            m = _all_reduce(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
            z.sub_(m[:, None])
            tz = torch.where(owns[a:b], z.gather(-1, local_t[a:b, None])[:, 0], torch.zeros_like(m))
            e = z.exp_()
            sums = [e.sum(-1), tz] + ([torch.xlogy(e, e).sum(-1)] if with_entropy else [])
            del z, e
            sums = _all_reduce(torch.stack(sums), group)
            log_s = torch.log(sums[0])
            lse[a:b] = m + log_s
            logp[a:b] = sums[1] - log_s
            if with_entropy:
                ent[a:b] = log_s - sums[2] / sums[0]
        ctx.save_for_backward(logits, local_t, owns, lse, ent if with_entropy else lse)
        ctx.valid = valid
        ctx.temperature, ctx.chunk_tokens, ctx.with_entropy = temperature, chunk_tokens, with_entropy
        return logp, ent if with_entropy else torch.empty(0, device=logits.device)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, local_t, owns, lse, ent = ctx.saved_tensors
        use_ent = ctx.with_entropy and grad_ent is not None and grad_ent.numel() > 0
        grad = torch.empty_like(logits)
        n = logits.shape[0]
        for a in range(0, n, ctx.chunk_tokens):
            b = min(a + ctx.chunk_tokens, n)
            p = _tempered(logits[a:b], ctx.temperature, ctx.valid).sub_(lse[a:b, None]).exp_()
            # d/dz of (g_lp * logp + g_ent * H) = g_lp * (onehot - p) - g_ent * (p log p + p H)
            g_lp = grad_logp[a:b]
            if use_ent:
                g = torch.xlogy(p, p).mul_(-grad_ent[a:b, None])
                g.addcmul_(p, -(g_lp + grad_ent[a:b] * ent[a:b])[:, None])
            else:
                g = p.mul_(-g_lp[:, None])
            del p
            # + g_lp on each token's own column (0 where another TP rank owns it); scatter_add
            # with a mask instead of nonzero(), which would copy a count to the host per chunk.
            g.scatter_add_(1, local_t[a:b, None], torch.where(owns[a:b], g_lp, torch.zeros_like(g_lp))[:, None].to(g.dtype))
            grad[a:b] = g.div_(ctx.temperature)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    true_vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(targets) and the entropy of p, from this rank's ``[..., V/tp]`` logits.

    Differentiable w.r.t. the logits (both outputs); results are float32 with the leading shape
    of ``targets``. ``entropy`` is None when ``with_entropy`` is False.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = targets.shape
    flat = logits_shard.reshape(-1, logits_shard.shape[-1])
    chunk_tokens = chunk_tokens or max(1, DEFAULT_CHUNK_BYTES // (4 * flat.shape[-1]))
    logp, ent = _VocabParallelLogprobEntropy.apply(
        flat, targets.reshape(-1), true_vocab_size, float(temperature), int(chunk_tokens), with_entropy
    )
    return logp.view(lead), (ent.view(lead) if with_entropy else None)


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor, targets: torch.Tensor, true_vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(targets) only (see :func:`vocab_parallel_logprobs_and_entropy`)."""
    return vocab_parallel_logprobs_and_entropy(logits_shard, targets, true_vocab_size, temperature, with_entropy=False)[0]
