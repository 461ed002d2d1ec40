"""rlmt-generate: bad inputs are one line and exit status 2; the position limit; every flag documented."""

import argparse
import json
import shutil

import pytest

from helpers import run_cli


def copy_model(tiny_models, tmp_path, name="llama-policy"):
    dst = tmp_path / name
    shutil.copytree(tiny_models / name, dst)
    return dst


def prompts(tmp_path, texts=("Say hello.", "Plan a picnic for four people in the park.")):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    return path


def generate(model, inputs, tmp_path, *extra):
    return run_cli("rlmt_megatron.cli.generate", ["--model", str(model), "--input", str(inputs),
                                                  "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "8", *extra])


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_truncated_safetensors(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    line = one_line_error(generate(model, prompts(tmp_path), tmp_path))
    assert line.startswith(f"error: {weights}: cannot be read as safetensors")


def test_missing_tokenizer(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path)
    for f in model.glob("tokenizer*"):
        f.unlink()
    line = one_line_error(generate(model, prompts(tmp_path), tmp_path))
    assert line == f"error: cannot load the model tokenizer: no tokenizer files (tokenizer.json / tokenizer_config.json) in {model}"


def test_unsupported_architecture(tiny_models, tmp_path):
    model = copy_model(tiny_models, tmp_path, "qwen2-policy")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "mistral"  # transformers would build a different model from the same weights
    (model / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(generate(model, prompts(tmp_path), tmp_path))
    assert line.startswith(f"error: {model / 'config.json'}: model_type 'mistral'")


def test_prompt_plus_new_tokens_past_the_position_limit_is_refused(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from rlmt_megatron.thinking import ThinkingFormatConfig, build_prompt_ids

    model = copy_model(tiny_models, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    cfg["rope_parameters"]["original_max_position_embeddings"] = 32  # transformers warns when it exceeds the limit
    (model / "config.json").write_text(json.dumps(cfg))
    inputs = prompts(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(model))
    longest = max(len(build_prompt_ids([{"role": "user", "content": t}], tok, ThinkingFormatConfig(), 1024)[0])
                  for t in ("Say hello.", "Plan a picnic for four people in the park."))
    assert longest < 64
    line = one_line_error(generate(model, inputs, tmp_path, "--max-new-tokens", "100"))
    assert line == (f"error: the longest prompt ({longest} tokens, {inputs}:2) + --max-new-tokens 100 = {longest + 100} "
                    f"exceeds max_position_embeddings 64 in {model / 'config.json'}; lower --max-new-tokens to "
                    f"{64 - longest} or less, or --max-prompt-tokens")


def _parsers(module) -> list[argparse.ArgumentParser]:
    """The CLI's parser(s), as main() builds them: parse_args is stopped right where it is called."""
    seen = []

    class Stop(Exception):
        pass

    def capture(self, *a, **k):
        seen.append(self)
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Stop):
            module.main([])
    parsers = list(seen)
    for action in seen[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


@pytest.mark.parametrize("name", ["generate", "convert"])
def test_every_option_has_a_help_text(name):
    import importlib

    module = importlib.import_module(f"rlmt_megatron.cli.{name}")
    undocumented = [f"{parser.prog} {action.option_strings or action.dest}" for parser in _parsers(module)
                    for action in parser._actions
                    if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
                    and not (action.help and action.help.strip())]
    assert undocumented == []


def test_convert_dtype_help_says_what_conversion_does():
    """rlmt-convert keeps the source's dtype (cli/convert.declared_dtype); the shared layout
    options' text ("float32 on CPU, bfloat16 on GPU") describes the other CLIs, not it."""
    from rlmt_megatron.cli import convert

    helps = {parser.prog: action.help for parser in _parsers(convert)[1:] for action in parser._actions
             if "--dtype" in action.option_strings}
    assert len(helps) == 2 and all("on GPU" not in h for h in helps.values()), helps
    assert "torch_dtype" in helps["rlmt-convert hf-to-mcore"] and "stored with the checkpoint" in helps["rlmt-convert mcore-to-hf"]
    assert convert.declared_dtype({"torch_dtype": "bfloat16"}) == "bfloat16" and convert.declared_dtype({}) == "float32"
