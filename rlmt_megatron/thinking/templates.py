"""Thinking formats: the prompt the policy sees and where the engine stops.

Three formats, as in RLMT (princeton-pli/RLMT, commit 2cde311b9dad4b71a9d49eacf8f921c0026a5a95):

- ``warm_start``: the model's own chat template; the SFT warm-start taught it to answer
  ``<think>\\n{plan}\\n</think>\\n\\n{answer}`` (``training/sft_dpo/utils/src/build_sft_dataset.py``,
  ``construct_messages``). The answer starts after ``</think>``.
- ``zero``: a base model prompted in plain text by the Jinja template the authors inject as the
  tokenizer's chat template (``training/sft_dpo/utils/src/convert_base_to_prompted_model.py``,
  ``THINKING_CHAT_TEMPLATE``); the answer is between ``<response>`` and ``</response>``.
  ``ZERO_NOTHINK_CHAT_TEMPLATE`` (``convert_base_to_nothink_prompted_model.py``) is the authors'
  no-thinking variant of it, usable as ``zero_template``.
- ``no_think``: the chat template, and the whole output is the answer.

The authors never pre-fill ``<think>`` in the generation prompt: verl's RL dataset renders
``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` and encodes it with
``add_special_tokens=False`` (``training/ppo_grpo/verl/utils/dataset/rl_dataset.py``), and their
eval's force-think path is commented out (``eval/llm_utils.py``, ``batch_query``). So neither do we.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.errors import InputFileError, RLMTError

# Byte-identical to THINKING_CHAT_TEMPLATE in training/sft_dpo/utils/src/convert_base_to_prompted_model.py
# (princeton-pli/RLMT @ 2cde311b9dad4b71a9d49eacf8f921c0026a5a95). Jinja turns the "\\n" escapes
# into newlines; ``bos_token`` renders empty for tokenizers without one (Qwen2.5 base).
ZERO_THINK_CHAT_TEMPLATE = '''{{- bos_token }}
{{- "A conversation between User and Assistant. Following the User's query, the Assistant first plans a response, and then provides the response. " }}
{{- "The internal reasoning process is enclosed within <think> </think> tags and the response is enclosed within <response> </response> tags, " }}
{{- "i.e., in the format <think> reasoning process here </think> <response> response here </response>.\\n\\n" }}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- "User: <query>" + message['content'] | trim + "</query>\\n" }}
    {%- elif message.role == 'assistant' %}
        {{- "Assistant: " + message['content'] | trim }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "Assistant:" }}
{%- endif %}'''

# Byte-identical to NOTHINK_CHAT_TEMPLATE in training/sft_dpo/utils/src/convert_base_to_nothink_prompted_model.py
# (same commit): the "zero, no thinking" baseline; parsed with the same <response> delimiters.
ZERO_NOTHINK_CHAT_TEMPLATE = '''{{- bos_token }}
{{- "A conversation between User and Assistant. The user asks a question, and the assistant provides a response. " }}
{{- "The response is enclosed within <response> </response> tags, i.e., <response> response </response>.\\n\\n" }}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- "User: <query>" + message['content'] | trim + "</query>\\n" }}
    {%- elif message.role == 'assistant' %}
        {{- "Assistant: " + message['content'] | trim }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "Assistant:" }}
{%- endif %}'''

FormatKind = Literal["warm_start", "zero", "no_think"]


class ThinkingFormatError(RLMTError, ValueError):
    """A thinking format that cannot be applied to this tokenizer or these arguments."""


class ThinkingFormatConfig(StrictModel):
    """How prompts are rendered and responses split into thinking and answer."""

    kind: FormatKind = Field("warm_start", description="warm_start | zero | no_think")
    think_start: str = Field("<think>", min_length=1, description="opens the plan (never required by the parser)")
    think_end: str = Field("</think>", min_length=1, description="warm_start: the answer starts after it")
    response_start: str = Field("<response>", min_length=1, description="zero: the answer starts after it")
    response_end: str = Field("</response>", min_length=1, description="zero: the answer ends before it; the stop string")
    strict: bool = Field(
        False, description="a missing answer delimiter makes the answer the literal [NULL] (authors: instruct runs only)"
    )
    zero_template: str = Field(
        ZERO_THINK_CHAT_TEMPLATE, min_length=1, description="Jinja chat template of the zero format"
    )
    keep_bos_on_truncation: bool = Field(
        True,
        description="left truncation keeps a leading BOS (verl drops it with the other cut tokens: set False to match)",
    )

    def answer_delimiters(self) -> tuple[Optional[str], Optional[str]]:
        """(start, end) of the answer; None where the format has no such delimiter."""
        if self.kind == "warm_start":
            return self.think_end, None
        if self.kind == "zero":
            return self.response_start, self.response_end
        return None, None


def warm_start_text(plan: str, answer: str) -> str:
    """An assistant turn in the warm-start SFT format (authors' ``construct_messages``)."""
    return f"<think>\n{plan}\n</think>\n\n{answer}"


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputFileError(f"prompt messages: expected a non-empty list of {{role, content}}, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputFileError(f"prompt message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise InputFileError(f"prompt message {i}: field {key!r} must be a string, got {m.get(key)!r:.80}")
    if not any(m["role"] == "user" for m in messages):
        raise InputFileError("prompt messages: no 'user' turn (the zero template renders only user turns)")


def render_prompt(messages: list[dict], tokenizer, fmt: ThinkingFormatConfig) -> str:
    """The prompt text, ending where the model starts writing."""
    _check_messages(messages)
    if fmt.kind == "zero":
        return tokenizer.apply_chat_template(
            messages, chat_template=fmt.zero_template, add_generation_prompt=True, tokenize=False
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ThinkingFormatError(
            f"format {fmt.kind!r} uses the model's chat template, but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} has none (a base model needs kind 'zero' or an SFT'd template)"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_prompt_ids(
    messages: list[dict], tokenizer, fmt: ThinkingFormatConfig, max_prompt_tokens: int
) -> tuple[list[int], bool]:
    """Prompt token ids, left-truncated to ``max_prompt_tokens``; and whether they were cut.

    The rendered text already carries the template's BOS (Llama 3 and the zero template write
    ``bos_token``), so it is encoded with ``add_special_tokens=False``: a tokenizer that adds BOS
    on its own would otherwise put a second one in front (verl does the same).

    Left truncation keeps the last tokens (the end of the user turn and the generation prompt).
    With ``keep_bos_on_truncation`` a leading BOS survives the cut, because models trained with
    a BOS at position 0 degrade without it; set it False to reproduce verl exactly.
    """
    if max_prompt_tokens < 2:
        raise ThinkingFormatError(f"max_prompt_tokens must be >= 2 (BOS plus one token), got {max_prompt_tokens}")
    ids = list(tokenizer(render_prompt(messages, tokenizer, fmt), add_special_tokens=False)["input_ids"])
    if len(ids) <= max_prompt_tokens:
        return ids, False
    bos = tokenizer.bos_token_id
    if fmt.keep_bos_on_truncation and bos is not None and ids[0] == bos:
        return [bos] + ids[len(ids) - (max_prompt_tokens - 1):], True
    return ids[len(ids) - max_prompt_tokens:], True


def _end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant's content, if any.

    Llama 3 writes ``<|eot_id|>``, Qwen2 ``<|im_end|>``; a base tokenizer's eos
    (``<|end_of_text|>``, ``<|endoftext|>``) is then not the token that ends a turn.
    """
    sentinel = "Zq7sentinelanswer"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
    except Exception:  # a template that refuses this shape: fall back to eos alone
        return None
    at = text.rfind(sentinel)
    if at < 0:
        return None
    suffix = tokenizer(text[at + len(sentinel):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return suffix[0] if suffix and suffix[0] in special else None


def stop_settings(fmt: ThinkingFormatConfig, tokenizer) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) the rollout engine needs for this format.

    warm_start / no_think: the tokenizer's eos and the chat template's end-of-turn token.
    zero: the ``response_end`` string (the authors' ``stop.txt``) and the eos. The stop string
    must stay in the output (our engines keep it), or strict parsing nulls every answer.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if fmt.kind == "zero":
        return [fmt.response_end], ids
    eot = _end_of_turn_id(tokenizer)
    if eot is not None and eot not in ids:
        ids.append(int(eot))
    if not ids:
        raise ThinkingFormatError("tokenizer has no eos token and its chat template no end-of-turn token: "
                                  "generation could not stop")
    return [], ids
