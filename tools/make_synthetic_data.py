"""Write the small bundled data sets used when the real WildChat-IF prompts are not at hand.

    python tools/make_synthetic_data.py [--out examples/data] [--seed 0] [--sft-rows 64]

- ``synthetic_prompts.jsonl``: 64 short, varied, hand-written chat prompts (``messages`` with
  one user turn, a few with a system message), ``data_source: "synthetic"``.
- ``sft_thinking.jsonl``: synthetic conversations in the RLMT warm-start format,
  assistant turns ``<think>\\n{plan}\\n</think>\\n\\n{answer}``; every eighth row has two
  exchanges so multi-turn loss masks are exercised.

Only the standard library; the same seed writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPTS = (
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
SYSTEMS = ("You are a helpful assistant.", "You are a friendly assistant who answers briefly.",
           "You are a patient teacher.")

TOPICS = ("the water cycle", "gravity", "saving money", "a vegetable garden", "public speaking", "a rainy holiday",
          "learning to swim", "a small birthday party", "healthy breakfasts", "recycling at home", "the solar system",
          "a first aquarium", "writing a cover letter", "keeping a diary", "a walk in the forest", "making new friends")
ASKS = ("Can you explain {t} simply?", "Give me a few tips about {t}.", "How do I get started with {t}?",
        "What should a beginner know about {t}?", "Write a short paragraph about {t}.")
PLAN_STEPS = ("The user wants a clear answer about {t}.", "I should keep it short and friendly.",
              "Start with the main idea, then give an example.", "A numbered list would be easy to follow.",
              "Avoid jargon; use everyday words.", "End with one encouraging sentence.",
              "Check that every step is practical.")
OPENERS = ("Here is a simple way to think about {t}.", "Good question! {T} is easier than it looks.",
           "Sure, let's look at {t} step by step.")
POINTS = ("Start small and build a habit.", "Ask someone with experience for advice.",
          "Write down what you learn each day.", "Pick one thing to improve at a time.",
          "Take short breaks so you stay fresh.", "Look for a simple example first.",
          "Practise a little every day rather than a lot once a week.")
CLOSERS = ("I hope this helps!", "Enjoy trying it out.", "Let me know if you want more detail.")
FOLLOW_UPS = ("Can you make that even shorter?", "Thanks! Can you give me one more tip?",
              "Could you say that for a child?")


def assistant_turn(plan: list[str], answer: str) -> str:
    return "<think>\n" + "\n".join(plan) + "\n</think>\n\n" + answer


def sft_row(rng: random.Random, multi_turn: bool) -> dict:
    topic = rng.choice(TOPICS)
    fmt = {"t": topic, "T": topic[0].upper() + topic[1:]}
    plan = [s.format(**fmt) for s in rng.sample(PLAN_STEPS, k=rng.randint(2, 4))]
    points = rng.sample(POINTS, k=rng.randint(2, 3))
    answer = " ".join([rng.choice(OPENERS).format(**fmt)] + [f"{i}. {p}" for i, p in enumerate(points, 1)]
                      + [rng.choice(CLOSERS)])
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    messages += [{"role": "user", "content": rng.choice(ASKS).format(**fmt)},
                 {"role": "assistant", "content": assistant_turn(plan, answer)}]
    if multi_turn:
        follow = rng.choice(FOLLOW_UPS)
        tip = rng.choice([p for p in POINTS if p not in points])
        messages += [{"role": "user", "content": follow},
                     {"role": "assistant", "content": assistant_turn(
                         [f"They asked: {follow}", "Answer in one or two sentences."], f"Of course. {tip}")}]
    return {"messages": messages, "data_source": "synthetic-sft"}


def prompt_rows() -> list[dict]:
    rows = []
    for i, text in enumerate(PROMPTS):
        # Every ninth prompt carries a system message so loaders and templates see both shapes.
        system = [{"role": "system", "content": SYSTEMS[i // 9 % len(SYSTEMS)]}] if i % 9 == 4 else []
        rows.append({"messages": system + [{"role": "user", "content": text}], "data_source": "synthetic"})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "examples" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-rows", type=int, default=64)
    args = ap.parse_args(argv)
    out = Path(args.out)
    rng = random.Random(args.seed)
    write(out / "synthetic_prompts.jsonl", prompt_rows())
    write(out / "sft_thinking.jsonl", [sft_row(rng, multi_turn=i % 8 == 7) for i in range(args.sft_rows)])
    print(f"wrote {len(PROMPTS)} prompts and {args.sft_rows} SFT rows to {out}")


if __name__ == "__main__":
    main()
