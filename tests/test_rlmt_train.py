"""rlmt-train end to end: GRPO, PPO and DPO runs at TP×PP 2×1 and 1×2, resume after a kill, and
bad input.

Each run is a real torchrun job (2 processes, gloo) with the tiny models, the embedded HF engine
and the tiny reward model. What is checked against independent references:
- weights: every sync is verified by checksum (``weight_sync.checksum``) and the engine's
  logprobs of its own samples equal the trainer's (``rollout/logprob_diff_max``): transformers
  vs Megatron, two implementations;
- rewards: the dumped answers are re-scored with transformers' LlamaForSequenceClassification
  on the RM's own chat template, and must equal the logged rewards (also with the RM on its own
  TP=2 layout beside a PP=2 policy);
Resume after SIGKILL (and SIGTERM, and a killed engine) against an uninterrupted run is in
the fault campaign's chain (test_fault_campaign.py).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, read_metrics, run_cli, torchrun
from helpers import write_train_config as write_config

def rescore_with_transformers(tiny: Path, out: Path, step: int) -> tuple[list[float], list[float]]:
    """(logged rewards, transformers' scores) for the samples dumped at ``step``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny / "llama-rm"))
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny / "llama-rm"), dtype=torch.float32).eval()
    logged, ref = [], []
    for row in map(json.loads, (out / "samples" / f"step_{step:06d}.jsonl").read_text().splitlines()):
        # The RM's own template: user turn + answer, no system prompt, exactly one BOS (written here
        # directly from the tokenizer's template, not through rlmt's rm_template).
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["answer"]}], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref.append(float(rm(torch.tensor([ids])).logits[0, 0]))
        logged.append(row["reward"])
    return logged, ref


# grpo-tp2 also runs REINFORCE++-baseline, straight-through k3+, the adaptive KL controller,
# seq_mean_token_sum, dynamic sampling, CISPO and TIS through the CLI and the loop (their formulas:
# test_algorithms.py, test_updates.py, test_policy_losses.py, test_step_rollouts.py)
KL_TARGET, KL_HORIZON, KL_COEF = 0.001, 10.0, 0.05
RUNS = {
    "grpo-tp2": ({"name": "grpo", "advantage": "reinforce_pp_baseline", "kl_estimator": "k3+", "kl_coef": KL_COEF,
                  "kl_control": {"kind": "adaptive", "target": KL_TARGET, "horizon": KL_HORIZON},
                  "aggregation": "seq_mean_token_sum", "dynamic_sampling": {"enabled": True, "max_extra_rounds": 1},
                  "policy_loss": "cispo", "rollout_correction": {"mode": "tis"}}, {"tp": 2}),
    # the reward model on its own TP=2 groups; GSPO with IcePop masking through the CLI and loop
    "grpo-pp2-rm-tp2": ({"name": "grpo", "policy_loss": "gspo", "rollout_correction": {"mode": "icepop"}}, {"pp": 2}),
    "ppo-tp2": ({"name": "ppo", "policy_loss": "gspo_token", "rollout_correction": {"mode": "mis"}}, {"tp": 2}),
    "ppo-pp2": ({"name": "ppo"}, {"pp": 2}),
    "dpo-tp2": ({"name": "dpo"}, {"tp": 2}),
    "dpo-pp2": ({"name": "dpo", "dpo_mode": "one_round"}, {"pp": 2}),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_algorithm_runs(run, tiny_models, tmp_path):
    algorithm, parallel = RUNS[run]
    out = tmp_path / "run"
    extra = {"monitoring": {"wandb": {"mode": "offline"}}} if run == "grpo-tp2" else {}
    if run.endswith("rm-tp2"):
        extra["reward"] = {"parallel": {"tp": 2}}
    truncating = run == "dpo-tp2"  # prompts longer than data.max_prompt_tokens: left-truncated and counted
    if truncating:
        extra["data"] = {"max_prompt_tokens": 4}
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, algorithm=algorithm,
                       build={"parallel": parallel}, **extra)
    torchrun(2, ["-m", "rlmt_megatron.cli.train", str(cfg)], timeout=600)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    one_round = algorithm.get("dpo_mode") == "one_round"
    for r in rows:
        assert r["reward/nonfinite_count"] == 0
        if truncating:
            assert r["prompt/truncated_count"] == 2  # both prompts of the step
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    # Engine (transformers) and trainer (Megatron, TP/PP) agree on the sampled tokens' logprobs
    # after every sync; in one_round DPO the engine keeps the initial policy, so from step 2 on
    # the difference is the policy's drift from its sampler.
    for r in rows[:1] if one_round else rows:
        assert r["rollout/logprob_diff_max"] <= 1e-4, r
    if one_round:
        assert rows[1]["rollout/logprob_diff_max"] > 1e-3
        assert [r["weight_version"] for r in rows] == [0, 0]
    else:
        assert [r["weight_version"] for r in rows] == [1, 2]
    expected_keys = {"ppo": {"loss/policy", "loss/value", "critic/grad_norm", "kl"}, "grpo": {"loss/policy", "kl", "entropy"},
                     "dpo": {"loss/dpo", "dpo/pairs"}}[algorithm["name"]]
    if "rollout_correction" in algorithm:  # engine and trainer agree: nothing is masked
        expected_keys |= {"rollout_correction/weight_mean", "rollout_correction/masked_token_frac"}
        assert all(r["rollout_correction/masked_token_frac"] == 0 for r in rows)
    assert expected_keys <= set(rows[0])
    logged, ref = rescore_with_transformers(tiny_models, out, step=2)
    assert logged == pytest.approx(ref, abs=1e-4)
    assert sum(logged) / len(logged) == pytest.approx(rows[1]["reward/mean"], abs=1e-9)
    # Outputs: TensorBoard events, checkpoint of the last step, final HF policy that moved.
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    final = load_file(str(out / "final_hf" / "model.safetensors"))
    start = load_file(str(tiny_models / "llama-policy" / "model.safetensors"))
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-5
    if run == "grpo-tp2":
        assert list(out.glob("wandb/offline-run-*/run-*.wandb"))
        # the adaptive controller's coefficient follows its formula from the logged KL, into the checkpoint
        expected, n = KL_COEF, 2 * 3  # prompts_per_step x samples: dynamic sampling keeps the batch's size
        for r in rows:
            assert r["kl/coef"] == pytest.approx(expected, rel=1e-12) and 1 <= r["dynamic_sampling/rounds"] <= 2
            expected *= 1 + min(max(r["kl/old_ref_seq_mean"] / KL_TARGET - 1, -0.2), 0.2) * n / KL_HORIZON
        saved = json.loads((out / "checkpoints" / "step_00000002" / "extra.json").read_text())
        assert saved["kl_coef"] == pytest.approx(expected, rel=1e-12) and expected != KL_COEF


