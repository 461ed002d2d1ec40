"""benchmarks/grpo_step.py: arguments, the phase arithmetic on hand-made metrics, and the script
end to end on CPU (a real rlmt-train run), its table checked against metrics.jsonl and the sample
files read here with json."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import grpo_step as gs
from helpers import REPO


def test_defaults_follow_the_device():
    cpu = gs.parse_args([], cuda=False)
    assert (cpu.models, cpu.prompts_per_step, cpu.samples, cpu.max_new_tokens, cpu.params_dtype, cpu.steps) == (
        "tiny", 2, 2, 8, "float32", 3)
    gpu = gs.parse_args([], cuda=True)
    assert (gpu.models, gpu.prompts_per_step, gpu.samples, gpu.max_new_tokens, gpu.params_dtype) == (
        "random", 16, 8, 512, "bfloat16")
    # the GPU policy is the ~0.5 B Llama shape the benchmark promises (count from transformers' own model)
    from benchmarks import common

    shapes = common.parameter_shapes(gpu.layers, gpu.vocab, **gs.random_shape(gpu))
    assert 0.45e9 < sum(math.prod(s) for s in shapes.values()) < 0.55e9
    given = gs.parse_args(["--samples", "4", "--prompts", "synthetic", "--override", "optim.lr=1e-7"], cuda=True)
    assert (given.samples, given.prompt_file, given.override) == (4, gs.SYNTHETIC_PROMPTS, ["optim.lr=1e-7"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "positive integer"),
    (["--steps", "two"], "positive integer"),
    (["--samples", "1"], "at least 2"),
    (["--override", "optim.lr"], "expected key.sub=value"),
    (["--override", "optim..lr=1"], "expected key.sub=value"),
    (["--prompts", "/no/such/prompts.jsonl"], "no such file"),
    (["--hidden", "100", "--heads", "12"], "not a multiple of --heads"),
    (["--heads", "12", "--kv-heads", "5"], "not a multiple of --kv-heads"),
    (["--models", "huge"], "invalid choice"),
])
def test_rejected_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        gs.parse_args(argv, cuda=False)
    assert message in capsys.readouterr().err


def test_wildchat_asked_for_but_absent(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gs, "WILDCHAT_PROMPTS", tmp_path / "absent.parquet")
    assert gs.parse_args([], cuda=False).prompt_file == gs.SYNTHETIC_PROMPTS  # auto falls back
    with pytest.raises(SystemExit):
        gs.parse_args(["--prompts", "wildchat"], cuda=False)
    assert "absent.parquet does not exist" in capsys.readouterr().err


def test_phase_arithmetic_on_known_numbers():
    # Step 2 lacks sync (counted as 0) and has a finer phase nested in train (never summed).
    rows = [
        {"step": 1, "timing/step": 10.0, "timing/rollout": 4.0, "timing/reward": 1.0, "timing/train": 3.0,
         "timing/sync": 0.5, "response/len_mean": 100.0},
        {"step": 2, "timing/step": 8.0, "timing/rollout": 3.0, "timing/reward": 1.0, "timing/train": 2.5,
         "timing/ref_logprobs": 1.0, "response/len_mean": 50.0},
        {"step": 3, "timing/step": 6.0, "timing/rollout": 2.0, "timing/reward": 1.0, "timing/train": 1.5,
         "timing/sync": 0.5, "timing/ref_logprobs": 0.5, "response/len_mean": 30.0, "skipped_update": 1.0},
    ]
    cols = gs.report(rows, rollouts_per_step=4)
    assert [c["label"] for c in cols] == ["step 1 (warm-up)", "step 2", "step 3", "mean of steps 2-3"]
    assert cols[0]["other_s"] == pytest.approx(1.5) and cols[0]["shares"]["rollout"] == pytest.approx(0.4)
    assert cols[1]["phases_s"] == {"rollout": 3.0, "reward": 1.0, "train": 2.5}  # the table shows sync 0
    assert cols[1]["other_s"] == pytest.approx(1.5) and cols[1]["finer_s"] == {"ref_logprobs": 1.0}
    mean = cols[3]
    assert mean["step_s"] == pytest.approx(7.0) and mean["phases_s"]["sync"] == pytest.approx(0.25)
    assert mean["other_s"] == pytest.approx(7.0 - (2.5 + 1.0 + 2.0 + 0.25))
    assert mean["response_tokens"] == pytest.approx((50 + 30) * 4 / 2)
    assert mean["generated_tokens_per_s"] == pytest.approx(160 / 2.5)   # tokens over rollout seconds
    assert mean["trained_tokens_per_s"] == pytest.approx(100 / 2.0)     # step 3 trained nothing
    assert mean["step_tokens_per_s"] == pytest.approx(160 / 7.0)
    text = gs.table(cols)
    assert "| ref_logprobs (within a phase above) | 0 | 0.0% | 1 | 12.5% |" in text
    assert "| sync | 0.5 | 5.0% | 0 | 0.0% | 0.5 | 8.3% | 0.25 | 3.6% |" in text
    with pytest.raises(SystemExit, match="step 4: no timing/step"):
        gs.report(rows + [{"step": 4}], 4)


def _table(stdout: str) -> dict[str, list[str]]:
    """The printed markdown table: row label -> its cells."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| phase |"))
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[start + 2:]]
    return {c[0]: c[1:] for c in cells}


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grpo_step.py"), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_end_to_end_tiny_models(tmp_path):
    work, report_md, report_json = tmp_path / "work", tmp_path / "bench.md", tmp_path / "numbers.json"
    proc = _run(["--steps", "3", "--prompts", "synthetic", "--workdir", str(work), "--json", str(report_json),
                 "--write", str(report_md)], tmp_path)
    rows = [json.loads(ln) for ln in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    table = _table(proc.stdout)
    phases = ["rollout", "reward", "train", "sync"]
    timing = {k for k in rows[0] if k.startswith("timing/")}
    finer = timing - {f"timing/{p}" for p in phases} - {"timing/step"}
    assert {f"timing/{p}" for p in phases} | {"timing/step"} <= timing
    assert {"timing/old_logprobs", "timing/update"} <= finer  # trainer/updates.py times them inside train
    for r in rows:  # the finer phases sit inside timing/train
        assert sum(r[k] for k in finer) <= r["timing/train"] + 1e-6
    rollouts = 2 * 2
    for i, r in enumerate(rows):
        seconds = lambda label: float(table[label][2 * i])  # noqa: E731
        share = lambda label: float(table[label][2 * i + 1].rstrip("%"))  # noqa: E731
        for p in phases:
            assert seconds(p) == pytest.approx(r[f"timing/{p}"], rel=1e-3)  # printed to 4 significant digits
            assert share(p) == pytest.approx(100 * r[f"timing/{p}"] / r["timing/step"], abs=0.05)
        other = r["timing/step"] - sum(r[f"timing/{p}"] for p in phases)
        assert seconds("other (step - phases above)") == pytest.approx(other, rel=1e-3, abs=1e-9)
        assert seconds("**step**") == pytest.approx(r["timing/step"], rel=1e-3)
        assert sum(share(p) for p in phases) + share("other (step - phases above)") == pytest.approx(100, abs=0.25)
        # response tokens from the sample files (each rollout's own count), not from the metric
        samples = [json.loads(ln) for ln in (work / "run" / "samples" / f"step_{r['step']:06d}.jsonl").read_text().splitlines()]
        assert len(samples) == rollouts
        tokens = sum(s["response_tokens"] for s in samples)
        assert float(table["response tokens"][2 * i]) == pytest.approx(tokens)
        assert float(table["generated tokens/s (rollout)"][2 * i]) == pytest.approx(tokens / r["timing/rollout"], rel=1e-3)
        assert float(table["trained response tokens/s (train)"][2 * i]) == pytest.approx(tokens / r["timing/train"], rel=1e-3)
    # the mean column is over steps 2-3 only (step 1 is warm-up)
    assert float(table["**step**"][6]) == pytest.approx((rows[1]["timing/step"] + rows[2]["timing/step"]) / 2, rel=1e-3)
    # exact numbers: phases + other add up to the step in float math
    cols = json.loads(report_json.read_text())["columns"]
    for c, r in zip(cols, rows):
        assert c["step_s"] == r["timing/step"] and c["phases_s"] == {p: r[f"timing/{p}"] for p in phases}
        assert math.isclose(math.fsum(c["phases_s"].values()) + c["other_s"], r["timing/step"], rel_tol=1e-12)
        assert math.isclose(math.fsum(c["shares"].values()), 1.0, rel_tol=1e-12)
    section = report_md.read_text()
    assert section.startswith("\n## RLMT GRPO step by phase, one CPU process (")
    assert "2 prompts x 2 samples per step, max 8 new tokens" in section and "synthetic_prompts.jsonl" in section
    assert "Command: `python benchmarks/grpo_step.py --steps 3 --prompts synthetic" in section
    assert "--write" not in section and "| **step** |" in section


def test_end_to_end_random_models_of_a_given_shape(tmp_path):
    # The GPU path (write_random_model + the reward model written here) at a tiny shape, one step:
    # the trainer accepts both folders and transformers reads them as the shape asked for.
    from transformers import AutoConfig, AutoModelForSequenceClassification

    work = tmp_path / "work"
    proc = _run(["--steps", "1", "--models", "random", "--layers", "2", "--hidden", "64", "--ffn", "96", "--heads", "4",
                 "--kv-heads", "2", "--vocab", "2048", "--samples", "2", "--max-new-tokens", "4", "--prompts",
                 "synthetic", "--workdir", str(work)], tmp_path)
    table = _table(proc.stdout)
    assert list(table["**step**"]) == [table["**step**"][0], "100.0%"]  # one column: the warm-up step
    rm = AutoModelForSequenceClassification.from_pretrained(str(work / "reward"))
    assert rm.config.num_labels == 1 and rm.score.weight.shape == (1, 64)
    assert rm.model.layers[1].mlp.gate_proj.weight.shape == (96, 64) and rm.model.embed_tokens.weight.shape == (2048, 64)
    n_rm = sum(p.numel() for p in rm.parameters())
    assert f"reward model {n_rm / 1e6:.1f} M" in proc.stdout
    policy = AutoConfig.from_pretrained(str(work / "policy"))
    assert (policy.num_hidden_layers, policy.hidden_size, policy.num_key_value_heads, policy.vocab_size) == (2, 64, 2, 2048)


def test_te_variant_without_transformer_engine_is_skipped_with_the_reason(tmp_path, capsys):
    from rlmt_megatron.models.layer_specs import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed here: the te variant would run")
    md = tmp_path / "bench.md"
    gs.main(["--attention", "te", "--workdir", str(tmp_path / "work"), "--write", str(md)])
    reason = "skipped: --attention te but Transformer Engine (transformer_engine) is not installed"
    assert reason in capsys.readouterr().out and reason in md.read_text()
    assert not (tmp_path / "work").exists()  # nothing was built or run
