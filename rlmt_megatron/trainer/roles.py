"""Builds what a run trains and queries: the Megatron roles and the rollout engine.

Every role (policy, reference, critic, reward model) is a Megatron-Core model on all trainer
ranks with the run's layout (``build.parallel``), except that the reward model may have its own
TP/PP (``reward.parallel``: its own Megatron groups in the same world, see
``distributed/role_layouts.py``). The reference is a frozen second model (see
``runner/model_runner.py`` for why not a weight swap); it is only built when the algorithm needs it.
The rollout engines live on their nodes' host ranks (``trainer/engine_hosts.py``), which drive
generation and receive the weight syncs; every rank learns every rollout by gathering.
``trainer/rollout_supervisor.py`` keeps them alive (restarts, re-syncs) with every rank agreeing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.load import is_megatron_checkpoint, load_model
from rlmt_megatron.config.model_build import ModelBuildConfig
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.config.rlmt import ModelsConfig, RewardConfig, RolloutConfig
from rlmt_megatron.distributed.collectives import barrier, is_rank0
from rlmt_megatron.distributed.role_layouts import RoleLayouts
from rlmt_megatron.errors import InputFileError
from rlmt_megatron.reward.rm_scorer import RewardScorer
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig
from rlmt_megatron.runner.model_runner import ModelRunner


@dataclass
class Roles:
    policy: ModelRunner
    reference: Optional[ModelRunner]
    critic: Optional[ModelRunner]
    scorer: RewardScorer
    tokenizer: object  # the policy's HF tokenizer


def _tokenizer(source: str, what: str):
    # preflight's loader: its error says which files are missing, not transformers' advice to
    # install sentencepiece/tiktoken
    from rlmt_megatron.trainer.preflight import load_tokenizer

    return load_tokenizer(source, what)


def _source(models: ModelsConfig, role: str) -> str:
    """The folder ``role`` starts from (``ModelsConfig.source``), which must exist."""
    field, path = models.source(role)
    if not Path(path).exists():
        raise InputFileError(f"{field}: {path} does not exist")
    return path


def build_roles(which: Sequence[str], models: ModelsConfig, build: ModelBuildConfig, optim: OptimConfig,
                critic_optim: OptimConfig, batching: BatchingConfig, reward: RewardConfig,
                collective_timeout_minutes: float) -> Roles:
    """Load the roles named in ``which`` (``RLMTConfig.roles()``: policy and reward model always,
    reference and critic when the algorithm needs them). The policy, reference and critic are
    micro-batched by ``batching``; the reward model by ``reward.max_tokens_per_microbatch``.
    Collective over the trainer's ranks."""
    policy_src = _source(models, "policy")
    policy = ModelRunner(load_model(policy_src, "policy", build), optim, batching)
    reference = None
    if "reference" in which:
        src = _source(models, "reference")
        reference = ModelRunner(load_model(src, "policy", build), None, batching)
    critic = None
    if "critic" in which:
        src = _source(models, "critic")
        critic = ModelRunner(load_model(src, "critic", build), critic_optim, batching)
    rm_src = _source(models, "reward")
    layout = contextlib.nullcontext
    rm_parallel = reward.parallel
    if rm_parallel is not None and rm_parallel != build.parallel:
        layouts = RoleLayouts()
        layouts.add("reward", rm_parallel, timeout_minutes=collective_timeout_minutes)
        layout = functools.partial(layouts.active, "reward")
    with layout():
        rm_build = build if rm_parallel is None else build.model_copy(update={"parallel": rm_parallel})
        rm_batching = BatchingConfig(logprob_tokens_per_microbatch=reward.max_tokens_per_microbatch)
        rm = ModelRunner(load_model(rm_src, "reward", rm_build), None, rm_batching)
    scorer = RewardScorer(rm, _tokenizer(rm_src, "reward model"), reward.max_length, layout)
    return Roles(policy, reference, critic, scorer, _tokenizer(policy_src, "policy"))


def engine_model_dir(policy_source: str, policy: ModelRunner, rollout: RolloutConfig, weight_sync: WeightSyncConfig,
                     out_dir: str) -> str:
    """An HF folder the engine starts from: the policy's own, or an export of a Megatron checkpoint
    (collective). Its weights are replaced by the first sync anyway. With FP8 rollouts the engine
    must start from an FP8 folder, so its layers expect the FP8 weights and scales every sync sends."""
    import json

    from rlmt_megatron.rollout.weight_sync import fp8

    folder = policy_source
    if is_megatron_checkpoint(folder):
        folder = str(Path(out_dir) / "rollout_init_hf")
        save_hf_folder(policy.built, folder, tokenizer_src=policy_source)
    if weight_sync.fp8 == "none":
        return folder
    config = fp8.config_for_sync(weight_sync.fp8, rollout.engine)
    fp8_folder = Path(out_dir) / "rollout_init_fp8"
    # every rank checks, so an impossible layout stops all of them
    fp8.check_block_layout(json.loads((Path(folder) / "config.json").read_text()), config, rollout.engine_tp_size)
    if is_rank0():
        fp8.write_fp8_hf_folder(folder, fp8_folder, config)
    barrier()
    return str(fp8_folder)
