#!/usr/bin/env python
"""Write the paper's RLMT recipes, for 1 and 4 nodes of 8xH100, from one table.

    python tools/make_recipes.py            # (re)write examples/rlmt/{1node,4nodes}/*.yaml, examples/rlmt/sft_*.yaml
    python tools/make_recipes.py --check    # exit 1 if a shipped recipe differs from the table

Every value is the one the authors ran, read from their released code, princeton-pli/RLMT at
commit 2cde311b9dad4b71a9d49eacf8f921c0026a5a95 (``AUTHORS`` below); the file and the key are named
next to each value. Where a value cannot be expressed here, the comment says so and what we do
instead.

Grid: {Llama-3.1-8B, Qwen2.5-7B} x {instruct warm-start, base warm-start, base zero} x
{thinking, no thinking} x {GRPO, PPO, DPO}, and the SFT warm-starts the warm-start runs start from.
The authors released a GRPO config for each of the 12 (model, start, thinking) runs, PPO configs
for the Llama base warm-start runs only and one DPO script for every DPO run; the other PPO
recipes carry the released PPO values over (their headers say so).

Layouts (checked by ``rlmt-train RECIPE --dry-run``, whose exact command heads every file, with
its step-time projection); the authors ran everything on 1 node of 8xH100 with FSDP (their batch
sizes are global, so they hold on any layout). The layouts are ours, not the authors':

- Every GPU generates: the engines are colocated on the trainer's GPUs (SGLang's memory saver
  releases them while the trainer works), four SGLang servers per node at engine TP 2 (server k
  on GPUs 2k, 2k+1, port 30000 + k), each an engine of the fleet: 4 engines fill the node's 8
  GPUs. Four servers rather than one with ``--dp-size 4``: SGLang 0.5.23 refuses weight updates
  by tensor (CUDA IPC) and by broadcast on a server with data-parallel replicas (its
  ``update_weights_from_tensor`` and ``update_weights_from_distributed`` assert ``dp_size == 1``),
  so each replica is an engine of its own, synced, restarted and balanced by the run. TP 2, not 1: beside the
  trainer's resident weights, gradients and optimizer shard, a TP-2 replica holds more sequences
  per GPU in its KV cache (its weights are halved and each GPU keeps half the KV heads), and both
  models split at TP 2 (Llama 32 heads / 8 KV heads, Qwen2.5-7B 28 / 4). The previous layouts
  (one server at TP 8, or 4 for Qwen, on one node) left 3/4 of the 4-node job's GPUs, and half of
  the 1-node Qwen job's, idle while generating, and TP 8 shards an 8B model far past what it needs.
- 1 node: policy (critic, reference) TP 4 with sequence parallelism, DP 2; the reward model on the
  same layout; 8K-token micro-batches. Four engines; weights by CUDA IPC.
- 4 nodes: 16 engines, four per node (``rollout.engines: 16``, one URL each: engine i is server
  i // 4 of node i mod 4, as the run places them, ``fleet.member_node``); the trainer on all 32
  GPUs: policy TP 4 + SP, DP 8, 16K-token micro-batches (12K for PPO, which also holds a critic);
  the reward model on its own TP 2 (DP 16). Each node's engine is synced by CUDA IPC from that
  node's own ranks (``trainer/engine_hosts.py``), the default colocated transport: no shared
  folder. The dry run projects ~73 s per GRPO step of 128 prompts x 8 for this layout (5 s of it
  the sync) against ~166 s for the former one (1 engine node, 3 trainer nodes), at its assumed
  rates.
- Synchronous (``rollout.max_staleness`` 0), as the authors' on-policy runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the format module's templates, when run as a script

from rlmt_megatron.thinking.templates import ZERO_NOTHINK_CHAT_TEMPLATE  # noqa: E402

OUT = REPO / "examples" / "rlmt"
PROMPTS = "../shared/data/wildchat-if/wildchat-if_train.parquet"
REWARD = "/path/to/Skywork-Reward-Llama-3.1-8B-v0.2"

AUTHORS = "princeton-pli/RLMT@2cde311b"
CONFIGS = "training/ppo_grpo/configs"  # one verl config per run, e.g. grpo__llamainstruct__warm-start__think.yaml
# The prompt set: 7,544 rows (training/ppo_grpo/data/wildchat-if_train.parquet). verl's dataloader
# drops the last partial batch (training/ppo_grpo/verl/trainer/ppo/ray_trainer.py,
# _create_dataloader: drop_last=True) and runs len(dataloader) x trainer.total_epochs steps; our
# PromptSampler drops it too (data.md), so run.total_steps = epochs x (7544 // prompts per step).
NUM_PROMPTS = 7544

MODELS = {
    "llama3.1-8b": {"hub": "Llama-3.1-8B", "authors": "llama"},
    "qwen2.5-7b": {"hub": "Qwen2.5-7B", "authors": "qwen"},
}
STARTS = {  # start -> (thinking variants, strict, lr); strict and lr are also in each run's row below
    "instruct": (("think", "nothink"), True, 3.0e-7),
    "base": (("think", "nothink"), False, 1.0e-6),
    "zero": (("think", "nothink"), False, 1.0e-6),
}
ALGORITHMS = ("grpo", "ppo", "dpo")
# Ours (module docstring, "Layouts"): SGLang on every GPU, four servers of TP 2 per node.
ENGINE_TP, SERVERS_PER_NODE, BASE_PORT = 2, 4, 30000


def _server_urls(nodes: int, host) -> list[str]:
    """Engine i's URL: server i // nodes of node i mod nodes (the run's ``fleet.member_node`` and
    ``member_slot``), listening on BASE_PORT + its place on the node."""
    return [f"http://{host(i % nodes)}:{BASE_PORT + i // nodes}" for i in range(nodes * SERVERS_PER_NODE)]


LAYOUTS = {
    "1node": {"nodes": 1, "placement": "colocated", "parallel": {"tp": 4, "pp": 1, "sequence_parallel": True},
              "reward_parallel": None, "max_tokens": {"grpo": 8192, "ppo": 8192, "dpo": 8192},
              "sglang_url": _server_urls(1, lambda node: "127.0.0.1"), "weight_sync": {}},
    "4nodes": {"nodes": 4, "placement": "colocated", "parallel": {"tp": 4, "pp": 1, "sequence_parallel": True},
               "reward_parallel": {"tp": 2, "pp": 1}, "max_tokens": {"grpo": 16384, "ppo": 12288, "dpo": 16384},
               "sglang_url": _server_urls(4, lambda node: f"NODE{node}"),
               # each node's engines are synced by CUDA IPC from that node's own ranks: no shared folder
               "weight_sync": {}},
}


class Run(NamedTuple):
    """One of the authors' verl runs: the values that differ between their configs. Each field is
    the key of ``training/ppo_grpo/configs/<run>.yaml`` named after it."""

    prompts: int  # data.train_batch_size (prompts per step); our data.prompts_per_step
    temperature: float  # actor_rollout_ref.rollout.temperature
    top_p: float  # actor_rollout_ref.rollout.top_p
    max_prompt: int  # data.max_prompt_length; our data.max_prompt_tokens
    epochs: int  # trainer.total_epochs; our run.total_steps = epochs x (7544 // prompts)
    save_freq: int  # trainer.save_freq; our run.save_every
    lr: float  # actor_rollout_ref.actor.optim.lr
    strict: bool  # reward_model.strict; our format.strict


# The table: (algorithm, model, start, thinking) -> the authors' run. Every value below is read from
# princeton-pli/RLMT training/ppo_grpo/configs/<the file named at the end of its row>.
#            prompts  temp  top_p  prompt epochs save  lr      strict
RUNS = {
    ("grpo", "llama3.1-8b", "instruct", "think"): Run(128, 0.8, 0.95, 1024, 2, 45, 3e-7, True),  # grpo__llamainstruct__warm-start__think.yaml
    ("grpo", "llama3.1-8b", "instruct", "nothink"): Run(64, 0.7, 1.0, 1024, 2, 45, 3e-7, True),  # grpo__llamainstruct__warm-start__nothink.yaml
    ("grpo", "llama3.1-8b", "base", "think"): Run(64, 0.7, 1.0, 1024, 2, 45, 1e-6, False),  # grpo__llamabase__warm-start__think.yaml
    ("grpo", "llama3.1-8b", "base", "nothink"): Run(64, 0.7, 1.0, 1024, 2, 45, 1e-6, False),  # grpo__llamabase__warm-start__nothink.yaml
    ("grpo", "llama3.1-8b", "zero", "think"): Run(64, 0.7, 1.0, 896, 4, 45, 1e-6, False),  # grpo__llamabase__zero__think.yaml
    ("grpo", "llama3.1-8b", "zero", "nothink"): Run(64, 0.7, 1.0, 896, 4, 45, 1e-6, False),  # grpo__llamabase__zero__nothink.yaml
    ("grpo", "qwen2.5-7b", "instruct", "think"): Run(128, 0.8, 0.95, 1024, 2, 45, 3e-7, True),  # grpo__qweninstruct__warm-start__think.yaml
    ("grpo", "qwen2.5-7b", "instruct", "nothink"): Run(64, 0.7, 1.0, 1024, 2, 45, 3e-7, True),  # grpo__qweninstruct__warm-start__nothink.yaml
    ("grpo", "qwen2.5-7b", "base", "think"): Run(64, 0.7, 1.0, 1024, 2, 45, 1e-6, False),  # grpo__qwenbase__warm-start__think.yaml
    ("grpo", "qwen2.5-7b", "base", "nothink"): Run(128, 0.8, 0.95, 1024, 2, 45, 1e-6, False),  # grpo__qwenbase__warm-start__nothink.yaml
    ("grpo", "qwen2.5-7b", "zero", "think"): Run(64, 0.7, 1.0, 896, 2, 50, 1e-6, False),  # grpo__qwenbase__zero__think.yaml
    ("grpo", "qwen2.5-7b", "zero", "nothink"): Run(64, 0.7, 1.0, 896, 2, 45, 1e-6, False),  # grpo__qwenbase__zero__nothink.yaml
    ("ppo", "llama3.1-8b", "base", "think"): Run(64, 0.7, 1.0, 896, 2, 55, 1e-6, False),  # ppo__llamabase__warm-start__think.yaml
    ("ppo", "llama3.1-8b", "base", "nothink"): Run(64, 0.7, 1.0, 896, 2, 55, 1e-6, False),  # ppo__llamabase__warm-start__nothink.yaml
}
PPO_TEMPLATE = ("llama3.1-8b", "base")  # the only PPO runs released: the others take their values, with
# the learning rate and strictness of the same (model, start) GRPO run (actor.optim.lr, reward_model.strict).

# Values every GRPO config shares (training/ppo_grpo/configs/grpo__*.yaml):
GRPO = {
    "samples_per_prompt": 8,  # actor_rollout_ref.rollout.n
    "max_new_tokens": 4096,  # data.max_response_length
    "mini_batch_prompts": 64,  # actor.ppo_mini_batch_size: train_batch_size / 64 optimizer steps per rollout, 1 epoch (actor.ppo_epochs)
    "clip": 0.2,  # actor.clip_ratio_low, actor.clip_ratio_high
    "dual_clip_c": 3.0,  # actor.clip_ratio_c
    "kl_coef": 0.001,  # actor.use_kl_loss: True, actor.kl_loss_coef (algorithm.use_kl_in_reward: False)
    "kl_estimator": "k3",  # actor.kl_loss_type: low_var_kl (k3)
    "entropy_coef": 0.001,  # actor.entropy_coeff
    "advantage": "grpo",  # algorithm.adv_estimator: grpo, norm_adv_by_std_in_grpo: True
    # actor.loss_agg_mode says token-mean, but with actor.ppo_micro_batch_size_per_gpu: 1 the fork's
    # dp_actor.update_policy takes the token mean inside each one-sequence micro-batch, scales it by
    # 1/gradient_accumulation and FSDP averages the ranks: the mean over sequences of per-sequence
    # token means (docs/rlmt_train.md, "Loss weighting of the authors' runs").
    "aggregation": "seq_mean_token_mean",
    "weight_decay": 0.01,  # actor.optim.weight_decay (AdamW, betas (0.9, 0.999): fsdp_workers.py, optim.AdamW)
    "lr_schedule": "constant",  # actor.optim.warmup_style: constant, lr_warmup_steps_ratio: 0
    "clip_grad": 1.0,  # actor.grad_clip
}
# Values both PPO configs share (training/ppo_grpo/configs/ppo__llamabase__warm-start__*.yaml):
PPO = {
    "samples_per_prompt": 1,  # actor_rollout_ref.rollout.n
    "kl_coef": 0.0,  # actor.use_kl_loss: False, algorithm.use_kl_in_reward: False: no reference model
    "gamma": 1.0, "lam": 1.0,  # algorithm.gamma, algorithm.lam (adv_estimator: gae)
    "value_clip": 0.5,  # critic.cliprange_value
    "critic_lr": 1.0e-5,  # critic.optim.lr (constant, weight_decay 0.01); the critic starts from the policy (critic.model.path)
    # actor.loss_agg_mode: token-mean with actor.ppo_micro_batch_size_per_gpu: 16, more than the 8
    # sequences a GPU holds (64 prompts x n=1 / 8 GPUs): each rank's token mean over all its
    # sequences, averaged over the ranks, which is token_mean when the ranks hold as many tokens.
    # (On 8 GPUs the fork's own check, fsdp_workers.py "should be divisible by
    # ppo_micro_batch_size_per_gpu", rejects 16 against 8 as released.) The critic's micro-batches
    # of 2 sequences (critic.ppo_micro_batch_size: 16 over 8 GPUs) cannot be expressed: it takes the
    # same token_mean.
    "aggregation": "token_mean",
}
# The DPO runs: training/sft_dpo/scripts/launch_dpo_example.sh (training) and
# training/sft_dpo/utils/scripts/launch_sample_responses_example.sh (the pairs).
DPO = {
    "samples_per_prompt": 8,  # NUM_SAMPLES=8, best vs worst (utils/src/build_dpo_dataset.py)
    "temperature": 0.7, "top_p": 1.0,  # TEMPERATURE=0.7; sample_responses.py sets no top_p (vLLM's 1.0)
    "max_new_tokens": 4096,  # MAX_TOKENS=4096
    "max_prompt": 4096,  # MAX_MODEL_LEN=8192 minus MAX_TOKENS: the prompts are not cut shorter
    "pairs_per_step": 128,  # micro_batch_size=1 x gradient_accumulation_steps=16 x 8 GPUs
    "epochs": 2,  # epochs=2 over the fixed pair set (algorithm.dpo_mode: one_round)
    "lr": 3.0e-7, "min_lr": 0.0, "lr_schedule": "cosine",  # lr=3e-7, min_lr=0, --lr_scheduler_type=cosine
    "warmup_ratio": 0.05,  # --warmup_ratio=0.05: ceil(0.05 x steps) as the HF Trainer rounds it
    "weight_decay": 1.0e-4,  # weight_decay=1e-4
    "adam_beta2": 0.95,  # --adam_beta1=0.9 --adam_beta2=0.95
    "beta": 0.1,  # beta=0.1
}
# The SFT warm-starts: training/sft_dpo/scripts/launch_sft_example.sh (mode=llama / mode=qwen).
SFT = {
    "batch_size": {"llama3.1-8b": 16, "qwen2.5-7b": 8},  # micro_batch_size=1 x 8 GPUs x gradient_accumulation_steps (2 llama, 1 qwen)
    "lr": 4.0e-6, "lr_schedule": "cosine",  # lr=4e-6, --lr_scheduler_type=cosine
    "warmup_ratio": 0.1,  # warmup_ratio=0.1
    "epochs": 2,  # epochs=2
    "weight_decay": 1.0e-4,  # weight_decay=1e-4
    "adam_beta2": 0.95,  # --adam_beta1=0.9 --adam_beta2=0.95
    "max_length": 20000,  # max_length=20000 -> --block_size -> SFTConfig.max_seq_length, which truncates (not drops)
}


def recipe_name(algo: str, model: str, start: str, thinking: str) -> str:
    return f"{algo}_{model}-{start}_{thinking}.yaml"


def sft_name(model: str, start: str, thinking: str) -> str:
    return f"sft_{model}-{start}_{thinking}.yaml"


def policy_path(model: str, start: str, thinking: str) -> str:
    hub = MODELS[model]["hub"]
    if start == "zero":
        return f"/path/to/{hub}"  # the base model itself
    return f"/path/to/{model}-{start}-sft-{thinking}"  # output of the SFT warm-start (rlmt-sft, sft_*.yaml)


def authors_run(algo: str, model: str, start: str, thinking: str) -> Optional[str]:
    """The authors' config file of this run, or None where they released none."""
    if algo == "dpo" or (algo, model, start, thinking) not in RUNS:
        return None
    kind = "zero" if start == "zero" else "warm-start"
    family = MODELS[model]["authors"] + ("instruct" if start == "instruct" else "base")
    return f"{CONFIGS}/{algo}__{family}__{kind}__{thinking}.yaml"


