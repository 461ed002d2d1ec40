"""Builds what a run trains and queries: the Megatron roles and the rollout engine.

Every role (policy, reference, critic, reward model) is a Megatron-Core model on all trainer
ranks with the run's layout (``build.parallel``), except that the reward model may have its own
TP/PP (``reward.parallel``: its own Megatron groups in the same world, see
``distributed/layouts.py``). The reference is a frozen second model (see
``training/engine.py`` for why not a weight swap); it is only built when the algorithm needs it.
The rollout engine lives on global rank 0, which drives generation and receives every weight
sync; the other ranks learn the rollouts by broadcast. ``trainer/engine_supervisor.py`` keeps it
alive (restarts, re-syncs) with every rank agreeing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.load import is_megatron_checkpoint, load_model
from rlmt_megatron.distributed.collectives import is_rank0
from rlmt_megatron.distributed.layouts import ParallelLayouts
from rlmt_megatron.errors import InputFileError, RLMTError
from rlmt_megatron.reward.scorer import RewardScorer
from rlmt_megatron.rollout.engine import RolloutEngine
from rlmt_megatron.training.engine import TrainEngine


@dataclass
class Roles:
    policy: TrainEngine
    reference: Optional[TrainEngine]
    critic: Optional[TrainEngine]
    scorer: RewardScorer
    tokenizer: object  # the policy's HF tokenizer


def _tokenizer(source: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise InputFileError(f"{source}: cannot load the {what} tokenizer ({e})") from None


def _exists(path: str, field: str) -> str:
    if not Path(path).exists():
        raise InputFileError(f"{field}: {path} does not exist")
    return path


def build_roles(cfg) -> Roles:
    """Load every role the algorithm needs. Collective over the trainer's ranks."""
    m, build = cfg.models, cfg.build
    policy_src = _exists(m.policy, "models.policy")
    policy = TrainEngine(load_model(policy_src, "policy", build), cfg.optim)
    reference = None
    if cfg.needs_reference:
        reference = TrainEngine(load_model(_exists(m.reference or m.policy, "models.reference"), "policy", build), None)
    critic = None
    if cfg.algorithm.name == "ppo":
        critic = TrainEngine(load_model(_exists(m.critic or m.policy, "models.critic"), "critic", build), cfg.critic_optim)
    rm_src = _exists(m.reward, "models.reward")
    layout = contextlib.nullcontext
    rm_parallel = cfg.reward.parallel
    if rm_parallel is not None and rm_parallel != build.parallel:
        from rlmt_megatron.trainer.engine_supervisor import collective_timeout_minutes  # (imports this module)

        layouts = ParallelLayouts()
        layouts.add("reward", rm_parallel, timeout_minutes=collective_timeout_minutes(cfg))
        layout = functools.partial(layouts.active, "reward")
    with layout():
        rm_build = build if rm_parallel is None else build.model_copy(update={"parallel": rm_parallel})
        reward = TrainEngine(load_model(rm_src, "reward", rm_build), None)
    scorer = RewardScorer(reward, _tokenizer(rm_src, "reward model"), cfg.reward.max_tokens_per_microbatch,
                          cfg.reward.max_length, layout)
    return Roles(policy, reference, critic, scorer, _tokenizer(policy_src, "policy"))


def engine_model_dir(cfg, policy: TrainEngine) -> str:
    """An HF folder the engine starts from: the policy's own, or an export of a Megatron checkpoint
    (collective). Its weights are replaced by the first sync anyway. With FP8 rollouts the engine
    must start from an FP8 folder, so its layers expect the FP8 weights and scales every sync sends."""
    folder = cfg.models.policy
    if is_megatron_checkpoint(folder):
        folder = str(Path(cfg.run.out_dir) / "rollout_init_hf")
        save_hf_folder(policy.built, folder, tokenizer_src=cfg.models.policy)
    if cfg.weight_sync.fp8 == "none":
        return folder
    from rlmt_megatron.distributed.collectives import barrier
    from rlmt_megatron.rollout.weight_sync import fp8

    config = fp8.config_for_sync(cfg.weight_sync.fp8, cfg.rollout.engine)
    fp8_folder = Path(cfg.run.out_dir) / "rollout_init_fp8"
    import json

    # every rank checks, so an impossible layout stops all of them
    fp8.check_block_layout(json.loads((Path(folder) / "config.json").read_text()), config, cfg.weight_sync.engine_tp_size)
    if is_rank0():
        fp8.write_fp8_hf_folder(folder, fp8_folder, config)
    barrier()
    return str(fp8_folder)


# What the hf engine runs in a child process (tests substitute an engine with injected faults).
HF_ENGINE = "rlmt_megatron.rollout.hf_engine.HFEngine"


def make_rollout_engine(cfg, model_dir: str) -> Optional[RolloutEngine]:
    """The engine on global rank 0 (None elsewhere). With ``rollout.engine_process: subprocess``
    (always for vLLM) it runs in a child process behind a pipe, so its death or a call that takes
    longer than ``rollout.timeout_s`` becomes an ``EngineError`` the loop survives by restarting it."""
    if not is_rank0():
        return None
    r = cfg.rollout
    if r.engine == "sglang":
        if r.engine_process is not None:
            raise RLMTError("rollout.engine_process applies to the hf and vllm engines; an sglang engine is its "
                            "own server (rollout.sglang_url): leave it unset")
        from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine

        return SGLangHTTPEngine(r.sglang_url, timeout=r.timeout_s)
    if r.engine == "vllm" and r.engine_process == "inline":
        raise RLMTError("rollout.engine_process=inline is impossible with the vllm engine: vLLM must not join the "
                        "trainer's torch.distributed world; leave it unset (subprocess)")
    from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine

    # On GPU the engine holds the trainer's dtype (bf16 in every recipe, as SGLang serves); on
    # CPU float32, the tested path (the CPU bf16 kernels are slow and not compared).
    import torch

    dtype = cfg.build.precision.params_dtype if torch.cuda.is_available() else "float32"
    if r.engine == "hf":
        if r.engine_process != "subprocess":
            from rlmt_megatron.rollout.hf_engine import HFEngine

            return HFEngine(model_dir, dtype=dtype)
        return SubprocessEngine(HF_ENGINE, {"model_dir": model_dir, "dtype": dtype}, timeout_s=r.timeout_s)
    max_len = cfg.data.max_prompt_tokens + r.max_new_tokens
    return SubprocessEngine("rlmt_megatron.rollout.vllm_engine.VLLMEngine",
                            {"model_dir": model_dir, "max_model_len": max_len, "seed": cfg.run.seed, "dtype": dtype,
                             "gpu_memory_utilization": r.gpu_memory_utilization},
                            timeout_s=r.timeout_s)
