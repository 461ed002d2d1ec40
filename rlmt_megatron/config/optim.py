"""What a role's runner is given at construction: its optimizer (``OptimConfig``, trained roles
only) and how its samples are cut into micro-batches (``BatchingConfig``, every role).

The token budgets are modelled on NeMo-RL's ``train_mb_tokens`` / ``logprob_mb_tokens``: a
training micro-batch keeps its activations for backward, a forward-only one (old/reference
logprobs, critic values, reward-model scores) does not, so the two budgets are set apart.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from rlmt_megatron.config.base import StrictModel


class OptimConfig(StrictModel):
    """Optimizer and schedule of one trained role (AdamW; Megatron's distributed optimizer)."""

    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam = AdamW (decoupled weight decay)")
    sgd_momentum: NonNegativeFloat = 0.0
    lr: PositiveFloat = 1e-6
    min_lr: NonNegativeFloat = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: NonNegativeInt = 0
    total_steps: PositiveInt = Field(1000, description="steps over which cosine/linear decay to min_lr")
    weight_decay: NonNegativeFloat = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: PositiveFloat = 1e-8
    clip_grad: NonNegativeFloat = Field(1.0, description="global grad-norm clip; 0 disables")
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = Field(False, description="overlap DP grad reduce with backward (GPU)")


class BatchingConfig(StrictModel):
    """Token-budget micro-batches of one role: samples sorted by length and packed greedily so
    that rows x padded width stays within the budget (a longer sample gets a micro-batch of its
    own)."""

    train_tokens_per_microbatch: PositiveInt = Field(
        8192, description="padded tokens (rows x width) per training micro-batch (train_step)")
    logprob_tokens_per_microbatch: PositiveInt = Field(
        8192, description="padded tokens per forward-only micro-batch (old/reference logprobs, critic values, "
        "reward scores); nothing is kept for backward there, so it may be larger than the training budget")
    max_samples_per_microbatch: Optional[PositiveInt] = Field(
        None, description="optional cap on rows per micro-batch, training and forward-only")
