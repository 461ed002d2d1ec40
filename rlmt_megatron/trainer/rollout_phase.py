"""Generate and score: prompts → chat/thinking template → engines → parsed answers → RM rewards.

The sampling settings and templated prompts are built here; the engines generate them
(``trainer/rollout_supervisor.py``, which gives every rank the same ``Rollout`` list). Parsing and
reward scoring then run everywhere (the RM is a Megatron model on all ranks).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rlmt_megatron.algorithms.reward_shaping import overlong_penalty
from rlmt_megatron.rollout.types import SamplingParams
from rlmt_megatron.config.rlmt import RewardConfig, RolloutConfig
from rlmt_megatron.thinking import build_prompt_ids, parse_response, stop_settings
from rlmt_megatron.thinking.templates import ThinkingFormatConfig
from rlmt_megatron.trainer.experience import Rollout


def sampling_params(r: RolloutConfig, fmt: ThinkingFormatConfig, tokenizer, run_seed: int, step: int,
                    round_: int = 0) -> SamplingParams:
    stop, stop_ids = stop_settings(fmt, tokenizer)
    # A seed per step (and per extra generation round of dynamic sampling): a resumed run
    # samples exactly what the uninterrupted run sampled.
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          stop=stop, stop_token_ids=stop_ids, n=r.samples_per_prompt,
                          seed=run_seed * 100003 + step + round_ * 2**32)


def prompt_token_ids(fmt: ThinkingFormatConfig, max_prompt_tokens: int, tokenizer,
                     conversations: Sequence[list[dict]]) -> tuple[list[list[int]], list[bool]]:
    """Templated prompt ids (left-truncated) and, per prompt, whether it was truncated."""
    ids, truncated = [], []
    for messages in conversations:
        p, cut = build_prompt_ids(messages, tokenizer, fmt, max_prompt_tokens)
        ids.append(p)
        truncated.append(bool(cut))
    return ids, truncated


def parse_and_score(fmt: ThinkingFormatConfig, tokenizer, scorer, rollouts: list[Rollout],
                    conversations: Sequence[list[dict]]) -> None:
    """Fill each rollout's ``extras`` (text, thinking, answer, format flag) and ``reward``.

    The response is decoded as the authors' reward worker does (princeton-pli/RLMT,
    training/ppo_grpo/verl/workers/fsdp_workers.py, ``_switch_chat_template``): special tokens
    kept, then every eos text removed (``parse_response``). Another special token that ends the
    response (``<|im_end|>`` under a base model's tokenizer whose eos is ``<|endoftext|>``) stays
    in the answer the reward model reads.
    """
    answers = []
    for r in rollouts:
        text = tokenizer.decode(r.response_ids, skip_special_tokens=False)
        parsed = parse_response(text, fmt, eos_token=tokenizer.eos_token)
        r.extras.update(text=text, thinking=parsed.thinking, answer=parsed.answer, format_ok=parsed.format_ok)
        answers.append(parsed.answer)
    rewards = scorer.score([conversations[r.prompt_index] for r in rollouts], answers)
    for r, value in zip(rollouts, rewards):
        r.reward = value


def shape_rewards(reward: RewardConfig, max_new_tokens: int, rollouts: Sequence[Rollout]) -> None:
    """DAPO's soft overlong penalty (``reward.overlong_buffer_tokens``; off at 0) added to each
    finite reward, and kept in ``extras["overlong_penalty"]``."""
    if not reward.overlong_buffer_tokens:
        return
    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.long)
    penalties = overlong_penalty(lengths, max_new_tokens, reward.overlong_buffer_tokens, reward.overlong_penalty_factor)
    for r, p in zip(rollouts, penalties.tolist()):
        r.extras["overlong_penalty"] = p
        r.reward = r.reward + p


def rollout_metrics(rollouts: Sequence[Rollout], tokenizer, truncated_prompts: int) -> dict[str, float]:
    finite = [r.reward for r in rollouts if math.isfinite(r.reward)]
    n = len(rollouts)
    mean = sum(finite) / len(finite) if finite else math.nan
    std = (sum((x - mean) ** 2 for x in finite) / (len(finite) - 1)) ** 0.5 if len(finite) > 1 else 0.0
    lengths = [len(r.response_ids) for r in rollouts]

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    thinking = [tokens(r.extras.get("thinking")) for r in rollouts]
    answer = [tokens(r.extras.get("answer")) for r in rollouts]
    penalties = [r.extras["overlong_penalty"] for r in rollouts if "overlong_penalty" in r.extras]
    shaping = {"reward/overlong_penalty_mean": sum(penalties) / n} if penalties else {}
    return shaping | {
        "reward/mean": mean,
        "reward/std": std,
        "reward/min": min(finite) if finite else math.nan,
        "reward/max": max(finite) if finite else math.nan,
        "reward/nonfinite_count": float(n - len(finite)),
        "format/ok_rate": sum(bool(r.extras.get("format_ok")) for r in rollouts) / n,
        "response/len_mean": sum(lengths) / n,
        "response/len_max": float(max(lengths)),
        "response/clip_rate": sum(r.finish_reason == "length" for r in rollouts) / n,
        "response/empty_count": float(sum(x == 0 for x in lengths)),
        "thinking/len_mean": sum(thinking) / n,
        "answer/len_mean": sum(answer) / n,
        "prompt/truncated_count": float(truncated_prompts),
    }


def staleness_metrics(rollouts: Sequence[Rollout], trainer_version: int) -> dict[str, float]:
    """How far behind the trained weights the samples were drawn: per sample, the trainer's
    version minus the oldest weights that sampled any of its tokens (0 when synchronous); the
    share of response tokens drawn from older weights (the ones the rollout correction
    reweights; a partial rollout's tokens each count with their own version); and the histogram
    of the tokens' staleness, ``rollout/staleness_hist/<k>``: the share of tokens sampled k
    updates before the weights they train, for k from 0 to the step's largest."""
    stale = [trainer_version - r.weight_version for r in rollouts]
    versions = [v for r in rollouts for v in r.versions()]
    off = sum(v < trainer_version for v in versions)
    total = max(1, len(versions))
    hist = {f"rollout/staleness_hist/{k}": sum(trainer_version - v == k for v in versions) / total
            for k in range(max(stale) + 1)}
    return {"rollout/staleness_mean": sum(stale) / len(stale), "rollout/staleness_max": float(max(stale)),
            "rollout/off_policy_token_frac": off / total} | hist
