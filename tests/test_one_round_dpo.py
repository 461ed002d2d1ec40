"""One-round DPO trains two epochs over one fixed pair set (the authors' DPO): a prompt met again in
a later epoch gets back the responses the initial model gave it the first time. The groups are
recorded in the run folder, where a resumed run reads them back (``OneRoundStore``); the resume
itself is the loop's usual one (test_fault_campaign.py)."""

import json

from helpers import PROMPTS, read_metrics, run_cli
from helpers import write_train_config as write_config


def _groups(out, step: int) -> dict[str, list]:
    """prompt -> its responses at ``step`` (answer, reward, length), in sample order."""
    groups: dict[str, list] = {}
    for row in map(json.loads, (out / "samples" / f"step_{step:06d}.jsonl").read_text().splitlines()):
        groups.setdefault(row["prompt"], []).append((row["answer"], row["reward"], row["response_tokens"]))
    return groups


def test_later_epochs_train_on_the_first_epochs_samples(tiny_models, tmp_path):
    from rlmt_megatron.trainer.one_round import OneRoundStore

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:4]))  # 2 steps per epoch
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, algorithm={"name": "dpo", "dpo_mode": "one_round"},
                       data={"prompts": [str(prompts)], "prompts_per_step": 2},
                       run={"total_steps": 4, "export_hf": False, "deterministic": False})
    proc = run_cli("rlmt_megatron.cli.train", [str(cfg)])  # steps 1-2: epoch 0; steps 3-4: epoch 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]
    assert [r["rollout/recalled_prompts"] for r in rows] == [0, 0, 2, 2]
    sampled = _groups(out, 1) | _groups(out, 2)
    assert len(sampled) == 4
    for step in (3, 4):
        recalled = _groups(out, step)
        assert len(recalled) == 2
        for prompt, responses in recalled.items():
            assert responses == sampled[prompt], (step, prompt)
    assert all(r["dpo/pairs"] >= 1 and r["grad_norm"] > 0 for r in rows)  # every step trained
    # What a resumed run starts from: every prompt's group, read back from the run folder.
    store = OneRoundStore(out, resuming=True)
    assert len(store.groups) == 4
    assert sorted(r for g in store.groups.values() for r in (s["reward"] for s in g["samples"])) == sorted(
        r for group in sampled.values() for _, r, _ in group)
