"""A rule-based judge of the CPU demo's answers, independent of the reward model, and the demo's
GRPO summary built on it.

    python -m rlmt_megatron.testing.answer_quality RUN_DIR      # RUN_DIR: the demo's out/grpo

**The judge** (``answer_quality``, 0..1): how much of an answer is well-formed sentences of the
demo's helpful style. In this synthetic task "a better answer" has a definition one can write
down, because every helpful answer the demo ever shows a model is put together from fixed
sentence pools (``demo_data``: the SFT set's ``HELPFUL_*``, the preference set's ``PREF_*`` and
``STEP_PARTS`` sentences, the held-out set's ``HELDOUT_*``), with a topic slot ``{t}``. So an
answer is as good as the share of its words that sit in intact runs of such sentences:

- the answer is split into sentences (at ``.``, ``!``, ``?`` and line breaks; list numbers and
  dashes dropped) and each sentence into lower-case words; every other symbol (``<``, ``/``,
  ``>``, stray bytes) is a word of its own, which no pool sentence contains;
- each sentence is aligned with its best pool sentence (a topic slot matches one to six words,
  credited only where the words on both sides of it match the pool sentence); only runs of at
  least two consecutive words in the pool sentence's order count, so a stray "a" or "the" earns
  nothing; the sentence's credit is its matched words times matched/longer-of-the-two, so a
  sentence cut off, missing words or padded with junk earns part of its length;
- a pool sentence is credited at most once per answer (a repeated sentence earns nothing the
  second time; a loop inside a sentence is unmatched words);
- the answer's score is the credited words over ``max(words, MIN_WORDS)``: garbage between good
  sentences dilutes it, and one good sentence alone (shorter than the shortest helpful answer the
  demo writes) is not a whole answer. ``[NULL]`` (a missing ``</think>``) and curt lines score 0.

Why this is a fair judge here: it rewards exactly what the demo's data define as the good
behaviour (coherent helpful sentences, whole, once each, nothing else) and nothing the RM could
be exploited with (length, helpful *words* in broken order, fragments): broken words, fragments,
repeats, junk and halves of two sentences glued together all lose credit, graded by how much of
the text they take up. It does not use the RM, nor the corruption generators the RM is trained
on (``broken_text.degrade``); it knows only the pools, which are the task's definition of a helpful
sentence. What it cannot judge: relevance to the prompt (the demo's policy answers any prompt,
WildChat's too, with its memorised advice, and the slot takes any topic), correctness, or style
outside the pools, so it is a judge of this synthetic task only.

**The summary** (``summary_lines``): the GRPO run's mean reward and format rate over the first
and last fifth of the steps (``metrics.jsonl``), the mean answer quality of the same steps'
samples (``samples/step_*.jsonl``; all answers, and the format-ok ones alone), and the Spearman
rank correlation between the RM's score and the judge's over those samples.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from functools import lru_cache
from pathlib import Path

from rlmt_megatron.thinking import NULL_ANSWER

MIN_WORDS = 12  # the shortest helpful answers the demo writes (one or two steps and a closer)
SLOT_WORDS = (1, 6)  # how many words a topic slot may match
SLOT = "\x00"  # stands for {t} in a tokenised pool sentence

_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9',.!?]")
_LIST_MARK = re.compile(r"(?:^|(?<=\s))(?:\d+\.|-)(?=\s)")
_SENTENCE_END = re.compile(r"[.!?\n]+")


def words(sentence: str) -> list[str]:
    return _TOKEN.findall(sentence.lower())


def sentences(answer: str) -> list[list[str]]:
    """The answer's sentences as word lists (list numbers and dashes removed, empty ones dropped)."""
    text = _LIST_MARK.sub(" ", answer)
    return [w for w in (words(s) for s in _SENTENCE_END.split(text)) if w]


@lru_cache(maxsize=1)
def helpful_pool() -> tuple[tuple[str, ...], ...]:
    """Every helpful sentence of the demo's pools, tokenised, ``{t}`` as ``SLOT``."""
    from rlmt_megatron.testing import demo_data as d

    raw = set(d.HELPFUL_OPEN + d.HELPFUL_STEPS + d.HELPFUL_CLOSE + d.PREF_OPEN + d.PREF_STEPS + d.PREF_CLOSE
              + d.HELDOUT_OPEN + d.HELDOUT_TIPS + d.HELDOUT_CLOSE)
    raw |= {f"{v} {w}{n}." for v in d.STEP_PARTS[0] for w in d.STEP_PARTS[1] for n in d.STEP_PARTS[2]}
    pool = set()
    for s in raw:  # a pool entry with "!" inside is two sentences, as an answer's would be
        pool.update(tuple(w) for w in sentences(s.replace("{T}", "{t}").replace("{t}", SLOT)))
    pool = sorted(pool)
    return tuple(pool)


@lru_cache(maxsize=1)
def _bigram_index() -> dict[tuple[str, str], list[int]]:
    index: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(helpful_pool()):
        for bg in set(zip(p, p[1:])):
            if SLOT not in bg:
                index.setdefault(bg, []).append(i)
    return index


def _run_words(a: list[str] | tuple[str, ...], b: list[str] | tuple[str, ...]) -> int:
    """Words of ``a`` in common runs of two or more consecutive words with ``b``, in order."""
    if len(a) < 2 or len(b) < 2:
        return 0
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return sum(blk.size for blk in blocks if blk.size >= 2)


