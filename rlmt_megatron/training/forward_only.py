"""Forward-only passes: per-token logprobs (policy), scores (reward model), values (critic).

All three run through :meth:`TrainEngine.forward`, i.e. Megatron's own pipeline schedule over
token-budget micro-batches, so one code path serves PP=1, PP>1 and interleaved PP. Sequences are
right-padded; with causal attention padded positions come after every real token and cannot
influence it, so no attention mask is needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from rlmt_megatron.models.builder import BuiltModel


def broadcast_from_last_stage(obj: Any) -> Any:
    """Send a picklable object from the last pipeline stage to every stage of this pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


def _engine(model):
    from rlmt_megatron.training.engine import TrainEngine

    return model if isinstance(model, TrainEngine) else TrainEngine(model, None)


def _samples(sequences: Sequence[Sequence[int]]):
    from rlmt_megatron.training.batching import Sample

    out = []
    for i, seq in enumerate(sequences):
        if len(seq) < 2:
            raise ValueError(f"sequence {i} has {len(seq)} token(s); at least 2 are needed")
        out.append(Sample(torch.as_tensor(list(seq), dtype=torch.long)))
    return out


def sequence_logprobs(
    model: "BuiltModel | Any", sequences: Sequence[Sequence[int]], max_tokens: int = 8192, temperature: float = 1.0
) -> list[torch.Tensor]:
    """Per sequence, log p(token_t | tokens_<t) for t = 1..len-1 (float32 CPU), on every rank.

    The output layer is applied a chunk of tokens at a time (``chunked_logprobs``), so the
    [tokens, V/tp] logits never exist at once: with a 128K vocabulary they, not the decoder,
    dominated the old/reference pass's memory (benchmarks/logprob_pass.py).
    """
    from rlmt_megatron.training.chunked_logprobs import sequence_logprobs_chunked

    return sequence_logprobs_chunked(model, sequences, max_tokens, temperature)


def sequence_logprobs_from_logits(
    model: "BuiltModel | Any", sequences: Sequence[Sequence[int]], max_tokens: int = 8192, temperature: float = 1.0
) -> list[torch.Tensor]:
    """``sequence_logprobs`` from GPTModel's full logits (fused vocab-parallel logprobs on them):
    the previous path, kept as the benchmark's comparison and a second implementation in tests."""
    from rlmt_megatron.training.logprobs import vocab_parallel_logprobs

    engine = _engine(model)
    vocab = engine.built.spec.vocab_size

    def reduce(logits, mb):
        lp = vocab_parallel_logprobs(logits[:, :-1], mb.targets, vocab, temperature).cpu()  # one copy
        return [lp[row, : n - 1] for row, n in enumerate(mb.lengths[: len(mb.indices)].tolist())]

    return engine.forward(_samples(sequences), reduce, max_tokens)


def sequence_scores(model, sequences: Sequence[Sequence[int]], max_tokens: int = 8192) -> list[torch.Tensor]:
    """Reward model: the head's output at each sequence's last real token (float32 scalar)."""

    def reduce(out, mb):
        n = len(mb.indices)
        rows = torch.arange(n, device=out.device)
        return list(out[rows, mb.lengths[:n] - 1, 0].float().cpu())

    return _engine(model).forward(_samples(sequences), reduce, max_tokens)


def token_values(model, sequences: Sequence[Sequence[int]], max_tokens: int = 8192) -> list[torch.Tensor]:
    """Critic: one value per token of each sequence (float32 [len])."""

    def reduce(out, mb):
        values = out[: len(mb.indices), :, 0].float().cpu()  # one copy per micro-batch, not per row
        return [values[row, :n] for row, n in enumerate(mb.lengths[: len(mb.indices)].tolist())]

    return _engine(model).forward(_samples(sequences), reduce, max_tokens)