# ---------------------------------------------------------------------------------------------
# Bad input: one process (world of one), clear one-line errors, exit status 2.


def test_empty_prompt_set_is_refused(tiny_models, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, tmp_path / "run", data={"prompts": [str(empty)]})
    proc = run_cli("rlmt_megatron.cli.train", [str(cfg)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "empty.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_config_errors_name_the_field(tiny_models, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, tmp_path / "run", rollout={"samples_per_prompt": 1})
    proc = run_cli("rlmt_megatron.cli.train", [str(cfg), "optim.lr=-1", "algorithm.nme=grpo"])
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr and "algorithm.nme" in proc.stderr and "cfg.yaml" in proc.stderr


def _fault_run(mode, tiny_models, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, run={"total_steps": 1, "export_hf": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "tests/workers/rlmt_fault_worker.py", "--mode", mode, str(cfg)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    return proc, out


@pytest.mark.parametrize("mode, message", [("empty", "returned 6 empty responses"), ("nan_all", "all 6 rewards are NaN/inf")])
def test_untrainable_steps_stop_with_a_clear_error(mode, message, tiny_models, tmp_path):
    proc, _ = _fault_run(mode, tiny_models, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_some_nan_rewards_are_dropped_and_counted(tiny_models, tmp_path):
    proc, out = _fault_run("nan_some", tiny_models, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_metrics(out)[0]
    assert row["reward/nonfinite_count"] == 2  # samples 0 and 3 of 6
    samples = [json.loads(line) for line in (out / "samples" / "step_000001.jsonl").read_text().splitlines()]
    finite = [s["reward"] for s in samples if s["reward"] is not None]
    assert len(finite) == 4 and row["reward/mean"] == pytest.approx(sum(finite) / 4, abs=1e-9)