def _credit(s: list[str], p: tuple[str, ...]) -> float:
    """Credited words of sentence ``s`` aligned with pool sentence ``p``: matched * matched / longer."""
    if SLOT not in p:
        m = _run_words(s, p)
        return m * m / max(len(s), len(p)) if m else 0.0
    k = p.index(SLOT)
    pre, post = p[:k], p[k + 1:]
    best = 0.0
    for i in range(1, len(s)):
        tail = _common_prefix(s[:i][::-1], pre[::-1])  # pool words right before the slot
        if not tail:
            continue
        for j in range(i + SLOT_WORDS[0], min(i + SLOT_WORDS[1], len(s)) + 1):
            if not all(w.isalpha() for w in s[i:j]):
                break
            lead = _common_prefix(s[j:], post)  # and right after it
            if post and not lead:
                continue
            m = (tail + (j - i) + lead + _run_words(s[:i - tail], pre[:len(pre) - tail])
                 + _run_words(s[j + lead:], post[lead:]))
            best = max(best, m * m / max(len(s), len(pre) + len(post) + j - i))
    if best:
        return best
    m = _run_words(s, pre + post)  # no slot filled: the pool sentence's words around it
    return m * m / max(len(s), len(pre) + len(post) + 2) if m else 0.0


def _common_prefix(a, b) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def sentence_credits(answer: str) -> list[tuple[list[str], float]]:
    """(words, credited words) for each sentence; each pool sentence credited once."""
    pool, index = helpful_pool(), _bigram_index()
    used: set[int] = set()
    out = []
    for s in sentences(answer):
        candidates = {i for bg in zip(s, s[1:]) for i in index.get(bg, ()) if i not in used}
        best, best_i = 0.0, None
        for i in sorted(candidates):
            c = _credit(s, pool[i])
            if c > best:
                best, best_i = c, i
        if best_i is not None:
            used.add(best_i)
        out.append((s, best))
    return out


def answer_quality(answer: str) -> float:
    """0..1: credited words over ``max(words, MIN_WORDS)`` (see the module's docstring)."""
    if answer.strip() == NULL_ANSWER:
        return 0.0
    credits = sentence_credits(answer)
    n = sum(len(s) for s, _ in credits)
    return min(1.0, sum(c for _, c in credits) / max(n, MIN_WORDS))


# --------------------------------------------------------------------------- statistics


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); None if either is constant."""
    if len(x) != len(y):
        raise ValueError("spearman: lengths differ")
    rx, ry = ranks(x), ranks(y)
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else None


# --------------------------------------------------------------------------- the demo's summary


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:+.2f}"


def summary_lines(run_dir: str | Path) -> list[str]:
    """The demo's closing lines for a GRPO run folder (``metrics.jsonl`` and ``samples/``)."""
    run = Path(run_dir)
    rows = _read_jsonl(run / "metrics.jsonl")
    k = max(1, len(rows) // 5)
    first, last = rows[:k], rows[-k:]

    def mean(rs, key):
        return sum(r[key] for r in rs if r[key] is not None) / len(rs)

    def samples(rs):
        out = []
        for r in rs:
            path = run / "samples" / f"step_{int(r['step']):06d}.jsonl"
            out += _read_jsonl(path) if path.is_file() else []
        return out

    s_first, s_last = samples(first), samples(last)
    for s in s_first + s_last:
        s["quality"] = answer_quality(s["answer"])

    def q(ss, ok_only=False):
        return _mean([s["quality"] for s in ss if s["format_ok"] or not ok_only])

    def r(ss):
        return _mean([s["reward"] for s in ss if s["format_ok"]])

    both = s_first + s_last
    ok = [s for s in both if s["format_ok"]]
    rho_all = spearman([s["reward"] for s in both], [s["quality"] for s in both]) if both else None
    rho_ok = spearman([s["reward"] for s in ok], [s["quality"] for s in ok]) if ok else None
    steps = f"steps {first[0]['step']}-{first[-1]['step']} and {last[0]['step']}-{last[-1]['step']}"
    return [
        f"reward/mean: first {k} steps {mean(first, 'reward/mean'):+.2f} -> last {k} steps "
        f"{mean(last, 'reward/mean'):+.2f} (format-ok answers only {r(s_first):+.2f} -> {r(s_last):+.2f}); "
        f"answer quality (rule-based, 0..1) {q(s_first):.3f} -> {q(s_last):.3f} (format-ok answers only "
        f"{q(s_first, True):.3f} -> {q(s_last, True):.3f}); format/ok_rate {mean(first, 'format/ok_rate'):.2f} -> "
        f"{mean(last, 'format/ok_rate'):.2f}; engine vs trainer logprob diff (mean) "
        f"{max(r['rollout/logprob_diff_mean'] for r in rows):.1e} at most",
        f"RM score vs answer quality on the policy's samples of {steps}: Spearman {_fmt(rho_ok)} over the "
        f"{len(ok)} format-ok answers ({_fmt(rho_all)} over all {len(both)}, [NULL] included)",
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlmt_megatron.testing.answer_quality",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a GRPO run folder (metrics.jsonl, samples/)")
    p.add_argument("--answer", action="append", default=[], help="print the quality of this answer instead")
    a = p.parse_args(argv)
    if a.answer:
        for text in a.answer:
            print(f"{answer_quality(text):.3f}\t{text}")
        return
    print("\n".join(summary_lines(a.run_dir)))


if __name__ == "__main__":
    main()
