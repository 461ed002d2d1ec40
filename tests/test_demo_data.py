"""rlmt_megatron.testing.demo_data, the one synthetic-data builder: the demo's sets have the
shape its docstring promises (checked row by row here, with the rules written out again), the
same seed writes the same bytes, and its command line (the package's and tools/'s) writes the
committed examples/data files byte for byte. The GRPO prompts are the SFT set's asks on the
preference set's topics. The held-out preference set shares no answer, prompt
or sentence with the training sets, covers its eight kinds, and rm_accuracy.py scores it as
transformers' LlamaForSequenceClassification does."""

import difflib
import json
import re
import subprocess
import sys

import pytest

from helpers import REPO
from rlmt_megatron.testing.demo_data import (HELDOUT_CLOSE, HELDOUT_CURT, HELDOUT_OFF_TOPIC, HELDOUT_OPEN,
                                             HELDOUT_SEED, HELDOUT_TIPS, SALAD_WORDS, make_demo_data,
                                             make_heldout_preferences)

TURN = re.compile(r"<think>\n(.+)\n</think>\n\n(.+)", re.S)
GIBBERISH = "abcdefghijklmnopqrstuvwxyz0123456789 .,;!?<>/"  # the training noise's characters


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_sets_are_what_the_reward_model_and_sft_stages_need(tmp_path):
    files = make_demo_data(tmp_path, seed=0, sft_rows=40, pref_rows=40, degraded_rows=12)
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
    assert len(prefs) == 52 and {p["kind"] for p in prefs[40:]} == {"degraded"}  # checked on their own below
    prefs = prefs[:40]
    kinds = ("curt", "shuffled", "gibberish", "null", "phrase_loop", "cut_off", "unrelated", "jumble", "mangled")
    for i, p in enumerate(prefs):
        chosen, rejected = p["chosen"], p["rejected"]
        assert [m["role"] for m in p["messages"]] == ["user"] and len(chosen.split()) >= 4
        assert chosen.rstrip()[-1] in ".!" and p["kind"] == kinds[i % 9], (i, p)
        if p["kind"] == "curt":
            assert len(rejected.split()) <= 4
        elif p["kind"] == "shuffled":  # the chosen answer's words, shuffled
            assert sorted(rejected.split()) == sorted(chosen.split()) and rejected != chosen
        elif p["kind"] == "gibberish":  # of the same length
            assert len(rejected) == len(chosen) and set(rejected) <= set(GIBBERISH)
        elif p["kind"] == "null":  # what strict mode scores when the thinking delimiter is missing
            assert rejected == "[NULL]"
        elif p["kind"] == "phrase_loop":  # one to three of the answer's words, repeated
            words = rejected.split()
            period = next(n for n in (1, 2, 3) if words == words[:n] * (len(words) // n))
            assert len(words) // period >= 5 and " ".join(words[:period]) in chosen
        elif p["kind"] == "cut_off":  # a prefix of the answer that stops mid-sentence
            assert chosen.startswith(rejected) and len(rejected) < len(chosen) and rejected[-1] not in ".!?:"
        elif p["kind"] == "unrelated":  # coherent sentences that share no sentence with the answer
            assert rejected.endswith(".") and 2 <= rejected.count(". ") + 1 <= 4
            assert not set(re.split(r"(?<=\.) ", rejected)) & set(re.split(r"(?<=[.!]) ", chosen))
        elif p["kind"] == "jumble":  # words of the pools, not the answer's own order
            assert len(rejected.split()) == len(chosen.split()) and rejected.endswith(".") and rejected != chosen
        else:  # mangled: broken words; fewer or as many, and not the answer
            assert p["kind"] == "mangled" and len(rejected.split()) <= len(chosen.split()) and rejected != chosen


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    a, b, c = (make_demo_data(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    for key in ("sft", "preferences"):
        assert a[key].read_bytes() == b[key].read_bytes()
        assert a[key].read_bytes() != c[key].read_bytes()
    assert len(rows(a["sft"])) == 256 and len(rows(a["preferences"])) == 1008 + 336  # the demo's sizes
    assert a["grpo_prompts"].read_bytes() == c["grpo_prompts"].read_bytes()  # no seed: every ask on every topic
    # the held-out set has a seed of its own: the demo's seed does not change it
    assert a["heldout"].read_bytes() == b["heldout"].read_bytes() == c["heldout"].read_bytes()
    assert len(rows(a["heldout"])) == 9 * 48
    d, e = (make_heldout_preferences(tmp_path / f"h{seed}.jsonl", seed=seed) for seed in (HELDOUT_SEED, 5))
    assert d.read_bytes() == a["heldout"].read_bytes() and e.read_bytes() != d.read_bytes()


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
                                        f"preferences: {tmp_path / 'preferences.jsonl'}",
                                        f"heldout: {tmp_path / 'heldout_preferences.jsonl'}",
                                        f"grpo_prompts: {tmp_path / 'grpo_prompts.jsonl'}"]
    want = make_demo_data(tmp_path / "direct", seed=3)
    for key in ("sft", "preferences", "heldout", "grpo_prompts"):
        assert (tmp_path / want[key].name).read_bytes() == want[key].read_bytes()


def test_grpo_prompts_are_the_sft_sets_asks_on_the_preference_sets_topics(tmp_path):
    """The GRPO prompts, read with the trainer's own loader: every ask the SFT set uses about every
    topic the preference set uses, once each, so the policy meets the kind of prompt it was
    warm-started on and the RM the kind it was trained on."""
    from rlmt_megatron.data.prompts import load_prompt_set

    files = make_demo_data(tmp_path, sft_rows=256, pref_rows=1008)
    prompts = load_prompt_set(files["grpo_prompts"])
    assert len(prompts) == len(prompts.prompts) == 144 and {p.source for p in prompts} == {"demo"}
    assert all([m["role"] for m in p.messages] == ["user"] for p in prompts)
    grpo = [p.messages[0]["content"] for p in prompts]
    sft = {r["messages"][0]["content"] for r in rows(files["sft"])}
    pref = {r["messages"][0]["content"] for r in rows(files["preferences"])}
    # the asks and topics, recovered from the written SFT and preference prompts themselves
    asks = {"Can you help me plan ", "What should I do about ", "Give me advice on ", "How do I get ready for ",
            "Write a few tips about ", "I need ideas for "}

    def topics_of(texts):
        return {text[len(a):-1] for text in texts for a in asks if text.startswith(a)}

    split = {(a, text[len(a):-1]) for text in grpo for a in asks if text.startswith(a)}
    assert len(split) == len(set(grpo)) == 144  # each one ask and one topic, no prompt twice
    assert topics_of(grpo) == topics_of(pref) and len(topics_of(grpo)) == 24
    assert topics_of(sft) < topics_of(grpo) and len(topics_of(sft)) == 16  # 8 topics new to the policy
    assert sft < set(grpo) and pref <= set(grpo)


# ---------------------------------------------------------------------------------------------
# the held-out preference set (make_heldout_preferences) and its accuracy (rm_accuracy.py)

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def test_heldout_set_shares_no_answer_prompt_or_sentence_with_training(tmp_path):
    files = make_demo_data(tmp_path)  # the demo's own sizes and seed
    train_prompts = {m["content"] for r in rows(files["preferences"]) + rows(files["sft"]) + rows(files["grpo_prompts"])
                     for m in r["messages"] if m["role"] == "user"}
    train_answers = {r[k] for r in rows(files["preferences"]) for k in ("chosen", "rejected")}
    train_answers |= {TURN.fullmatch(r["messages"][1]["content"]).group(2) for r in rows(files["sft"])}
    train_text = "\n".join(train_answers)
    # the words of every training answer but the character-level noise (gibberish, mangled)
    worded = [r["chosen"] for r in rows(files["preferences"])] + [r["rejected"] for r in rows(files["preferences"])
                                                                  if r["kind"] not in ("gibberish", "mangled")]
    train_words = set(re.findall(r"[a-z]+", "\n".join(worded).lower()))
    held = rows(files["heldout"])
    assert {r["kind"] for r in held} == {"curt", "word_salad", "word_loop", "char_noise", "prompt_echo", "truncated",
                                         "off_topic", "garbled", "more_broken"}
    assert all(sum(r["kind"] == k for r in held) == 48 for k in {r["kind"] for r in held})
    for r in held:
        (user,) = r["messages"]
        assert user["content"] not in train_prompts
        assert r["chosen"] not in train_answers and r["rejected"] not in train_answers, r
    # every sentence the held-out answers are written with (the pools, topics filled in) is new
    pool = [s.format(t="X") for s in HELDOUT_OPEN] + list(HELDOUT_TIPS + HELDOUT_CLOSE + HELDOUT_OFF_TOPIC + HELDOUT_CURT)
    for sentence in pool:
        head = sentence.split("X")[0] if "X" in sentence else sentence
        assert head not in train_text, sentence
    assert not set(SALAD_WORDS) & train_words


def test_heldout_kinds_are_what_they_say(tmp_path):
    for r in rows(make_heldout_preferences(tmp_path / "h.jsonl", pairs_per_kind=16)):
        chosen, rejected, prompt = r["chosen"], r["rejected"], r["messages"][0]["content"]
        # chosen: the pools' opener (for this topic), tips and closer, numbered or dashed, nothing else
        topic = prompt_topic(prompt)
        if r["kind"] == "more_broken":  # the less broken of two versions of such an answer: below
            continue
        rest = chosen
        for unit in sorted([o.format(t=topic) for o in HELDOUT_OPEN] + list(HELDOUT_TIPS + HELDOUT_CLOSE), key=len,
                           reverse=True):
            rest = rest.replace(unit, "")
        assert re.fullmatch(r"[\s\d.-]*", rest), chosen
        words = rejected.split()
        if r["kind"] == "curt":
            assert rejected in HELDOUT_CURT
        elif r["kind"] == "word_salad":
            assert len(words) == len(chosen.split()) and {w.strip(".").lower() for w in words} <= set(SALAD_WORDS)
        elif r["kind"] == "word_loop":
            assert len(set(words)) == 1 and 8 <= len(words) <= 60
        elif r["kind"] == "char_noise":  # nothing of training's noise but the space
            assert 4 <= len(rejected) <= 400 and not (set(rejected) & set(GIBBERISH)) - {" "}
        elif r["kind"] == "prompt_echo":
            assert rejected == prompt
        elif r["kind"] == "truncated":
            assert chosen.startswith(rejected) and len(rejected) < len(chosen) and rejected[-1] not in ".!?:"
        elif r["kind"] == "off_topic":
            assert set(SENTENCE.split(rejected)) <= set(HELDOUT_OFF_TOPIC)
        else:  # garbled: the chosen answer's letters, mostly kept in order, a few changed
            assert r["kind"] == "garbled" and rejected != chosen
            assert difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).ratio() > 0.7


def prompt_topic(prompt):
    from rlmt_megatron.testing.demo_data import HELDOUT_ASKS, HELDOUT_TOPICS

    (topic,) = [t for t in HELDOUT_TOPICS if any(a.format(t=t) == prompt for a in HELDOUT_ASKS)]
    return topic


def test_accuracy_by_kind_counts_strict_wins():
    from rlmt_megatron.testing.rm_accuracy import accuracy_by_kind, accuracy_line

    pairs = [{"kind": "a"}, {"kind": "a"}, {"kind": "b"}, {}]
    acc = accuracy_by_kind(pairs, [1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 1.0, 6.0])  # a tie is not a win
    assert acc == {"overall": 0.5, "a": 0.5, "b": 1.0, "unlabelled": 0.0}
    assert accuracy_line(acc) == ("reward model held-out preference accuracy: 0.50 overall; "
                                  "per kind: a 0.50, b 1.00, unlabelled 0.00")


def test_rm_accuracy_scores_pairs_as_transformers_does(tiny_models, tmp_path):
    """The command the demo runs, on the untrained tiny RM: its scores (the project's rlmt-score
    path) against LlamaForSequenceClassification's, and the accuracy it prints from them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlmt_megatron.reward.rm_template import rm_input_ids
    from rlmt_megatron.testing.rm_accuracy import accuracy_by_kind, accuracy_line

    pairs = rows(make_heldout_preferences(tmp_path / "h.jsonl", pairs_per_kind=1))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rm = tiny_models / "llama-rm"
    proc = subprocess.run([sys.executable, "-m", "rlmt_megatron.testing.rm_accuracy", "--rm", str(rm), "--pairs",
                           str(tmp_path / "pairs.jsonl"), "--report", str(tmp_path / "acc.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    scored = rows(tmp_path / "pairs.scores.jsonl")
    assert [(s["pair"], s["side"], s["kind"]) for s in scored] == [
        (i, side, p["kind"]) for i, p in enumerate(pairs) for side in ("chosen", "rejected")]
    tok = AutoTokenizer.from_pretrained(str(rm))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm), dtype=torch.float32).eval()
    ref = {}
    for i, p in enumerate(pairs):
        for side in ("chosen", "rejected"):
            with torch.no_grad():
                ref[i, side] = model(torch.tensor([rm_input_ids(tok, p["messages"], p[side])])).logits[0, 0].item()
    for s in scored:
        assert abs(s["score"] - ref[s["pair"], s["side"]]) <= 1e-4, (s, ref[s["pair"], s["side"]])
    want = accuracy_by_kind(pairs, [ref[i, "chosen"] for i in range(len(pairs))],
                            [ref[i, "rejected"] for i in range(len(pairs))])
    assert json.loads((tmp_path / "acc.json").read_text()) == want
    assert proc.stdout.strip().splitlines()[-1] == accuracy_line(want)


# ---------------------------------------------------------------------------------------------
# graded breakage: the degraded training pairs, the held-out more_broken pairs, and the
# rule-based answer-quality judge (testing/answer_quality.py) the demo's summary reports

CLEAN = ("Sure, here is a simple plan for the garden. First, write down what you need. "
         "Then check each step twice. I hope this helps, and good luck!")
# Each form is one of the ways a tiny policy breaks an answer, applied to CLEAN by hand.
BROKEN_ONCE = {
    "word dropped": "Sure, here is a simple plan for the garden. First, write what you need. "
                    "Then check each step twice. I hope this helps, and good luck!",
    "fragment repeated": "Sure, here is a simple plan for the garden. First, write down what you need. "
                         "Then check each step check each step twice. I hope this helps, and good luck!",
    "junk inserted": "Sure, here is a simple plan for the garden. First, write down </think> what you need. "
                     "Then check each step twice. I hope this helps, and good luck!",
    "broken off": "Sure, here is a simple plan for the garden. First, write down "
                  "Then check each step twice. I hope this helps, and good luck!",
    "halves mixed": "Sure, here is a simple plan for the garden. First, write down each step twice. "
                    "I hope this helps, and good luck!",
    "sentence repeated": "Sure, here is a simple plan for the garden. First, write down what you need. "
                         "First, write down what you need. I hope this helps, and good luck!",
    "word cut short": "Sure, here is a simple plan for the garden. First, wri down what you need. "
                      "Then check each step twice. I hope this helps, and good luck!",
}
# CLEAN broken more and more: each line is the one before with more damage.
WORSE_AND_WORSE = [
    CLEAN,
    "Sure, here is a simple plan for the garden. First, write what you need. Then check each step twice. "
    "I hope this helps, and good luck!",
    "Sure, here is a simple plan for the garden. First, write what you need. Then check each step check each step "
    "twice. I hope this helps, and good luck!",
    "Sure, here is a simple plan for the garden. First, write what 42 you need. Then check each step check each step "
    "twice. I hope this he",
    "Sure, here is a simple for the garden. First, write what 42 you </think> Then check each step check each "
    "twi. I ho this he",
    "Sure, here is for the garden. Fir write what 42 you </think> Then chec each check each twi. I ho this he",
    "Sure, here for gar. Fir wri what 42 you </think> Th chec each check. I ho th he",
    "Sur, her fo gar. Fir wri wha 42 yo </think> Th chec eac chec. I ho th he",
]


def test_answer_quality_scores_a_clean_answer_high_and_each_broken_form_lower():
    from rlmt_megatron.testing.answer_quality import answer_quality

    assert answer_quality(CLEAN) == 1.0
    # other pool sentences, a numbered list, the held-out pools, any topic in the slot
    assert answer_quality("Happy to help with the mountain picnic. 1. Start early so nothing is rushed. "
                          "2. Pack the food the day before. Tell me how it goes.") == 1.0
    assert answer_quality("Of course! Let's break moving house into small pieces. Gather everything you need in "
                          "one place before you begin. Good luck, you will be fine.") == 1.0
    for form, text in BROKEN_ONCE.items():
        assert 0.3 < answer_quality(text) < 0.99, form
    # what is not a helpful answer earns nothing: [NULL], curt lines, common words, noise, other prose
    for text in ("[NULL]", "", "No.", "I do not know.", "a a a. the the. and a the", "xq zzv </think> 93 \ufffd",
                 "The cat slept all afternoon on the warm step. Snow fell on the hills last night."):
        assert answer_quality(text) == 0.0, text
    # one good sentence is part of an answer, not a whole one
    assert 0.3 < answer_quality("Happy to help with the garden.") < 0.6


def test_answer_quality_falls_with_every_added_damage():
    from rlmt_megatron.testing.answer_quality import answer_quality

    scores = [answer_quality(text) for text in WORSE_AND_WORSE]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] == 1.0 and scores[-1] < 0.1


def test_spearman_with_ties():
    from rlmt_megatron.testing.answer_quality import ranks, spearman

    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [0, 0, 0]) is None
    assert spearman([1, 2, 3, 4], [0, 0, 1, 1]) == pytest.approx(0.8944, abs=1e-4)


def test_degraded_pairs_prefer_the_less_broken_version(tmp_path):
    from rlmt_megatron.testing.answer_quality import answer_quality
    from rlmt_megatron.testing.demo_data import PREF_TOPICS

    files = make_demo_data(tmp_path, sft_rows=8, pref_rows=9, degraded_rows=96)
    prefs = rows(files["preferences"])
    deg = prefs[9:]
    assert len(deg) == 96 and {p["kind"] for p in deg} == {"degraded"}
    clean = 0
    for p in deg:
        (user,) = p["messages"]
        assert any(t in user["content"] for t in PREF_TOPICS)
        assert p["chosen"] != p["rejected"]
        # chosen is a helpful answer itself, or a lightly broken one; either way the judge ranks
        # it at least as high as the rejected one for nearly every pair
        clean += answer_quality(p["chosen"]) == 1.0
    agree = sum(answer_quality(p["chosen"]) > answer_quality(p["rejected"]) for p in deg) / len(deg)
    assert agree >= 0.85, agree
    assert 30 <= clean <= 66, clean  # about half are clean answers over broken ones
    # the rows before them are the nine kinds as they were: their own generator is untouched
    assert rows(make_demo_data(tmp_path / "b", sft_rows=8, pref_rows=9, degraded_rows=0)["preferences"]) == prefs[:9]


def test_heldout_more_broken_pairs_use_heldout_pools_only(tmp_path):
    from rlmt_megatron.testing.answer_quality import answer_quality
    from rlmt_megatron.testing.broken_text import DEGRADE_MARKUP
    from rlmt_megatron.testing.demo_data import HELDOUT_DEGRADE_POOLS, HELDOUT_KINDS

    held = rows(make_heldout_preferences(tmp_path / "h.jsonl", pairs_per_kind=24))
    assert [r["kind"] for r in held[:8 * 24]] == [HELDOUT_KINDS[i % 8] for i in range(8 * 24)]
    more = held[8 * 24:]
    assert len(more) == 24 and {r["kind"] for r in more} == {"more_broken"}
    assert not set(HELDOUT_DEGRADE_POOLS["markup"]) & set(DEGRADE_MARKUP)
    for r in more:
        prompt_topic(r["messages"][0]["content"])  # a held-out prompt
        assert r["chosen"] != r["rejected"]
        assert not any(m in r["rejected"] for m in DEGRADE_MARKUP)  # none of training's junk markup
    assert sum(answer_quality(r["chosen"]) > answer_quality(r["rejected"]) for r in more) >= 0.85 * len(more)


def test_summary_lines_report_reward_quality_and_their_correlation(tmp_path):
    from rlmt_megatron.testing.answer_quality import summary_lines

    run = tmp_path / "grpo"
    (run / "samples").mkdir(parents=True)
    metrics = []
    for step in range(1, 11):
        late = step > 5
        metrics.append({"step": step, "reward/mean": 1.0 + step, "format/ok_rate": 0.5 if not late else 1.0,
                        "rollout/logprob_diff_mean": 1e-7})
        samples = [{"answer": WORSE_AND_WORSE[-1 - i if late else -1], "reward": float(i), "format_ok": True}
                   for i in range(4)] + [{"answer": "[NULL]", "reward": -5.0, "format_ok": False}]
        (run / "samples" / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    first, second = summary_lines(run)
    assert first.startswith("reward/mean: first 2 steps +2.50 -> last 2 steps +10.50 (format-ok answers only "
                            "+1.50 -> +1.50); answer quality (rule-based, 0..1) ")
    assert "format/ok_rate 0.50 -> 1.00; engine vs trainer logprob diff (mean) 1.0e-07 at most" in first
    # the late samples' better answers got the higher rewards: a positive rank correlation
    assert second.startswith("RM score vs answer quality on the policy's samples of steps 1-2 and 9-10: Spearman +")
    assert "over the 16 format-ok answers" in second and "over all 20, [NULL] included" in second
