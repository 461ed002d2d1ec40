"""The RLMT training loop, top to bottom.

    prompts ─► template ─► engine.generate ─► parse <think> ─► RM scores the answer
      ─► old/ref logprobs (+ critic values) ─► advantages ─► policy (and critic) update
      ─► weight sync to the engine ─► metrics, samples, checkpoint ─► next step

Every trainer rank runs this function (SPMD under torchrun); each node's first rank also drives
that node's rollout engines (``trainer/engine_hosts.py``), and rank 0 writes the run directory.
Faults: a stop signal (SLURM preemption / time limit) ends the run after a checkpoint with the
requeue contract of ``trainer/stop.py``; a failing rollout engine is restarted and the step
retried (``trainer/rollout_supervisor.py``); collectives time out and a watchdog reports stuck
ranks (``trainer/watchdog.py``).
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rlmt_megatron.algorithms.kl_control import KLController
from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.rng_state import capture_rng_state, restore_rng_state
from rlmt_megatron.checkpoint.train_state import list_checkpoints, prune_checkpoints, save_train_state
from rlmt_megatron.data.prompts import PromptSampler, load_prompt_set
from rlmt_megatron.distributed.bootstrap import initialize
from rlmt_megatron.distributed.collectives import barrier, is_rank0
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.monitoring import MetricsLogger, PhaseTimer, ProgressReporter, write_resolved_config, write_samples
from rlmt_megatron.monitoring.progress import peak_memory_metrics
from rlmt_megatron.config.rlmt import RLMTConfig
from rlmt_megatron.trainer.rollout_supervisor import EngineGaveUp, RolloutSupervisor
from rlmt_megatron.trainer.run_folder import claim_run_folder, load_resume_state
from rlmt_megatron.trainer.experience import check_trainable
from rlmt_megatron.trainer.one_round import OneRoundStore
from rlmt_megatron.trainer.roles import build_roles, engine_model_dir
from rlmt_megatron.trainer.rollout_phase import rollout_metrics, staleness_metrics
from rlmt_megatron.trainer.partial_rollouts import PartialRollouts
from rlmt_megatron.trainer.step_rollouts import (collect_partial_rollouts, collect_step_rollouts, finish_step_rollouts,
                                                 launch_partial_round, launch_step_rollouts, stop_string_cut)
from rlmt_megatron.trainer.updates import UPDATES
from rlmt_megatron.trainer.stop import (
    RunStopped,
    StepAbandoned,
    StopSignals,
    clear_exit_status,
    exit_status_written,
    write_exit_status,
)
from rlmt_megatron.trainer.watchdog import Watchdog, activity


class RolloutEngineFailed(RLMTError):
    """The engine kept failing; the run stopped with a checkpoint (exit status 2)."""


def train(cfg: RLMTConfig) -> Path:
    out = Path(cfg.run.out_dir)
    timeout = cfg.collective_timeout_minutes()
    with StopSignals(cfg.run.stop_signals) as stop:
        initialize(cfg.build.parallel, cfg.run.seed, timeout_minutes=timeout)
        _seed_everything(cfg.run.seed, cfg.run.deterministic)
        with Watchdog(cfg.run.watchdog_timeout_s, out / "watchdog"):
            return _train(cfg, out, stop)


def _train(cfg: RLMTConfig, out: Path, stop: StopSignals) -> Path:
    # first of all: one run per folder, and a fresh run never mixes with an old one's outputs
    with claim_run_folder(out, cfg.run.resume, cfg.run.overwrite):
        try:
            return _run(cfg, out, stop)
        except Exception as error:  # noqa: BLE001 - recorded, then raised as it was
            if is_rank0():
                _record_failure(out, error)
            raise


def _run(cfg: RLMTConfig, out: Path, stop: StopSignals) -> Path:
    if is_rank0():
        clear_exit_status(out)
    roles = build_roles(cfg.roles(), cfg.models, cfg.build, cfg.optim, cfg.critic_optim, cfg.batching, cfg.reward,
                        cfg.collective_timeout_minutes())
    prompts = load_prompt_set(cfg.data.prompts, cfg.data.prompt_field)
    if is_rank0() and prompts.report.num_skipped:
        print(prompts.report.summary())
    sampler = PromptSampler(prompts, cfg.data.prompts_per_step, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    # before resuming: one_round DPO's engine keeps these weights
    model_dir = engine_model_dir(cfg.models.policy, roles.policy, cfg.rollout, cfg.weight_sync, cfg.run.out_dir)
    ckpt_root = out / "checkpoints"
    engines = {"policy": roles.policy} | ({"critic": roles.critic} if roles.critic else {})
    step, version, restarts, member_restarts = 0, 0, 0, None
    resume_dir, extra = load_resume_state(out, cfg.run.resume, engines)
    if resume_dir is not None:
        step, version = extra["step"], extra["weight_version"]
        restarts = extra.get("engine_restarts", 0)
        member_restarts = extra.get("engine_member_restarts")
        sampler.load_state_dict(extra["sampler"])
    kl = cfg.algorithm.kl_control  # the coefficient is state: an adaptive one resumes where it was
    kl_control = KLController(cfg.algorithm.kl_coef, *((kl.target, kl.horizon) if kl.kind == "adaptive" else ()))
    if resume_dir is not None and kl.kind == "adaptive":
        kl_control.coef = extra["kl_coef"]
    saved = {step: resume_dir} if resume_dir is not None else {}
    # one_round DPO: each prompt sampled once from the initial model, recalled in later epochs
    pair_set = None if cfg.engine_follows_policy else OneRoundStore(out, resuming=resume_dir is not None)
    supervisor = RolloutSupervisor(cfg.rollout, cfg.weight_sync, roles.policy, model_dir, out, stop, restarts,
                                   follows_policy=cfg.engine_follows_policy, engine_dtype=cfg.engine_dtype(),
                                   max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                                   seed=cfg.run.seed, member_restarts=member_restarts)

    # Partial rollouts: the groups carried from step to step (kept in checkpoints).
    r = cfg.rollout
    partial = PartialRollouts(r.samples_per_prompt, r.max_new_tokens, r.partial_max_syncs,
                              stop_string_cut(cfg.format, roles.tokenizer)) if r.partial_tokens else None
    if partial is not None and resume_dir is not None:
        partial.load_state_dict(extra["partial_rollouts"])

    def sampling_state() -> tuple[dict, Optional[dict]]:
        """The sampler's state and the partial rollouts' (what a checkpoint keeps)."""
        return sampler.state_dict(), partial.state_dict() if partial is not None else None

    # Asynchronous rollouts: the next step's generation, launched before this step trains, and the
    # sampling state before its prompts were drawn (what a checkpoint keeps: a resumed run draws
    # them again and generates them from the checkpoint's weights, one version newer).
    asynchronous = cfg.rollout.max_staleness > 0
    launched = None
    boundary = sampling_state()

    def checkpoint(at: int) -> Optional[Path]:
        """Save the training state after step ``at`` (once per step; nothing to save at step 0)."""
        if at not in saved and at > 0:
            kept = boundary if asynchronous else sampling_state()
            with activity("checkpoint"):
                saved[at] = save_train_state(ckpt_root, at, engines, {
                    "step": at, "weight_version": version,
                    "sampler": kept[0],
                    "engine_restarts": supervisor.restarts, "engine_member_restarts": supervisor.member_restarts,
                    "kl_coef": kl_control.coef}
                    | ({"partial_rollouts": kept[1]} if partial is not None else {}))
            if is_rank0():
                prune_checkpoints(ckpt_root, cfg.run.keep_last)
        return saved.get(at)

    logger = progress = None
    try:
        # the engine starts from exactly the trainer's weights (one_round DPO: the initial ones)
        supervisor.start(version, push=supervisor.follows_policy or step == 0)
        if is_rank0():
            resolved = cfg.model_dump(mode="json")
            write_resolved_config(out, resolved)
            logger = MetricsLogger(out, cfg.monitoring, resolved, resume_from_step=step if resume_dir else None)
            progress = ProgressReporter(total_steps=cfg.run.total_steps, start_step=step)
        update = UPDATES[cfg.algorithm.name]
        for step in range(step + 1, cfg.run.total_steps + 1):
            at_start = (sampling_state(), capture_rng_state())  # to abandon the step
            timer = PhaseTimer()
            try:
                with activity(f"step {step}"), timer.phase("step"):
                    if partial is not None:
                        got = collect_partial_rollouts(cfg, roles, supervisor, sampler, partial, step, timer,
                                                       launched)
                        launched = None
                    elif launched is None:
                        got = collect_step_rollouts(cfg, roles, supervisor, sampler, step, timer, pair_set)
                    else:
                        got, launched = finish_step_rollouts(cfg, roles, supervisor, launched, timer), None
                    rollouts = got.rollouts
                    check_trainable(rollouts)
                    stale = staleness_metrics(rollouts, version)
                    if asynchronous:
                        boundary = sampling_state()
                    if asynchronous and step < cfg.run.total_steps:
                        launched = _launch_next(cfg, roles, supervisor, sampler, partial, step + 1, version, timer)
                    with activity("train"), timer.phase("train"):
                        algorithm = cfg.algorithm.model_copy(update={"kl_coef": kl_control.coef})
                        metrics = update(algorithm, roles, rollouts, temperature=cfg.rollout.temperature,
                                         max_new_tokens=cfg.rollout.max_new_tokens) or {"skipped_update": 1.0}
                    metrics["kl/coef"] = kl_control.coef  # the coefficient this step used
                    kl_control.update(metrics.get("kl/old_ref_seq_mean", math.nan), len(rollouts))
                    if supervisor.follows_policy:  # one_round DPO's engine keeps version 0
                        version += 1
                        supervisor.trainer_version = version
                        if not asynchronous:  # asynchronous: synced before a launch, when the bound needs it
                            with timer.phase("sync"):
                                supervisor.push(version)
            except (StepAbandoned, EngineGaveUp) as e:
                # Nothing of the step was kept: back to its start, and the checkpoint is the previous step's.
                sampler.load_state_dict(at_start[0][0])
                if partial is not None:
                    partial.load_state_dict(at_start[0][1])
                restore_rng_state(at_start[1], Path(f"<start of step {step}>"))
                if isinstance(e, StepAbandoned):
                    _stop(cfg, out, stop, step - 1, checkpoint(step - 1), abandoned=step)
                _engine_failed(out, e, step - 1, checkpoint(step - 1))
            metrics.update(rollout_metrics(rollouts, roles.tokenizer, sum(got.truncated)), **got.metrics, **stale,
                           **timer.metrics())
            metrics.update(epoch=float(sampler.epoch), weight_version=float(version))
            metrics["rollout/restarts"] = float(supervisor.restarts)
            if is_rank0():
                metrics.update(supervisor.metrics())
            metrics.update(peak_memory_metrics())
            if is_rank0():
                logger.log(step, metrics)
                write_samples(out, step, _sample_rows(rollouts, got.conversations, roles.tokenizer, got.prompts),
                              first_k=cfg.monitoring.samples_per_step)
                progress.update(step, metrics)
            if step == cfg.run.total_steps or (cfg.run.save_every and step % cfg.run.save_every == 0):
                checkpoint(step)
            if step < cfg.run.total_steps and stop.agreed():  # every rank stops after the same step
                _stop(cfg, out, stop, step, checkpoint(step))
        if cfg.run.export_hf:
            save_hf_folder(roles.policy.built, out / "final_hf", tokenizer_src=cfg.models.policy)
        barrier()
        if is_rank0():
            write_exit_status(out, "finished", requeue=False, exit_code=0, step=cfg.run.total_steps,
                              checkpoint=saved.get(cfg.run.total_steps), message="the run finished")
    finally:
        supervisor.close()  # each host its own engines
        if is_rank0():
            for closing in (logger, progress):
                if closing is not None:
                    closing.close()
    return out


def _launch_next(cfg, roles, supervisor, sampler, partial, step: int, version: int, timer):
    """Asynchronous rollouts: sync the engines if the batch launched now would otherwise be more
    than ``rollout.max_staleness`` updates old when trained (at version ``version + 1``), then
    launch step ``step``'s generation (with partial rollouts: its first round)."""
    if supervisor.version < version + 1 - cfg.rollout.max_staleness:
        with timer.phase("sync"):
            supervisor.push(version)
    if partial is not None:
        return launch_partial_round(cfg, roles, supervisor, sampler, partial, step)
    return launch_step_rollouts(cfg, roles, supervisor, sampler, step)


