"""Seeded synthetic data: the bundled sets in ``examples/data`` and the CPU demo's training sets.

One builder for both; every set comes from a seed and the same seed writes byte-identical files.
Assistant turns use the warm-start format ``<think>\\n{plan}\\n</think>\\n\\n{answer}``
(``rlmt_megatron.thinking.warm_start_text``, the format the trainer parses).

**Bundled** (``--set bundled``; committed in ``examples/data``, used when the real WildChat-IF
prompts are not at hand; a test regenerates them and compares byte for byte):

- ``synthetic_prompts.jsonl``: 64 short, varied, hand-written chat prompts (``messages`` with
  one user turn, a few with a system message), ``data_source: "synthetic"``.
- ``sft_thinking.jsonl``: synthetic conversations in the warm-start format; every eighth row has
  two exchanges so multi-turn loss masks are exercised, ``data_source: "synthetic-sft"``.

**Demo** (``--set demo``, the default; written by ``tools/run_demo.sh`` into its run folder). A
randomly initialised reward model scores noise, so GRPO against it would show nothing. The demo
therefore builds, with the project's own trainers:

1. an SFT warm-start set (``sft_thinking.jsonl``) whose answers come in two styles, half
   *helpful* (acknowledge, give steps, close politely) and half *curt* (a short refusal-like line);
2. a preference set (``preferences.jsonl``) in which the helpful answer to a prompt is chosen
   over a curt one, over the same words shuffled, over gibberish of similar length, and over the
   strict-mode ``[NULL]`` answer (so neither length nor vocabulary alone earns reward: a tiny RM
   trained only on helpful-vs-curt rewards any long string, and GRPO then learns to babble).

The reward model learns "coherent helpful beats everything else" from (2); the warm-started
policy samples both styles; GRPO should then move the policy towards the helpful style, so the
demo's reward curve rises for a reason one can state.

    python -m rlmt_megatron.testing.demo_data --out DIR [--seed 0]            # the demo's sets
    python -m rlmt_megatron.testing.demo_data --set bundled [--out examples/data] [--seed 0] [--sft-rows 64]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlmt_megatron.thinking import NULL_ANSWER, warm_start_text

EXAMPLES_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"  # in a source checkout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------- bundled sets

BUNDLED_PROMPTS = (
    "What is a good name for a small bakery that sells mostly bread?",
    "Explain in two sentences why the sky looks blue.",
    "Write a haiku about a rainy Monday morning.",
    "Give me three tips for keeping houseplants alive.",
    "How do I politely decline an invitation to a party?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "What is the difference between weather and climate?",
    "Suggest a simple dinner I can cook with rice, eggs and spinach.",
    "Write a short thank-you note to a neighbour who watered my garden.",
    "Why do cats purr?",
    "How many minutes are there in three and a half hours?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the pros and cons of working from home?",
    "Describe a sunset to someone who has never seen one.",
    "Write a limerick about a forgetful robot.",
    "How can I improve my handwriting?",
    "What should I pack for a two-day hiking trip?",
    "Explain what a prime number is to a ten-year-old.",
    "Write an opening line for a mystery novel set in a lighthouse.",
    "What is the best way to learn a new language as an adult?",
    "Give me a short motivational message for exam week.",
    "Compare trains and planes for a 500 kilometre journey.",
    "How does a refrigerator keep food cold?",
    "Write a product description for a blue ceramic coffee mug.",
    "What are some fun things to do on a rainy weekend with kids?",
    "Explain the rules of tic-tac-toe.",
    "Write a two-line poem about the moon.",
    "How do I make a budget for my monthly expenses?",
    "What causes the seasons on Earth?",
    "Give me five creative names for a pet turtle.",
    "How should I prepare for a job interview at a library?",
    "Rewrite this sentence to sound more formal: 'we gotta fix this asap'.",
    "What is photosynthesis, in simple words?",
    "Write a short story about a lost umbrella that finds its way home.",
    "How do bees make honey?",
    "Recommend a routine for a ten-minute morning stretch.",
    "What is the capital of Canada, and why was it chosen?",
    "Explain compound interest with a simple example.",
    "Write an email asking my manager for a day off next Friday.",
    "What are three common mistakes new runners make?",
    "Why is it important to sleep well before a test?",
    "Describe the taste of a lemon without using the word sour.",
    "How do I remove a coffee stain from a white shirt?",
    "Write a riddle whose answer is 'a shadow'.",
    "What does a librarian do on a typical day?",
    "Give me a packing list for a beach holiday.",
    "Explain recursion using a real-life example.",
    "What is the difference between a virus and a bacterium?",
    "Write a cheerful birthday message for my grandmother.",
    "How can a small town attract more visitors?",
    "List four ways to save water at home.",
    "What would happen if the Moon disappeared?",
    "Write a short dialogue between a cat and a dog about breakfast.",
    "How do I choose a good watermelon at the market?",
    "Explain why leaves change colour in autumn.",
    "Suggest a name and a slogan for a bicycle repair shop.",
    "What are the main parts of a plant, and what does each do?",
    "Write a bedtime story about a sleepy dragon, in under 100 words.",
    "How do I start a conversation with someone new at work?",
    "Why do we have leap years?",
    "Give me a simple weekly plan for learning to play the guitar.",
    "Explain what an algorithm is without using technical words.",
    "Write a four-line poem about the ocean at night.",
    "What is a healthy snack I can take to school?",
)
BUNDLED_SYSTEMS = ("You are a helpful assistant.", "You are a friendly assistant who answers briefly.",
                   "You are a patient teacher.")
BUNDLED_TOPICS = (
    "the water cycle", "gravity", "saving money", "a vegetable garden", "public speaking", "a rainy holiday",
    "learning to swim", "a small birthday party", "healthy breakfasts", "recycling at home", "the solar system",
    "a first aquarium", "writing a cover letter", "keeping a diary", "a walk in the forest", "making new friends")
BUNDLED_ASKS = ("Can you explain {t} simply?", "Give me a few tips about {t}.", "How do I get started with {t}?",
                "What should a beginner know about {t}?", "Write a short paragraph about {t}.")
BUNDLED_PLAN_STEPS = ("The user wants a clear answer about {t}.", "I should keep it short and friendly.",
                      "Start with the main idea, then give an example.", "A numbered list would be easy to follow.",
                      "Avoid jargon; use everyday words.", "End with one encouraging sentence.",
                      "Check that every step is practical.")
BUNDLED_OPENERS = ("Here is a simple way to think about {t}.", "Good question! {T} is easier than it looks.",
                   "Sure, let's look at {t} step by step.")
BUNDLED_POINTS = ("Start small and build a habit.", "Ask someone with experience for advice.",
                  "Write down what you learn each day.", "Pick one thing to improve at a time.",
                  "Take short breaks so you stay fresh.", "Look for a simple example first.",
                  "Practise a little every day rather than a lot once a week.")
BUNDLED_CLOSERS = ("I hope this helps!", "Enjoy trying it out.", "Let me know if you want more detail.")
BUNDLED_FOLLOW_UPS = ("Can you make that even shorter?", "Thanks! Can you give me one more tip?",
                      "Could you say that for a child?")


def bundled_prompt_rows() -> list[dict]:
    rows = []
    for i, text in enumerate(BUNDLED_PROMPTS):
        # Every ninth prompt carries a system message so loaders and templates see both shapes.
        system = [{"role": "system", "content": BUNDLED_SYSTEMS[i // 9 % len(BUNDLED_SYSTEMS)]}] if i % 9 == 4 else []
        rows.append({"messages": system + [{"role": "user", "content": text}], "data_source": "synthetic"})
    return rows


def bundled_sft_row(rng: random.Random, multi_turn: bool) -> dict:
    topic = rng.choice(BUNDLED_TOPICS)
    fmt = {"t": topic, "T": topic[0].upper() + topic[1:]}
    plan = [s.format(**fmt) for s in rng.sample(BUNDLED_PLAN_STEPS, k=rng.randint(2, 4))]
    points = rng.sample(BUNDLED_POINTS, k=rng.randint(2, 3))
    answer = " ".join([rng.choice(BUNDLED_OPENERS).format(**fmt)] + [f"{i}. {p}" for i, p in enumerate(points, 1)]
                      + [rng.choice(BUNDLED_CLOSERS)])
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(BUNDLED_SYSTEMS)})
    messages += [{"role": "user", "content": rng.choice(BUNDLED_ASKS).format(**fmt)},
                 {"role": "assistant", "content": warm_start_text("\n".join(plan), answer)}]
    if multi_turn:
        follow = rng.choice(BUNDLED_FOLLOW_UPS)
        tip = rng.choice([p for p in BUNDLED_POINTS if p not in points])
        plan = f"They asked: {follow}\nAnswer in one or two sentences."
        messages += [{"role": "user", "content": follow},
                     {"role": "assistant", "content": warm_start_text(plan, f"Of course. {tip}")}]
    return {"messages": messages, "data_source": "synthetic-sft"}


def make_bundled_data(out_dir: str | Path, seed: int = 0, sft_rows: int = 64) -> dict[str, Path]:
    out = Path(out_dir)
    rng = random.Random(seed)
    files = {"prompts": out / "synthetic_prompts.jsonl", "sft": out / "sft_thinking.jsonl"}
    write_jsonl(files["prompts"], bundled_prompt_rows())
    write_jsonl(files["sft"], [bundled_sft_row(rng, multi_turn=i % 8 == 7) for i in range(sft_rows)])
    return files


# --------------------------------------------------------------------------- demo sets

DEMO_TOPICS = ("the garden", "a birthday party", "my homework", "the weekly budget", "a short trip", "the old bicycle",
               "a job interview", "the science fair", "a rainy weekend", "the team meeting", "a new recipe",
               "the school play", "a noisy neighbour", "the morning run", "a lost key", "the city library")
DEMO_ASKS = ("Can you help me plan {t}?", "What should I do about {t}?", "Give me advice on {t}.",
             "How do I get ready for {t}?", "Write a few tips about {t}.", "I need ideas for {t}.")
DEMO_PLAN_STEPS = ("understand what the user wants", "list the main steps", "keep the answer short and clear",
                   "think about what could go wrong", "pick the most useful advice", "end with a kind note")
HELPFUL_OPEN = ("Sure, here is a simple plan for {t}.", "Happy to help with {t}.", "Good question about {t}.")
HELPFUL_STEPS = ("First, write down what you need.", "Next, pick a time and ask a friend to help.",
                 "Then check each step twice.", "Keep a small list and tick items off.",
                 "Take a short break when you feel tired.", "Ask for feedback at the end.")
HELPFUL_CLOSE = ("I hope this helps, and good luck!", "Let me know if you want more ideas.",
                 "You can do this, have a great day!")
CURT = ("No.", "I do not know.", "Figure it out.", "Not my problem.", "Maybe. Whatever.", "Ask someone else.")


def demo_prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(DEMO_TOPICS)
    return rng.choice(DEMO_ASKS).format(t=topic), topic


def demo_thinking(rng: random.Random) -> str:
    steps = rng.sample(DEMO_PLAN_STEPS, k=rng.randint(2, 3))
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
    return NULL_ANSWER  # what strict mode scores when the thinking delimiter is missing


def make_demo_data(out_dir: str | Path, seed: int = 0, sft_rows: int = 256, pref_rows: int = 512) -> dict[str, Path]:
    out = Path(out_dir)
    rng = random.Random(seed)
    sft, prefs = [], []
    for i in range(sft_rows):
        ask, topic = demo_prompt(rng)
        answer = helpful_answer(rng, topic) if i % 2 == 0 else curt_answer(rng)
        sft.append({"messages": [{"role": "user", "content": ask},
                                 {"role": "assistant", "content": warm_start_text(demo_thinking(rng), answer)}]})
    for i in range(pref_rows):
        ask, topic = demo_prompt(rng)
        chosen = helpful_answer(rng, topic)
        prefs.append({"messages": [{"role": "user", "content": ask}],
                      "chosen": chosen, "rejected": rejected_answer(rng, i % 4, chosen)})
    files = {"sft": out / "sft_thinking.jsonl", "preferences": out / "preferences.jsonl"}
    write_jsonl(files["sft"], sft)
    write_jsonl(files["preferences"], prefs)
    return files


# --------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlmt_megatron.testing.demo_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=("demo", "bundled"), default="demo", help="which sets to write (default demo)")
    p.add_argument("--out", default=None, help="output folder (required for demo; bundled: examples/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-rows", type=int, default=None, help="SFT rows (default 256 demo, 64 bundled)")
    a = p.parse_args(argv)
    if a.set == "bundled":
        out = Path(a.out) if a.out else EXAMPLES_DATA
        rows = 64 if a.sft_rows is None else a.sft_rows
        make_bundled_data(out, a.seed, rows)
        print(f"wrote {len(BUNDLED_PROMPTS)} prompts and {rows} SFT rows to {out}")
        return
    if a.out is None:
        p.error("--out is required for the demo sets")
    files = make_demo_data(a.out, a.seed, **({} if a.sft_rows is None else {"sft_rows": a.sft_rows}))
    for name, path in files.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
