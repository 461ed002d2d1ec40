"""SFT samples: assistant-only loss masks against a hand-built reference, row checks, lengths."""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlmt_megatron.data.sft import (
    ChatTemplateError,
    SFTDataConfig,
    assistant_token_mask,
    build_sft_sample,
    build_sft_samples,
    load_sft_samples,
)
from rlmt_megatron.errors import InputFileError
from rlmt_megatron.testing.tiny_models import BOS, END_HEADER, EOT, START_HEADER

REPO = Path(__file__).resolve().parent.parent

# The tiny template with the assistant's content and <|eot_id|> wrapped in {% generation %}.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ (message['content'] | trim) + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Drops the thinking of earlier assistant turns (as Qwen3's template does): no prefix property.
STRIPPING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set c = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (c | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
NO_GENERATION_PROMPT_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"

CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Plan a short trip."},
    {"role": "assistant", "content": "<think>\nGo somewhere close.\n</think>\n\nVisit the lake."},
    {"role": "user", "content": "And after that?"},
    {"role": "assistant", "content": "<think>\nOne more idea.\n</think>\n\nHave lunch in the village."},
]


@pytest.fixture(scope="module", params=["llama-policy", "qwen2-policy"])
def tok(request, tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models / request.param))


def reference(tok, messages):
    """Token ids and assistant mask built piece by piece from the strings the Llama-3 layout is
    made of (not by rendering the template): special tokens by id, text segments by encoding.
    Special tokens split the text, so each text segment is encoded on its own."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    sid = tok.convert_tokens_to_ids
    ids, mask = [sid(BOS)], [0]
    for m in messages:
        header = [sid(START_HEADER)] + enc(m["role"]) + [sid(END_HEADER)]
        newline = enc("\n\n")
        body = enc(m["content"].strip()) + [sid(EOT)]
        ids += header + newline + body
        mask += [0] * (len(header) + len(newline)) + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


@pytest.mark.parametrize("method", ["prefix", "generation"])
@pytest.mark.parametrize("turns", [3, 5])
def test_mask_matches_hand_built_reference(tok, method, turns):
    messages = CHAT[:turns]
    want_ids, want_mask = reference(tok, messages)
    if method == "generation":
        tok = _with_template(tok, GENERATION_TEMPLATE)
    ids, mask = assistant_token_mask(tok, messages, method)
    assert ids == want_ids
    assert mask == want_mask
    # The sample: action t predicts token t + 1, so the loss mask is the token mask shifted by one.
    s = build_sft_sample(tok, messages, SFTDataConfig())
    assert s.input_ids.tolist() == want_ids
    assert s.fields["loss_mask"].tolist() == [float(x) for x in want_mask[1:]]
    # Exactly the assistant content and its end-of-turn token are trained (tokens decoded back).
    trained = tok.decode([t for t, m in zip(want_ids, want_mask) if m])
    assert trained == "".join(m["content"] + EOT for m in messages if m["role"] == "assistant")


# ChatML as Qwen2.5 lays it out: a default system turn when none is given, "<|im_end|>\n" after
# every turn, the header and the content in one text segment.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chatml_layout_trains_content_im_end_and_its_newline(tiny_models):
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "qwen2-policy"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    messages = CHAT[1:]  # no system message: the template adds its default one
    turns = [{"role": "system", "content": "You are a helpful assistant."}] + messages
    want_ids, want_mask = [], []
    for m in turns:
        head, body = enc(m["role"] + "\n"), enc(m["content"])
        assert enc(m["role"] + "\n" + m["content"]) == head + body  # the reference's own premise
        ids = [start] + head + body + [end] + enc("\n")
        want_ids += ids
        trained = int(m["role"] == "assistant")
        want_mask += [0] * (1 + len(head)) + [trained] * (len(ids) - 1 - len(head))
    assert assistant_token_mask(tok, messages, "prefix") == (want_ids, want_mask)


def test_auto_picks_generation_tags_when_present(tiny_models):
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    gen = _with_template(tok, GENERATION_TEMPLATE)
    want = reference(tok, CHAT)
    assert assistant_token_mask(gen, CHAT, "auto") == want
    assert assistant_token_mask(tok, CHAT, "auto") == want
    # A template whose generation block covers nothing: the generation path notices.
    empty = _with_template(tok, GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
                           + "{% if false %}{% generation %}{% endgeneration %}{% endif %}")
    with pytest.raises(ChatTemplateError, match="marked no token"):
        assistant_token_mask(empty, CHAT, "auto")


def test_templates_without_the_prefix_property_are_refused(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    stripping = _with_template(tok, STRIPPING_TEMPLATE)
    assistant_token_mask(stripping, CHAT[:3], "prefix")  # one turn: nothing earlier to rewrite
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(ChatTemplateError, match=rf"{path}:1: .*not a prefix of the next"):
        build_sft_samples(path, stripping)
    with pytest.raises(ChatTemplateError, match="ignores add_generation_prompt"):
        assistant_token_mask(_with_template(tok, NO_GENERATION_PROMPT_TEMPLATE), CHAT[:3], "prefix")


def test_bad_rows_are_counted_with_their_line(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    good = {"messages": CHAT[1:3]}
    rows = [
        ({"messages": "text"}, "not_a_list"),
        ({"other": []}, "missing_field"),
        ({"messages": []}, "empty_messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "bad_role"),
        ({"messages": [CHAT[1], {"role": "assistant", "content": ""}]}, "empty_content"),
        ({"messages": CHAT[1:4]}, "last_not_assistant"),
        ({"messages": [CHAT[2], CHAT[1], CHAT[2]]}, "assistant_first"),
        ({"messages": [CHAT[1], {"role": "assistant", "content": "no thinking here"}]}, "missing_delimiter"),
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in rows) + json.dumps(good) + "\n")
    samples, report = build_sft_samples(path, tok, SFTDataConfig(require_delimiter="</think>", max_examples=3))
    assert len(samples) == 1 and report.kept == 1 and report.total == len(rows) + 1
    assert dict(report.skipped) == {reason: 1 for _, reason in rows}
    assert report.examples == [f"{path}:1: field 'messages' is str, expected a list of messages [not_a_list]",
                               f"{path}:2: field 'messages' is missing or null [missing_field]",
                               f"{path}:3: field 'messages' is an empty list [empty_messages]"]
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(rows[0][0]) + "\n")
    with pytest.raises(InputFileError, match=r"bad.jsonl: no usable SFT rows .*not_a_list=1"):
        build_sft_samples(only_bad, tok)


def test_overlong_rows_dropped_by_default_or_truncated(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    ids, mask = reference(tok, CHAT)
    first_assistant = reference(tok, CHAT[1:3])[1].index(1)  # the earlier of the two rows' first
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[1:3]}) + "\n")
    limit = len(ids) - 3
    samples, report = build_sft_samples(path, tok, SFTDataConfig(max_length=limit))
    assert len(samples) == 1 and dict(report.skipped) == {"too_long": 1}
    samples, report = build_sft_samples(path, tok, SFTDataConfig(max_length=limit, overlong="truncate"))
    assert report.num_skipped == 0
    assert samples[0].input_ids.tolist() == ids[:limit]
    assert samples[0].fields["loss_mask"].tolist() == [float(x) for x in mask[1:limit]]
    # A cut before the first assistant token leaves nothing to train: dropped, not kept empty.
    with pytest.raises(InputFileError, match="no_loss_tokens=2"):
        build_sft_samples(path, tok, SFTDataConfig(max_length=first_assistant, overlong="truncate"))


def test_bundled_thinking_set_and_its_generator(tiny_models, tmp_path):
    spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "tools" / "make_synthetic_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.main(["--out", str(tmp_path)])
    for name in ("sft_thinking.jsonl", "synthetic_prompts.jsonl"):  # committed files are reproducible
        assert (tmp_path / name).read_bytes() == (REPO / "examples" / "data" / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tiny_models / "llama-policy"))
    path = REPO / "examples" / "data" / "sft_thinking.jsonl"
    samples, report = build_sft_samples(path, tok, SFTDataConfig(require_delimiter="</think>"))
    assert len(samples) == 64 and report.num_skipped == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows) == 8
    for row, s in zip(rows, samples):
        want_ids, want_mask = reference(tok, row["messages"])
        assert s.input_ids.tolist() == want_ids and s.fields["loss_mask"].tolist() == want_mask[1:]
    assert len(load_sft_samples(path, tok, max_length=4096)) == 64


def _with_template(tok, template):
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = template
    return other
