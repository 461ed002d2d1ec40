"""The rlmt-train config: shipped recipes validate, overrides parse as YAML, errors name the field."""

from pathlib import Path

import pytest

from rlmt_megatron.errors import InputFileError
from rlmt_megatron.trainer.config import RLMTConfig, load_config, parse_overrides
from rlmt_megatron.trainer.supervised import SupervisedConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted((EXAMPLES / "rlmt").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    if path.name.startswith("sft"):
        cfg = load_config(path, cls=SupervisedConfig)
        assert cfg.optim.lr == 4e-6 and cfg.epochs == 2
        return
    cfg = load_config(path)
    assert isinstance(cfg, RLMTConfig)
    assert cfg.rollout.temperature == 0.7 and cfg.rollout.max_new_tokens == 4096  # the paper's sampling
    assert cfg.data.max_prompt_tokens == 1024
    assert cfg.optim.total_steps == cfg.run.total_steps


def test_demo_configs_validate_with_the_demo_overrides():
    cfg = load_config(EXAMPLES / "demo" / "grpo.yaml", ["models.policy=a", "models.reward=b", "data.prompts=[p.jsonl]",
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
        load_config(bad_yaml)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("models: {policy: a, reward: b}\ndata: {prompts: [p]}\nrollout: {samples_per_prompt: 1}\n")
    with pytest.raises(InputFileError, match="samples_per_prompt must be >= 2"):
        load_config(cfg)
    with pytest.raises(InputFileError) as e:
        load_config(cfg, ["rollout.samples_per_prompt=4", "optim.lr=-1", "algorithm.nme=x"])
    assert "optim.lr" in str(e.value) and "algorithm.nme" in str(e.value) and "cfg.yaml" in str(e.value)
    with pytest.raises(InputFileError, match="models: Field required"):
        load_config(None, ["data.prompts=[p]"])


def test_decaying_schedules_default_to_the_run_length():
    cfg = load_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", "run.total_steps=50",
                             "algorithm.updates_per_rollout=2", "optim.lr_schedule=cosine"])
    assert cfg.optim.total_steps == 100 and cfg.critic_optim.total_steps == 100
    cfg = load_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", "optim.total_steps=7"])
    assert cfg.optim.total_steps == 7


def test_impossible_engine_setups_fail_at_load_on_every_rank():
    base = ["models.policy=a", "models.reward=b", "data.prompts=[p]"]
    with pytest.raises(InputFileError, match="rollout.engine='hf'|engine 'hf'"):
        load_config(None, base + ["rollout.placement=disaggregated"])
    with pytest.raises(InputFileError, match="cuda_ipc"):
        load_config(None, base + ["weight_sync.transport=cuda_ipc"])
    with pytest.raises(InputFileError, match="checksum"):
        load_config(None, base + ["rollout.engine=sglang", "rollout.sglang_url=http://x", "weight_sync.checksum=true"])
