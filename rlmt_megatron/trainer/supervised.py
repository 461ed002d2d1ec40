"""Supervised stages around RLMT: the SFT warm-start (``rlmt-sft``) and reward-model training on
preference pairs (``rlmt-train-rm``; used by the demo to make its tiny RM meaningful).

Both are epochs over a fixed dataset, seeded shuffle, ``batch_size`` sequences (SFT) or pairs
(RM) per optimizer step, on the same ModelRunner as RL; the result is written as an HF folder.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field, PositiveInt, model_validator

from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.config.model_build import ModelBuildConfig
from rlmt_megatron.data.jsonl import field, messages_field, read_jsonl
from rlmt_megatron.distributed.bootstrap import initialize
from rlmt_megatron.distributed.collectives import barrier, dp_rank_and_size, dp_shard, is_rank0
from rlmt_megatron.errors import InputFileError
from rlmt_megatron.monitoring import MetricsLogger, MonitoringConfig, ProgressReporter, write_resolved_config
from rlmt_megatron.reward.rm_template import rm_input_ids
from rlmt_megatron.runner.batching import Sample
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.runner.model_runner import ModelRunner
from rlmt_megatron.runner.losses import reward_model_loss_fn, sft_loss_fn


class SupervisedConfig(StrictModel):
    model: str = Field(..., description="HF folder or rlmt checkpoint to start from")
    tokenizer: Optional[str] = Field(
        None, description="HF folder whose tokenizer (and chat template) renders the data and is written with the "
        "result; default: the model's. A base model without a chat template takes its instruct sibling's (the "
        "authors' SFT of Llama-3.1-8B uses the Llama-3.1-8B-Instruct tokenizer)")
    data: list[str] = Field(..., min_length=1, description="jsonl files (SFT: messages; RM: messages, chosen, rejected)")
    out_dir: str = "runs/supervised"
    seed: int = 1234
    epochs: PositiveInt = 2
    batch_size: PositiveInt = Field(64, description="sequences (SFT) or preference pairs (RM) per optimizer step")
    max_length: PositiveInt = Field(4096, description="longest SFT row in tokens (whole conversation)")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="SFT rows longer than max_length: drop (skip and count) or truncate (keep the first "
        "max_length tokens, as TRL's SFTTrainer does with max_seq_length)")
    warmup_ratio: Optional[float] = Field(
        None, ge=0.0, lt=1.0, description="warm-up as a fraction of the run: optim.warmup_steps = ceil(ratio x "
        "total steps), the HF Trainer's rule; the run length is only known once the data is read. Excludes "
        "optim.warmup_steps")
    build: ModelBuildConfig = Field(default_factory=ModelBuildConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=4e-6, lr_schedule="cosine"))
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="micro-batch token budget "
                                     "(train_tokens_per_microbatch; the supervised stages run no forward-only pass)")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_ratio is not None and "warmup_steps" in self.optim.model_fields_set:
            raise ValueError("warmup_ratio and optim.warmup_steps both set the warm-up: keep one")
        return self


def preference_samples(paths: list[str], tokenizer) -> list[Sample]:
    """(chosen, rejected) samples, interleaved, each scored at its last token."""
    out: list[Sample] = []
    for path in paths:
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            messages = messages_field(row, where)
            for key in ("chosen", "rejected"):
                ids = rm_input_ids(tokenizer, messages, field(row, key, str, where))
                mask = torch.zeros(len(ids) - 1)
                mask[-1] = 1.0  # one "loss token" per sequence: the global pair count
                out.append(Sample(torch.tensor(ids, dtype=torch.long), {"loss_mask": mask}))
    if not out:
        raise InputFileError(f"{', '.join(paths)}: no preference pairs")
    return out


def sft_samples(paths: list[str], tokenizer, max_length: int, overlong: str = "drop") -> list[Sample]:
    from rlmt_megatron.data.sft import load_sft_samples

    samples: list[Sample] = []
    for path in paths:
        samples.extend(load_sft_samples(path, tokenizer, max_length, overlong))
    return samples


def supervised_optim(cfg: SupervisedConfig, num_units: int) -> OptimConfig:
    """The optimizer config of a run over ``num_units`` sequences (pairs): the schedule spans
    ``epochs x ceil(units / batch_size)`` steps, and ``warmup_ratio`` becomes
    ``ceil(ratio x steps)`` warm-up steps (the HF Trainer's rule)."""
    total = cfg.epochs * math.ceil(num_units / cfg.batch_size)
    update: dict = {"total_steps": total}
    if cfg.warmup_ratio is not None:
        update["warmup_steps"] = math.ceil(cfg.warmup_ratio * total)
    return cfg.optim.model_copy(update=update)


def run_supervised(cfg: SupervisedConfig, kind: Literal["sft", "reward_model"]) -> Path:
    from transformers import AutoTokenizer

    out = Path(cfg.out_dir)
    initialize(cfg.build.parallel, cfg.seed)
    tokenizer_src = cfg.tokenizer or cfg.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    unit = 2 if kind == "reward_model" else 1
    samples = (preference_samples(cfg.data, tokenizer) if kind == "reward_model"
               else sft_samples(cfg.data, tokenizer, cfg.max_length, cfg.overlong))
    units = [samples[i:i + unit] for i in range(0, len(samples), unit)]
    optim = supervised_optim(cfg, len(units))
    total = optim.total_steps
    role = "reward" if kind == "reward_model" else "policy"
    engine = ModelRunner(load_model(cfg.model, role, cfg.build), optim, cfg.batching)
    loss = reward_model_loss_fn() if kind == "reward_model" else sft_loss_fn(engine.built.spec.vocab_size)
    _, dp = dp_rank_and_size()
    if cfg.batch_size < dp:
        raise InputFileError(f"batch_size={cfg.batch_size} is smaller than the {dp} data-parallel ranks")
    logger = progress = None
    if is_rank0():
        resolved = cfg.model_dump(mode="json")
        write_resolved_config(out, resolved)
        logger = MetricsLogger(out, cfg.monitoring, resolved, resume_from_step=None)
        keys = ("loss/rm", "rm/accuracy", "lr") if kind == "reward_model" else ("loss/sft", "lr")
        progress = ProgressReporter(total_steps=total, start_step=0, keys=keys)
    rng = random.Random(cfg.seed)
    step = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(units)))
        rng.shuffle(order)
        for lo in range(0, len(order), cfg.batch_size):
            batch = [units[i] for i in order[lo:lo + cfg.batch_size]]
            if len(batch) < dp:  # a last partial batch too small to give every DP rank a unit
                continue
            local = [s for u in dp_shard(batch) for s in u]
            step += 1
            metrics = engine.train_step(local, loss, unit_size=unit)
            metrics["epoch"] = float(epoch)
            if is_rank0():
                logger.log(step, metrics)
                progress.update(step, metrics)
    save_hf_folder(engine.built, out / "hf", tokenizer_src=tokenizer_src)
    barrier()
    if is_rank0():
        logger.close()
        progress.close()
        (out / "DONE.json").write_text(json.dumps({"steps": step, "model": str(out / "hf")}) + "\n")
    return out / "hf"