def _record_failure(out: Path, error: Exception) -> None:
    """Rank 0: a run that failed on its own (a full disk, a damaged checkpoint, a bug) says so in
    ``exit_status.json`` unless the loop already wrote why it ended. Never requeued: it would
    fail again. ``checkpoint`` is the newest complete one, where the same command resumes."""
    if exit_status_written(out):
        return
    newest = list_checkpoints(out / "checkpoints")
    step, path = newest[-1] if newest else (0, None)
    resumes = f"the newest complete checkpoint is step {step}'s: {path}" if path else "no checkpoint was saved"
    try:
        write_exit_status(out, "failed", requeue=False, exit_code=2 if isinstance(error, RLMTError) else 1,
                          step=step, checkpoint=path, message=f"{error}; {resumes}")
    except OSError:  # the disk that failed the run may refuse this file too: the error still shows
        pass


def _engine_failed(out: Path, error: Exception, step: int, path: Optional[Path]) -> None:
    saved = f"the training state of step {step} is in {path}" if path else "no step was completed"
    message = f"{error}; {saved}; fix the engine and run the same command again to resume"
    if is_rank0():
        write_exit_status(out, "engine_failed", requeue=False, exit_code=2, step=step, checkpoint=path, message=message)
    raise RolloutEngineFailed(message) from None


