"""One-round DPO's fixed pair set: each prompt is sampled once, from the initial model; a prompt
met again (a later epoch) trains on the very responses it got the first time.

This is what the authors ran: they sampled 8 responses per prompt from the initial model once
(``training/sft_dpo/utils/scripts/launch_sample_responses_example.sh``), kept the best and the
worst as one pair per prompt (``utils/src/build_dpo_dataset.py``) and trained two epochs over that
fixed set (``training/sft_dpo/scripts/launch_dpo_example.sh``, ``epochs=2``). Here the first epoch
samples as it goes: the engine keeps the initial weights in one_round mode, so that is the same
distribution as sampling everything first. Each prompt's scored group is recorded, and later
epochs recall it instead of sampling again. ``dpo_pairs`` then picks the same pair from it (the
rule is deterministic on the same rewards). A prompt the first epoch never reached (the dropped
last partial batch) is sampled when it first comes up, from the same initial model.

Where the groups live, and why:

- the run folder, ``out_dir/one_round_rollouts/step_XXXXXXXX.pt``, one file per step that
  sampled, written by rank 0 under a temporary name and renamed (a file is whole or absent): a
  resumed run (a preempted job) must train its later epochs on the same pairs, and re-sampling
  would not give them back (engines are not bit-reproducible across restarts). Not inside the
  checkpoints: those are written every ``save_every`` steps and would copy the set each time. A
  file of a step after the checkpoint a run resumes from is used too: it holds samples of the
  initial model for its prompts, which is what the pair set is made of.
- rank 0's memory, all files read at start: a later epoch recalls groups from every step of the
  first, in shuffled order. The whole group is kept, not only the pair, so a recalled step's
  metrics (``reward/mean``, lengths) compare with a sampled one's: at most
  ``samples_per_prompt x (prompt + max_new_tokens)`` int32 ids and float32 logprobs per prompt,
  about 1 GB for 7.5K prompts x 8 samples of ~2K tokens.

Prompts are keyed by their file and row (``Prompt.path``, ``Prompt.index``); the prompt ids are
stored and compared when recalled, so a changed template or truncation fails loudly instead of
training on responses to another prompt.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlmt_megatron.data.prompts import Prompt
from rlmt_megatron.distributed.collectives import is_rank0, rank0_decides
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.trainer.experience import Rollout

DIRNAME = "one_round_rollouts"


class OneRoundError(RLMTError):
    """The recorded rollouts do not fit this run (another prompt rendering)."""


def prompt_key(prompt: Prompt) -> str:
    return f"{prompt.path}#{prompt.index}"


def _record(prompt_ids: Sequence[int], group: Sequence[Rollout]) -> dict:
    return {"prompt_ids": torch.tensor(prompt_ids, dtype=torch.int32), "samples": [{
        "response_ids": torch.tensor(r.response_ids, dtype=torch.int32),
        "logprobs": torch.tensor(r.engine_logprobs, dtype=torch.float32),
        "finish_reason": r.finish_reason, "weight_version": int(r.weight_version), "reward": float(r.reward),
        "extras": dict(r.extras)} for r in group]}


def _rollouts(position: int, prompt_ids: list[int], record: dict) -> list[Rollout]:
    return [Rollout(position, list(prompt_ids), s["response_ids"].tolist(), s["logprobs"].tolist(), s["finish_reason"],
                    s["weight_version"], s["reward"], dict(s["extras"])) for s in record["samples"]]


class OneRoundStore:
    """The recorded groups of a one_round DPO run (rank 0 holds them; see the module docstring)."""

    def __init__(self, out_dir: str | Path, resuming: bool):
        """``resuming``: the run continues from a checkpoint and reads the recorded groups back. A
        fresh start discards any it finds: the run folder check (run_folder.py) lets a fresh run
        start only where no earlier attempt completed a step, so they are an abandoned attempt's."""
        self.dir = Path(out_dir) / DIRNAME
        self.groups: dict[str, dict] = {}
        if is_rank0() and self.dir.is_dir():
            if not resuming:
                shutil.rmtree(self.dir)
                return
            for f in sorted(self.dir.glob("step_*.pt")):
                self.groups.update(torch.load(f, weights_only=True))

    def _lookup(self, keys: Sequence[str]) -> dict[int, dict]:
        return {i: self.groups[k] for i, k in enumerate(keys) if k in self.groups}

    def _save(self, step: int, groups: dict[str, dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step:08d}.pt"
        tmp = final.with_name(final.name + ".tmp")
        torch.save(groups, tmp)
        os.replace(tmp, final)
        self.groups.update(groups)

    def rollouts(self, step: int, batch: Sequence[Prompt], prompt_ids: list[list[int]],
                 sample: Callable[[list[int]], list[Rollout]]) -> tuple[list[Rollout], int]:
        """The step's rollouts in batch order, and how many prompts were recalled. Collective.

        ``sample(positions)`` generates and scores the prompts at those batch positions (their
        rollouts' ``prompt_index`` being batch positions); it runs for the prompts never sampled
        before, whose groups are then recorded."""
        keys = [prompt_key(p) for p in batch]
        known: dict[int, dict] = rank0_decides(lambda: self._lookup(keys), "reading one-round DPO's recorded rollouts")
        for i, record in known.items():
            if record["prompt_ids"].tolist() != list(prompt_ids[i]):
                raise OneRoundError(
                    f"{self.dir}: the rollouts recorded for prompt {keys[i]} were sampled for other prompt tokens "
                    "(a changed format, tokenizer or data.max_prompt_tokens); resume with the settings they were "
                    "sampled with, or start a fresh run")
        missing = [i for i in range(len(batch)) if i not in known]
        fresh = sample(missing) if missing else []
        if fresh:
            by_position: dict[int, list[Rollout]] = {}
            for r in fresh:
                by_position.setdefault(r.prompt_index, []).append(r)
            groups = {keys[i]: _record(prompt_ids[i], g) for i, g in by_position.items()}
            # rank 0 writes; a failure (a full disk) is raised on every rank alike
            rank0_decides(lambda: self._save(step, groups), "recording one-round DPO's rollouts")
        recalled = [r for i, record in known.items() for r in _rollouts(i, prompt_ids[i], record)]
        # prompt-major in batch order; sorted() is stable, so each group keeps its sample order
        return sorted(fresh + recalled, key=lambda r: r.prompt_index), len(known)
