"""tools/run_demo.sh and tools/run_parity_demo.sh: their torchrun launcher, run twice at once.

Each script launches its two-process jobs through one shell function, ``run2``. The test takes
that function's definition out of the script, runs it in bash for two jobs at the same time,
and each job waits until the other has formed its own two-rank world: with a port written into
the launcher, the second job cannot bind it (EADDRINUSE) and the test fails.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

WORKER = r'''
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert dist.get_world_size() == 2 and t.item() == 2.0, (dist.get_world_size(), t.item())
here, me = Path(sys.argv[1]), sys.argv[2]
if dist.get_rank() == 0:
    (here / f"up-{me}").write_text(os.environ["MASTER_PORT"])
deadline = time.time() + 120
while len(list(here.glob("up-*"))) < 2:  # both jobs alive at once, or this one gives up
    assert time.time() < deadline, "the other job never formed its world"
    time.sleep(0.2)
dist.barrier()
dist.destroy_process_group()
'''


def launcher(script: Path) -> str:
    """The ``run2() { ... }`` line: the script's only torchrun invocation."""
    text = script.read_text()
    assert text.count("torch.distributed.run") == 1, f"{script.name}: every torchrun launch goes through run2"
    (line,) = [ln for ln in text.splitlines() if re.match(r"run2\(\) \{.*\}$", ln)]
    return line


@pytest.mark.parametrize("script", ["run_demo.sh", "run_parity_demo.sh"])
def test_two_launches_at_once_each_get_their_own_port(script, tmp_path):
    definition = launcher(REPO / "tools" / script)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    jobs = [subprocess.Popen(["bash", "-c", f'set -euo pipefail; {definition}\nrun2 "$@"', "launch",
                              str(tmp_path / "worker.py"), str(tmp_path), name],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
            for name in ("a", "b")]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-4000:]
    ports = {(tmp_path / f"up-{name}").read_text() for name in ("a", "b")}
    assert len(ports) == 2  # two rendezvous, on two ports