def run_values(algo: str, model: str, start: str, thinking: str) -> Run:
    if algo == "ppo" and (algo, model, start, thinking) not in RUNS:
        grpo = RUNS[("grpo", model, start, thinking)]
        return RUNS[("ppo", *PPO_TEMPLATE, thinking)]._replace(lr=grpo.lr, strict=grpo.strict)
    return RUNS[(algo, model, start, thinking)]


def checkpoints(total: int, every: int) -> int:
    """How many checkpoints a run saves: every ``every`` steps and at the last step."""
    return total // every + (1 if total % every else 0)


def _engines(lay: dict) -> dict:
    urls = lay["sglang_url"]
    return {"engines": len(urls), "sglang_url": urls}


def build(algo: str, model: str, start: str, thinking: str, layout: str) -> dict:
    lay = LAYOUTS[layout]
    if start == "zero":
        kind = "zero"  # reward_model.longcot_config: the converted model's, delimiter <response>
    else:
        kind = "warm_start" if thinking == "think" else "no_think"  # longcot_config: null for *__nothink
    stem = recipe_name(algo, model, start, thinking)[:-5]
    fmt: dict = {"kind": kind}
    if start == "zero" and thinking == "nothink":
        # convert_base_to_nothink_prompted_model.py's NOTHINK_CHAT_TEMPLATE (answer in <response>)
        fmt["zero_template"] = ZERO_NOTHINK_CHAT_TEMPLATE
    algorithm: dict = {"name": algo}
    if algo == "dpo":
        d = DPO
        fmt["strict"] = STARTS[start][1]
        prompts = d["pairs_per_step"]  # at most one pair per prompt
        steps = d["epochs"] * (NUM_PROMPTS // prompts)
        optim = {"lr": d["lr"], "min_lr": d["min_lr"], "lr_schedule": d["lr_schedule"],
                 "warmup_steps": math.ceil(d["warmup_ratio"] * steps), "weight_decay": d["weight_decay"],
                 "adam_beta2": d["adam_beta2"], "clip_grad": 1.0}  # HF Trainer max_grad_norm default 1.0
        algorithm.update(dpo_beta=d["beta"], dpo_mode="one_round")
        rollout = {"samples_per_prompt": d["samples_per_prompt"], "temperature": d["temperature"], "top_p": d["top_p"],
                   "max_new_tokens": d["max_new_tokens"]}
        max_prompt, save_every = d["max_prompt"], 0  # save_strategy="no": the final model only
        keep = 1
    else:
        r = run_values(algo, model, start, thinking)
        fmt["strict"] = r.strict
        prompts = r.prompts
        steps = r.epochs * (NUM_PROMPTS // prompts)
        g = GRPO
        optim = {"lr": r.lr, "lr_schedule": g["lr_schedule"], "weight_decay": g["weight_decay"],
                 "clip_grad": g["clip_grad"]}
        algorithm.update(clip_low=g["clip"], clip_high=g["clip"], dual_clip_c=g["dual_clip_c"],
                         entropy_coef=g["entropy_coef"])
        if algo == "grpo":
            algorithm.update(advantage=g["advantage"], kl_coef=g["kl_coef"], kl_estimator=g["kl_estimator"],
                             aggregation=g["aggregation"], updates_per_rollout=r.prompts // g["mini_batch_prompts"])
            n = g["samples_per_prompt"]
        else:
            algorithm.update(gamma=PPO["gamma"], lam=PPO["lam"], value_clip=PPO["value_clip"], kl_coef=PPO["kl_coef"],
                             aggregation=PPO["aggregation"], updates_per_rollout=r.prompts // g["mini_batch_prompts"])
            n = PPO["samples_per_prompt"]
        rollout = {"samples_per_prompt": n, "temperature": r.temperature, "top_p": r.top_p,
                   "max_new_tokens": g["max_new_tokens"]}
        max_prompt, save_every = r.max_prompt, r.save_freq
        keep = checkpoints(steps, save_every)  # trainer.max_actor_ckpt_to_keep: null keeps every one
    cfg: dict = {
        "run": {"out_dir": f"runs/{stem}", "total_steps": steps, "save_every": save_every, "keep_last": keep,
                "seed": 1234},
        "models": {"policy": policy_path(model, start, thinking), "reward": REWARD},
        "build": {"parallel": dict(lay["parallel"]), "precision": {"params_dtype": "bfloat16"}},
        "data": {"prompts": [PROMPTS], "max_prompt_tokens": max_prompt, "prompts_per_step": prompts},
        "format": fmt,
        "rollout": {"engine": "sglang", "placement": lay["placement"], **_engines(lay), "engine_tp_size": ENGINE_TP,
                    **rollout},
        "weight_sync": {**lay["weight_sync"], "bucket_mb": 1024},
        "algorithm": algorithm,
        "optim": optim,
    }
    if algo == "ppo":
        cfg["critic_optim"] = {"lr": PPO["critic_lr"], "lr_schedule": "constant", "weight_decay": GRPO["weight_decay"],
                               "clip_grad": GRPO["clip_grad"]}
    tokens = lay["max_tokens"][algo]  # the forward-only passes keep the training budget the layouts were sized with
    cfg["batching"] = {"train_tokens_per_microbatch": tokens, "logprob_tokens_per_microbatch": tokens}
    if lay["reward_parallel"]:
        cfg["reward"] = {"parallel": dict(lay["reward_parallel"])}
    cfg["monitoring"] = {"wandb": {"project": "rlmt", "group": f"{algo}-{model}-{start}-{thinking}",
                                   "tags": [algo, model, start, thinking, layout]}}
    return cfg


def build_sft(model: str, start: str, thinking: str) -> dict:
    hub = MODELS[model]["hub"]
    cfg: dict = {"model": f"/path/to/{hub}-Instruct" if start == "instruct" else f"/path/to/{hub}"}
    if model == "llama3.1-8b" and start == "base":
        cfg["tokenizer"] = f"/path/to/{hub}-Instruct"  # base_tokenizer="Llama-3.1-8B-Instruct" (its chat template)
    s = SFT
    cfg.update({
        "data": [f"/path/to/sft_{thinking}.jsonl"],
        "out_dir": f"runs/sft_{model}-{start}_{thinking}",
        "epochs": s["epochs"], "batch_size": s["batch_size"][model],
        "max_length": s["max_length"], "overlong": "truncate", "warmup_ratio": s["warmup_ratio"],
        "build": {"parallel": {"tp": 4, "sequence_parallel": True}, "precision": {"params_dtype": "bfloat16"}},
        "optim": {"lr": s["lr"], "lr_schedule": s["lr_schedule"], "weight_decay": s["weight_decay"],
                  "adam_beta2": s["adam_beta2"], "clip_grad": 1.0},  # HF Trainer max_grad_norm default 1.0
        "batching": {"train_tokens_per_microbatch": 8192},
        "monitoring": {"wandb": {"project": "rlmt", "group": f"sft-{model}-{start}-{thinking}"}},
    })
    return cfg


def _kept_note(algo: str, steps: int, save_every: int, prompts: int) -> str:
    """Which checkpoint the paper evaluates. training/README.md: the scripts 'train for 2 epochs
    (234 steps), whereas we take the checkpoint around step 117 (specifically, step 135)'. The
    recipe cannot pick a checkpoint; it keeps every one (run.keep_last), as verl did."""
    if algo == "dpo":
        return "# Kept model: the final one (launch_dpo_example.sh: save_strategy=no)."
    if prompts == 64 and 135 % save_every == 0:
        return f"# Kept checkpoint: the paper evaluates step 135 (training/README.md), not the last of the {steps}."
    if prompts == 64:
        return (f"# Kept checkpoint: the paper names step 135 (training/README.md); this run's authors saved every "
                f"{save_every} (steps {135 // save_every * save_every}, {(135 // save_every + 1) * save_every}), as here.")
    return (f"# Kept checkpoint: the paper names step 135 of its 64-prompt runs (training/README.md), "
            f"{135 * 64} prompts: step {135 * 64 // prompts} here (saves every {save_every}, as the authors).")


def header(algo: str, model: str, start: str, thinking: str, layout: str, path: str, cfg: dict) -> str:
    lay = LAYOUTS[layout]
    hub = MODELS[model]["hub"]
    what = {"instruct": f"{hub}-Instruct warm-started by SFT", "base": f"{hub} (base) warm-started by SFT",
            "zero": f"{hub} (base) straight, with the plain-text zero template"}[start]
    think = "with thinking" if thinking == "think" else "without thinking (the paper's baseline)"
    nodes = lay["nodes"]
    sglang = (f"for k in {' '.join(map(str, range(SERVERS_PER_NODE)))}; do python -m sglang.launch_server "
              f"--model-path POLICY --tp {ENGINE_TP} --base-gpu-id $(({ENGINE_TP} * k)) --port $(({BASE_PORT} + k)) "
              "--enable-memory-saver --mem-fraction-static F & done   (F: as the dry run says)")
    if nodes == 1:
        launch = [f"#   {sglang}", f"#   torchrun --nproc-per-node 8 -m rlmt_megatron.cli.train {path}"]
    else:
        launch = [f"#   on each of the {nodes} nodes, {SERVERS_PER_NODE} servers (node i is NODEi in rollout.sglang_url):",
                  f"#     {sglang}",
                  f"#   then on every node: launch/torchrun.sh {path} (each node syncs its own servers by CUDA IPC)"]
    dry = f"rlmt-train {path} --dry-run" + (f" --nodes {nodes}" if nodes != 1 else "")
    source = authors_run(algo, model, start, thinking)
    if algo == "dpo":
        source_line = ("# Values: princeton-pli/RLMT training/sft_dpo/scripts/launch_dpo_example.sh and "
                       "training/sft_dpo/utils/scripts/launch_sample_responses_example.sh.")
    elif source is None:
        source_line = (f"# Values: the authors released PPO configs for Llama-3.1-8B base warm-start only; this recipe "
                       f"takes theirs ({CONFIGS}/ppo__llamabase__warm-start__{thinking}.yaml) with the learning rate "
                       f"and strictness of the matching GRPO run.")
    else:
        source_line = f"# Values: princeton-pli/RLMT {source}."
    return "\n".join([
        f"# RLMT {algo.upper()}: {what}, {think}.",
        f"# {nodes} node(s) of 8xH100, rollouts on SGLang colocated on every GPU: {nodes * SERVERS_PER_NODE} servers, "
        f"{SERVERS_PER_NODE} per node, TP {ENGINE_TP} each (our layout: tools/make_recipes.py, 'Layouts').",
        source_line,
        _kept_note(algo, cfg["run"]["total_steps"], cfg["run"]["save_every"], cfg["data"]["prompts_per_step"]),
        "# Generated by tools/make_recipes.py from its table: edit the table, not this file.",
        "# Replace the /path/to/ folders (the dry run then reads their config.json).",
        *launch,
        f"# dry run: {dry}",
    ]) + "\n"


def sft_header(model: str, start: str, thinking: str, path: str) -> str:
    hub = MODELS[model]["hub"]
    base = f"{hub}-Instruct" if start == "instruct" else f"{hub} (base)"
    data = ("thinking traces in the warm-start format <think>\\n{plan}\\n</think>\\n\\n{answer}" if thinking == "think"
            else "the same responses without their thinking traces")
    return "\n".join([
        f"# The SFT warm-start of {base}, {'with' if thinking == 'think' else 'without'} thinking: ~6K prompts with {data},",
        "# loss on the assistant turns only, 2 epochs. Its out_dir/hf is the policy of the "
        f"{model}-{start}_{thinking} RL recipes.",
        "# Values: princeton-pli/RLMT training/sft_dpo/scripts/launch_sft_example.sh "
        f"(mode={MODELS[model]['authors']}).",
        "# Generated by tools/make_recipes.py from its table: edit the table, not this file.",
        f"#   torchrun --nproc-per-node 8 -m rlmt_megatron.cli.supervised sft {path}",
    ]) + "\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the zero chat template) as literal blocks, readable in the recipe."""


def _str(dumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=110)


def recipes() -> dict[Path, str]:
    out = {}
    for layout in LAYOUTS:
        for model in MODELS:
            for start, (variants, _, _) in STARTS.items():
                for thinking in variants:
                    for algo in ALGORITHMS:
                        rel = Path("examples/rlmt") / layout / recipe_name(algo, model, start, thinking)
                        cfg = build(algo, model, start, thinking, layout)
                        text = header(algo, model, start, thinking, layout, str(rel), cfg)
                        out[REPO / rel] = text + _dump(cfg)
    for model in MODELS:
        for start in ("instruct", "base"):
            for thinking in STARTS[start][0]:
                rel = Path("examples/rlmt") / sft_name(model, start, thinking)
                out[REPO / rel] = sft_header(model, start, thinking, str(rel)) + _dump(build_sft(model, start, thinking))
    return out


def _shipped() -> list[Path]:
    return [f for d in LAYOUTS for f in (OUT / d).glob("*.yaml")] + list(OUT.glob("sft*.yaml"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = p.parse_args(argv)
    wanted = recipes()
    if args.check:
        stale = [str(f.relative_to(REPO)) for f, text in wanted.items() if not f.is_file() or f.read_text() != text]
        extra = [str(f.relative_to(REPO)) for f in _shipped() if f not in wanted]
        for f in stale:
            print(f"differs from the table: {f}", file=sys.stderr)
        for f in extra:
            print(f"not in the table: {f}", file=sys.stderr)
        return 1 if stale or extra else 0
    for f in _shipped():
        if f not in wanted:
            f.unlink()
    for f, text in wanted.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    print(f"wrote {len(wanted)} recipes under {OUT.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
