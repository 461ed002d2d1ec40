#!/usr/bin/env python
"""Write the paper's RLMT recipes, for 1 and 4 nodes of 8xH100, from one table.

    python tools/make_recipes.py            # (re)write examples/rlmt/{1node,4nodes}/*.yaml
    python tools/make_recipes.py --check    # exit 1 if a shipped recipe differs from the table

Grid: {Llama-3.1-8B, Qwen2.5-7B} x {instruct warm-start, base warm-start, base zero} x
{GRPO, PPO, DPO} x {thinking, no thinking} (zero is a thinking format only: the format module has no
plain-text template without thinking). Hyperparameters are the paper's and the authors' released
configs (princeton-pli/RLMT training/ppo_grpo/configs/*.yaml, training/sft_dpo/scripts/
launch_dpo_example.sh), summarised in /work/shared/ARCHITECTURE.md:

- instruct: lr 3e-7, strict answer extraction; base and zero: lr 1e-6, non-strict;
- GRPO: 8 samples per prompt, 64 prompts per step (128 for instruct-think, trained as 2 mini-batches
  of 64 as the authors' ppo_mini_batch_size does), KL k3 0.001 in the loss, entropy 0.001,
  clip 0.2 with dual clip 3, token-mean, constant lr, 120 steps (the paper keeps ~120-135);
- PPO: 1 sample per prompt, GAE gamma = lambda = 1, critic from the policy with lr 1e-5, value
  clip 0.5, no KL term (the authors' PPO configs set use_kl_loss False), so no reference model;
- DPO (on-policy, one round): 8 samples from the initial model, best vs worst, beta 0.1, lr 3e-7
  cosine with 5% warmup, weight decay 1e-4 (the authors' DPO script), 2 epochs = 234 steps.

Layouts (checked by ``rlmt-train RECIPE --dry-run``, whose exact command heads every file):

- 1 node, colocated SGLang on the 8 trainer GPUs: policy (critic, reference) TP 4 with sequence
  parallelism, DP 2; the reward model on the same layout; 8K-token micro-batches.
- 4 nodes, disaggregated: one node serves SGLang, three train (world 24): policy TP 4 + SP, DP 6,
  16K-token micro-batches (12K for PPO, which also holds a critic); the reward model on its own
  TP 2 (DP 12).
- Engine TP: 8 for Llama (32 heads, 8 KV heads); 4 for Qwen2.5-7B, whose 28 heads do not split 8 ways.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "examples" / "rlmt"
PROMPTS = "../shared/data/wildchat-if/wildchat-if_train.parquet"
REWARD = "/path/to/Skywork-Reward-Llama-3.1-8B-v0.2"

MODELS = {
    "llama3.1-8b": {"hub": "Llama-3.1-8B", "engine_tp": 8},
    "qwen2.5-7b": {"hub": "Qwen2.5-7B", "engine_tp": 4},
}
STARTS = {  # start -> (thinking variants, strict, lr)
    "instruct": (("think", "nothink"), True, 3.0e-7),
    "base": (("think", "nothink"), False, 1.0e-6),
    "zero": (("think",), False, 1.0e-6),
}
ALGORITHMS = ("grpo", "ppo", "dpo")
LAYOUTS = {
    "1node": {"nodes": 1, "placement": "colocated", "parallel": {"tp": 4, "pp": 1, "sequence_parallel": True},
              "reward_parallel": None, "max_tokens": {"grpo": 8192, "ppo": 8192, "dpo": 8192},
              "sglang_url": "http://127.0.0.1:30000"},
    "4nodes": {"nodes": 4, "placement": "disaggregated", "parallel": {"tp": 4, "pp": 1, "sequence_parallel": True},
               "reward_parallel": {"tp": 2, "pp": 1}, "max_tokens": {"grpo": 16384, "ppo": 12288, "dpo": 16384},
               "sglang_url": "http://ENGINE_NODE:30000"},
}


def recipe_name(algo: str, model: str, start: str, thinking: str) -> str:
    return f"{algo}_{model}_zero.yaml" if start == "zero" else f"{algo}_{model}-{start}_{thinking}.yaml"


def policy_path(model: str, start: str, thinking: str) -> str:
    hub = MODELS[model]["hub"]
    if start == "zero":
        return f"/path/to/{hub}"  # the base model itself
    return f"/path/to/{model}-{start}-sft-{thinking}"  # output of the SFT warm-start (rlmt-sft)


def build(algo: str, model: str, start: str, thinking: str, layout: str) -> dict:
    _, strict, lr = STARTS[start]
    lay = LAYOUTS[layout]
    kind = "zero" if start == "zero" else ("warm_start" if thinking == "think" else "no_think")
    headline = algo == "grpo" and start == "instruct" and thinking == "think"
    stem = recipe_name(algo, model, start, thinking)[:-5]
    prompts = 128 if headline else 64
    steps = 234 if algo == "dpo" else 120
    optim = {"lr": 3.0e-7 if algo == "dpo" else lr, "lr_schedule": "cosine" if algo == "dpo" else "constant",
             "weight_decay": 1.0e-4 if algo == "dpo" else 0.01, "clip_grad": 1.0}
    if algo == "dpo":
        optim["warmup_steps"] = 12  # 5% of 234
    algorithm: dict = {"name": algo}
    if algo == "grpo":
        algorithm.update(advantage="grpo", clip_low=0.2, clip_high=0.2, dual_clip_c=3.0, kl_coef=0.001,
                         kl_estimator="k3", entropy_coef=0.001, aggregation="token_mean",
                         updates_per_rollout=2 if headline else 1)
    elif algo == "ppo":
        algorithm.update(gamma=1.0, lam=1.0, value_clip=0.5, clip_low=0.2, clip_high=0.2, dual_clip_c=3.0,
                         kl_coef=0.0, entropy_coef=0.001, aggregation="token_mean")
    else:
        algorithm.update(dpo_beta=0.1, dpo_mode="one_round")
    cfg: dict = {
        "run": {"out_dir": f"runs/{stem}", "total_steps": steps, "save_every": 20, "keep_last": 2, "seed": 1234},
        "models": {"policy": policy_path(model, start, thinking), "reward": REWARD},
        "build": {"parallel": dict(lay["parallel"]), "precision": {"params_dtype": "bfloat16"}},
        "data": {"prompts": [PROMPTS], "max_prompt_tokens": 1024, "prompts_per_step": prompts},
        "format": {"kind": kind, "strict": strict},
        "rollout": {"engine": "sglang", "placement": lay["placement"], "sglang_url": lay["sglang_url"],
                    "engine_tp_size": MODELS[model]["engine_tp"],
                    "samples_per_prompt": 1 if algo == "ppo" else 8, "temperature": 0.7, "max_new_tokens": 4096},
        "weight_sync": {"bucket_mb": 1024},
        "algorithm": algorithm,
        "optim": optim,
    }
    if algo == "ppo":
        cfg["critic_optim"] = {"lr": 1.0e-5, "lr_schedule": "constant", "weight_decay": 0.01, "clip_grad": 1.0}
    tokens = lay["max_tokens"][algo]  # the forward-only passes keep the training budget the layouts were sized with
    cfg["batching"] = {"train_tokens_per_microbatch": tokens, "logprob_tokens_per_microbatch": tokens}
    if lay["reward_parallel"]:
        cfg["reward"] = {"parallel": dict(lay["reward_parallel"])}
    cfg["monitoring"] = {"wandb": {"project": "rlmt", "group": f"{algo}-{model}-{start}-{thinking}",
                                   "tags": [algo, model, start, thinking, layout]}}
    return cfg


def header(algo: str, model: str, start: str, thinking: str, layout: str, path: str) -> str:
    lay = LAYOUTS[layout]
    hub = MODELS[model]["hub"]
    what = {"instruct": f"{hub}-Instruct warm-started by SFT", "base": f"{hub} (base) warm-started by SFT",
            "zero": f"{hub} (base) straight, with the plain-text zero template"}[start]
    think = "with thinking" if thinking == "think" else "without thinking (the paper's baseline)"
    tp, nodes = MODELS[model]["engine_tp"], lay["nodes"]
    sglang = (f"python -m sglang.launch_server --model-path POLICY --tp {tp} --enable-memory-saver "
              "--mem-fraction-static F   (F: as the dry run says)")
    if lay["placement"] == "colocated":
        launch = [f"#   {sglang}", f"#   torchrun --nproc-per-node 8 -m rlmt_megatron.cli.train {path}"]
    else:
        launch = [f"#   on the engine node:  {sglang.replace(' --enable-memory-saver', '')}",
                  f"#   on the {nodes - 1} trainer nodes: launch/torchrun.sh {path} rollout.sglang_url=http://HOST:30000"]
    dry = f"rlmt-train {path} --dry-run" + (f" --nodes {nodes}" if nodes != 1 else "")
    return "\n".join([
        f"# RLMT {algo.upper()}: {what}, {think}.",
        f"# {nodes} node(s) of 8xH100, rollouts on SGLang {lay['placement']} (TP {tp}).",
        "# Generated by tools/make_recipes.py from its table: edit the table, not this file.",
        "# Replace the /path/to/ folders (the dry run then reads their config.json).",
        *launch,
        f"# dry run: {dry}",
    ]) + "\n"


def recipes() -> dict[Path, str]:
    out = {}
    for layout in LAYOUTS:
        for model in MODELS:
            for start, (variants, _, _) in STARTS.items():
                for thinking in variants:
                    for algo in ALGORITHMS:
                        rel = Path("examples/rlmt") / layout / recipe_name(algo, model, start, thinking)
                        cfg = build(algo, model, start, thinking, layout)
                        text = header(algo, model, start, thinking, layout, str(rel))
                        text += yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=110)
                        out[REPO / rel] = text
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = p.parse_args(argv)
    wanted = recipes()
    if args.check:
        stale = [str(f.relative_to(REPO)) for f, text in wanted.items() if not f.is_file() or f.read_text() != text]
        extra = [str(f.relative_to(REPO)) for d in LAYOUTS for f in (OUT / d).glob("*.yaml") if f not in wanted]
        for f in stale:
            print(f"differs from the table: {f}", file=sys.stderr)
        for f in extra:
            print(f"not in the table: {f}", file=sys.stderr)
        return 1 if stale or extra else 0
    for f, text in wanted.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    print(f"wrote {len(wanted)} recipes under {OUT.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
