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
2. a preference set (``preferences.jsonl``, 1344 pairs, each labelled ``kind``): 1008 in which a
   helpful answer (the SFT templates, or wider pools of openers, steps and closers, some short)
   is chosen over one of nine kinds of bad answer, in turn: ``curt``; ``shuffled`` (its own words
   in random order); ``jumble`` (random words of the pools); ``phrase_loop`` (a few of its words
   repeated); ``cut_off`` (stopped mid-sentence); ``unrelated`` (coherent sentences that answer
   nothing); ``mangled`` (its words broken, as the tiny policy writes them); ``gibberish`` (ASCII
   noise of its length); ``null`` (the strict-mode ``[NULL]`` answer). So neither length nor
   vocabulary alone earns reward: a tiny RM trained only on helpful-vs-curt rewards any long
   string, and GRPO then learns to babble. Then 336 ``degraded`` pairs (``degraded_pair``): the
   less broken of two versions of a helpful answer beats the more broken one (words dropped,
   fragments repeated, junk inserted, sentences broken off, halves of two sentences mixed, by
   degrees), so that text which keeps fragments of the helpful wording ranks by how broken it is;
3. the GRPO prompts (``grpo_prompts.jsonl``, ``demo_grpo_prompts``): the SFT set's asks about
   the preference set's topics, eight of them new to the SFT policy. Prompts of the kind the
   policy was warm-started on, so that it answers them in sentences (helpful or curt) that the
   RM and the rule-based judge can rank; on WildChat's prompts the tiny policy writes broken
   text, and there is nothing for GRPO to improve;
4. a **held-out** preference set (``heldout_preferences.jsonl``, ``make_heldout_preferences``)
   from another seed, other prompts and other sentences, with eight kinds of bad answer of its
   own (see ``HELDOUT_KINDS`` below) and a ninth, ``more_broken`` (graded breakage of held-out
   answers, with held-out junk); ``rm_accuracy.py`` reports the RM's accuracy on it.