def _demo_folder_step(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLMT_DEMO_FOLDER_ONLY": "1"}
    return subprocess.run(["bash", str(REPO / "tools" / "run_demo.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_run_demo_refuses_a_folder_it_did_not_make_and_clears_only_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = _demo_folder_step(foreign)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {foreign} exists and is not an empty folder made by tools/run_demo.sh "
                                   f"(no {foreign}/.rlmt_demo): give another folder, or empty or remove it yourself")
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # a new folder (or an empty one) is made and marked; a second run clears it
    demo = tmp_path / "demo"
    assert _demo_folder_step(demo).returncode == 0
    assert (demo / ".rlmt_demo").is_file()
    (demo / "grpo").mkdir()
    proc = _demo_folder_step(demo)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in demo.iterdir()) == [".rlmt_demo"]


# ---------------------------------------------------------------------------------------------
# run_demo.sh's output: a line before each stage, and no repeated library start-up notices


DEMO = REPO / "tools" / "run_demo.sh"
# The notices every command used to repeat (Megatron, Megatron-FSDP's logger, torch, autograd).
NOTICES = ("Transformer Engine and Apex are not installed", "Using Megatron-FSDP without Transformer Engine",
           "Detected Megatron Core", "is deprecated. Please use", "The .grad attribute of a Tensor")


def _in_demo_env(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` with the environment run_demo.sh sets up for its commands: the script's
    lines between the virtualenv set-up and the launcher, run by bash, then the command."""
    text = DEMO.read_text()
    env_part = text[text.index("tools/setup_env.sh"):text.index("\nrun2()")].split("\n", 1)[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run(["bash", "-c", f"set -euo pipefail\n{env_part}\n{command}"], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_demo_commands_print_no_library_start_up_notices(tiny_models, tmp_path):
    proc = _in_demo_env(f"python -m rlmt_megatron.testing.demo_data --out {tmp_path}/data", tmp_path)
    assert proc.returncode == 0, proc.stderr
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join((tmp_path / "data" / "preferences.jsonl").read_text().splitlines(True)[:16]))
    # The demo's own stage-2 command (one step here), which builds Megatron's DDP and optimizer.
    proc = _in_demo_env(f"rlmt-train-rm {REPO}/examples/demo/rm.yaml model={tiny_models}/llama-rm "
                        f"'data=[{prefs}]' out_dir={tmp_path}/rm", tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rlmt-train-rm finished" in proc.stdout + proc.stderr
    shown = [n for n in NOTICES if n in proc.stderr]
    assert not shown, proc.stderr[-4000:]


def test_demo_env_still_shows_other_warnings_and_errors(tmp_path):
    proc = _in_demo_env("python -c \"import warnings; warnings.warn('an unexpected problem'); "
                        "raise SystemExit('error: a real failure')\"", tmp_path)
    assert proc.returncode == 1
    assert "UserWarning: an unexpected problem" in proc.stderr and "error: a real failure" in proc.stderr


def test_run_demo_prints_a_line_before_each_stage(tmp_path):
    out = tmp_path / "demo"
    proc = _demo_folder_step(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"== RLMT CPU demo into {out}"  # before anything slow
    # Every slow command has its own stage line since the previous one (the script cannot run
    # in full here: it installs packages and trains for minutes).
    commands = ("tools/setup_env.sh", "rlmt_megatron.testing.tiny_models", "rlmt_megatron.testing.demo_data",
                "rlmt-train-rm ", "rlmt_megatron.testing.rm_accuracy", "rlmt-sft ", "run2 -m rlmt_megatron.cli.train",
                "rlmt-plot ")
    lines = DEMO.read_text().splitlines()
    stage_seen, order = False, []
    for line in lines:
        if line.startswith("stage \""):
            stage_seen = True
        for c in commands:
            if c in line and not line.lstrip().startswith("#") and not line.startswith("stage"):
                assert stage_seen, f"no stage line before: {line}"
                stage_seen = False
                order.append(c)
    assert order == list(commands)


def test_run_demo_summary_reports_the_rule_based_answer_quality(tmp_path):
    """The closing summary comes from testing/answer_quality.py (reward, format rate, the answers'
    rule-based quality and its rank correlation with the RM's scores), run on the GRPO folder."""
    lines = DEMO.read_text().splitlines()
    (summary,) = [ln for ln in lines if "rlmt_megatron.testing.answer_quality" in ln and not ln.startswith("#")]
    assert summary.strip() == 'python -m rlmt_megatron.testing.answer_quality "$out/grpo"'
    assert lines.index(summary) > max(i for i, ln in enumerate(lines) if ln.startswith("rlmt-plot "))
    proc = subprocess.run([sys.executable, "-m", "rlmt_megatron.testing.answer_quality", str(tmp_path),
                           "--answer", "Happy to help with the garden. Then check each step twice.", "--answer", "No."],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split("\t")[0] for ln in proc.stdout.splitlines()] == ["0.917", "0.000"]


def test_run_demo_trains_grpo_on_the_prompts_demo_data_writes_unless_told_otherwise(tmp_path):
    """GRPO's prompt file is the demo_data command's grpo_prompts.jsonl in the run folder, and
    RLMT_DEMO_PROMPTS replaces it: the script's own lines from the data command to the GRPO
    launch, run by bash with the commands recorded instead of run."""
    lines = DEMO.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("python -m rlmt_megatron.testing.demo_data"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("run2 -m rlmt_megatron.cli.train"))
    part = "\n".join(lines[start:end + 4])
    # the data command runs for real; the training and scoring commands do nothing
    fakes = ('python() { if [ "$2" = rlmt_megatron.testing.demo_data ]; then "$PY" "$@"; fi; }\n'
             'rlmt-train-rm() { :; }\nrlmt-sft() { :; }\nquiet() { cat; }\n'
             'run2() { printf "%s\\n" "$@" > "$out/grpo_args"; }\nstage() { :; }\n')
    for override in (None, str(tmp_path / "other.jsonl")):
        out = tmp_path / ("own" if override is None else "other")
        env = {k: v for k, v in os.environ.items() if k != "RLMT_DEMO_PROMPTS"}
        env.update(PY=sys.executable, PYTHONPATH=str(REPO), **({} if override is None else {"RLMT_DEMO_PROMPTS": override}))
        script = f"set -euo pipefail\nrepo={REPO}\nout={out}\n{fakes}{part}\n"
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        args = (out / "grpo_args").read_text().splitlines()
        want = out / "data" / "grpo_prompts.jsonl" if override is None else override
        assert f"data.prompts=[{want}]" in args, args
        assert (out / "data" / "grpo_prompts.jsonl").is_file()  # written either way
