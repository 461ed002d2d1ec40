"""benchmarks/gpu_suite.sh, run for real with a fake Python.

Without CUDA it must refuse cleanly. Past that check, every stage is run here with a stand-in
for ``python3``/``$PYTHON`` that records each call (argv, stdin, PYTHONPATH, WANDB_MODE) and
prints a line: the test then checks which install each situation triggers, the exact command
each stage runs (and that the benchmark's own parser accepts it with its GPU defaults), what
lands under $OUT, and that a failing benchmark fails the stage.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.sh"

FAKE_PYTHON = f'''#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if args[:1] == ["-"] else None
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"argv": args, "stdin": stdin, "PYTHONPATH": os.environ.get("PYTHONPATH"),
                        "WANDB_MODE": os.environ.get("WANDB_MODE")}}) + "\\n")
if args[:1] == ["-c"] and "megatron" in args[1]:
    sys.exit(1 if os.environ.get("FAKE_NO_MEGATRON") else 0)
if args[:1] in (["-c"], ["-"]) or args[:2] == ["-m", "pip"]:
    sys.exit(0)
print("fake benchmark ran:", " ".join(args))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''


@pytest.fixture
def suite(tmp_path):
    """Run the suite with the fake Python; returns (run, out, site) where run(stage, *args,
    **env) gives (CompletedProcess, recorded calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, site, pieces = tmp_path / "out", tmp_path / "site", tmp_path / "no_te_pieces"
    log = tmp_path / "calls.jsonl"

    def run(stage, *args, **env):
        log.write_text("")
        environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(out), "PYTHON": str(fake), "TE_SITE": str(site),
                   "TE_PIECES": str(pieces), "BASE_WHEELS": str(tmp_path / "base"), "FAKE_LOG": str(log), **env}
        proc = subprocess.run(["bash", str(SUITE), stage, *args], capture_output=True, text=True, env=environ,
                              timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return proc, calls

    return run, out, site


def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(SUITE), "train"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr


def test_install_when_megatron_is_there_updates_only_this_package(suite):
    run, out, site = suite
    proc, calls = run("logprobs")
    assert proc.returncode == 0, proc.stderr
    cuda_check, import_check, pip, versions, bench = calls
    assert cuda_check["argv"] == ["-c", "import torch; assert torch.cuda.is_available()"]
    assert import_check["argv"] == ["-c", "import megatron.core, pydantic"] and import_check["PYTHONPATH"] == str(site)
    assert pip["argv"] == ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), str(REPO)]
    assert versions["argv"] == ["-"] and "megatron-core" in versions["stdin"]
    # everything after the install runs with the installed site first and W&B off
    assert versions["PYTHONPATH"] == bench["PYTHONPATH"] == f"{site}:{REPO}"
    assert bench["WANDB_MODE"] == "disabled"


def test_install_from_the_wheels_leaves_transformer_engine_out(suite, tmp_path):
    run, out, site = suite
    base = tmp_path / "base"
    proc, calls = run("sync", FAKE_NO_MEGATRON="1")
    assert proc.returncode == 2 and f"{base} is missing" in proc.stderr
    assert [c["argv"][0] for c in calls] == ["-c", "-c"]  # nothing installed, no benchmark run
    base.mkdir()
    wheels = ["megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl", "pydantic-2.14.3-py3-none-any.whl",
              "transformer_engine-2.20.2-py3-none-any.whl"]
    for name in wheels:
        (base / name).write_bytes(b"")
    proc, calls = run("sync", FAKE_NO_MEGATRON="1")
    assert proc.returncode == 0, proc.stderr
    pip = next(c["argv"] for c in calls if c["argv"][:2] == ["-m", "pip"])
    assert pip[:9] == ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                       "--upgrade"]
    assert pip[9:11] == ["--target", str(site)]
    assert sorted(pip[11:]) == sorted([str(base / wheels[0]), str(base / wheels[1]), str(REPO)])


STAGES = {  # stage -> (the command after the interpreter, with $OUT as {out}; the log it tees to)
    "tests": (["-m", "pytest", "-q", "-s", "tests/gpu"], "tests.log"),
    "train": (["benchmarks/train_step.py", "--json", "{out}/train.json", "--write", "{out}/results.md"], "train.log"),
    "logprobs": (["benchmarks/logprob_pass.py", "--write", "{out}/results.md"], "logprobs.log"),
    "sync": (["benchmarks/weight_sync.py", "--write", "{out}/results.md"], "sync.log"),
    "grpo": (["benchmarks/grpo_step.py", "--json", "{out}/grpo.json", "--write", "{out}/results.md"], "grpo.log"),
    "fp8": (["benchmarks/fp8_parity.py", "--out-dir", "{out}", "--plot", "--write", "{out}/results.md"], "fp8.log"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_runs_its_benchmark_and_keeps_the_log(suite, stage):
    run, out, _ = suite
    extra = ["--seed", "3"] if stage != "tests" else ["-k", "parity"]
    proc, calls = run(stage, *extra)
    assert proc.returncode == 0, proc.stderr
    command, log = STAGES[stage]
    want = [a.format(out=out) for a in command] + extra
    assert calls[-1]["argv"] == want
    assert (out / log).read_text() == f"fake benchmark ran: {' '.join(want)}\n"
    assert proc.stdout == (out / log).read_text()  # tee: shown and kept


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "tests"])
def test_the_benchmark_accepts_the_command_the_stage_runs(suite, stage):
    run, out, _ = suite
    _, calls = run(stage)
    argv = calls[-1]["argv"]
    module = importlib.import_module("benchmarks." + Path(argv[0]).stem)
    args = module.parse_args(argv[1:], cuda=True)
    assert Path(args.write) == out / "results.md"


def test_a_failing_benchmark_fails_the_stage_and_an_unknown_stage_is_refused(suite):
    run, out, _ = suite
    proc, _ = run("grpo", FAKE_RC="3")
    assert proc.returncode == 3 and (out / "grpo.log").exists()
    proc, calls = run("warmup")
    assert proc.returncode == 2 and "unknown stage 'warmup'" in proc.stderr
    assert not any(c["argv"][:1] not in (["-c"], ["-"]) and c["argv"][:2] != ["-m", "pip"] for c in calls)


def test_the_tests_stage_has_gpu_tests_to_run():
    assert list((REPO / "tests" / "gpu").glob("test_*.py"))
