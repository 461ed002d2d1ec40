"""Forward-only passes: per-token logprobs (policy), scores (reward model), values (critic).

All three run through :meth:`ModelRunner.forward`, i.e. Megatron's own pipeline schedule over
token-budget micro-batches, so one code path serves PP=1, PP>1 and interleaved PP. The budget is
the runner's (``batching.logprob_tokens_per_microbatch``, set when it is built); a BuiltModel
gets a forward-only runner with the default batching. Sequences are
right-padded; with causal attention padded positions come after every real token and cannot
influence it, so no attention mask is needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlmt_megatron.models.builder import BuiltModel
from rlmt_megatron.runner.batching import samples_from_sequences
from rlmt_megatron.runner.chunked_logprobs import sequence_logprobs_chunked
from rlmt_megatron.runner.model_runner import as_runner


def sequence_logprobs(
    model: "BuiltModel | Any", sequences: Sequence[Sequence[int]], temperature: float = 1.0
) -> list[torch.Tensor]:
    """Per sequence, log p(token_t | tokens_<t) for t = 1..len-1 (float32 CPU), on every rank.

    The output layer is applied a chunk of tokens at a time (``chunked_logprobs``), so the
    [tokens, V/tp] logits never exist at once: with a 128K vocabulary they, not the decoder,
    dominated the old/reference pass's memory (benchmarks/logprob_pass.py).
    """
    return sequence_logprobs_chunked(model, sequences, temperature)


def sequence_logprobs_from_logits(
    model: "BuiltModel | Any", sequences: Sequence[Sequence[int]], temperature: float = 1.0
) -> list[torch.Tensor]:
    """``sequence_logprobs`` from GPTModel's full logits (fused vocab-parallel logprobs on them):
    the previous path, kept as the "fused" comparison of benchmarks/logprob_pass.py."""
    from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs

    engine = as_runner(model)
    vocab = engine.built.spec.vocab_size

    def reduce(logits, mb):
        lp = vocab_parallel_logprobs(logits[:, :-1], mb.targets, vocab, temperature).cpu()  # one copy
        return [lp[row, : n - 1] for row, n in enumerate(mb.lengths[: len(mb.indices)].tolist())]

    return engine.forward(samples_from_sequences(sequences), reduce)


def sequence_scores(model, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Reward model: the head's output at each sequence's last real token (float32 scalar)."""

    def reduce(out, mb):
        n = len(mb.indices)
        rows = torch.arange(n, device=out.device)
        return list(out[rows, mb.lengths[:n] - 1, 0].float().cpu())

    return as_runner(model).forward(samples_from_sequences(sequences), reduce)


def token_values(model, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Critic: one value per token of each sequence (float32 [len])."""

    def reduce(out, mb):
        values = out[: len(mb.indices), :, 0].float().cpu()  # one copy per micro-batch, not per row
        return [values[row, :n] for row, n in enumerate(mb.lengths[: len(mb.indices)].tolist())]

    return as_runner(model).forward(samples_from_sequences(sequences), reduce)
