"""Prompt sets: loaders (parquet, jsonl, datasets folder), row checks, sampler, left truncation."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmt_megatron.data.prompts import PromptSampler, load_prompt_set, truncate_left
from rlmt_megatron.errors import InputFileError, RLMTError

REPO = Path(__file__).resolve().parent.parent
WILDCHAT = REPO.parent / "shared" / "data" / "wildchat-if"


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


GOOD = [[user("first")], [{"role": "system", "content": "be kind"}, user("second")],
        [user("a"), asst("b"), user("third")]]
# (chat, reason) for every malformed case a parquet column of list<struct<role, content>> can hold.
BAD = [
    (None, "missing_field"),
    ([], "empty_messages"),
    ([{"role": "tool", "content": "x"}], "bad_role"),
    ([{"role": None, "content": "x"}], "bad_role"),
    ([{"role": "user", "content": None}], "content_not_string"),
    ([user("   \n")], "empty_content"),
    ([user("q"), asst("an answer")], "trailing_assistant"),
    ([{"role": "system", "content": "only a system prompt"}], "no_user_turn"),
    ([user("q"), {"role": "system", "content": "late"}], "misplaced_system"),
]


def write_parquet(path, chats, sources=None, column="prompt"):
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    cols = {column: pa.array(chats, type=pa.list_(msg))}
    if sources is not None:
        cols["data_source"] = pa.array(sources, type=pa.string())
    pq.write_table(pa.table(cols), path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def check_report(ps, where_prefix):
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(ps.report.skipped) == expected
    assert ps.report.total == len(GOOD) + len(BAD) and ps.report.kept == len(GOOD)
    assert len(ps.report.examples) == 5 and all(e.startswith(where_prefix) for e in ps.report.examples)


def test_parquet_bad_rows_are_counted_and_skipped_with_row_numbers(tmp_path):
    chats = [c for c, _ in BAD[:4]] + GOOD + [c for c, _ in BAD[4:]]
    path = tmp_path / "p.parquet"
    write_parquet(path, chats, sources=[f"src{i}" for i in range(len(chats))])
    ps = load_prompt_set(path)
    check_report(ps, f"{path} row ")
    assert f"{path} row 0: field 'prompt' is missing or null [missing_field]" in ps.report.examples
    # original row index and data_source survive; messages are exactly the input chats
    assert [(p.index, p.source) for p in ps] == [(4, "src4"), (5, "src5"), (6, "src6")]
    assert [p.messages for p in ps] == GOOD


def test_jsonl_bad_rows_name_the_line(tmp_path):
    rows = [{"messages": c, "data_source": "j"} for c, _ in BAD] + [{"messages": c} for c in GOOD]
    rows[0] = {"data_source": "j"}  # the field absent altogether
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank first line is not a row
    ps = load_prompt_set(path)
    check_report(ps, f"{path}:")
    assert ps.report.examples[0].startswith(f"{path}:2: ")
    assert [(p.index, p.source) for p in ps] == [(9, None), (10, None), (11, None)]


def test_jsonl_type_errors_that_parquet_cannot_hold(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"messages": "hello"}, {"messages": ["hello"]}, {"messages": [{"role": "user", "content": 3}]},
                       {"messages": [user("fine")]}])
    ps = load_prompt_set(path)
    assert dict(ps.report.skipped) == {"not_a_list": 1, "bad_message": 1, "content_not_string": 1}
    assert len(ps) == 1


def test_trailing_assistant_turns_can_be_dropped(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"messages": [user("q"), asst("a"), asst("b")]}, {"messages": [asst("only")]}])
    ps = load_prompt_set(path, drop_trailing_assistant=True)
    assert [p.messages for p in ps] == [[user("q")]]
    assert dict(ps.report.skipped) == {"no_user_turn": 1}


def test_nothing_usable_or_wrong_column_is_an_error(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a plain string", "another"]}), path)
    with pytest.raises(InputFileError, match=r"bad.parquet: no usable prompt rows .*not_a_list=2"):
        load_prompt_set(path)
    good = tmp_path / "g.parquet"
    write_parquet(good, GOOD, column="chat")
    with pytest.raises(InputFileError, match="no 'prompt' or 'messages' column"):
        load_prompt_set(good)
    with pytest.raises(InputFileError, match="no column 'conversation'"):
        load_prompt_set(good, field="conversation")
    assert [p.messages for p in load_prompt_set(good, field="chat")] == GOOD
    with pytest.raises(InputFileError, match="unknown prompt file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_prompt_set(tmp_path / "x.csv")
    with pytest.raises(InputFileError, match="cannot read as parquet"):
        (tmp_path / "junk.parquet").write_bytes(b"not parquet")
        load_prompt_set(tmp_path / "junk.parquet")


def test_files_are_concatenated_in_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    write_jsonl(a, [{"messages": GOOD[0]}])
    write_parquet(b, GOOD[1:], sources=["x", "y"])
    ps = load_prompt_set([a, b])
    assert [(Path(p.path).name, p.index, p.source) for p in ps] == [("a.jsonl", 0, None), ("b.parquet", 0, "x"), ("b.parquet", 1, "y")]
    assert ps.report.total == ps.report.kept == 3


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the 'datasets' package is not installed")
    rows = [{"prompt": c, "data_source": "d"} for c in GOOD] + [{"prompt": [user("q"), asst("a")], "data_source": "d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    ps = load_prompt_set(tmp_path / "ds")
    assert [p.messages for p in ps] == GOOD and {p.source for p in ps} == {"d"}
    assert dict(ps.report.skipped) == {"trailing_assistant": 1}
    assert ps.report.examples[0].startswith(f"{tmp_path / 'ds'} row 3: ")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputFileError, match="DatasetDict with splits train; pass one split's folder"):
        load_prompt_set(tmp_path / "dd")
    assert len(load_prompt_set(tmp_path / "dd" / "train")) == 3


def test_datasets_folder_without_the_package_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # makes "import datasets" fail
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputFileError, match=r"'datasets' package is not installed \(pip install datasets\)"):
        load_prompt_set(tmp_path / "folder")


@pytest.mark.skipif(not WILDCHAT.is_dir(), reason=f"real WildChat-IF prompts not found at {WILDCHAT}")
def test_real_wildchat_if_parquet():
    train = load_prompt_set(WILDCHAT / "wildchat-if_train.parquet")
    val = load_prompt_set(WILDCHAT / "wildchat-if_val.parquet")
    assert (len(train), len(val)) == (7544, 250)
    assert train.report.num_skipped == val.report.num_skipped == 0
    # Independent read of the same file: pyarrow rows, in order, untouched.
    raw = pq.read_table(WILDCHAT / "wildchat-if_val.parquet").to_pylist()
    assert [p.messages for p in val] == [r["prompt"] for r in raw]
    assert [p.index for p in val] == [r["extra_info"]["index"] for r in raw]
    assert {p.source for p in train} == {"wildchat-if"}


def test_bundled_synthetic_prompts():
    ps = load_prompt_set(REPO / "examples" / "data" / "synthetic_prompts.jsonl")
    assert len(ps) == 64 and ps.report.num_skipped == 0
    assert len({p.messages[-1]["content"] for p in ps}) == 64


# --------------------------------------------------------------------------- sampler


def numbered(n):
    return [{"id": i} for i in range(n)]  # the sampler only indexes; any items do


def fake_set(n):
    """A PromptSet-like sequence with a fingerprint, so sampler tests need no files."""
    class S(list):
        def fingerprint(self):
            return f"set-of-{len(self)}"
    return S(numbered(n))


def ids(batch):
    return [p["id"] for p in batch]


def test_each_epoch_is_a_permutation_in_full_batches():
    s = PromptSampler(fake_set(10), 4, seed=3)
    assert s.steps_per_epoch == 2
    epochs = {}
    for _ in range(6):
        b = ids(s.next_batch())
        assert len(b) == 4
        epochs.setdefault(s.epoch, []).extend(b)
    assert sorted(epochs) == [0, 1, 2]
    for e, seen in epochs.items():
        assert len(set(seen)) == 8  # no repeats inside an epoch; 2 prompts wait for a later epoch
    assert len({tuple(v) for v in epochs.values()}) == 3  # a fresh shuffle every epoch


def test_keep_last_returns_the_partial_batch_and_no_shuffle_keeps_file_order():
    s = PromptSampler(fake_set(10), 4, shuffle=False, drop_last=False)
    assert s.steps_per_epoch == 3
    assert [ids(s.next_batch()) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    assert s.epoch == 1


def test_same_seed_same_batches_other_seed_other_batches():
    a = [ids(b) for b in _draw(PromptSampler(fake_set(50), 8, seed=1), 9)]
    assert a == [ids(b) for b in _draw(PromptSampler(fake_set(50), 8, seed=1), 9)]
    assert a[0] != ids(PromptSampler(fake_set(50), 8, seed=2).next_batch())


def _draw(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_continues_with_exactly_the_same_batches(drop_last):
    straight = PromptSampler(fake_set(10), 3, seed=11, drop_last=drop_last)
    expected = [ids(b) for b in _draw(straight, 5)]  # crosses an epoch boundary (3 or 4 steps per epoch)
    first = PromptSampler(fake_set(10), 3, seed=11, drop_last=drop_last)
    got = [ids(b) for b in _draw(first, 2)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint's serialisation
    resumed = PromptSampler(fake_set(10), 3, seed=999, drop_last=drop_last)  # the state's seed wins
    resumed.load_state_dict(state)
    got += [ids(b) for b in _draw(resumed, 3)]
    assert got == expected
    assert resumed.epoch == straight.epoch and resumed.state_dict() == straight.state_dict()


def test_resume_on_real_prompt_set_and_refusals(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"messages": [user(f"question {i}")]} for i in range(7)])
    ps = load_prompt_set(path)
    a = PromptSampler(ps, 2, seed=5)
    a.next_batch()
    state = a.state_dict()
    b = PromptSampler(load_prompt_set(path), 2, seed=5)
    b.load_state_dict(state)
    assert [p.messages for p in b.next_batch()] == [p.messages for p in a.next_batch()]
    write_jsonl(path, [{"messages": [user(f"other question {i}")]} for i in range(7)])
    with pytest.raises(RLMTError, match="different prompt set"):
        PromptSampler(load_prompt_set(path), 2, seed=5).load_state_dict(state)
    with pytest.raises(RLMTError, match="shuffle=True, this run has False"):
        PromptSampler(ps, 2, seed=5, shuffle=False).load_state_dict(state)


def test_set_smaller_than_one_batch_is_an_error():
    with pytest.raises(InputFileError, match="3 prompts, fewer than one batch of 4"):
        PromptSampler(fake_set(3), 4)


# --------------------------------------------------------------------------- truncation


def test_truncate_left_keeps_the_end():
    ids_ = list(range(100, 110))
    assert truncate_left(ids_, 4) == ([106, 107, 108, 109], True)
    assert truncate_left(ids_, 10) == (ids_, False)
    assert truncate_left(ids_, 50) == (ids_, False)
    with pytest.raises(RLMTError):
        truncate_left(ids_, 0)
