"""Run monitoring: metrics.jsonl, TensorBoard, W&B (offline), sample dumps, progress, rlmt-plot.

References are independent of the code under test: the stdlib json parser, tensorboard's own
EventAccumulator, wandb's own reader of its .wandb log (``wandb leet inspect --json``), PIL for
the PNGs, and hand-computed expectations.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlmt_megatron.errors import InputFileError
from rlmt_megatron.monitoring import (
    MetricsLogger,
    MonitoringConfig,
    PhaseTimer,
    ProgressReporter,
    WandbConfig,
    read_metrics,
    resolve_wandb_mode,
    write_resolved_config,
    write_samples,
)

PLAIN = MonitoringConfig(tensorboard=False, wandb=WandbConfig(mode="disabled"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_jsonl_roundtrip_is_float64_exact_and_nonfinite_is_null(tmp_path):
    logged = {
        "reward/mean": 0.1 + 0.2,          # 0.30000000000000004: needs all 17 digits
        "kl": 1e-300,
        "lr": 2.0**-30,
        "grad_norm": np.float32(1.1),      # numpy scalar: its exact float64 value
        "loss/policy": torch.tensor(-3.25, dtype=torch.float64),
        "response/len_max": 4097,          # int -> float
        "entropy": float("nan"),
        "reward/max": float("inf"),
        "reward/min": float("-inf"),
    }
    with MetricsLogger(tmp_path, PLAIN, {}) as logger:
        logger.log(7, logged)
        logger.log(8, {"kl": 0.5})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    first, second = _lines(tmp_path / "metrics.jsonl")
    assert list(first) == ["step", "entropy", "grad_norm", "kl", "loss/policy", "lr", "response/len_max",
                           "reward/max", "reward/mean", "reward/min", "nonfinite_keys"]
    assert first["step"] == 7 and isinstance(first["step"], int)
    for key in ("reward/mean", "kl", "lr", "grad_norm", "loss/policy", "response/len_max"):
        assert first[key] == float(logged[key]), key  # exact equality, not approx
    assert first["grad_norm"] == float(np.float64(np.float32(1.1)))
    assert first["entropy"] is None and first["reward/max"] is None and first["reward/min"] is None
    assert first["nonfinite_keys"] == ["entropy", "reward/max", "reward/min"]
    assert second == {"step": 8, "kl": 0.5}


def test_metrics_rejects_reserved_and_non_numeric(tmp_path):
    with MetricsLogger(tmp_path, PLAIN, {}) as logger:
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 1.0})
        with pytest.raises(TypeError, match="metric 'note' = 'hi' is not a number"):
            logger.log(1, {"note": "hi"})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_not_writer_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", MonitoringConfig(), {"a": 1}, is_writer=False)
    logger.log(1, {"kl": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_resume_drops_later_steps_and_a_torn_line(tmp_path):
    with MetricsLogger(tmp_path, PLAIN, {}) as logger:
        for step in range(1, 6):
            logger.log(step, {"x": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a kill in the middle of writing step 6
        f.write('{"step": 6, "x": 6.')
    with MetricsLogger(tmp_path, PLAIN, {}, resume_from_step=3) as logger:
        assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        logger.log(4, {"x": 40.0})
        logger.log(5, {"x": 50.0})
    assert [(r["step"], r["x"]) for r in _lines(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # the atomic rewrite left no temp file


def test_fresh_run_moves_old_metrics_aside(tmp_path):
    with MetricsLogger(tmp_path, PLAIN, {}) as logger:
        logger.log(1, {"x": 1.0})
    with MetricsLogger(tmp_path, PLAIN, {}, resume_from_step=None) as logger:
        logger.log(1, {"x": 2.0})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 2.0}]
    assert _lines(tmp_path / "metrics.jsonl.prev") == [{"step": 1, "x": 1.0}]


def test_read_metrics_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x": \n{"step": 3}\n')
    with pytest.raises(InputFileError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"x": 2.0}\n')
    with pytest.raises(InputFileError, match=r"metrics\.jsonl:2: field 'step'"):
        read_metrics(path)


def test_write_resolved_config(tmp_path):
    import yaml

    cfg = {"run": {"out_dir": "runs/x", "seed": 3}, "algorithm": {"name": "grpo", "kl_coef": 1e-3}, "tags": ["a"]}
    path = write_resolved_config(tmp_path / "out", cfg)
    assert path == tmp_path / "out" / "config.yaml"
    assert yaml.safe_load(path.read_text()) == cfg


# ---------------------------------------------------------------------------------------------
# TensorBoard


def _tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tb_plugin_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The accumulator TensorBoard's Python data provider uses (scalars arrive as tensors)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(log_dir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def test_tensorboard_scalars_read_back_equal_and_resume_purges(tmp_path):
    cfg = MonitoringConfig(tensorboard=True, wandb=WandbConfig(mode="disabled"))
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"reward/mean": 0.1 * step, "kl": 1.0 / 3.0 + step})
    with MetricsLogger(tmp_path, cfg, {}, resume_from_step=2) as logger:
        logger.log(3, {"reward/mean": 0.7, "kl": 1e-9})
        logger.log(4, {"reward/mean": 0.8, "kl": 2e-9})
    # TensorBoard stores classic scalars as float32: the reference is numpy's float32 rounding.
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    expected = {
        "reward/mean": [(1, f32(0.1)), (2, f32(0.2)), (3, f32(0.7)), (4, f32(0.8))],
        "kl": [(1, f32(1.0 / 3.0 + 1)), (2, f32(1.0 / 3.0 + 2)), (3, f32(1e-9)), (4, f32(2e-9))],
    }
    assert _tb_scalars(tmp_path / "tensorboard") == expected
    assert _tb_plugin_scalars(tmp_path / "tensorboard") == expected


def test_tensorboard_fresh_run_hides_an_older_run(tmp_path):
    cfg = MonitoringConfig(tensorboard=True, wandb=WandbConfig(mode="disabled"))
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"x": 1.0})
    with MetricsLogger(tmp_path, cfg, {}) as logger:
        logger.log(1, {"x": 2.0})
    assert _tb_scalars(tmp_path / "tensorboard") == {"x": [(1, 2.0)]}
    assert _tb_plugin_scalars(tmp_path / "tensorboard") == {"x": [(1, 2.0)]}


# ---------------------------------------------------------------------------------------------
# Weights & Biases (offline, never network)


def test_resolve_wandb_mode():
    auto = WandbConfig()
    assert resolve_wandb_mode(auto, {}) == "offline"
    assert resolve_wandb_mode(auto, {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode(auto, {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode(WandbConfig(mode="disabled"), {"WANDB_API_KEY": "k"}) == "disabled"


def _wandb_records(run_file: Path) -> list[dict]:
    """wandb's own reader of its transaction log, one JSON record per line."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def test_wandb_offline_run_holds_history_and_config_and_resumes_same_id(tmp_path, offline_wandb):
    out = tmp_path / "run"
    cfg = MonitoringConfig(tensorboard=False, wandb=WandbConfig(project="rlmt-test", tags=["t1"]))
    run_config = {"algorithm": {"name": "grpo", "lr": 1e-6}, "seed": 3}
    with MetricsLogger(out, cfg, run_config) as logger:
        logger.log(1, {"reward/mean": 0.1 + 0.2, "kl": 0.5})
        logger.log(2, {"reward/mean": 0.25, "kl": 1.0 / 3.0})
    run_id = (out / "wandb_run_id").read_text().strip()
    (first,) = list((out / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    records = _wandb_records(first)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == run_id and run["project"] == "rlmt-test" and run["display_name"] == "run"
    assert {k: v for k, v in run["config"]["update"].items() if not k.startswith("_")} == run_config
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [(h["_step"], h["reward/mean"], h["kl"]) for h in history] == [(1, 0.1 + 0.2, 0.5), (2, 0.25, 1.0 / 3.0)]

    with MetricsLogger(out, cfg, run_config, resume_from_step=1) as logger:
        logger.log(2, {"reward/mean": 0.75, "kl": 0.0})
    assert (out / "wandb_run_id").read_text().strip() == run_id
    # wandb gives the resumed offline session its own folder, under the same run id
    assert len(list((out / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))) == 2
    records = _wandb_records(out / "wandb" / "latest-run" / f"run-{run_id}.wandb")
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == run_id and run["resume"] is True
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [(h["_step"], h["reward/mean"], h["kl"]) for h in history] == [(2, 0.75, 0.0)]


def test_wandb_fresh_run_gets_a_new_id(tmp_path, offline_wandb):
    out = tmp_path / "run"
    cfg = MonitoringConfig(tensorboard=False, wandb=WandbConfig(mode="offline", dir=str(tmp_path / "wb")))
    with MetricsLogger(out, cfg, {}) as logger:
        logger.log(1, {"x": 1.0})
    first = (out / "wandb_run_id").read_text().strip()
    with MetricsLogger(out, cfg, {}) as logger:
        logger.log(1, {"x": 1.0})
    second = (out / "wandb_run_id").read_text().strip()
    assert first != second
    assert {p.name for p in (tmp_path / "wb" / "wandb").glob("offline-run-*/*.wandb")} == {
        f"run-{first}.wandb", f"run-{second}.wandb"}


def test_wandb_absent(tmp_path, monkeypatch, caplog):
    from rlmt_megatron.errors import RLMTError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    auto = MonitoringConfig(tensorboard=False)
    with caplog.at_level("WARNING"), MetricsLogger(tmp_path / "a", auto, {}) as logger:
        logger.log(1, {"x": 1.0})  # the default mode: runs on without W&B
    assert "wandb is not installed" in caplog.text
    with pytest.raises(RLMTError, match="mode=offline needs the 'wandb' package"):
        MetricsLogger(tmp_path / "b", MonitoringConfig(tensorboard=False, wandb=WandbConfig(mode="offline")), {})


# ---------------------------------------------------------------------------------------------
# sample dumps


def _row(i: int, **over) -> dict:
    row = {"prompt": f"p{i}", "thinking": "t", "answer": "a", "reward": 0.5 * i, "format_ok": True,
           "response_tokens": 10 + i, "finish_reason": "stop", "weight_version": 3}
    row.update(over)
    return row


def test_samples_rows_first_k_and_nonfinite_reward(tmp_path):
    rows = [_row(0, reward=float("nan"), thinking=None, format_ok=False, prompt_source="set-a"),
            _row(1, finish_reason="length"), _row(2)]
    path = write_samples(tmp_path, 12, rows, first_k=2)
    assert path == tmp_path / "samples" / "step_000012.jsonl"
    got = _lines(path)
    assert len(got) == 2
    assert got[0] == {**_row(0, thinking=None, format_ok=False, reward=None), "reward_nonfinite": True,
                      "prompt_source": "set-a"}
    assert got[1] == _row(1, finish_reason="length")
    assert write_samples(tmp_path, 13, rows, first_k=0) is None
    assert len(_lines(write_samples(tmp_path, 14, rows))) == 3


def test_samples_validation_names_row_and_key(tmp_path):
    bad = _row(1)
    del bad["weight_version"]
    with pytest.raises(ValueError, match=r"step 5, row 1: missing key\(s\) weight_version"):
        write_samples(tmp_path, 5, [_row(0), bad])
    with pytest.raises(TypeError, match=r"row 0: 'response_tokens' = True"):
        write_samples(tmp_path, 5, [_row(0, response_tokens=True)])
    with pytest.raises(TypeError, match=r"row 0: 'prompt' = 3"):
        write_samples(tmp_path, 5, [_row(0, prompt=3)])
    assert not (tmp_path / "samples" / "step_000005.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# progress and phase timing


def test_progress_non_tty_prints_one_line_per_step():
    out = io.StringIO()  # isatty() is False, as for a SLURM log
    ticks = iter([0.0, 10.0, 20.0, 30.0])
    progress = ProgressReporter(total_steps=5, start_step=2, stream=out, clock=lambda: next(ticks))
    for step in (3, 4, 5):
        progress.update(step, {"reward/mean": 0.125 * step, "kl": float("nan"), "other": 1.0})
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 3/5 (60%) | elapsed 00:10 | eta 00:20 | reward/mean=0.375 kl=nan")
    assert lines[2].startswith("step 5/5 (100%) | elapsed 00:30 | eta 00:00")
    assert all("other" not in line and "\r" not in line for line in lines)


def test_progress_tty_draws_a_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    progress = ProgressReporter(total_steps=4, stream=out)
    for step in range(1, 5):
        progress.update(step, {"reward/mean": 1.0})
    progress.close()
    assert "\r" in out.getvalue() and "4/4" in out.getvalue() and "reward/mean=1" in out.getvalue()


def test_phase_timer_nested_repeated_and_cuda_sync(monkeypatch):
    ticks = iter([0.0, 1.0, 3.5, 4.0, 4.25, 10.0])
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(1))
    timer = PhaseTimer(cuda_sync=True, clock=lambda: next(ticks))
    with timer.phase("step"):            # 0.0 .. 10.0
        with timer.phase("rollout"):     # 1.0 .. 3.5
            pass
        with timer.phase("rollout"):     # 4.0 .. 4.25, added
            pass
    assert timer.metrics() == {"timing/rollout": 2.75, "timing/step": 10.0}
    assert len(synced) == 6  # both ends of each of the three phases

    ticks2 = iter([0.0, 2.0])
    timer = PhaseTimer(cuda_sync=False, clock=lambda: next(ticks2))
    with pytest.raises(RuntimeError):
        with timer.phase("train"):
            raise RuntimeError("boom")
    assert timer.metrics() == {"timing/train": 2.0} and len(synced) == 6


# ---------------------------------------------------------------------------------------------
# rlmt-plot


def _write_metrics(path: Path, n: int = 6) -> None:
    with MetricsLogger(path, PLAIN, {}) as logger:
        for step in range(1, n + 1):
            logger.log(step, {"reward/mean": math.sin(step), "kl": 0.01 * step, "loss/policy": 1.0 / step,
                              "timing/rollout": 2.0, "timing/train": 1.0,
                              "entropy": float("nan") if step == 3 else 1.5})


def _cli(argv, capsys):
    from rlmt_megatron.cli.plot import cli

    old = sys.argv
    sys.argv = ["rlmt-plot", *argv]
    try:
        with pytest.raises(SystemExit) as e:
            cli()
            raise SystemExit(0)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def _is_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path
    with Image.open(path) as im:
        return im.size


def test_plot_defaults_and_patterns(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _write_metrics(run)
    code, out, err = _cli([str(run)], capsys)
    assert code == 0, err
    written = [Path(p) for p in out.split()]
    # defaults that are present, in DEFAULT_PLOT_KEYS order, plus the grid
    assert [p.name for p in written] == ["reward_mean.png", "kl.png", "entropy.png", "loss_policy.png", "summary.png"]
    assert all(p.parent == run / "plots" for p in written)
    assert _is_png(written[0]) == (600, 400)  # figsize 6x4 in at 100 dpi
    assert _is_png(written[-1]) == (1350, 640)  # 3 x 2 grid of 4.5 x 3.2 in
    code, out, err = _cli([str(run / "metrics.jsonl"), "--keys", "timing/*,kl", "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert sorted(Path(p).name for p in out.split()) == ["kl.png", "summary.png", "timing_rollout.png", "timing_train.png"]
    for p in out.split():
        _is_png(Path(p))


def test_plot_user_errors_exit_2_with_clear_message(tmp_path, capsys):
    run = tmp_path / "run"
    _write_metrics(run, n=2)
    code, out, err = _cli([str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such file or directory" in err and "Traceback" not in err
    code, out, err = _cli([str(tmp_path)], capsys)
    assert code == 2 and "needs a metrics.jsonl" in err
    code, out, err = _cli([str(run), "--keys", "reward/mean,grad_nrom"], capsys)
    assert code == 2 and "no such key 'grad_nrom'; available: entropy, kl, loss/policy, reward/mean" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "kl": 1.0}\n{"step": 2, "kl": 1.0}\n{"step": 3, kl: 2}\n{"step": 4, "kl": 1.0}\n')
    code, out, err = _cli([str(bad)], capsys)
    assert code == 2 and f"{bad}:3: not valid JSON" in err and "Traceback" not in err


def test_plot_without_matplotlib_is_a_user_error(tmp_path, capsys, monkeypatch):
    _write_metrics(tmp_path, n=2)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = _cli([str(tmp_path)], capsys)
    assert code == 2 and "plotting needs matplotlib: pip install matplotlib" in err


def _write_lines(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("stage, row, want", [
    # What rlmt-sft and rlmt-train-rm log (runner/losses.py, trainer/supervised.py).
    ("sft", {"loss/sft": 2.0, "lr": 1e-5, "grad_norm": 0.5}, ["loss/sft", "grad_norm"]),
    ("rm", {"loss/rm": 0.7, "rm/accuracy": 0.5, "lr": 1e-5, "grad_norm": 0.5},
     ["loss/rm", "rm/accuracy", "grad_norm"]),
    # PPO: the critic's loss next to the policy's.
    ("ppo", {"reward/mean": 1.0, "loss/value": 0.3, "loss/policy": 0.1, "grad_norm": 0.5},
     ["reward/mean", "loss/policy", "loss/value", "grad_norm"]),
])
def test_plot_defaults_follow_the_stage(tmp_path, capsys, stage, row, want):
    from rlmt_megatron.monitoring.plot import select_keys

    path = _write_lines(tmp_path / stage / "metrics.jsonl",
                        [{"step": s, **{k: v * s for k, v in row.items()}} for s in (1, 2, 3)])
    assert select_keys(read_metrics(path), None, path) == want
    pytest.importorskip("matplotlib")
    code, out, err = _cli([str(path.parent)], capsys)
    assert code == 0, err
    assert [Path(p).name for p in out.split()] == [k.replace("/", "_") + ".png" for k in want] + ["summary.png"]
