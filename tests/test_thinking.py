"""Thinking formats against the authors' rules (princeton-pli/RLMT @ 2cde311b).

Every expected value below is written by hand from the authors' code:
- the parser: ``SequenceRewardModelWorker._extract_response`` in
  ``training/ppo_grpo/verl/workers/fsdp_workers.py`` (first occurrence of the answer-start
  delimiter, left-strip; first ``</response>`` after it, right-strip; ``[NULL]`` when strict);
- the zero prompt: ``THINKING_CHAT_TEMPLATE`` / ``NOTHINK_CHAT_TEMPLATE`` in
  ``training/sft_dpo/utils/src/convert_base_to_{,nothink_}prompted_model.py``, rendered by hand;
- prompt ids: verl's ``apply_chat_template(..., tokenize=False)`` + encode without specials.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import AddedToken, AutoTokenizer

from rlmt_megatron.errors import InputFileError
from rlmt_megatron.thinking import (
    NULL_ANSWER,
    ZERO_NOTHINK_CHAT_TEMPLATE,
    ThinkingFormatConfig,
    ThinkingFormatError,
    answer_for_reward,
    build_prompt_ids,
    parse_response,
    render_prompt,
    stop_settings,
    warm_start_text,
)

# --------------------------------------------------------------------------- parser

WARM = ThinkingFormatConfig(kind="warm_start", strict=False)
WARM_STRICT = ThinkingFormatConfig(kind="warm_start", strict=True)
ZERO = ThinkingFormatConfig(kind="zero", strict=False)
ZERO_STRICT = ThinkingFormatConfig(kind="zero", strict=True)
NO_THINK = ThinkingFormatConfig(kind="no_think", strict=True)  # strict has nothing to check here

N = NULL_ANSWER
# (case, text, non-strict (thinking, answer, format_ok, reason), strict answer)
WARM_CASES = [
    ("well formed", "<think>\nplan A\n</think>\n\nThe answer.",
     ("plan A", "The answer.", True, "ok"), "The answer."),
    ("missing <think> (not needed)", "plan A\n</think>\n\nThe answer.",
     ("plan A", "The answer.", True, "ok"), "The answer."),
    ("missing </think>: whole output, unstripped", "<think>\nplan A, still planning ",
     (None, "<think>\nplan A, still planning ", False, "no_answer_start"), N),
    ("no tags at all", "Just an answer.",
     (None, "Just an answer.", False, "no_answer_start"), N),
    ("empty thinking", "<think>\n\n</think>\n\nAnswer.",
     ("", "Answer.", True, "ok"), "Answer."),
    ("empty answer", "<think>\nplan\n</think>\n\n",
     ("plan", "", True, "ok"), ""),
    ("repeated </think>: first one splits", "<think>\na\n</think>\n\nb\n</think>\n\nc",
     ("a", "b\n</think>\n\nc", True, "ok"), "b\n</think>\n\nc"),
    ("tags in a code block of the answer", "<think>\nplan\n</think>\n\nUse:\n```html\n<think>x</think>\n```",
     ("plan", "Use:\n```html\n<think>x</think>\n```", True, "ok"), "Use:\n```html\n<think>x</think>\n```"),
    ("</think> quoted inside the thinking still splits", "<think>\nwrite `</think>` literally\n</think>\n\nDone.",
     ("write `", "` literally\n</think>\n\nDone.", True, "ok"), "` literally\n</think>\n\nDone."),
    ("answer: left-stripped only", "  <think>plan</think>   \n  Answer  \n",
     ("plan", "Answer  \n", True, "ok"), "Answer  \n"),
    ("CRLF", "<think>plan</think>\r\n\r\nAnswer",
     ("plan", "Answer", True, "ok"), "Answer"),
    ("text before <think>", "Sure! <think>plan</think>\n\nAnswer",
     ("Sure! <think>plan", "Answer", True, "ok"), "Answer"),
    ("truncated mid-answer is still well formed", "<think>\nplan\n</think>\n\nThe answer is cut mid-sen",
     ("plan", "The answer is cut mid-sen", True, "ok"), "The answer is cut mid-sen"),
    ("<response> tags mean nothing here", "<think>p</think> <response> A </response>",
     ("p", "<response> A </response>", True, "ok"), "<response> A </response>"),
]

ZERO_CASES = [
    ("well formed", " <think> reasoning here </think> <response> The answer. </response>",
     ("reasoning here", "The answer.", True, "ok"), "The answer."),
    ("missing </response> (truncated or stop string trimmed)", " <think> r </think> <response> The answer, cut",
     ("r", "The answer, cut", False, "no_answer_end"), N),
    ("missing <response>: cut before </response> of the whole text", " <think> r </think> The answer. </response>",
     (None, " <think> r </think> The answer.", False, "no_answer_start"), N),
    ("both missing: whole text", " <think> r </think> The answer.",
     (None, " <think> r </think> The answer.", False, "no_answer_start_or_end"), N),
    ("hallucinated next turn after </response>", " <think> r </think> <response> A </response>\nUser: <query>more</query>",
     ("r", "A", True, "ok"), "A"),
    ("repeated response blocks: the first", "<think>r</think><response>A</response><response>B</response>",
     ("r", "A", True, "ok"), "A"),
    ("</response> before <response> does not count", "</response> <think>r</think> <response>A",
     ("</response> <think>r", "A", False, "no_answer_end"), N),
    ("empty response", "<think>r</think><response></response>",
     ("r", "", True, "ok"), ""),
    ("empty thinking", "<think></think> <response> A </response>",
     ("", "A", True, "ok"), "A"),
    ("no-think zero output", " <response> A </response>",
     ("", "A", True, "ok"), "A"),
    ("multi-line answer keeps inner newlines", "<think>\nr\n</think>\n<response>\nLine 1\n\nLine 2\n</response>",
     ("r", "Line 1\n\nLine 2", True, "ok"), "Line 1\n\nLine 2"),
    ("code block holding </response> ends the answer early", "<think>r</think><response>Use `</response>` here</response>",
     ("r", "Use `", True, "ok"), "Use `"),
]


def _check(parsed, thinking, answer, ok, reason):
    assert (parsed.thinking, parsed.answer, parsed.format_ok, parsed.reason) == (thinking, answer, ok, reason)


@pytest.mark.parametrize("case,text,loose,strict_answer", WARM_CASES, ids=[c[0] for c in WARM_CASES])
def test_warm_start_parser(case, text, loose, strict_answer):
    _check(parse_response(text, WARM), *loose)
    strict = parse_response(text, WARM_STRICT)
    assert strict.answer == strict_answer
    assert (strict.format_ok, strict.reason) == loose[2:]


@pytest.mark.parametrize("case,text,loose,strict_answer", ZERO_CASES, ids=[c[0] for c in ZERO_CASES])
def test_zero_parser(case, text, loose, strict_answer):
    _check(parse_response(text, ZERO), *loose)
    strict = parse_response(text, ZERO_STRICT)
    assert strict.answer == strict_answer
    assert (strict.format_ok, strict.reason) == loose[2:]


@pytest.mark.parametrize("text", ["<think>x</think> Answer ", "", "plain"])
def test_no_think_scores_the_whole_text(text):
    _check(parse_response(text, NO_THINK), None, text, True, "not_thinking")


def test_eos_text_is_removed_like_the_authors_decode():
    text = "<think>\nplan\n</think>\n\nAnswer.<|eot_id|>"
    assert answer_for_reward(text, WARM, eos_token="<|eot_id|>") == "Answer."
    assert answer_for_reward(text, WARM) == "Answer.<|eot_id|>"  # caller decoded with specials: its job
    # removed before parsing: an eos right after </think> no longer hides the answer from lstrip
    assert answer_for_reward("<think>p</think><|eot_id|> A", WARM_STRICT, eos_token="<|eot_id|>") == "A"
    assert answer_for_reward("<response> A <|eot_id|>", ZERO_STRICT, eos_token="<|eot_id|>") == NULL_ANSWER


def test_custom_delimiters():
    fmt = ThinkingFormatConfig(kind="warm_start", think_start="<|begin_think|>", think_end="<|end_think|>")
    _check(parse_response("<|begin_think|>p<|end_think|>\nA", fmt), "p", "A", True, "ok")
    _check(parse_response("<think>p</think>\nA", fmt), None, "<think>p</think>\nA", False, "no_answer_start")
    zfmt = ThinkingFormatConfig(kind="zero", response_start="<answer>", response_end="</answer>", strict=True)
    _check(parse_response("<think>r</think><answer> A </answer>", zfmt), "r", "A", True, "ok")
    assert parse_response("<think>r</think><response> A </response>", zfmt).answer == NULL_ANSWER


def test_warm_start_text_round_trips():
    text = warm_start_text("step 1\nstep 2", "Final.")
    assert text == "<think>\nstep 1\nstep 2\n</think>\n\nFinal."
    _check(parse_response(text, WARM_STRICT), "step 1\nstep 2", "Final.", True, "ok")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [{"kind": "zero_shot"}, {"think_end": ""}, {"strict": "maybe"}, {"delimiter": "</think>"}])
def test_config_rejects_bad_fields(bad):
    with pytest.raises(ValidationError):
        ThinkingFormatConfig(**bad)


def test_config_defaults_are_the_papers():
    fmt = ThinkingFormatConfig()
    assert (fmt.kind, fmt.strict) == ("warm_start", False)
    assert (fmt.think_start, fmt.think_end, fmt.response_start, fmt.response_end) == (
        "<think>", "</think>", "<response>", "</response>")
    assert fmt.answer_delimiters() == ("</think>", None)
    assert ThinkingFormatConfig(kind="zero").answer_delimiters() == ("<response>", "</response>")
    assert ThinkingFormatConfig(kind="no_think").answer_delimiters() == (None, None)


# --------------------------------------------------------------------------- prompts

BOS, EOT, END_OF_TEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
ZERO_HEADER = (
    "A conversation between User and Assistant. Following the User's query, the Assistant first plans a "
    "response, and then provides the response. The internal reasoning process is enclosed within <think> "
    "</think> tags and the response is enclosed within <response> </response> tags, i.e., in the format "
    "<think> reasoning process here </think> <response> response here </response>.\n\n"
)
ZERO_NOTHINK_HEADER = (
    "A conversation between User and Assistant. The user asks a question, and the assistant provides a "
    "response. The response is enclosed within <response> </response> tags, i.e., <response> response "
    "</response>.\n\n"
)
QWEN2_TEMPLATE = (  # Qwen2.5's ChatML layout, without its default system prompt
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
USER = [{"role": "user", "content": "  How do I bake a cake?\n"}]


@pytest.fixture(scope="module")
def toks(tiny_models):
    llama_dir = str(tiny_models / "llama-policy")
    llama = AutoTokenizer.from_pretrained(llama_dir)
    # Real Llama 3 tokenizers add BOS on every encode AND their template writes it: the double-BOS trap.
    adds_bos = AutoTokenizer.from_pretrained(llama_dir, add_bos_token=True)
    # Llama-3.1 base: eos <|end_of_text|>, while the chat template ends turns with <|eot_id|>.
    base_eos = AutoTokenizer.from_pretrained(llama_dir, eos_token=END_OF_TEXT)
    qwen = AutoTokenizer.from_pretrained(str(tiny_models / "qwen2-policy"))
    qwen.add_tokens([AddedToken(t, special=True, normalized=False)
                     for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")], special_tokens=True)
    qwen.bos_token = None  # Qwen2.5 has no BOS
    qwen.eos_token = "<|endoftext|>"  # Qwen2.5 base
    qwen.chat_template = QWEN2_TEMPLATE
    assert adds_bos("a")["input_ids"][0] == adds_bos.bos_token_id  # the trap is armed
    return {"llama": llama, "adds_bos": adds_bos, "base_eos": base_eos, "qwen": qwen}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["llama", "adds_bos"])
@pytest.mark.parametrize("kind", ["warm_start", "no_think"])
def test_chat_template_prompt_has_one_bos_and_no_prefill(toks, name, kind):
    tok = toks[name]
    expected = (f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nHow do I bake a cake?{EOT}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids, cut = build_prompt_ids(USER, tok, ThinkingFormatConfig(kind=kind), max_prompt_tokens=1024)
    assert not cut
    assert ids == _ids(tok, expected)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.parametrize("name", ["llama", "adds_bos"])
def test_zero_prompt_is_the_authors_template(toks, name):
    tok = toks[name]
    fmt = ThinkingFormatConfig(kind="zero")
    text = render_prompt(USER, tok, fmt)
    assert text == BOS + ZERO_HEADER + "User: <query>How do I bake a cake?</query>\nAssistant:"
    ids, cut = build_prompt_ids(USER, tok, fmt, max_prompt_tokens=1024)
    assert not cut and ids == _ids(tok, text) and ids.count(tok.bos_token_id) == 1


def test_zero_template_multi_turn_and_system_quirks(toks):
    # The authors' template drops system turns and writes no newline after an assistant turn.
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": " b "}, {"role": "user", "content": "c"}]
    text = render_prompt(msgs, toks["llama"], ThinkingFormatConfig(kind="zero"))
    assert text == BOS + ZERO_HEADER + "User: <query>a</query>\nAssistant: bUser: <query>c</query>\nAssistant:"


def test_zero_nothink_template(toks):
    fmt = ThinkingFormatConfig(kind="zero", zero_template=ZERO_NOTHINK_CHAT_TEMPLATE)
    assert render_prompt(USER, toks["llama"], fmt) == (
        BOS + ZERO_NOTHINK_HEADER + "User: <query>How do I bake a cake?</query>\nAssistant:")


def test_tokenizer_without_bos(toks):
    tok = toks["qwen"]
    zero = render_prompt(USER, tok, ThinkingFormatConfig(kind="zero"))
    assert zero == ZERO_HEADER + "User: <query>How do I bake a cake?</query>\nAssistant:"  # no BOS, no "None"
    ids, _ = build_prompt_ids(USER, tok, ThinkingFormatConfig(), max_prompt_tokens=1024)
    assert ids == _ids(tok, "<|im_start|>user\n  How do I bake a cake?\n<|im_end|>\n<|im_start|>assistant\n")


LONG = [{"role": "user", "content": " ".join(["the quiet river found a golden lantern"] * 12)}]


@pytest.mark.parametrize("keep_bos", [True, False])
def test_left_truncation_keeps_the_tail(toks, keep_bos):
    tok = toks["llama"]
    fmt = ThinkingFormatConfig(keep_bos_on_truncation=keep_bos)
    full = _ids(tok, f"{BOS}<|start_header_id|>user<|end_header_id|>\n\n{LONG[0]['content']}{EOT}"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert len(full) > 40
    ids, cut = build_prompt_ids(LONG, tok, fmt, max_prompt_tokens=20)
    assert cut and len(ids) == 20
    assert ids == ([tok.bos_token_id] + full[-19:] if keep_bos else full[-20:])
    assert build_prompt_ids(LONG, tok, fmt, max_prompt_tokens=len(full)) == (full, False)
    ids, cut = build_prompt_ids(LONG, tok, fmt, max_prompt_tokens=len(full) - 1)
    assert cut and ids == ([full[0]] + full[2:] if keep_bos else full[1:])


def test_truncation_without_bos_is_plain_tail(toks):
    tok = toks["qwen"]
    full = _ids(tok, f"<|im_start|>user\n{LONG[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt_ids(LONG, tok, ThinkingFormatConfig(), max_prompt_tokens=20) == (full[-20:], True)


def test_stop_settings(toks):
    llama, base, qwen = toks["llama"], toks["base_eos"], toks["qwen"]
    eot, eotext = llama.convert_tokens_to_ids(EOT), llama.convert_tokens_to_ids(END_OF_TEXT)
    assert stop_settings(ThinkingFormatConfig(), llama) == ([], [eot])
    assert stop_settings(ThinkingFormatConfig(kind="no_think"), base) == ([], [eotext, eot])
    im_end, endoftext = qwen.convert_tokens_to_ids("<|im_end|>"), qwen.convert_tokens_to_ids("<|endoftext|>")
    assert stop_settings(ThinkingFormatConfig(), qwen) == ([], [endoftext, im_end])
    assert stop_settings(ThinkingFormatConfig(kind="zero"), base) == (["</response>"], [eotext])
    assert stop_settings(ThinkingFormatConfig(kind="zero", response_end="</answer>"), qwen) == (["</answer>"], [endoftext])


def test_prompt_errors_name_the_problem(toks):
    tok = toks["llama"]
    with pytest.raises(InputFileError, match=r"message 1: field 'content'"):
        build_prompt_ids([{"role": "user", "content": "a"}, {"role": "user"}], tok, ThinkingFormatConfig(), 64)
    with pytest.raises(InputFileError, match="no 'user' turn"):
        build_prompt_ids([{"role": "system", "content": "a"}], tok, ThinkingFormatConfig(), 64)
    with pytest.raises(ThinkingFormatError, match="max_prompt_tokens"):
        build_prompt_ids(USER, tok, ThinkingFormatConfig(), 1)
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ThinkingFormatError, match="has none"):
        build_prompt_ids(USER, bare, ThinkingFormatConfig(kind="warm_start"), 64)
    assert build_prompt_ids(USER, bare, ThinkingFormatConfig(kind="zero"), 1024)[0][0] == tok.bos_token_id


def test_the_reward_reads_the_answer_decoded_as_the_authors_do(tiny_models):
    """Special tokens are kept and only the eos text removed before the answer is extracted
    (the authors' reward worker decodes with special tokens, then replace(eos_token, "")): a
    non-eos special token that ends a response reaches the reward model."""
    from rlmt_megatron.config.rlmt import ThinkingFormatConfig
    from rlmt_megatron.trainer.experience import Rollout
    from rlmt_megatron.trainer.rollout_phase import parse_and_score

    tok = AutoTokenizer.from_pretrained(tiny_models / "llama-policy")
    body = tok("<think>\nplan\n</think>\n\nthe answer", add_special_tokens=False)["input_ids"]
    end_of_text = tok.convert_tokens_to_ids("<|end_of_text|>")
    responses = [body + [tok.eos_token_id], body + [end_of_text, tok.eos_token_id]]
    rollouts = [Rollout(0, [1], ids, [0.0] * len(ids), "stop", 0) for ids in responses]

    class Recorder:
        def score(self, conversations, answers):
            self.answers = list(answers)
            return [0.0] * len(answers)

    scorer = Recorder()
    parse_and_score(ThinkingFormatConfig(), tok, scorer, rollouts, [[{"role": "user", "content": "q"}]])
    assert scorer.answers == ["the answer", "the answer<|end_of_text|>"]
    assert [r.extras["format_ok"] for r in rollouts] == [True, True]
