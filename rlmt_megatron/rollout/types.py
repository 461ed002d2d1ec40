"""What rollout engines take and return: engine-independent, plain Python and tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from rlmt_megatron.config.base import StrictModel


class SamplingParams(StrictModel):
    """Sampling settings shared by every engine (names follow vLLM/SGLang)."""

    temperature: NonNegativeFloat = Field(1.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 = off")
    max_new_tokens: PositiveInt = 256
    stop: list[str] = Field(default_factory=list, description="stop strings (kept in the output)")
    stop_token_ids: list[NonNegativeInt] = Field(default_factory=list, description="stop tokens (kept in the output)")
    n: PositiveInt = Field(1, description="samples per prompt")
    seed: Optional[int] = None


FinishReason = Literal["stop", "length"]


def stop_string_end(decode: Callable[[list[int]], str], tokens: Sequence[int], stop: Sequence[str],
                    before: Sequence[int] = ()) -> Optional[int]:
    """How many of ``tokens`` an answer keeps when it ends at a stop string: the fewest whose text,
    after the tokens ``before`` them, holds one of ``stop`` (kept in the output, as vLLM and SGLang
    keep it); None when none does. ``decode``: token ids -> text."""
    context = list(before)
    if not stop or not any(s in decode(context + list(tokens)) for s in stop):
        return None
    return next(k for k in range(1, len(tokens) + 1) if any(s in decode(context + list(tokens[:k])) for s in stop))


@dataclass
class Generation:
    """One sampled response.

    ``logprobs[i]`` is log p(token_ids[i]) under the engine's weights at ``temperature`` (the
    distribution before top-p/top-k truncation, which is what the trainer computes), so the
    trainer can compare it with its own logprobs token by token.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int
    text: Optional[str] = field(default=None)