``answer_quality.py`` judges answers by rule from these pools, without the RM (the demo's summary).

The reward model learns "coherent helpful beats everything else" from (2); the warm-started
policy samples both styles; GRPO should then move the policy towards the helpful style, so the
demo's reward curve rises for a reason one can state. (4) checks that the RM learnt that rather
than its templates.

    python -m rlmt_megatron.testing.demo_data --out DIR [--seed 0]            # the demo's sets
    python -m rlmt_megatron.testing.demo_data --set bundled [--out examples/data] [--seed 0] [--sft-rows 64]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlmt_megatron.testing.broken_text import (
    degraded_pair,
    garbled,
    gibberish,
    mangled,
    shuffled,
    truncate_mid_sentence,
)
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


# The preference set's wider pools: the RM must learn "coherent and helpful" rather than the SFT
# templates, and meet more of the ways an answer goes wrong. None of these strings is in the
# held-out set (make_heldout_preferences, below), which has pools of its own.
PREF_TOPICS = DEMO_TOPICS + ("a family picnic", "the new puppy", "a music recital", "the garage sale",
                             "a hospital visit", "the holiday photos", "a board game night", "the bus timetable")
PREF_OPEN = HELPFUL_OPEN + ("Let us sort out {t} together.", "Here is what usually works for {t}.",
                            "No problem, {t} is easier with a plan.", "Thanks for asking about {t}.")
PREF_STEPS = HELPFUL_STEPS + ("Start early so nothing is rushed.", "Choose the three most important tasks.",
                              "Put the date in your calendar today.", "Tell the people involved what you plan.",
                              "Prepare a backup in case the weather changes.", "Try a small test run first.",
                              "Set a budget and stay close to it.", "Sleep well the night before.",
                              "Clear a space where you can work calmly.", "Check the details one more time.")
STEP_PARTS = (("Write down", "Check", "Pack", "Plan", "Ask about", "Prepare", "Choose", "Book", "Sort out",
               "Practise", "Review", "Buy", "Share", "Test", "Organise", "Remember"),
              ("the list", "your notes", "a spare bag", "the main tasks", "the tickets", "the food", "your questions",
               "the route", "a simple timetable", "the tools you need", "the costs", "the small details"),
              ("", " before you start", " the day before", " with a friend", " early in the morning", " at the end",
               " as soon as you can", " one step at a time", " every evening"))
PREF_CLOSE = HELPFUL_CLOSE + ("Have fun with it!", "Tell me how it goes.", "That should get you started.")
PREF_CURT = CURT + ("Go away.", "Nah.", "Stop asking.", "Who cares?", "Not today.", "That is boring.")
UNRELATED = ("The cat slept all afternoon on the warm step.", "Our town has two bakeries and one old cinema.",
             "The lake freezes every January.", "My uncle drives a red van to work.",
             "Snow fell on the hills last night.", "The shop on the corner sells fresh fish on Fridays.",
             "Paper was first made from plants and rags.", "The children sang a song about the sea.",
             "A storm closed the harbour for two days.", "Bananas grow in warm and wet places.",
             "The old clock in the hall stopped at noon.", "Her brother plays the drums in a jazz band.",
             "The price of bread went up again this year.", "Some birds fly south every autumn.",
             "The school bus is painted bright yellow.", "A famous painter lived in this street long ago.")
UNRELATED_PARTS = (("The baker", "My aunt", "A small boat", "The night train", "Our teacher", "The farmer next door",
                    "A tall man in a grey coat", "The choir"),
                   ("crossed the valley", "was in the newspaper", "opened a new shop", "sang an old song",
                    "lost its way", "arrived late", "won a prize", "moved to the coast", "found a coin"),
                   ("last week", "in the spring", "every morning", "long ago", "on Sunday", "after the rain"))
REJECTED_KINDS = ("curt", "shuffled", "gibberish", "null", "phrase_loop", "cut_off", "unrelated", "jumble", "mangled")
# The jumble's words: every word of the pools above, in random order (not only the answer's own).
JUMBLE_WORDS = tuple(sorted({w.strip(".,!?").lower() for s in PREF_STEPS + PREF_CLOSE + UNRELATED for w in s.split()}))


def advice_step(rng: random.Random) -> str:
    """A step from ``PREF_STEPS`` or, half of the time, put together from ``STEP_PARTS``."""
    if rng.random() < 0.5:
        return rng.choice(PREF_STEPS)
    verb, what, when = (rng.choice(part) for part in STEP_PARTS)
    return f"{verb} {what}{when}."


def varied_helpful_answer(rng: random.Random, topic: str) -> str:
    """A helpful answer from the wider pools: a paragraph or a numbered list after an opener, or
    a short one (one or two steps and a closing line)."""
    n = rng.randint(1, 2) if rng.random() < 0.2 else rng.randint(2, 4)
    steps: list[str] = []
    while len(steps) < n:  # n different steps
        step = advice_step(rng)
        if step not in steps:
            steps.append(step)
    if len(steps) <= 2 and rng.random() < 0.5:
        return " ".join([*steps, rng.choice(PREF_CLOSE)])
    body = " ".join(f"{i}. {s}" for i, s in enumerate(steps, 1)) if rng.random() < 0.4 else " ".join(steps)
    return f"{rng.choice(PREF_OPEN).format(t=topic)} {body} {rng.choice(PREF_CLOSE)}"


def unrelated_text(rng: random.Random) -> str:
    """Two to four coherent sentences that answer nothing: from ``UNRELATED`` or put together
    from ``UNRELATED_PARTS`` (subject, what happened, when)."""
    sentences = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.5:
            sentences.append(rng.choice(UNRELATED))
        else:
            subject, event, when = (rng.choice(part) for part in UNRELATED_PARTS)
            sentences.append(f"{subject} {event} {when}.")
    return " ".join(sentences)


def rejected_answer(rng: random.Random, kind: str, chosen: str) -> str:
    if kind == "curt":
        return rng.choice(PREF_CURT)
    if kind == "shuffled":
        return shuffled(rng, chosen)
    if kind == "gibberish":
        return gibberish(rng, len(chosen))
    if kind == "phrase_loop":  # a degenerate loop on a few of the answer's own words
        words = chosen.split()
        lo = rng.randrange(len(words) - 3)
        return " ".join(words[lo:lo + rng.randint(1, 3)] * rng.randint(5, 30))
    if kind == "cut_off":
        return truncate_mid_sentence(rng, chosen)
    if kind == "jumble":
        words = [rng.choice(JUMBLE_WORDS) for _ in chosen.split()]
        return " ".join([words[0].capitalize()] + words[1:]) + "."
    if kind == "mangled":
        return mangled(rng, chosen, JUMBLE_WORDS)
    if kind == "unrelated":  # coherent sentences that answer nothing
        return unrelated_text(rng)
    return NULL_ANSWER  # what strict mode scores when the thinking delimiter is missing


def demo_grpo_prompts() -> list[dict]:
    """Every ask of ``DEMO_ASKS`` about every topic of ``PREF_TOPICS`` (144 prompts, topic by
    topic; the trainer's sampler shuffles them). The held-out topics and asks stay out: they
    measure the RM."""
    return [{"messages": [{"role": "user", "content": ask.format(t=topic)}], "data_source": "demo"}
            for topic in PREF_TOPICS for ask in DEMO_ASKS]


def make_demo_data(out_dir: str | Path, seed: int = 0, sft_rows: int = 256, pref_rows: int = 1008,
                   heldout_per_kind: int = 48, degraded_rows: int | None = None) -> dict[str, Path]:
    """The demo's sets; ``degraded_rows`` defaults to a third of ``pref_rows`` (336 of 1008)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    sft, prefs = [], []
    for i in range(sft_rows):
        ask, topic = demo_prompt(rng)
        answer = helpful_answer(rng, topic) if i % 2 == 0 else curt_answer(rng)
        sft.append({"messages": [{"role": "user", "content": ask},
                                 {"role": "assistant", "content": warm_start_text(demo_thinking(rng), answer)}]})
    for i in range(pref_rows):
        topic = rng.choice(PREF_TOPICS)
        ask = rng.choice(DEMO_ASKS).format(t=topic)
        chosen = helpful_answer(rng, topic) if i % 3 == 0 else varied_helpful_answer(rng, topic)
        kind = REJECTED_KINDS[i % len(REJECTED_KINDS)]
        prefs.append({"messages": [{"role": "user", "content": ask}],
                      "chosen": chosen, "rejected": rejected_answer(rng, kind, chosen), "kind": kind})
    # The degraded pairs come after, from a generator of their own, so the rows above stay as
    # they were (and their kinds' accuracies comparable with earlier runs).
    deg_rng = random.Random(f"degraded-{seed}")
    for _ in range(pref_rows // 3 if degraded_rows is None else degraded_rows):
        topic = deg_rng.choice(PREF_TOPICS)
        ask = deg_rng.choice(DEMO_ASKS).format(t=topic)
        clean = helpful_answer(deg_rng, topic) if deg_rng.random() < 0.5 else varied_helpful_answer(deg_rng, topic)
        better, worse = degraded_pair(deg_rng, clean, mix_pool=PREF_STEPS + PREF_CLOSE, junk_words=JUMBLE_WORDS)
        prefs.append({"messages": [{"role": "user", "content": ask}], "chosen": better, "rejected": worse,
                      "kind": "degraded"})
    files = {"sft": out / "sft_thinking.jsonl", "preferences": out / "preferences.jsonl",
             "heldout": out / "heldout_preferences.jsonl", "grpo_prompts": out / "grpo_prompts.jsonl"}
    write_jsonl(files["sft"], sft)
    write_jsonl(files["preferences"], prefs)
    write_jsonl(files["grpo_prompts"], demo_grpo_prompts())
    make_heldout_preferences(files["heldout"], pairs_per_kind=heldout_per_kind)
    return files


# --------------------------------------------------------------------------- held-out preferences

# Written to ask "does a coherent, helpful answer outscore the ways an answer goes wrong?" on text
# the demo RM was not trained on. Prompts: topics and phrasings not in DEMO_TOPICS/PREF_TOPICS and
# DEMO_ASKS. Chosen: coherent and helpful, from sentences in no training pool, in four layouts.
# Rejected, one kind per row in turn (the nearest training kind in brackets):
#   curt         dismissive lines not in PREF_CURT                     (curt)
#   word_salad   real words from SALAD_WORDS, in no training answer    (jumble, shuffled)
#   word_loop    one word repeated 8-60 times                          (phrase_loop)
#   char_noise   4-400 characters of Greek, Cyrillic, Hebrew, accented Latin, capitals or
#                symbols, none in training's lower-case ASCII noise    (gibberish)
#   prompt_echo  the user's prompt copied back                         (none)
#   truncated    the chosen answer cut mid-sentence                    (cut_off)
#   off_topic    coherent statements that answer nothing               (unrelated)
#   garbled      the chosen answer with typing noise, letter by letter (mangled: whole words)
# [NULL] is left out: one fixed string, trained on, it cannot be held out. Not measured here:
# relevance (a helpful answer to another question), correctness, real (WildChat) prompts.
# tests/test_demo_data.py checks that no held-out answer, prompt or sentence is in training.
HELDOUT_SEED = 20240611  # not a seed the demo trains with

HELDOUT_TOPICS = ("a camping weekend", "the piano lesson", "a dinner for six", "moving to a new flat",
                  "my first week at a new job", "the chemistry exam", "a dog that barks at night", "a long flight",
                  "the spring cleaning", "a wedding speech", "a small vegetable patch", "the charity bake sale")
HELDOUT_ASKS = ("Any tips for {t}?", "How should I handle {t}?", "What is a good way to approach {t}?",
                "Please help me with {t}.", "I'm nervous about {t}. What can I do?")
HELDOUT_OPEN = ("Good news: {t} is manageable with a little planning.",
                "Here are a few ideas that should make {t} easier.",
                "Of course! Let's break {t} into small pieces.",
                "That sounds like a lot, but {t} can go smoothly.",
                "A calm plan makes {t} much simpler.")
HELDOUT_TIPS = ("Set aside ten minutes tonight to sketch out the main tasks.",
                "Gather everything you need in one place before you begin.",
                "Talk to someone who has done it before and ask what surprised them.",
                "Do the hardest part early, while you still have energy.",
                "Leave some spare time in case something takes longer than expected.",
                "Write a short checklist and keep it where you can see it.",
                "Reward yourself with something small when you finish.",
                "If you get stuck, step away for a few minutes and come back fresh.",
                "Practise once with a friend so the real thing feels familiar.",
                "Keep notes on what worked so that next time is even easier.")
HELDOUT_CLOSE = ("Good luck, you will be fine.", "I hope that makes it a little easier.",
                 "Feel free to ask if you want more detail on any step.", "Go at your own pace and enjoy it.")
HELDOUT_CURT = ("Nope.", "Can't help with that.", "Search online.", "Not interested.", "Why ask me?",
                "Do it yourself.", "Too hard.", "Meh.")
HELDOUT_OFF_TOPIC = ("The museum opens at nine and closes at five on weekdays.",
                     "Rain is expected over the northern hills by the evening.",
                     "The bridge was built in the last century and painted green.",
                     "My cousin collects old stamps from islands in the Pacific.",
                     "Copper conducts heat much better than glass does.",
                     "The football match ended in a draw after extra time.",
                     "Most owls hunt at night and sleep during the day.",
                     "The train to the coast was delayed by twenty minutes.")
# Real words in no training answer (the word salad's); the loops' words may be in some.
SALAD_WORDS = ("window", "seven", "purple", "elephant", "although", "carefully", "mountain", "borrow", "lemon",
               "beneath", "quiet", "engine", "yesterday", "orange", "whisper", "ladder", "because", "cloud",
               "silver", "tomorrow", "jacket", "river", "thirty", "gently", "castle", "pencil", "blue", "never",
               "forest", "spoon", "above", "happily", "candle", "winter", "strange", "bottle", "across", "tiger")
LOOP_WORDS = ("sure", "okay", "yes", "the", "hello", "thanks", "fine", "hmm", "right", "and")
NOISE_ALPHABETS = ("αβγδεζηθικλμνξοπρστυφχψω", "абвгдежзийклмнопрстуфхцчшщыэюя", "àéîõüçñøåßæœ",
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "#$%&*+=@^_~|{}[]", "אבגדהוזחטיכלמנסעפצקרשת")
HELDOUT_KINDS = ("curt", "word_salad", "word_loop", "char_noise", "prompt_echo", "truncated", "off_topic", "garbled")
# more_broken (a ninth kind, after the others): the less broken of two versions of a held-out
# answer beats the more broken one (``degraded_pair``, as the training kind ``degraded``), broken
# with the held-out pools: halves of the held-out tips and closers mixed in, junk tokens from the
# held-out sentences' words and markup of its own.
HELDOUT_DEGRADE_POOLS = {
    "mix_pool": HELDOUT_TIPS + HELDOUT_CLOSE,
    "junk_words": tuple(sorted({w.strip(".,!?:").lower() for s in HELDOUT_TIPS + HELDOUT_CLOSE + HELDOUT_OFF_TOPIC
                                for w in s.split()})),
    "markup": ("|>", "##", "[/", "**", "~~", "&&", "<<")}
ALL_HELDOUT_KINDS = HELDOUT_KINDS + ("more_broken",)


def heldout_prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(HELDOUT_TOPICS)
    return rng.choice(HELDOUT_ASKS).format(t=topic), topic


def heldout_helpful(rng: random.Random, topic: str) -> str:
    """Four layouts: a paragraph, a numbered list, a dashed list (one tip a line, a layout the
    training set lacks), and a short answer of one or two tips and a closing line."""
    opener = rng.choice(HELDOUT_OPEN).format(t=topic)
    close = rng.choice(HELDOUT_CLOSE)
    layout = rng.randrange(4)
    tips = rng.sample(HELDOUT_TIPS, k=rng.randint(1, 2) if layout == 3 else rng.randint(2, 4))
    if layout == 0:
        return " ".join([opener, *tips, close])
    if layout == 1:
        return " ".join([opener, *(f"{i}. {tip}" for i, tip in enumerate(tips, 1)), close])
    if layout == 2:
        return "\n".join([opener, *(f"- {tip}" for tip in tips), close])
    return " ".join([*tips, close])


def heldout_rejected(rng: random.Random, kind: str, chosen: str, prompt: str) -> str:
    if kind == "curt":
        return rng.choice(HELDOUT_CURT)
    if kind == "word_salad":
        words = [rng.choice(SALAD_WORDS) for _ in chosen.split()]
        return " ".join([words[0].capitalize()] + words[1:]) + "."
    if kind == "word_loop":
        return " ".join([rng.choice(LOOP_WORDS)] * rng.randint(8, 60))
    if kind == "char_noise":
        alphabet = rng.choice(NOISE_ALPHABETS) + " " * rng.randint(0, 6)
        return "".join(rng.choice(alphabet) for _ in range(rng.choice((rng.randint(4, 40), rng.randint(100, 400)))))
    if kind == "prompt_echo":
        return prompt
    if kind == "truncated":
        return truncate_mid_sentence(rng, chosen)
    if kind == "off_topic":
        return " ".join(rng.sample(HELDOUT_OFF_TOPIC, k=rng.randint(2, 4)))
    if kind == "garbled":
        return garbled(rng, chosen)
    raise ValueError(f"unknown held-out kind {kind!r}")


def make_heldout_preferences(out_path: str | Path, seed: int = HELDOUT_SEED, pairs_per_kind: int = 48) -> Path:
    """``pairs_per_kind`` rows per kind of ``HELDOUT_KINDS``: messages, chosen, rejected, kind."""
    rng = random.Random(seed)
    rows = []
    for i in range(pairs_per_kind * len(HELDOUT_KINDS)):
        kind = HELDOUT_KINDS[i % len(HELDOUT_KINDS)]
        prompt, topic = heldout_prompt(rng)
        chosen = heldout_helpful(rng, topic)
        rows.append({"messages": [{"role": "user", "content": prompt}], "chosen": chosen,
                     "rejected": heldout_rejected(rng, kind, chosen, prompt), "kind": kind})
    # more_broken comes last, from a generator of its own, so the kinds above keep their rows.
    deg_rng = random.Random(f"more_broken-{seed}")
    for _ in range(pairs_per_kind):
        prompt, topic = heldout_prompt(deg_rng)
        better, worse = degraded_pair(deg_rng, heldout_helpful(deg_rng, topic), **HELDOUT_DEGRADE_POOLS)
        rows.append({"messages": [{"role": "user", "content": prompt}], "chosen": better, "rejected": worse,
                     "kind": "more_broken"})
    write_jsonl(Path(out_path), rows)
    return Path(out_path)


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
