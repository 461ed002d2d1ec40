"""Split a generated response into thinking and the answer the reward model scores.

The rule is the authors' ``SequenceRewardModelWorker._extract_response``
(princeton-pli/RLMT @ 2cde311b9dad4b71a9d49eacf8f921c0026a5a95,
``training/ppo_grpo/verl/workers/fsdp_workers.py``), applied to the decoded response after the
eos token text is removed (``_switch_chat_template``):

1. no answer-start delimiter configured (no_think): the text, untouched;
2. the FIRST occurrence of the answer-start delimiter (``</think>``; ``<response>`` for zero):
   keep what follows it, left-stripped; if absent: strict -> ``[NULL]``, else keep the whole text
   (not stripped) and go on;
3. zero only, the FIRST ``</response>`` in what is left: keep what precedes it, right-stripped;
   if absent: strict -> ``[NULL]``, else keep it all.

``<think>`` is never required: only the delimiter that opens the answer counts. The authors'
evaluation code splits at the LAST ``</think>`` instead; training (what we reproduce) uses the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from rlmt_megatron.thinking.templates import ThinkingFormatConfig

NULL_ANSWER = "[NULL]"

Reason = Literal["ok", "not_thinking", "no_answer_start", "no_answer_end", "no_answer_start_or_end"]


@dataclass(frozen=True)
class ParsedResponse:
    """``answer`` is exactly what the reward model sees (``[NULL]`` when strict rejects).

    ``thinking`` is for logs and metrics only: the text before the answer-start delimiter, with
    one leading ``think_start`` and one trailing ``think_end`` removed and whitespace stripped;
    None when the delimiter is missing or the format has none.
    ``format_ok`` says every answer delimiter of the format was found (independent of strict);
    ``reason`` names what was missing.
    """

    thinking: Optional[str]
    answer: str
    format_ok: bool
    reason: Reason


def _thinking(before: str, fmt: ThinkingFormatConfig) -> str:
    t = before.strip()
    if t.startswith(fmt.think_start):
        t = t[len(fmt.think_start):]
    if t.endswith(fmt.think_end):
        t = t[: -len(fmt.think_end)]
    return t.strip()


def parse_response(text: str, fmt: ThinkingFormatConfig, eos_token: Optional[str] = None) -> ParsedResponse:
    """Apply the authors' extraction rule to ``text`` (decoded response, special tokens kept or not).

    ``eos_token``: every occurrence of this string is removed first, as the authors do after
    decoding with special tokens; pass None when the text was decoded with
    ``skip_special_tokens=True``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_response: text must be a str, got {type(text).__name__}")
    if eos_token:
        text = text.replace(eos_token, "")
    start, end = fmt.answer_delimiters()
    if start is None:
        return ParsedResponse(thinking=None, answer=text, format_ok=True, reason="not_thinking")

    at = text.find(start)
    has_start = at >= 0
    thinking = _thinking(text[:at], fmt) if has_start else None
    rest = text[at + len(start):].lstrip() if has_start else text
    has_end = end is None or end in rest
    reason: Reason = {
        (True, True): "ok", (False, True): "no_answer_start",
        (True, False): "no_answer_end", (False, False): "no_answer_start_or_end",
    }[(has_start, has_end)]
    if fmt.strict and reason != "ok":
        return ParsedResponse(thinking=thinking, answer=NULL_ANSWER, format_ok=False, reason=reason)
    if end is not None and has_end:
        rest = rest[: rest.find(end)].rstrip()
    return ParsedResponse(thinking=thinking, answer=rest, format_ok=reason == "ok", reason=reason)


def answer_for_reward(text: str, fmt: ThinkingFormatConfig, eos_token: Optional[str] = None) -> str:
    """Exactly the string the reward model scores for this response."""
    return parse_response(text, fmt, eos_token).answer
