"""Render a (conversation, answer) pair the way the reward model was trained to read it.

The RM sees the user turn(s) and the answer, in the RM's **own** chat template (not the
policy's), with no system prompt (RLMT scores the answer to the user, not to our instructions)
and exactly one BOS: templates that start with BOS are tokenised without adding another.
"""

from __future__ import annotations


def rm_conversation(messages: list[dict], answer: str) -> list[dict]:
    """Drop system turns and any trailing assistant turn, then append the answer."""
    turns = [m for m in messages if m["role"] != "system"]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns + [{"role": "assistant", "content": answer}]


def rm_input_ids(tokenizer, messages: list[dict], answer: str) -> list[int]:
    """Token ids for the RM: its chat template, tokenised without a second BOS."""
    text = tokenizer.apply_chat_template(rm_conversation(messages, answer), tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids
