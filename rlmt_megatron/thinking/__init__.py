"""RLMT thinking formats: prompt templates, engine stop settings, and the answer parser."""

from rlmt_megatron.thinking.parser import NULL_ANSWER, ParsedResponse, answer_for_reward, parse_response
from rlmt_megatron.thinking.templates import (
    ZERO_NOTHINK_CHAT_TEMPLATE,
    ZERO_THINK_CHAT_TEMPLATE,
    ThinkingFormatConfig,
    ThinkingFormatError,
    build_prompt_ids,
    render_prompt,
    stop_settings,
    warm_start_text,
)

__all__ = [
    "NULL_ANSWER",
    "ParsedResponse",
    "ThinkingFormatConfig",
    "ThinkingFormatError",
    "ZERO_NOTHINK_CHAT_TEMPLATE",
    "ZERO_THINK_CHAT_TEMPLATE",
    "answer_for_reward",
    "build_prompt_ids",
    "parse_response",
    "render_prompt",
    "stop_settings",
    "warm_start_text",
]