def _stop(cfg, out: Path, stop: StopSignals, step: int, path: Optional[Path], abandoned: Optional[int] = None) -> None:
    """After the checkpoint of ``step``: the status file for the launcher, then exit (every rank)."""
    code = cfg.run.stop_exit_code
    if is_rank0():
        how = f"step {abandoned}'s rollout was abandoned" if abandoned else f"after step {step}"
        message = (f"stopped by {stop.signal_name or 'a stop signal on another rank'} ({how}); "
                   + (f"checkpoint {path}" if path else "no step completed, nothing to save")
                   + f"; exit status {code}: requeue, the next start resumes")
        write_exit_status(out, "stopped", requeue=True, exit_code=code, step=step, checkpoint=path, message=message,
                          signal_name=stop.signal_name)
        print(message, file=sys.stderr, flush=True)
    barrier()  # the status file exists before any rank exits (torchrun may then kill rank 0)
    raise RunStopped(code)


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS refuses deterministic mode without a fixed workspace (read when CUDA starts;
        # launch/env.sh exports it too, for runs whose CUDA is up before this point).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
    } | ({"token_versions": _runs(r.token_versions)} if r.token_versions is not None else {}) for r in rollouts]


def _runs(values: list[int]) -> list[list[int]]:
    """[[value, how many in a row], ...]: a partial rollout's token versions, compactly."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out
