"""The RLMT training loop, top to bottom.

    prompts ─► template ─► engine.generate ─► parse <think> ─► RM scores the answer
      ─► old/ref logprobs (+ critic values) ─► advantages ─► policy (and critic) update
      ─► weight sync to the engine ─► metrics, samples, checkpoint ─► next step

Every trainer rank runs this function (SPMD under torchrun); rank 0 also owns the rollout engine
and writes the run directory.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.train_state import latest_checkpoint, load_train_state, prune_checkpoints, save_train_state
from rlmt_megatron.data.prompts import PromptSampler, load_prompt_set
from rlmt_megatron.distributed.bootstrap import initialize
from rlmt_megatron.distributed.collectives import barrier, is_rank0
from rlmt_megatron.monitoring import MetricsLogger, PhaseTimer, ProgressReporter, write_resolved_config, write_samples
from rlmt_megatron.rollout.weight_sync.select import make_transport
from rlmt_megatron.trainer.config import RLMTConfig
from rlmt_megatron.trainer.experience import check_trainable
from rlmt_megatron.trainer.roles import build_roles, engine_model_dir, make_rollout_engine
from rlmt_megatron.trainer.rollout_phase import generate, parse_and_score, prompt_token_ids, rollout_metrics, sampling_params
from rlmt_megatron.trainer.steps import UPDATES
from rlmt_megatron.trainer.sync import PolicySync, fp8_quantizer


def train(cfg: RLMTConfig) -> Path:
    out = Path(cfg.run.out_dir)
    initialize(cfg.build.parallel, cfg.run.seed)
    _seed_everything(cfg.run.seed, cfg.run.deterministic)
    roles = build_roles(cfg)
    prompts = load_prompt_set(cfg.data.prompts, cfg.data.prompt_field)
    if is_rank0() and prompts.report.num_skipped:
        print(prompts.report.summary())
    sampler = PromptSampler(prompts, cfg.data.prompts_per_step, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    model_dir = engine_model_dir(cfg, roles.policy)
    engine = make_rollout_engine(cfg, model_dir)
    transport = make_transport(cfg.weight_sync, engine, cfg.rollout.placement, base_dir=model_dir,
                               disk_dir=str(out / "weight_sync")) if engine else None
    sync = PolicySync(engine, transport, cfg.weight_sync.bucket_mb * 2**20, cfg.weight_sync.checksum,
                      quantize=fp8_quantizer(cfg.weight_sync.fp8, cfg.rollout.engine))
    ckpt_root = out / "checkpoints"
    engines = {"policy": roles.policy} | ({"critic": roles.critic} if roles.critic else {})
    step, version = 0, 0
    resume_dir = latest_checkpoint(ckpt_root) if cfg.run.resume == "auto" else (
        None if cfg.run.resume == "never" else Path(cfg.run.resume))
    if resume_dir is not None:
        extra = load_train_state(resume_dir, engines)
        step, version = extra["step"], extra["weight_version"]
        sampler.load_state_dict(extra["sampler"])
    logger = progress = None
    if is_rank0():
        write_resolved_config(out, cfg.model_dump(mode="json"))
        logger = MetricsLogger(out, cfg.monitoring, cfg.model_dump(mode="json"), resume_from_step=step if resume_dir else None)
        progress = ProgressReporter(total_steps=cfg.run.total_steps, start_step=step)
    sync.push(roles.policy, version)  # the engine starts from exactly the trainer's weights
    update = UPDATES[cfg.algorithm.name]
    for step in range(step + 1, cfg.run.total_steps + 1):
        timer = PhaseTimer()
        with timer.phase("step"):
            batch = sampler.next_batch()
            conversations = [p.messages for p in batch]
            with timer.phase("rollout"):
                prompt_ids, truncated = prompt_token_ids(cfg, roles.tokenizer, conversations)
                rollouts = generate(engine, prompt_ids, sampling_params(cfg, roles.tokenizer, step))
            if engine is not None and cfg.rollout.placement == "colocated":
                engine.sleep()  # colocated SGLang frees its GPU memory for training; the next sync/generate retakes it
            with timer.phase("reward"):
                parse_and_score(cfg, roles.tokenizer, roles.scorer, rollouts, conversations)
                check_trainable(rollouts)
            with timer.phase("train"):
                metrics = update(cfg, roles, rollouts) or {"skipped_update": 1.0}
            if not (cfg.algorithm.name == "dpo" and cfg.algorithm.dpo_mode == "one_round"):
                with timer.phase("sync"):
                    version += 1
                    sync.push(roles.policy, version)
        metrics.update(rollout_metrics(rollouts, roles.tokenizer, truncated), **timer.metrics())
        metrics.update(epoch=float(sampler.epoch), weight_version=float(version))
        if is_rank0():
            logger.log(step, metrics)
            write_samples(out, step, _sample_rows(rollouts, conversations, roles.tokenizer, batch),
                          first_k=cfg.monitoring.samples_per_step)
            progress.update(step, metrics)
        if step == cfg.run.total_steps or (cfg.run.save_every and step % cfg.run.save_every == 0):
            save_train_state(ckpt_root, step, engines,
                             {"step": step, "weight_version": version, "sampler": sampler.state_dict()})
            if is_rank0():
                prune_checkpoints(ckpt_root, cfg.run.keep_last)
    if cfg.run.export_hf:
        save_hf_folder(roles.policy.built, out / "final_hf", tokenizer_src=cfg.models.policy)
    barrier()
    if is_rank0():
        logger.close()
        progress.close()
        if engine is not None:
            engine.close()
    return out


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def _sample_rows(rollouts, conversations, tokenizer, batch) -> list[dict]:
    return [{
        "prompt": conversations[r.prompt_index][-1]["content"],
        "prompt_source": getattr(batch[r.prompt_index], "source", None),
        "thinking": r.extras.get("thinking"),
        "answer": r.extras.get("answer"),
        "reward": r.reward,
        "format_ok": r.extras.get("format_ok"),
        "response_tokens": len(r.response_ids),
        "finish_reason": r.finish_reason,
        "weight_version": r.weight_version,
    } for r in rollouts]
