"""Scores answers with the reward model (a Megatron-Core model on the trainer's ranks).

The RM reads the conversation and the answer in its **own** chat template with its own tokenizer
(``rm_template.py``: re-tokenised from text, no system prompt, one BOS). Sequences are split over
data-parallel ranks, run through Megatron's forward-only schedule by the RM runner's token budget
(its ``batching``, from ``reward.max_tokens_per_microbatch``), and the scores
gathered back so every rank holds all of them. Non-finite scores are returned as they are; the
caller applies the documented rule (``trainer/experience.py``) and counts them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

from rlmt_megatron.distributed.collectives import dp_gather, dp_shard
from rlmt_megatron.reward.rm_template import rm_input_ids
from rlmt_megatron.runner.model_runner import ModelRunner
from rlmt_megatron.runner.forward_only import sequence_scores


class RewardScorer:
    def __init__(self, engine: ModelRunner, tokenizer, max_length: Optional[int] = None,
                 layout: Callable[[], ContextManager] = contextlib.nullcontext):
        self.engine = engine
        self.layout = layout  # activates the RM's own parallel layout (distributed/role_layouts.py)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def input_ids(self, conversation: list[dict], answer: str) -> list[int]:
        ids = rm_input_ids(self.tokenizer, conversation, answer)
        if self.max_length is not None and len(ids) > self.max_length:
            # Keep the end: the RM's score is read at the last token, which must be the answer's end.
            ids = ids[:1] + ids[len(ids) - self.max_length + 1:]
        return ids

    def score(self, conversations: Sequence[list[dict]], answers: Sequence[str]) -> list[float]:
        """One float per (conversation, answer); collective over the trainer's ranks."""
        if len(conversations) != len(answers):
            raise ValueError(f"{len(conversations)} conversations but {len(answers)} answers")
        sequences = [self.input_ids(c, a) for c, a in zip(conversations, answers)]
        with self.layout():  # sharded over the RM's DP ranks, run on its TP/PP groups
            local = sequence_scores(self.engine, dp_shard(sequences))
            return [float(s) for s in dp_gather(local)]
