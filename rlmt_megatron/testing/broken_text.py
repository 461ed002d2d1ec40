"""Ways an answer goes wrong, as text transformations: the bad answers of the demo's preference
sets (``demo_data``), from word shuffles and gibberish to the graded breakage a tiny policy
writes. Pure functions of a ``random.Random`` and the text; every word pool is passed in, so the
training set and the held-out set each break answers with their own words.
"""

from __future__ import annotations

import random


def shuffled(rng: random.Random, text: str) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def gibberish(rng: random.Random, length: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 .,;!?<>/"
    return "".join(rng.choice(letters) for _ in range(length))


def truncate_mid_sentence(rng: random.Random, text: str) -> str:
    """The first 30-70% of the words, ending on a word that does not close a sentence."""
    words = text.split(" ")
    cut = rng.randint(max(2, len(words) * 3 // 10), max(2, len(words) * 7 // 10))
    while cut > 1 and words[cut - 1].rstrip().endswith((".", "!", "?", ":")):
        cut -= 1
    return " ".join(words[:cut]).rstrip(",;-\n ")


def mangled(rng: random.Random, text: str, words: tuple[str, ...]) -> str:
    """Broken words, what the tiny warm-started policy writes: about half of the words lose a
    letter, are cut short, run into the next word or become the start of another of ``words``."""
    out: list[str] = []
    for word in text.split():
        op = rng.randrange(8)
        if op == 0 and len(word) > 2:
            i = rng.randrange(len(word))
            word = word[:i] + word[i + 1:]
        elif op == 1 and len(word) > 3:
            word = word[:rng.randint(1, len(word) - 2)]
        elif op == 2 and out:
            word = out.pop() + word
        elif op == 3:
            other = rng.choice(words)
            word = other[:rng.randint(1, len(other))]
        out.append(word)
    return " ".join(out)


# Graded breakage: the text a tiny policy writes once it has the helpful words but not the
# sentences. ``degrade`` applies ``ops`` damages, one at a time, each one of: a word dropped; a
# fragment of one to four words repeated in place; a junk token inserted (a word's first letters,
# a piece of the thinking markup, digits, a stray byte, a word of another pool); a word cut short
# or run into the next; a sentence broken off (its end dropped, the next sentence follows); two
# sentences' halves mixed (a sentence's second half replaced by another helpful sentence's). A
# ``degraded`` pair (the preference set's tenth kind) prefers the less broken of two versions of
# one helpful answer: the clean answer or a broken one, over that text broken further,
# so the RM learns "less broken is better" by degrees rather than only "clean beats broken".
DEGRADE_MARKUP = ("</think>", "<think>", "think>", "</", ">\n", "\ufffd", "\ufffd\ufffd")


def _junk_token(rng: random.Random, words: tuple[str, ...], markup: tuple[str, ...]) -> str:
    u = rng.random()
    if u < 0.4:  # a word's first letters
        w = rng.choice(words)
        return w[:rng.randint(1, max(1, len(w) - 1))]
    if u < 0.65:
        return rng.choice(markup)
    if u < 0.8:
        return str(rng.randint(0, 99))
    return rng.choice(words)


def _sentence_spans(words: list[str]) -> list[tuple[int, int]]:
    """(first, last) word index of each sentence: a sentence ends at a word ending in . ! or ?."""
    spans, start = [], 0
    for i, w in enumerate(words):
        if w.endswith((".", "!", "?")) or i == len(words) - 1:
            spans.append((start, i))
            start = i + 1
    return spans


def degrade(rng: random.Random, text: str, ops: int, mix_pool: tuple[str, ...], junk_words: tuple[str, ...],
            markup: tuple[str, ...] = DEGRADE_MARKUP) -> str:
    """``text`` with ``ops`` damages (see above); ``mix_pool``: the sentences whose halves are mixed
    in, ``junk_words``: the words junk tokens are made from (the training set's pools or the
    held-out set's own)."""
    words = text.split()
    for _ in range(ops):
        op = rng.randrange(6)
        if len(words) < 4 and op in (0, 3, 4, 5):  # short text only grows (junk inserted)
            op = 2
        i = rng.randrange(len(words))
        if op == 0:
            del words[i]
        elif op == 1:
            n = rng.randint(1, min(4, len(words) - i))
            words[i + n:i + n] = words[i:i + n]
        elif op == 2:
            words.insert(i, _junk_token(rng, junk_words, markup))
        elif op == 3:
            if rng.random() < 0.5 and len(words[i]) > 3:
                words[i] = words[i][:rng.randint(2, len(words[i]) - 2)]
            elif i + 1 < len(words):
                words[i:i + 2] = [words[i] + words[i + 1]]
        else:
            a, b = rng.choice(_sentence_spans(words))
            if b - a < 2:
                continue
            k = rng.randint(a + 1, b - 1)
            if op == 4:  # broken off: the sentence stops at word k
                del words[k:b + 1]
            else:  # the second half of another helpful sentence
                other = rng.choice(mix_pool).split()
                words[k:b + 1] = other[len(other) // 2:]
    return " ".join(words)


def degraded_pair(rng: random.Random, chosen: str, **pools) -> tuple[str, str]:
    """(less broken, more broken): the clean answer (half of the time) or one with one to a
    quarter of its word count damages, over that text with one to a third of its word count more.
    Both ends matter: a warm-started tiny policy writes mostly broken text, and GRPO needs the RM
    to rank "somewhat broken" above "more broken" there too, not only "clean" above "broken"."""
    n = len(chosen.split())
    better = chosen if rng.random() < 1 / 2 else degrade(rng, chosen, rng.randint(1, max(1, n // 4)), **pools)
    worse = degrade(rng, better, rng.randint(1, max(2, n // 3)), **pools)
    while worse == better:  # an op can leave the text as it was (a half mixed in with itself)
        worse = degrade(rng, better, 1, **pools)
    return better, worse


def garbled(rng: random.Random, text: str) -> str:
    """Typing noise, letter by letter: a letter dropped (8%), doubled (5%) or replaced (5%), and a
    space dropped (20%); training's ``mangled`` works on whole words instead."""
    out = []
    for ch in text:
        u = rng.random()
        if ch == " ":
            out.append("" if u < 0.2 else ch)
        elif u < 0.08:
            continue
        elif u < 0.13:
            out.append(ch * 2)
        elif u < 0.18:
            out.append(rng.choice("abcdefghijklmnopqrstuvwxyz"))
        else:
            out.append(ch)
    return "".join(out)
