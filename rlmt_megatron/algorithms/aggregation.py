"""Reduce per-token losses to a scalar, independently of how the global batch is split.

One global batch is cut into micro-batches (gradient accumulation) across data-parallel ranks.
A per-micro-batch mean would weight tokens by the size of the micro-batch they landed in, so
the loss (and gradient) would depend on the split. Instead every mode is written as a *sum*
over tokens or sequences divided by normalisers of the whole global batch
(``GlobalNormalizers``, computed once); each micro-batch returns its *contribution*, and

    global loss = sum of contributions over all micro-batches and all ranks.

So: backprop each contribution as is (no division by the number of micro-batches) and *sum*
gradients over data-parallel ranks. If the DP all-reduce averages instead (the usual DDP
default), multiply each contribution by the DP world size.

Modes (``G_tok`` valid tokens, ``G_seq`` sequences with >= 1 valid token, in the global batch):

- ``token_mean``:              sum_tokens loss / G_tok
- ``seq_mean_token_mean``:     sum_seqs (sum_t loss / n_tokens(seq)) / G_seq
- ``seq_mean_token_sum``:      sum_tokens loss / G_seq                     (DAPO's sequence sum)
- ``seq_mean_token_sum_norm``: sum_tokens loss / (G_seq * norm_constant)   (Dr.GRPO)

Sequences with no valid token add nothing and are not counted in ``G_seq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .checks import as_bool_mask, lookup, require_ndim, require_same_shape

Aggregation = Callable[[torch.Tensor, torch.Tensor, "GlobalNormalizers"], torch.Tensor]


@dataclass(frozen=True)
class GlobalNormalizers:
    """Counts over the whole global batch (all micro-batches, all DP ranks), as plain numbers.

    ``num_tokens``: valid tokens; ``num_seqs``: sequences with at least one valid token;
    ``norm_constant``: the per-sequence divisor of ``seq_mean_token_sum_norm`` (e.g. the max
    response length; None when that mode is not used).
    """

    num_tokens: float
    num_seqs: float
    norm_constant: float | None = None


def global_normalizers(masks: Sequence[torch.Tensor], norm_constant: float | None = None) -> GlobalNormalizers:
    """Normalisers for one process from the masks ([b, T] each) of all its micro-batches.

    Across data-parallel ranks, all-reduce (SUM) ``num_tokens`` and ``num_seqs`` yourself.
    ``norm_constant=None`` falls back to the longest valid response in ``masks`` (all-reduce MAX
    across ranks); prefer a fixed constant such as the generation length limit, so the scale
    does not change between batches. Never raises: an all-masked batch is reported by the
    aggregation that would divide by zero.
    """
    tokens, seqs, longest = 0, 0, 0
    for i, mask in enumerate(masks):
        m = as_bool_mask(f"masks[{i}]", require_ndim(f"masks[{i}]", mask, 2))
        per_row = m.sum(dim=-1)
        tokens += int(per_row.sum())
        seqs += int((per_row > 0).sum())
        longest = max(longest, int(per_row.max()) if per_row.numel() else 0)
    return GlobalNormalizers(tokens, seqs, norm_constant if norm_constant is not None else longest)


def _prepare(loss: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    require_ndim("loss", loss, 2)
    require_same_shape("loss", loss, mask=mask)
    m = as_bool_mask("mask", mask)
    return torch.where(m, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)), m


def _positive(value: float | None, what: str) -> float:
    if value is None or not value > 0:
        raise ValueError(f"{what} is {value!r}: all-masked response (no valid tokens in the global batch)")
    return value


def token_mean(loss: torch.Tensor, mask: torch.Tensor, norms: GlobalNormalizers) -> torch.Tensor:
    """Contribution ``sum_{valid t} loss / G_tok``: every token of the global batch weighs the same."""
    g_tok = _positive(norms.num_tokens, "global token count (norms.num_tokens)")
    loss, _ = _prepare(loss, mask)
    return loss.sum() / g_tok


def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, norms: GlobalNormalizers) -> torch.Tensor:
    """Contribution ``sum_seqs (sum_t loss / n_tokens(seq)) / G_seq``: every sequence weighs the same.

    Long responses get a smaller per-token weight (the length bias Dr.GRPO points out).
    """
    g_seq = _positive(norms.num_seqs, "global sequence count (norms.num_seqs)")
    loss, m = _prepare(loss, mask)
    n = m.sum(dim=-1)
    per_seq = loss.sum(dim=-1) / n.clamp(min=1).to(loss.dtype)
    return per_seq.sum() / g_seq


def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor, norms: GlobalNormalizers) -> torch.Tensor:
    """Contribution ``sum_{valid t} loss / G_seq``: each sequence's token sum, averaged over the
    sequences (verl's ``seq-mean-token-sum``, listed with DAPO's options): a long response's
    tokens weigh as much as a short one's, and the loss scale grows with response length."""
    g_seq = _positive(norms.num_seqs, "global sequence count (norms.num_seqs)")
    loss, _ = _prepare(loss, mask)
    return loss.sum() / g_seq


def seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, norms: GlobalNormalizers) -> torch.Tensor:
    """Contribution ``sum_{valid t} loss / (G_seq * norm_constant)`` (Dr.GRPO): a constant per-token weight,
    so neither response length nor batch composition rescales a token's gradient."""
    g_seq = _positive(norms.num_seqs, "global sequence count (norms.num_seqs)")
    if norms.norm_constant is None or not norms.norm_constant > 0:
        raise ValueError(f"norms.norm_constant must be > 0 for seq_mean_token_sum_norm, got {norms.norm_constant!r}")
    loss, _ = _prepare(loss, mask)
    return loss.sum() / (g_seq * norms.norm_constant)


AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def get_aggregation(name: str) -> Aggregation:
    """The aggregation registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("aggregation", AGGREGATIONS, name)


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, norms: GlobalNormalizers, mode: str = "token_mean"
) -> torch.Tensor:
    """This micro-batch's contribution under ``mode``; sum contributions over micro-batches and ranks."""
    return get_aggregation(mode)(loss, mask, norms)
