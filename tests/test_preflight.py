"""rlmt-train checks its input files before building anything (trainer/preflight.py)."""

import json
import shutil

import pytest

from helpers import run_cli, write_train_config
from rlmt_megatron.config.rlmt import load_rlmt_config
from rlmt_megatron.errors import InputFileError, UnsupportedArchitectureError
from rlmt_megatron.trainer.preflight import check_inputs


def config(tmp_path, tiny_models, **sections):
    return load_rlmt_config(write_train_config(tmp_path / "cfg.yaml", tiny_models, tmp_path / "out", **sections))


def copy_model(tiny_models, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(tiny_models / name, dst)
    return dst


def test_good_inputs_pass(tiny_models, tmp_path):
    check_inputs(config(tmp_path, tiny_models))


@pytest.mark.parametrize("field", ["policy", "reward", "reference"])
def test_missing_model_folder_names_the_field(tiny_models, tmp_path, field):
    missing = tmp_path / "nope"
    with pytest.raises(InputFileError, match=rf"^models\.{field}: {missing} does not exist$"):
        check_inputs(config(tmp_path, tiny_models, models={field: str(missing)}))


def test_folder_without_config_json(tiny_models, tmp_path):
    rm = copy_model(tiny_models, tmp_path, "llama-rm")
    (rm / "config.json").unlink()
    with pytest.raises(InputFileError, match=rf"^models\.reward: {rm} has neither config\.json .* nor rlmt_model\.json"):
        check_inputs(config(tmp_path, tiny_models, models={"reward": str(rm)}))


def test_unsupported_architecture(tiny_models, tmp_path):
    rm = copy_model(tiny_models, tmp_path, "llama-rm")
    cfg = json.loads((rm / "config.json").read_text())
    cfg["architectures"] = ["FooBar"]
    (rm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=rf"^models\.reward: {rm}/config\.json: architecture 'FooBar'"):
        check_inputs(config(tmp_path, tiny_models, models={"reward": str(rm)}))


@pytest.mark.parametrize("field, name, what", [("policy", "llama-policy", "policy"), ("reward", "llama-rm", "reward model")])
def test_missing_tokenizer_says_which_files(tiny_models, tmp_path, field, name, what):
    model = copy_model(tiny_models, tmp_path, name)
    for f in model.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(InputFileError) as e:
        check_inputs(config(tmp_path, tiny_models, models={field: str(model)}))
    assert str(e.value) == (f"models.{field}: cannot load the {what} tokenizer: no tokenizer files "
                            f"(tokenizer.json / tokenizer_config.json) in {model}")


def test_roles_tokenizer_error_does_not_suggest_installing_packages(tiny_models, tmp_path):
    from rlmt_megatron.trainer.roles import _tokenizer

    model = copy_model(tiny_models, tmp_path, "llama-policy")
    (model / "tokenizer.json").unlink()  # tokenizer_config.json alone: transformers suggests sentencepiece
    with pytest.raises(InputFileError) as e:
        _tokenizer(str(model), "policy")
    assert "sentencepiece" not in str(e.value) and "tiktoken" not in str(e.value)
    assert str(e.value) == (f"cannot load the policy tokenizer from {model}: no tokenizer.json "
                            "(tokenizer_config.json alone does not define the vocabulary)")


def test_missing_prompt_file_names_its_index(tiny_models, tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text("{}\n")
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(InputFileError, match=rf"^data\.prompts\[1\]: {missing} does not exist$"):
        check_inputs(config(tmp_path, tiny_models, data={"prompts": [str(good), str(missing)]}))


def test_megatron_checkpoint_is_accepted_by_its_description(tiny_models, tmp_path):
    from rlmt_megatron.checkpoint.dist_ckpt import META_NAME
    from rlmt_megatron.trainer import preflight

    assert preflight.META_NAME == META_NAME
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in (tiny_models / "llama-policy").glob("tokenizer*"):
        shutil.copy(f, ckpt)
    hf = json.loads((tiny_models / "llama-policy" / "config.json").read_text())
    (ckpt / META_NAME).write_text(json.dumps({"role": "policy", "padded_vocab_size": 1024, "hf_config": hf}))
    check_inputs(config(tmp_path, tiny_models, models={"policy": str(ckpt)}))
    hf["architectures"] = ["FooBar"]
    (ckpt / META_NAME).write_text(json.dumps({"role": "policy", "padded_vocab_size": 1024, "hf_config": hf}))
    with pytest.raises(UnsupportedArchitectureError, match=rf"^models\.policy: {ckpt / META_NAME}: architecture 'FooBar'"):
        check_inputs(config(tmp_path, tiny_models, models={"policy": str(ckpt)}))


def test_train_cli_refuses_a_missing_prompt_file_before_building_models(tiny_models, tmp_path):
    missing = tmp_path / "missing.jsonl"
    cfg = write_train_config(tmp_path / "cfg.yaml", tiny_models, tmp_path / "out", data={"prompts": [str(missing)]})
    proc = run_cli("rlmt_megatron.cli.train", [str(cfg)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == f"error: data.prompts[0]: {missing} does not exist\n"
    assert proc.stdout == ""  # nothing from Megatron's model, DDP or optimizer setup came first
