"""The rlmt-train config: shipped recipes validate, overrides parse as YAML, errors name the field."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rlmt_megatron.errors import InputFileError
from rlmt_megatron.config.base import load_config, parse_overrides
from rlmt_megatron.config.rlmt import RLMTConfig, load_rlmt_config
from rlmt_megatron.trainer.supervised import SupervisedConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted((EXAMPLES / "rlmt").rglob("*.yaml"))  # rlmt/sft_*.yaml, rlmt/{1node,4nodes}/*.yaml


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_validate(path):
    if path.name.startswith("sft"):
        cfg = load_config(path, cls=SupervisedConfig)
        assert cfg.optim.lr == 4e-6 and cfg.epochs == 2
        return
    cfg = load_rlmt_config(path)
    assert isinstance(cfg, RLMTConfig)
    assert cfg.rollout.max_new_tokens == 4096  # the authors' data.max_response_length / MAX_TOKENS
    assert (cfg.rollout.temperature, cfg.rollout.top_p) in ((0.7, 1.0), (0.8, 0.95))
    assert cfg.optim.total_steps == cfg.run.total_steps * (cfg.algorithm.updates_per_rollout if cfg.algorithm.name != "dpo" else 1)
    # 2 epochs over the 7,544 prompts with the last partial batch dropped (4 for the Llama zero GRPO runs)
    epochs = 4 if cfg.algorithm.name == "grpo" and "llama3.1-8b-zero" in path.name else 2
    assert cfg.run.total_steps == epochs * (7544 // cfg.data.prompts_per_step)


RL_RECIPES = [p for p in RECIPES if not p.name.startswith("sft")]


def _load_make_recipes():
    spec = importlib.util.spec_from_file_location("make_recipes", EXAMPLES.parent / "tools" / "make_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE_RECIPES = _load_make_recipes()  # the one table of the paper's hyperparameters and layouts
TABLE = [(layout, model, start, thinking, algo) for layout in MAKE_RECIPES.LAYOUTS for model in MAKE_RECIPES.MODELS
         for start, (variants, _, _) in MAKE_RECIPES.STARTS.items() for thinking in variants
         for algo in MAKE_RECIPES.ALGORITHMS]


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("layout, model, start, thinking, algo", TABLE, ids=lambda v: str(v))
def test_recipes_carry_the_papers_hyperparameters(layout, model, start, thinking, algo):
    """Each shipped recipe, read by the trainer's config loader, holds every value the table in
    tools/make_recipes.py gives it (nothing dropped, renamed or defaulted on the way)."""
    path = EXAMPLES / "rlmt" / layout / MAKE_RECIPES.recipe_name(algo, model, start, thinking)
    cfg = load_rlmt_config(path)
    wanted = list(_leaves(MAKE_RECIPES.build(algo, model, start, thinking, layout)))
    assert len(wanted) > 30
    for keys, value in wanted:
        got = cfg
        for key in keys:
            got = got[key] if isinstance(got, dict) else getattr(got, key)
        assert got == value, f"{path.name}: {'.'.join(keys)} = {got!r}, the table says {value!r}"


def test_recipe_files_are_exactly_what_the_table_writes():
    written = MAKE_RECIPES.recipes()
    assert {p.resolve() for p in written} == {p.resolve() for p in RECIPES}  # no file missing, none extra
    assert len(written) == len(TABLE) + len(RECIPES) - len(RL_RECIPES)  # + the SFT warm-starts
    for path, text in written.items():
        assert path.read_bytes() == text.encode(), path.name
    proc = subprocess.run([sys.executable, "tools/make_recipes.py", "--check"], capture_output=True, text=True,
                          cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr


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


def test_micro_batch_budgets_live_in_the_batching_section():
    base = ["models.policy=a", "models.reward=b", "data.prompts=[p]"]
    cfg = load_rlmt_config(None, base + ["batching.train_tokens_per_microbatch=4096",
                                         "batching.logprob_tokens_per_microbatch=16384"])
    assert (cfg.batching.train_tokens_per_microbatch, cfg.batching.logprob_tokens_per_microbatch) == (4096, 16384)
    assert cfg.batching.max_samples_per_microbatch is None and cfg.reward.max_tokens_per_microbatch == 8192
    for moved in ("optim.max_tokens_per_microbatch=4096", "critic_optim.max_samples_per_microbatch=2"):
        with pytest.raises(InputFileError, match=moved.split("=")[0] + ": Extra inputs are not permitted"):
            load_rlmt_config(None, base + [moved])


def test_each_role_starts_from_its_own_folder_or_the_policys():
    from rlmt_megatron.config.rlmt import ModelsConfig

    shared = ModelsConfig(policy="p", reward="r")
    assert [shared.source(r) for r in ("policy", "reference", "critic", "reward")] == [
        ("models.policy", "p"), ("models.policy", "p"), ("models.policy", "p"), ("models.reward", "r")]
    own = ModelsConfig(policy="p", reward="r", reference="ref", critic="c")
    assert (own.source("reference"), own.source("critic")) == (("models.reference", "ref"), ("models.critic", "c"))


def test_supervised_warmup_ratio_and_overlong():
    from rlmt_megatron.trainer.supervised import supervised_optim

    base = ["model=m", "data=[d.jsonl]", "batch_size=16", "epochs=2"]
    cfg = load_config(None, base + ["warmup_ratio=0.1"], cls=SupervisedConfig)
    optim = supervised_optim(cfg, 6001)  # ceil(6001 / 16) = 376 steps per epoch
    assert optim.total_steps == 752 and optim.warmup_steps == 76  # ceil(0.1 x 752), the HF Trainer's rounding
    assert supervised_optim(load_config(None, base, cls=SupervisedConfig), 6001).warmup_steps == 0
    assert cfg.overlong == "drop" and cfg.tokenizer is None
    with pytest.raises(InputFileError, match="warmup_ratio and optim.warmup_steps"):
        load_config(None, base + ["warmup_ratio=0.1", "optim.warmup_steps=5"], cls=SupervisedConfig)
    with pytest.raises(InputFileError, match="warmup_ratio"):
        load_config(None, base + ["warmup_ratio=1.5"], cls=SupervisedConfig)
    with pytest.raises(InputFileError, match="overlong"):
        load_config(None, base + ["overlong=cut"], cls=SupervisedConfig)
