"""Synthetic data that makes the CPU demo's tiny models meaningful.

A randomly initialised reward model scores noise, so GRPO against it would show nothing. The demo
therefore builds, with the project's own trainers:

1. an SFT warm-start set in the paper's thinking format (``<think>\\n{plan}\\n</think>\\n\\n{answer}``)
   whose answers come in two styles, half *helpful* (acknowledge, give steps, close politely)
   and half *curt* (a short refusal-like line);
2. a preference set in which the helpful answer to a prompt is chosen over a curt one, over
   the same words shuffled, over gibberish of similar length, and over the strict-mode
   ``[NULL]`` answer (so neither length nor vocabulary alone earns reward: a tiny RM trained
   only on helpful-vs-curt rewards any long string, and GRPO then learns to babble).

The reward model learns "coherent helpful beats everything else" from (2); the warm-started
policy samples both styles; GRPO should then move the policy towards the helpful style, so the
demo's reward curve rises for a reason one can state. Everything is generated from a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlmt_megatron.thinking import warm_start_text

TOPICS = ("the garden", "a birthday party", "my homework", "the weekly budget", "a short trip", "the old bicycle",
          "a job interview", "the science fair", "a rainy weekend", "the team meeting", "a new recipe",
          "the school play", "a noisy neighbour", "the morning run", "a lost key", "the city library")
ASKS = ("Can you help me plan {t}?", "What should I do about {t}?", "Give me advice on {t}.",
        "How do I get ready for {t}?", "Write a few tips about {t}.", "I need ideas for {t}.")
PLAN_STEPS = ("understand what the user wants", "list the main steps", "keep the answer short and clear",
              "think about what could go wrong", "pick the most useful advice", "end with a kind note")
HELPFUL_OPEN = ("Sure, here is a simple plan for {t}.", "Happy to help with {t}.", "Good question about {t}.")
HELPFUL_STEPS = ("First, write down what you need.", "Next, pick a time and ask a friend to help.",
                 "Then check each step twice.", "Keep a small list and tick items off.",
                 "Take a short break when you feel tired.", "Ask for feedback at the end.")
HELPFUL_CLOSE = ("I hope this helps, and good luck!", "Let me know if you want more ideas.",
                 "You can do this, have a great day!")
CURT = ("No.", "I do not know.", "Figure it out.", "Not my problem.", "Maybe. Whatever.", "Ask someone else.")


def prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(TOPICS)
    return rng.choice(ASKS).format(t=topic), topic


def thinking(rng: random.Random) -> str:
    steps = rng.sample(PLAN_STEPS, k=rng.randint(2, 3))
    return " ".join(f"I should {s}." for s in steps)


def helpful_answer(rng: random.Random, topic: str) -> str:
    body = " ".join(rng.sample(HELPFUL_STEPS, k=rng.randint(2, 3)))
    return f"{rng.choice(HELPFUL_OPEN).format(t=topic)} {body} {rng.choice(HELPFUL_CLOSE)}"


def curt_answer(rng: random.Random) -> str:
    return rng.choice(CURT)


def shuffled(rng: random.Random, text: str) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def gibberish(rng: random.Random, length: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 .,;!?<>/"
    return "".join(rng.choice(letters) for _ in range(length))


def rejected_answer(rng: random.Random, kind: int, chosen: str) -> str:
    if kind == 0:
        return curt_answer(rng)
    if kind == 1:
        return shuffled(rng, chosen)
    if kind == 2:
        return gibberish(rng, len(chosen))
    return "[NULL]"  # what strict mode scores when the thinking delimiter is missing


def make_demo_data(out_dir: str | Path, seed: int = 0, sft_rows: int = 256, pref_rows: int = 512) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sft, prefs = [], []
    for i in range(sft_rows):
        ask, topic = prompt(rng)
        answer = helpful_answer(rng, topic) if i % 2 == 0 else curt_answer(rng)
        sft.append({"messages": [{"role": "user", "content": ask},
                                 {"role": "assistant", "content": warm_start_text(thinking(rng), answer)}]})
    for i in range(pref_rows):
        ask, topic = prompt(rng)
        chosen = helpful_answer(rng, topic)
        prefs.append({"messages": [{"role": "user", "content": ask}],
                      "chosen": chosen, "rejected": rejected_answer(rng, i % 4, chosen)})
    files = {"sft": out / "sft_thinking.jsonl", "preferences": out / "preferences.jsonl"}
    for key, rows in (("sft", sft), ("preferences", prefs)):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return files


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for name, path in make_demo_data(a.out, a.seed).items():
        print(f"{name}: {path}")
