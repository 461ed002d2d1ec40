"""Partial rollouts (``rollout.partial_tokens``, trainer/partial_rollouts.py).

The bookkeeping is checked against schedules derived by hand (which groups each step trains, the
weight version of every token, the rounds and draws), with a scripted generation that knows
each answer's length. Then a real run: a tiny GRPO policy whose end-of-sequence logit is scaled
up, so that its answers end after 1 to 8 tokens, trained with answers continued across syncs.
Checked there: answers whose tokens carry two versions, staleness within the cap, the metrics
recounted from the samples files, and a run stopped after its first step (groups in flight) and
resumed equal to the uninterrupted one bit for bit, so what is carried is kept in checkpoints.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_metrics, run_cli, write_train_config
from rlmt_megatron.data.prompts import Prompt
from rlmt_megatron.rollout.types import Generation
from rlmt_megatron.trainer.partial_rollouts import Answer, PartialRollouts

NEVER = 10**6  # an answer that never stops by itself: it ends at max_new_tokens


class Script:
    """Draws prompt ``serial`` in batches of ``batch``; the request for an answer is its prompt
    ([serial]) and its tokens so far, each token ``serial * 1000 + sample * 10 + position``, so
    every continuation names its answer. ``lengths[serial][sample]`` tokens end it with "stop"."""

    def __init__(self, lengths, batch: int, chunk: int):
        self.lengths, self.batch, self.chunk = lengths, batch, chunk
        self.next = 0
        self.version = 0

    def draw(self):
        out = [(Prompt([{"role": "user", "content": f"q{s}"}], None, "x.jsonl", s), [s], False)
               for s in range(self.next, self.next + self.batch)]
        self.next += self.batch
        return out

    def generate(self, requests, round_):
        firsts: dict = {}
        out = []
        for r in requests:
            serial, tokens = r[0], r[1:]
            sample = tokens[0] // 10 % 100 if tokens else firsts.setdefault(serial, iter(range(100))).__next__()
            length = self.lengths[serial][sample]
            new = [serial * 1000 + sample * 10 + p for p in range(len(tokens), min(len(tokens) + self.chunk, length))]
            stop = len(tokens) + len(new) == length
            out.append(Generation(0, 0, new, [-0.5] * len(new), "stop" if stop else "length", self.version))
        return out


def steps(partial: PartialRollouts, script: Script, count: int, want: int):
    """Run ``count`` steps (one sync after each); per step (serials trained, versions per answer, metrics)."""
    out = []
    for _ in range(count):
        groups, metrics = partial.collect(want, script.version, script.draw, script.generate)
        out.append(([g.serial for g in groups], [a.versions for g in groups for a in g.answers], metrics))
        script.version += 1
    return out


# 2 prompts a step x 2 answers, 2 tokens a round, answers of the full 8 tokens, S = 1: at most
# 2 x 2 groups in flight. Step 1 draws at rounds 0 and 1 (serials 0-3) and trains 0, 1 after 4
# rounds; each later step draws once and finishes the batch drawn a step before, in 1 or 3 rounds.
FULL_LENGTH_SCHEDULE = {
    "serials": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "versions": [[[0] * 8] * 4, [[0] * 6 + [1] * 2] * 4, [[1] * 2 + [2] * 6] * 4, [[2] * 6 + [3] * 2] * 4],
    "rounds, draws, continued, spanned, in flight": [(4, 2, 0, 0, 2), (1, 1, 4, 1, 2), (3, 1, 4, 1, 2), (1, 1, 4, 1, 2)],
}


def _schedule(got):
    return {"serials": [serials for serials, _, _ in got], "versions": [versions for _, versions, _ in got],
            "rounds, draws, continued, spanned, in flight": [
                (m["partial/rounds"], m["partial/drawn_batches"], m["partial/continued_samples"],
                 m["partial/max_syncs_spanned"], m["partial/in_flight_groups"]) for _, _, m in got]}


def test_answers_continue_across_syncs_on_the_schedule_derived_by_hand():
    lengths = {s: [NEVER, NEVER] for s in range(12)}
    partial = PartialRollouts(samples_per_prompt=2, max_new_tokens=8, max_syncs=1)
    assert _schedule(steps(partial, Script(lengths, batch=2, chunk=2), 4, want=2)) == FULL_LENGTH_SCHEDULE


def test_a_first_round_launched_ahead_takes_the_place_of_the_steps_first():
    # Each step after the first launches its first round ahead (first_round, as asynchronous
    # rollouts do while the previous step trains), here from the same weights: the same schedule.
    lengths = {s: [NEVER, NEVER] for s in range(12)}
    partial = PartialRollouts(samples_per_prompt=2, max_new_tokens=8, max_syncs=1)
    script, got = Script(lengths, batch=2, chunk=2), []
    for step in range(4):
        first = partial.first_round(2, script.draw) if step else None
        launched = None if first is None else (first, script.generate(first.requests, 0))
        groups, metrics = partial.collect(2, script.version, script.draw, script.generate, launched)
        got.append(([g.serial for g in groups], [a.versions for g in groups for a in g.answers], metrics))
        script.version += 1
    assert _schedule(got) == FULL_LENGTH_SCHEDULE


def test_an_answer_that_would_span_too_many_syncs_is_finished_and_trained_first():
    # One prompt a step, one answer each, 1 token a round, S = 1. Serial 1 never stops: begun in
    # step 2 (v1, 2 rounds: serial 2 is drawn in the second and ends at once), it is carried with 2
    # tokens; after step 3's first round (serial 3 drawn, ends at once) it would span 2 syncs, so
    # step 3 runs a second round, in which it ends (4 tokens), and trains it before serial 3, the
    # oldest first; serial 3 waits and step 4 trains it without generating.
    lengths = {0: [1], 1: [NEVER], 2: [1], 3: [1], 4: [1]}
    partial = PartialRollouts(samples_per_prompt=1, max_new_tokens=4, max_syncs=1)
    script = Script(lengths, batch=1, chunk=1)
    got = steps(partial, script, 2, want=1)
    state = json.loads(json.dumps(partial.state_dict()))  # what a checkpoint keeps
    got += steps(partial, script, 2, want=1)
    assert [serials for serials, _, _ in got] == [[0], [2], [1], [3]]
    assert [versions for _, versions, _ in got] == [[[0]], [[1]], [[1, 1, 2, 2]], [[2]]]
    assert [(m["partial/rounds"], m["partial/drawn_batches"], m["partial/waiting_groups"]) for _, _, m in got] == [
        (1, 1, 0), (2, 2, 0), (2, 1, 1), (0, 0, 0)]
    # the same two steps again from the saved state
    resumed = PartialRollouts(samples_per_prompt=1, max_new_tokens=4, max_syncs=1)
    resumed.load_state_dict(state)
    script.next, script.version = 3, 2
    assert steps(resumed, script, 2, want=1) == got[2:]


@pytest.fixture(scope="module")
def eos_prone_policy(tiny_models, tmp_path_factory):
    """The tiny Llama policy with its end-of-sequence row of the LM head scaled by 6: its answers
    end after 1 to 8 tokens (about half of them before 8)."""
    out = tmp_path_factory.mktemp("eos_prone") / "llama-policy"
    shutil.copytree(tiny_models / "llama-policy", out)
    weights = load_file(str(out / "model.safetensors"))
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    weights["lm_head.weight"][eos] *= 6
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _config(path, tiny_models, policy, out, total_steps, **rollout):
    cfg = write_train_config(path, tiny_models, out, run={"total_steps": total_steps, "save_every": 1},
                             models={"policy": str(policy), "reward": str(tiny_models / "llama-rm")},
                             optim={"lr": 1e-2}, data={"prompts_per_step": 4},
                             rollout={"samples_per_prompt": 2, "max_new_tokens": 8, "partial_tokens": 2, **rollout},
                             algorithm={"rollout_correction": {"mode": "tis"}})
    return [str(cfg)]


def _check_token_versions(out, steps: int, bound: int) -> list[dict]:
    """Every step's staleness metrics recounted from its samples' token versions (the weights
    step k trains are version k - 1); some answers carry two versions; none is more than
    ``bound`` updates stale. Returns the metric rows."""
    rows = read_metrics(out)
    samples = [[json.loads(line) for line in (out / "samples" / f"step_{s:06d}.jsonl").read_text().splitlines()]
               for s in range(1, steps + 1)]
    runs = [[tuple(map(tuple, r["token_versions"])) for r in step] for step in samples]
    assert any(len(v) == 2 for step in runs for v in step), runs
    for trained_at, (row, versions) in enumerate(zip(rows, runs)):
        tokens = [(v, k) for per_answer in versions for v, k in per_answer]
        total = sum(k for _, k in tokens)
        assert total == sum(r["response_tokens"] for r in samples[trained_at])
        assert row["rollout/off_policy_token_frac"] == pytest.approx(
            sum(k for v, k in tokens if v < trained_at) / total, abs=1e-12)
        assert row["rollout/staleness_max"] == max(trained_at - per_answer[0][0] for per_answer in versions) <= bound
        assert row["partial/continued_samples"] == sum(len(v) > 1 for v in versions)
        hist = {int(k.rsplit("/", 1)[1]): v for k, v in row.items() if k.startswith("rollout/staleness_hist/")}
        assert hist == pytest.approx({s: sum(k for v, k in tokens if trained_at - v == s) / total
                                      for s in range(int(row["rollout/staleness_max"]) + 1)}, abs=1e-12)
    return rows


def test_a_run_with_partial_rollouts_resumes_to_the_uninterrupted_run(eos_prone_policy, tiny_models, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run = run_cli("rlmt_megatron.cli.train", _config(tmp_path / "w.yaml", tiny_models, eos_prone_policy, whole, 3))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _check_token_versions(whole, 3, bound=1)  # synchronous: at most the one sync an answer may span
    assert rows[0]["partial/in_flight_groups"] > 0  # the cut below falls with groups in flight

    for total in (1, 3):  # one step, then resumed from its checkpoint to the third
        run = run_cli("rlmt_megatron.cli.train", _config(tmp_path / "c.yaml", tiny_models, eos_prone_policy, cut, total))
        assert run.returncode == 0, run.stderr[-3000:]
    drop = ("timing/", "memory/", "engines/0/tokens_per_s")
    assert read_metrics(cut, drop) == read_metrics(whole, drop)
    a, b = (load_file(str(d / "final_hf" / "model.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_asynchronous_partial_rollouts_launch_each_steps_first_round_ahead(eos_prone_policy, tiny_models, tmp_path):
    # One-step-off-policy (max_staleness 1): each step's first round runs on the engine while the
    # previous step trains, from weights one update older; a continued answer may be one more behind.
    out = tmp_path / "async"
    run = run_cli("rlmt_megatron.cli.train", _config(tmp_path / "a.yaml", tiny_models, eos_prone_policy, out, 3,
                                                     max_staleness=1, engine_process="subprocess"))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _check_token_versions(out, 3, bound=2)
    assert [r["rollout/staleness_hist/1"] > 0 for r in rows[1:]] == [True, True]  # the launched rounds' tokens


def test_partial_rollout_settings_that_cannot_work_are_refused_at_load():
    from rlmt_megatron.config.rlmt import RLMTConfig

    def config(**sections):
        tree = {"models": {"policy": "p", "reward": "r"}, "data": {"prompts": ["x.jsonl"]},
                "rollout": {"partial_tokens": 64, "max_new_tokens": 256},
                "algorithm": {"rollout_correction": {"mode": "tis"}}}
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        return RLMTConfig.model_validate(tree)

    assert config().rollout.partial_tokens == 64 and config().rollout.partial_max_syncs == 1
    with pytest.raises(ValueError, match=r"rollout.partial_tokens=64 \(partial rollouts\) must divide "
                                         r"rollout.max_new_tokens=200"):
        config(rollout={"max_new_tokens": 200})
    with pytest.raises(ValueError, match="set algorithm.rollout_correction.mode"):
        config(algorithm={"rollout_correction": {"mode": "none"}})
    with pytest.raises(ValueError, match="applies to grpo and ppo"):
        config(algorithm={"name": "dpo", "rollout_correction": {"mode": "none"}})
    with pytest.raises(ValueError, match="cannot be combined with algorithm.dynamic_sampling"):
        config(algorithm={"dynamic_sampling": {"enabled": True}})
    # with asynchronous rollouts, what those need too
    assert config(rollout={"max_staleness": 1, "engine_process": "subprocess"}).rollout.max_staleness == 1
    with pytest.raises(ValueError, match=r"needs the hf engine in its own process"):
        config(rollout={"max_staleness": 1})
    assert config(format={"kind": "zero"}).format.kind == "zero"  # its stop string is found across rounds


def test_a_stop_string_split_over_two_rounds_ends_the_answer_where_it_ends(tiny_models):
    # The zero format stops at "</response>". Split an answer's tokens before the string's last
    # token: the engine, searching only the second round's text, would not see it; the cut finds
    # where it ends.
    from transformers import AutoTokenizer

    from rlmt_megatron.thinking.templates import ThinkingFormatConfig
    from rlmt_megatron.trainer.step_rollouts import stop_string_cut

    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    ids = tok("<response>Go north.</response> and then some", add_special_tokens=False)["input_ids"]
    ends = next(k for k in range(1, len(ids) + 1) if "</response>" in tok.decode(ids[:k]))
    split = ends - 1
    assert "</response>" not in tok.decode(ids[split:])  # the second round alone does not hold it
    cut = stop_string_cut(ThinkingFormatConfig(kind="zero"), tok)
    assert cut(ids[:split], ids[split:]) == 1  # keep the string's last token, drop the rest
    assert cut(ids[:split - 1], ids[split - 1:split]) is None  # not complete yet
    assert stop_string_cut(ThinkingFormatConfig(), tok) is None  # the chat formats stop on tokens
    # in an answer: the round's tokens after the string are dropped and the answer is finished
    answer = Answer(list(ids[:split]), [0.0] * split, [0] * split)
    answer.add(Generation(0, 0, ids[split:], [-1.0] * (len(ids) - split), "length", 1), 64, cut)
    assert answer.tokens == ids[:ends] and answer.finish == "stop" and answer.versions == [0] * split + [1]
