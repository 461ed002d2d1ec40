"""rlmt_megatron.testing.demo_data, the one synthetic-data builder: the demo's sets have the
shape its docstring promises (checked row by row here, with the rules written out again), the
same seed writes the same bytes, and its command line (the package's and tools/'s) writes the
committed examples/data files byte for byte."""

import json
import re
import subprocess
import sys

import pytest

from helpers import REPO
from rlmt_megatron.testing.demo_data import make_demo_data

TURN = re.compile(r"<think>\n(.+)\n</think>\n\n(.+)", re.S)


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_sets_are_what_the_reward_model_and_sft_stages_need(tmp_path):
    files = make_demo_data(tmp_path, seed=0, sft_rows=40, pref_rows=40)
    sft = rows(files["sft"])
    assert len(sft) == 40
    for i, row in enumerate(sft):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        plan, answer = TURN.fullmatch(assistant["content"]).groups()
        assert plan.startswith("I should ")
        # helpful (several sentences) on even rows, a curt line of at most four words on odd ones
        assert (len(answer.split()) > 10) if i % 2 == 0 else (len(answer.split()) <= 4), (i, answer)
    prefs = rows(files["preferences"])
    assert len(prefs) == 40
    for i, p in enumerate(prefs):
        chosen, rejected = p["chosen"], p["rejected"]
        assert [m["role"] for m in p["messages"]] == ["user"] and len(chosen.split()) > 10
        kind = i % 4
        if kind == 0:  # curt
            assert len(rejected.split()) <= 4
        elif kind == 1:  # the chosen answer's words, shuffled
            assert sorted(rejected.split()) == sorted(chosen.split()) and rejected != chosen
        elif kind == 2:  # gibberish of the same length
            assert len(rejected) == len(chosen) and set(rejected) <= set("abcdefghijklmnopqrstuvwxyz0123456789 .,;!?<>/")
        else:  # what strict mode scores when the thinking delimiter is missing
            assert rejected == "[NULL]"


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    a, b, c = (make_demo_data(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for key in ("sft", "preferences"):
        assert a[key].read_bytes() == b[key].read_bytes()
        assert a[key].read_bytes() != c[key].read_bytes()
    assert len(rows(a["sft"])) == 256 and len(rows(a["preferences"])) == 512  # the demo's sizes


@pytest.mark.parametrize("command", [["-m", "rlmt_megatron.testing.demo_data", "--set", "bundled"],
                                     ["tools/make_synthetic_data.py"]])
def test_command_lines_rewrite_the_committed_bundled_files(command, tmp_path):
    proc = subprocess.run([sys.executable, *command, "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 64 prompts and 64 SFT rows to {tmp_path}"
    for name in ("synthetic_prompts.jsonl", "sft_thinking.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "examples" / "data" / name).read_bytes(), name


def test_demo_command_line(tmp_path):
    cmd = [sys.executable, "-m", "rlmt_megatron.testing.demo_data"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "--out is required for the demo sets" in proc.stderr
    proc = subprocess.run([*cmd, "--out", str(tmp_path), "--seed", "3"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"sft: {tmp_path / 'sft_thinking.jsonl'}",
                                        f"preferences: {tmp_path / 'preferences.jsonl'}"]
    want = make_demo_data(tmp_path / "direct", seed=3)
    for key in ("sft", "preferences"):
        assert (tmp_path / want[key].name).read_bytes() == want[key].read_bytes()
