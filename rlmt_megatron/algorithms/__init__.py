"""RL / preference / SFT math in pure torch: advantage estimators, KL estimators, per-token losses
and split-invariant aggregation. Imports nothing else from ``rlmt_megatron`` (nor Megatron), so
every other module can use it and it can be tested in isolation.

Every estimator or loss is a plain function registered by name in a small dict
(``ADVANTAGE_ESTIMATORS``, ``KL_ESTIMATORS``, ``POLICY_LOSSES``, ``VALUE_LOSSES``,
``SFT_LOSSES``, ``DPO_LOSSES``, ``AGGREGATIONS``, ``ROLLOUT_CORRECTIONS``); the matching ``get_*`` raises ValueError
listing the valid names.
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    discounted_returns,
    dr_grpo,
    gae,
    get_advantage_estimator,
    grpo,
    masked_whiten,
    outcome_to_token_rewards,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from .aggregation import (
    AGGREGATIONS,
    GlobalNormalizers,
    aggregate,
    get_aggregation,
    global_normalizers,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from .checks import require_finite
from .dpo import DPO_LOSSES, get_dpo_loss, sigmoid_dpo
from .kl import KL_ESTIMATORS, get_kl_estimator, k1, k1_plus, k2, k3, k3_plus, straight_through
from .kl_control import KLController
from .policy_loss import (
    POLICY_LOSSES,
    PolicyLossConfig,
    entropy_bonus,
    fold_kl_into_rewards,
    get_policy_loss,
    kl_loss_term,
    policy_objective,
    ppo_clip,
)
from .policy_variants import cispo, gspo, gspo_token, sequence_log_ratio
from .rollout_correction import ROLLOUT_CORRECTIONS, get_rollout_correction, icepop, mis, tis
from .bradley_terry import bradley_terry
from .reward_shaping import overlong_penalty
from .sft_loss import SFT_LOSSES, get_sft_loss, nll
from .value_loss import VALUE_LOSSES, clipped_value_loss, get_value_loss

from types import ModuleType as _ModuleType

__all__ = sorted(n for n, v in globals().items() if not n.startswith("_") and not isinstance(v, _ModuleType))
