"""benchmarks/fp8_parity.py: the CPU run end to end (the loss falls on the Markov source from
ln(vocab); curves, table, plot and skipped rows), the statistics against float64 hand
computation on synthetic curves, the source's structure and entropy, and argument errors."""

import csv
import importlib.util
import math

import pytest
import torch

from benchmarks import fp8_parity as fp


def test_defaults_follow_the_device():
    gpu = fp.parse_args([], cuda=True)
    assert (gpu.layers, gpu.hidden, gpu.vocab, gpu.seq, gpu.steps) == (8, 1024, 32768, 1024, 300)
    assert gpu.recipes == ["bf16", "fp8-tensorwise", "fp8-delayed"] and gpu.reference == "bf16"
    assert gpu.warmup == 30 and gpu.final_window == 20
    cpu = fp.parse_args([], cuda=False)
    assert cpu.recipes == ["fp32"] and cpu.reference == "fp32" and cpu.device == "cpu"
    # the GPU recipes are the ones the brief names, on the TE spec, bf16 weights
    assert {r: (fp.RECIPES[r].params_dtype, fp.RECIPES[r].fp8, fp.RECIPES[r].backend) for r in gpu.recipes} == {
        "bf16": ("bfloat16", None, "te"), "fp8-tensorwise": ("bfloat16", "tensorwise", "te"),
        "fp8-delayed": ("bfloat16", "delayed", "te")}


@pytest.mark.parametrize("argv, message", [
    (["--recipes", "fp32,fp16"], "unknown recipe(s) ['fp16']"),
    (["--recipes", "fp32,fp32"], "each recipe once"),
    (["--reference", "bf16"], "--reference bf16 is not among --recipes fp32"),
    (["--steps", "0"], "positive integer"),
    (["--steps", "ten"], "positive integer"),
    (["--lr", "-1"], "positive number"),
    (["--steps", "10", "--final-window", "11"], "--final-window 11 is longer than --steps 10"),
    (["--steps", "10", "--final-window", "5", "--window", "20"], "--window 20 is longer than --steps 10"),
    (["--steps", "10", "--warmup", "10"], "--warmup must be in [0, --steps 10)"),
    (["--hidden", "60", "--heads", "8"], "--heads 8 must divide --hidden 60"),
    (["--heads", "4", "--kv-heads", "3"], "--kv-heads 3 must divide --heads 4"),
    (["--seq", "1"], "--seq must be at least 2"),
    (["--vocab", "8", "--branching", "8"], "--branching 8 must be smaller than --vocab 8"),
])
def test_rejected_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        fp.parse_args(argv, cuda=False)
    assert message in capsys.readouterr().err


def test_skip_reasons():
    assert fp.skip_reason("fp8-delayed", cuda=True, te_available=False) == "skipped: no transformer_engine"
    assert fp.skip_reason("bf16", cuda=False, te_available=True) == "skipped: needs a CUDA GPU"
    assert fp.skip_reason("fp8-tensorwise", cuda=True, te_available=True) is None
    assert fp.skip_reason("fp32", cuda=False, te_available=False) is None


# --------------------------------------------------------------------------- statistics

def synthetic(n):
    ref = [2.0 + 8.0 * math.exp(-t / 40.0) + 0.05 * math.sin(t) for t in range(n)]
    # ~1% wobble, plus an early transient (5% at step 0) that has died out in the trailing window
    fp8 = [r * (1.0 + 0.01 * math.cos(0.3 * t)) + 0.002 + 0.5 * math.exp(-t / 10.0) for t, r in enumerate(ref)]
    return ref, fp8


def test_statistics_equal_float64_hand_computation():
    n, window, final_window = 300, 100, 20
    ref, fp8 = synthetic(n)
    ref_s = [0.5] * 30 + [0.1 + 0.001 * (t % 7) for t in range(n - 30)]  # the first 10% are slow (compiling)
    fp8_s = [0.7] * 30 + [0.06 + 0.002 * (t % 5) for t in range(n - 30)]
    results = [{"recipe": "bf16", "losses": ref, "step_seconds": ref_s, "peak_gib": 1.0},
               {"recipe": "fp8-delayed", "losses": fp8, "step_seconds": fp8_s, "peak_gib": 1.1},
               {"recipe": "fp8-tensorwise", "skipped": "skipped: no transformer_engine"}]
    rows = fp.summarize(results, "bf16", window, final_window)

    # by hand, in float64 (Python floats)
    final_ref = math.fsum(ref[n - final_window:]) / final_window
    final_fp8 = math.fsum(fp8[n - final_window:]) / final_window
    gap = 0.0
    for t in range(n - window, n):
        gap = max(gap, abs(fp8[t] - ref[t]) / ref[t])
    rate_ref = (n - 30) / math.fsum(ref_s[30:])
    rate_fp8 = (n - 30) / math.fsum(fp8_s[30:])

    bf16, fp8_row, skipped = rows
    assert bf16["final"] == pytest.approx(final_ref, rel=1e-12)
    assert bf16["final_rel"] == 0.0 and bf16["max_rel_gap"] == 0.0 and bf16["speedup"] == pytest.approx(1.0)
    assert fp8_row["final"] == pytest.approx(final_fp8, rel=1e-12)
    assert fp8_row["final_rel"] == pytest.approx((final_fp8 - final_ref) / final_ref, rel=1e-9)
    assert fp8_row["max_rel_gap"] == pytest.approx(gap, rel=1e-12)
    assert fp8_row["steps_per_s"] == pytest.approx(rate_fp8, rel=1e-12)
    assert fp8_row["speedup"] == pytest.approx(rate_fp8 / rate_ref, rel=1e-12)
    assert "final" not in skipped and skipped["skipped"] == "skipped: no transformer_engine"
    # the gap is over the trailing window only, not the early transient
    assert 0.009 < fp8_row["max_rel_gap"] < 0.02 < max(abs(a - b) / b for a, b in zip(fp8, ref))


