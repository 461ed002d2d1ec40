"""Bad input gives a clear error naming the file, field or constraint, never a deep traceback."""

import json
import shutil

import pytest

from helpers import run_cli
from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed.layout_checks import check_model_layout, check_world_size
from rlmt_megatron.errors import CheckpointError, InputFileError, LayoutError, UnsupportedArchitectureError
from rlmt_megatron.models.hf_config import load_hf_config, parse_hf_config


def copy_model(tiny_models, tmp_path, name="llama-policy"):
    dst = tmp_path / name
    shutil.copytree(tiny_models / name, dst)
    return dst


def test_missing_folder_and_config(tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_config(tmp_path / "nope")
    model = copy_model(tiny_models, tmp_path)
    (model / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_hf_config(model)


def test_corrupt_config_names_line(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    (model / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json: line 3"):
        load_hf_config(model)


def test_missing_field_and_wrong_type(tiny_models):
    cfg = json.loads((tiny_models / "llama-policy" / "config.json").read_text())
    del cfg["intermediate_size"]
    with pytest.raises(CheckpointError, match="'intermediate_size' is missing"):
        parse_hf_config(cfg, "x/config.json")
    cfg = json.loads((tiny_models / "llama-policy" / "config.json").read_text())
    cfg["num_hidden_layers"] = "4"
    with pytest.raises(CheckpointError, match="'num_hidden_layers' is '4', expected int"):
        parse_hf_config(cfg, "x/config.json")


def test_unknown_architecture_lists_supported(tiny_models):
    cfg = json.loads((tiny_models / "llama-policy" / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2'.*supported model types: llama, qwen2"):
        parse_hf_config(cfg, "x/config.json")
    cfg = json.loads((tiny_models / "llama-policy" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(UnsupportedArchitectureError, match="rope scaling type 'yarn'"):
        parse_hf_config(cfg, "x/config.json")


def test_transformers4_config_layout_is_read(tiny_models):
    """Hub files written by transformers 4.x keep rope_theta/rope_scaling at top level."""
    cfg = json.loads((tiny_models / "llama-policy" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    spec = parse_hf_config(cfg, "x/config.json")
    assert spec.rope_theta == 500000.0 and spec.rope_scaling.original_max_position_embeddings == 256


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (ParallelConfig(tp=2, pp=2), 6, "world size 6 is not divisible by tp\\*pp = 2\\*2 = 4"),
        (ParallelConfig(tp=1, sequence_parallel=True), 1, "sequence_parallel=true needs tp > 1"),
        (ParallelConfig(pp=1, vpp=2), 1, "vpp=2 .* needs pp >= 2"),
    ],
)
def test_world_size_constraints(parallel, world, message):
    with pytest.raises(LayoutError, match=message):
        check_world_size(parallel, world)


@pytest.mark.parametrize(
    "parallel, message",
    [
        (ParallelConfig(tp=8), "num_attention_heads=4 is not divisible by tp=8"),
        (ParallelConfig(tp=4), "num_key_value_heads=2 is not divisible by tp=4"),
        (ParallelConfig(pp=3), "num_hidden_layers=4 is not divisible by pp=3 = 3"),
        (ParallelConfig(pp=2, vpp=4), "num_hidden_layers=4 is not divisible by pp=2 \\* vpp=4 = 8"),
    ],
)
def test_model_layout_constraints(tiny_models, parallel, message):
    spec = load_hf_config(tiny_models / "llama-policy")
    with pytest.raises(LayoutError, match=message):
        check_model_layout(parallel, spec)


def test_cli_reports_truncated_safetensors_without_traceback(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3]}) + "\n")
    proc = run_cli("rlmt_megatron.cli.logprobs", ["--model", str(model), "--input", str(rows), "--out", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"error: {weights}: cannot be read as safetensors" in proc.stderr


def test_cli_reports_indivisible_layout(tiny_models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": [3]}) + "\n")
    proc = run_cli("rlmt_megatron.cli.logprobs", ["--model", str(tiny_models / "llama-policy"), "--tp", "2",
                                                  "--input", str(rows), "--out", str(tmp_path / "o.jsonl")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: world size 1 is not divisible by tp*pp = 2*1 = 2" in proc.stderr


def _load_single_process(model_dir, build):
    from rlmt_megatron.checkpoint.load import load_model

    return load_model(model_dir, "policy", build)


def test_missing_tensor_is_named(tiny_models, tmp_path, world_of_one):
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny_models, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.layers.2.mlp.up_proj.weight' is missing"):
        _load_single_process(model, world_of_one)


def test_unconsumed_tensor_is_an_error(tiny_models, tmp_path, world_of_one):
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny_models, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.9.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) have no place.*model\.layers\.9\.extra\.weight"):
        _load_single_process(model, world_of_one)


def test_shape_mismatch_is_named(tiny_models, tmp_path, world_of_one):
    model = copy_model(tiny_models, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 256  # weights say 384
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json and weights disagree"):
        _load_single_process(model, world_of_one)


def test_bad_jsonl_rows_name_file_and_line(tiny_models, tmp_path):
    from rlmt_megatron.cli.logprobs import encode_rows, load_tokenizer

    tok = load_tokenizer(tiny_models / "llama-policy")
    cases = {
        '{"messages": [{"role": "user", "content": "hi"}]}': "field 'response' is missing",
        '{"response": "x"}': "needs 'messages' or 'prompt_ids'",
        '{"prompt_ids": [1, 99999], "response": "x"}': r"prompt_ids\[1\] = 99999 is not a token id in \[0, 1024\)",
        '{"messages": [{"role": "user"}], "response": "x"}': r"messages\[0\] must be an object",
        '[1, 2]': "expected a JSON object, got list",
        '{"messages": ': "not valid JSON",
    }
    for line, message in cases.items():
        path = tmp_path / "rows.jsonl"
        path.write_text('{"prompt_ids": [1], "response_ids": [2]}\n\n' + line + "\n")
        with pytest.raises(InputFileError, match=f"{path}:3: {message}"):
            encode_rows(str(path), tok, 1024)


def test_unknown_architecture_class_is_refused(tiny_models, tmp_path):
    """A known model_type with an architecture class we have no head mapping for must not train silently."""
    model = copy_model(tiny_models, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FooBar"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.json: architecture 'FooBar' is not supported "
                       r"for model_type 'llama'; supported: LlamaForCausalLM, LlamaForSequenceClassification"):
        load_hf_config(model)


def test_invalid_override_is_named_instead_of_the_file(tiny_models, tmp_path):
    from helpers import write_train_config
    from rlmt_megatron.config.rlmt import load_rlmt_config

    path = write_train_config(tmp_path / "cfg.yaml", tiny_models, tmp_path / "out")
    with pytest.raises(InputFileError) as e:
        load_rlmt_config(path, ["optim.lr=-1"])
    assert str(e.value).splitlines()[0] == f"override optim.lr=-1: invalid configuration (1 problem(s); config file {path}):"
    # a bad value in the file itself still names the file
    path = write_train_config(tmp_path / "bad.yaml", tiny_models, tmp_path / "out", optim={"lr": -1})
    with pytest.raises(InputFileError, match=rf"^{path}: invalid configuration"):
        load_rlmt_config(path, ["run.seed=5"])
