"""The rlmt-train config: shipped recipes validate, overrides parse as YAML, errors name the field."""

from pathlib import Path

import pytest

from rlmt_megatron.errors import InputFileError
from rlmt_megatron.config.base import load_config, parse_overrides
from rlmt_megatron.config.rlmt import RLMTConfig, load_rlmt_config
from rlmt_megatron.trainer.supervised import SupervisedConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted((EXAMPLES / "rlmt").rglob("*.yaml"))  # rlmt/sft_warmstart.yaml, rlmt/{1node,4nodes}/*.yaml


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_validate(path):
    if path.name.startswith("sft"):
        cfg = load_config(path, cls=SupervisedConfig)
        assert cfg.optim.lr == 4e-6 and cfg.epochs == 2
        return
    cfg = load_rlmt_config(path)
    assert isinstance(cfg, RLMTConfig)
    assert cfg.rollout.temperature == 0.7 and cfg.rollout.max_new_tokens == 4096  # the paper's sampling
    assert cfg.data.max_prompt_tokens == 1024
    assert cfg.optim.total_steps == cfg.run.total_steps * (cfg.algorithm.updates_per_rollout if cfg.algorithm.name != "dpo" else 1)


RL_RECIPES = [p for p in RECIPES if not p.name.startswith("sft")]