def test_statistics_without_a_reference_and_mismatched_curves():
    ref, fp8 = synthetic(50)
    rows = fp.summarize([{"recipe": "bf16", "skipped": "skipped: no transformer_engine"},
                         {"recipe": "fp8-delayed", "losses": fp8, "step_seconds": [0.1] * 50, "peak_gib": 1.0}],
                        "bf16", 10, 5)
    assert rows[1]["final"] == pytest.approx(math.fsum(fp8[-5:]) / 5)
    assert "final_rel" not in rows[1] and "max_rel_gap" not in rows[1]
    table = fp.table(rows, "bf16", 10, 5)
    assert "| bf16 | bfloat16, TE | skipped: no transformer_engine |" in table
    with pytest.raises(ValueError, match="50 and 49 steps"):
        fp.max_relative_gap(fp8, ref[:49], 10)


# --------------------------------------------------------------------------- data source

def test_markov_source_structure_and_entropy():
    src = fp.MarkovSource(vocab=300, branching=4, seed=3)
    # distinct successors in every row
    assert all(len(set(row.tolist())) == 4 for row in src.successors)
    # entropy rate by hand: p_k = (1/k) / (1 + 1/2 + 1/3 + 1/4)
    h = 1 + 1 / 2 + 1 / 3 + 1 / 4
    expected = -sum((1 / k / h) * math.log(1 / k / h) for k in range(1, 5))
    assert src.entropy_rate() == pytest.approx(expected, rel=1e-12)

    batch = src.batch(step=5, rows=64, length=512)
    assert torch.equal(batch, fp.MarkovSource(300, 4, 3).batch(5, 64, 512))  # a function of (seed, step)
    assert not torch.equal(batch, src.batch(6, 64, 512))
    # every transition is one of the table's, and the k-th successor is chosen with p_k
    prev, nxt = batch[:, :-1].reshape(-1), batch[:, 1:].reshape(-1)
    match = src.successors[prev] == nxt[:, None]
    assert bool(match.any(dim=1).all())
    freq = match.double().mean(dim=0)
    for k in range(4):
        assert freq[k].item() == pytest.approx((1 / (k + 1)) / h, abs=0.01)  # 32704 draws: sd ~0.003


# --------------------------------------------------------------------------- end to end on CPU

def test_cpu_run_loss_falls_and_outputs(tmp_path, capsys):
    steps = 8
    argv = ["--steps", str(steps), "--final-window", "3", "--window", "4", "--warmup", "0",
            "--recipes", "fp32,fp8-delayed", "--out-dir", str(tmp_path), "--plot", "--write", str(tmp_path / "b.md")]
    rows = fp.main(argv)
    out = capsys.readouterr().out
    fp32, fp8 = rows
    losses = fp32["losses"]
    assert len(losses) == steps and len(fp32["step_seconds"]) == steps
    # random init (N(0, 0.02) weights): the first loss is ln(vocab) up to a little
    assert losses[0] == pytest.approx(math.log(512), abs=0.1)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2  # learns the source
    assert fp32["final"] == pytest.approx(sum(losses[-3:]) / 3)
    expected_skip = "skipped: no transformer_engine" if importlib.util.find_spec("transformer_engine") is None \
        else "skipped: needs a CUDA GPU"
    assert fp8["skipped"] == expected_skip and expected_skip in out

    with (tmp_path / "fp8_parity_curves.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["step", "fp32"]
    assert [int(r[0]) for r in table[1:]] == list(range(1, steps + 1))
    assert [float(r[1]) for r in table[1:]] == losses
    assert (tmp_path / "fp8_parity_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = (tmp_path / "b.md").read_text()
    assert "## FP8 vs bf16 loss parity" in section and "| fp32 | float32, local/SDPA |" in section
    assert "--write" not in section and "loss floor 1.2425 nats" in section
