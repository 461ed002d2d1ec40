"""Step time of the CPU demo's GRPO stage, synchronous against asynchronous rollouts, side by side.

  python benchmarks/async_step.py --demo runs/demo [--steps 12] [--engines 1] [--write docs/benchmarks.md]

``--demo``: a folder written by ``tools/run_demo.sh`` (its SFT policy ``sft/hf``, reward model
``rm/hf`` and GRPO prompts ``data/grpo_prompts.jsonl``). Both runs are the demo's GRPO config
(``examples/demo/grpo.yaml``: 8 prompts x 4 samples of up to 96 tokens, policy at TP=2 over two
torchrun processes) with the hf engine in its own process, checkpoints and the HF export off, the
same seed; the asynchronous one adds ``rollout.max_staleness=1`` (one-step-off-policy) and TIS.
Reported: the mean of ``timing/step`` and of its phases over the steps after the first (the first
is synchronous in both), and the ratio of the two step times. The step time includes what the
asynchronous run hides: the generation runs in the engine's process while the two ranks train.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

MODES = {
    "synchronous": [],
    "asynchronous (max_staleness 1, TIS)": ["rollout.max_staleness=1", "algorithm.rollout_correction.mode=tis"],
}
PHASES = ("step", "rollout", "reward", "train", "sync")


def run(demo: Path, out: Path, steps: int, engines: int, extra: list[str]) -> list[dict]:
    prompts = demo / "data" / "grpo_prompts.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rlmt_megatron.cli.train", str(common.REPO / "examples" / "demo" / "grpo.yaml"),
           f"run.out_dir={out}", f"models.policy={demo / 'sft' / 'hf'}", f"models.reward={demo / 'rm' / 'hf'}",
           f"data.prompts=[{prompts}]", "build.parallel.tp=2", f"run.total_steps={steps}", "run.save_every=0",
           "run.export_hf=false", "monitoring.wandb.mode=disabled", "rollout.engine_process=subprocess",
           f"rollout.engines={engines}", *extra]
    proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a folder written by tools/run_demo.sh")
    p.add_argument("--steps", type=common.positive_int, default=12)
    p.add_argument("--engines", type=common.positive_int, default=1)
    p.add_argument("--write", type=Path, help="append the results to this markdown file")
    a = p.parse_args(argv)
    for need in ("sft/hf", "rm/hf", "data/grpo_prompts.jsonl"):
        if not (a.demo / need).exists():
            raise SystemExit(f"error: {a.demo / need} is missing: give a folder written by tools/run_demo.sh")
    means = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (mode, extra) in enumerate(MODES.items()):
            rows = run(a.demo, Path(tmp) / f"mode_{i}", a.steps, a.engines, extra)[1:]
            means[mode] = {ph: sum(r.get(f"timing/{ph}", 0.0) for r in rows) / len(rows) for ph in PHASES}
            means[mode]["staleness"] = sum(r["rollout/staleness_mean"] for r in rows) / len(rows)
            print(mode, {k: round(v, 3) for k, v in means[mode].items()}, flush=True)
    sync_step = means["synchronous"]["step"]
    table = ["| rollouts | step (s) | rollout wait (s) | reward (s) | train (s) | sync (s) | staleness | vs synchronous |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, m in means.items():
        table.append(f"| {mode} | {m['step']:.2f} | {m['rollout']:.2f} | {m['reward']:.2f} | {m['train']:.2f} | "
                     f"{m['sync']:.2f} | {m['staleness']:.2f} | {m['step'] / sync_step:.2f}x |")
    text = (common.section_header("Synchronous vs asynchronous rollouts, the CPU demo's GRPO stage",
                                  "benchmarks/async_step.py", argv)
            + f"The demo's GRPO config at TP=2 (two processes), {a.engines} hf engine(s) in their own processes, "
            f"{a.steps} steps; means over steps 2-{a.steps}. In the asynchronous run, \"rollout wait\" is the part "
            "of the generation the training did not hide, and \"sync\" happens before the next launch.\n\n"
            + "\n".join(table) + "\n")
    print(text)
    common.append_section(a.write, text)


if __name__ == "__main__":
    main()