@pytest.mark.parametrize("path", RL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_carry_the_papers_hyperparameters(path):
    """The paper's table (/work/shared/ARCHITECTURE.md) and the authors' released configs, restated."""
    algo, rest = path.stem.split("_", 1)
    start = "zero" if rest.endswith("_zero") else ("instruct" if "-instruct_" in rest else "base")
    think = not rest.endswith("_nothink")
    cfg = load_rlmt_config(path)
    a, r, f = cfg.algorithm, cfg.rollout, cfg.format
    assert a.name == algo and cfg.models.reward.endswith("Skywork-Reward-Llama-3.1-8B-v0.2")
    assert f.kind == ("zero" if start == "zero" else "warm_start" if think else "no_think")
    assert f.strict == (start == "instruct")  # strict answer extraction for instruct runs only
    assert cfg.optim.weight_decay == (1e-4 if algo == "dpo" else 0.01) and cfg.optim.clip_grad == 1.0
    if algo == "grpo":
        headline = start == "instruct" and think
        assert cfg.optim.lr == (3e-7 if start == "instruct" else 1e-6) and cfg.optim.lr_schedule == "constant"
        assert cfg.data.prompts_per_step == (128 if headline else 64) and r.samples_per_prompt == 8
        assert a.updates_per_rollout == (2 if headline else 1)  # authors: mini-batches of 64 prompts
        assert (a.kl_coef, a.kl_estimator, a.entropy_coef, a.clip_low, a.clip_high, a.dual_clip_c) == (
            0.001, "k3", 0.001, 0.2, 0.2, 3.0)
        assert a.advantage == "grpo" and a.aggregation == "token_mean" and cfg.run.total_steps == 120
    elif algo == "ppo":
        assert cfg.optim.lr == (3e-7 if start == "instruct" else 1e-6) and r.samples_per_prompt == 1
        assert (a.gamma, a.lam, a.value_clip, a.kl_coef) == (1.0, 1.0, 0.5, 0.0) and not cfg.needs_reference
        assert cfg.critic_optim.lr == 1e-5 and cfg.data.prompts_per_step == 64
    else:
        assert cfg.optim.lr == 3e-7 and cfg.optim.lr_schedule == "cosine" and cfg.optim.warmup_steps == 12
        assert (a.dpo_beta, a.dpo_mode, r.samples_per_prompt) == (0.1, "one_round", 8)
        assert cfg.run.total_steps == 234 and cfg.optim.total_steps == 234  # 2 epochs of 7.5K prompts / 64


def test_demo_configs_validate_with_the_demo_overrides():
    cfg = load_rlmt_config(EXAMPLES / "demo" / "grpo.yaml", ["models.policy=a", "models.reward=b", "data.prompts=[p.jsonl]",
                                                        "build.parallel.tp=2"])
    assert cfg.build.parallel.tp == 2 and cfg.format.strict
    for name in ("rm", "sft"):
        load_config(EXAMPLES / "demo" / f"{name}.yaml", ["model=m", "data=[d.jsonl]"], cls=SupervisedConfig)


def test_overrides_are_yaml_values():
    assert parse_overrides(["a.b=1e-6", "c=[x, y]", "d=true", "e=null", "f="]) == [
        ("a.b", 1e-6), ("c", ["x", "y"]), ("d", True), ("e", None), ("f", "")]
    with pytest.raises(InputFileError, match="expected key.sub=value"):
        parse_overrides(["novalue"])
    with pytest.raises(InputFileError, match="expected key.sub=value"):
        parse_overrides(["a..b=1"])


def test_errors_name_file_line_and_field(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  total_steps: 3\n  seed: [1\n")
    with pytest.raises(InputFileError, match=r"bad.yaml: line \d+, column \d+"):
        load_rlmt_config(bad_yaml)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("models: {policy: a, reward: b}\ndata: {prompts: [p]}\nrollout: {samples_per_prompt: 1}\n")
    with pytest.raises(InputFileError, match="samples_per_prompt must be >= 2"):
        load_rlmt_config(cfg)
    with pytest.raises(InputFileError) as e:
        load_rlmt_config(cfg, ["rollout.samples_per_prompt=4", "optim.lr=-1", "algorithm.nme=x"])
    assert "optim.lr" in str(e.value) and "algorithm.nme" in str(e.value) and "cfg.yaml" in str(e.value)
    with pytest.raises(InputFileError, match="models: Field required"):
        load_rlmt_config(None, ["data.prompts=[p]"])


def test_decaying_schedules_default_to_the_run_length():
    cfg = load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", "run.total_steps=50",
                             "algorithm.updates_per_rollout=2", "optim.lr_schedule=cosine"])
    assert cfg.optim.total_steps == 100 and cfg.critic_optim.total_steps == 100
    cfg = load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", "optim.total_steps=7"])
    assert cfg.optim.total_steps == 7


def test_impossible_engine_setups_fail_at_load_on_every_rank():
    base = ["models.policy=a", "models.reward=b", "data.prompts=[p]"]
    with pytest.raises(InputFileError, match="rollout.engine='hf'|engine 'hf'"):
        load_rlmt_config(None, base + ["rollout.placement=disaggregated"])
    with pytest.raises(InputFileError, match="cuda_ipc"):
        load_rlmt_config(None, base + ["weight_sync.transport=cuda_ipc"])
    with pytest.raises(InputFileError, match="checksum"):
        load_rlmt_config(None, base + ["rollout.engine=sglang", "rollout.sglang_url=http://x", "weight_sync.checksum=true"])


def test_kl_in_and_advantage_combinations_that_cannot_work_are_refused():
    base = ["models.policy=a", "models.reward=b", "data.prompts=[p]"]
    assert load_rlmt_config(None, base).algorithm.kl_in == "loss"
    for ok in (["algorithm.kl_in=reward", "algorithm.kl_coef=0"], ["algorithm.name=ppo", "algorithm.kl_in=reward"],
               ["algorithm.advantage=reinforce_pp", "algorithm.kl_in=reward"]):
        load_rlmt_config(None, base + ok)
    with pytest.raises(InputFileError, match="kl_in=reward .* dpo has neither"):
        load_rlmt_config(None, base + ["algorithm.name=dpo", "algorithm.kl_in=reward"])
    with pytest.raises(InputFileError, match="advantage=reinforce_pp applies to name=grpo only"):
        load_rlmt_config(None, base + ["algorithm.name=ppo", "algorithm.advantage=reinforce_pp"])
    with pytest.raises(InputFileError, match="samples_per_prompt must be >= 2"):
        load_rlmt_config(None, base + ["algorithm.advantage=rloo", "rollout.samples_per_prompt=1"])
