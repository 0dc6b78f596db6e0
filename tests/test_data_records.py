"""Reading records (JSONL, Parquet, folders, Hugging Face datasets), response-only labels, and bad input."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_horizon.data.config import DataConfig
from lightning_horizon.data.encode import IGNORE_INDEX, encode_records
from lightning_horizon.data.errors import DataError
from lightning_horizon.data.records import Record, read_records

CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"}]}
PAIR = {"prompt": "Spell 'cat' backwards.", "response": "tac", "system": "Be brief."}
TEXT = {"text": "The quick brown fox."}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_forms_are_normalised(tmp_path):
    records, skipped = read_records(write_jsonl(tmp_path / "d.jsonl", [CHAT, "", PAIR, TEXT]))
    assert skipped == 0 and len(records) == 3
    assert records[0].messages == tuple(CHAT["messages"]) and records[0].source.endswith("d.jsonl:1")
    assert [m["role"] for m in records[1].messages] == ["system", "user", "assistant"]
    assert records[1].source.endswith("d.jsonl:3")  # blank line 2 skipped, numbering kept
    assert records[2].text == TEXT["text"] and not records[2].is_chat


def test_parquet_folder_and_hf_dataset(tmp_path):
    pq.write_table(pa.Table.from_pylist([PAIR, PAIR]), tmp_path / "a.parquet")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", [CHAT])
    records, _ = read_records(str(tmp_path))  # folder: both files, recursively, sorted by name
    assert [r.source.rsplit("/", 1)[-1] for r in records] == ["a.parquet, row 1", "a.parquet, row 2", "b.jsonl:1"]
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([PAIR] * 3)}).save_to_disk(str(tmp_path / "hf"))
    records, _ = read_records(str(tmp_path / "hf"), split="train")
    assert len(records) == 3 and records[0].messages[2]["content"] == "tac"
    with pytest.raises(DataError, match="no split 'test'"):
        read_records(str(tmp_path / "hf"), split="test")


def test_labels_only_on_responses(tokenizer):
    records = [
        Record("x:1", messages=tuple(CHAT["messages"])),
        Record("x:2", messages=({"role": "system", "content": "S"}, *CHAT["messages"], *CHAT["messages"])),
    ]
    docs = encode_records(records, tokenizer, max_seq_len=512)
    for i, turns in enumerate((1, 2)):
        ids, labels = docs.doc(i)
        trained = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(trained) == "2 + 2 = 4<|im_end|>" * turns
        assert labels[0] == IGNORE_INDEX
        assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()


def test_template_without_generation_markers_gives_same_labels(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = tokenizer.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    records = [Record("x:1", messages=({"role": "system", "content": "S"}, *CHAT["messages"], *CHAT["messages"]))]
    a, b = encode_records(records, tokenizer, 512).doc(0), encode_records(records, plain, 512).doc(0)
    assert (a[0] == b[0]).all()
    # The diff-of-prefixes method also trains on the newline after <|im_end|> (it belongs to the turn).
    extra = (b[1] != IGNORE_INDEX) & (a[1] == IGNORE_INDEX)
    assert tokenizer.decode(b[0][extra]) == "\n\n"
    assert ((a[1] != IGNORE_INDEX) <= (b[1] != IGNORE_INDEX)).all()


def test_plain_text_trains_on_all_tokens_and_truncation(tokenizer):
    with pytest.warns(UserWarning, match="truncated 1 of 1"):
        docs = encode_records([Record("x:1", text="hello world " * 50)], tokenizer, max_seq_len=16)
    ids, labels = docs.doc(0)
    assert ids.numel() == 16 and labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()
    with pytest.warns(UserWarning, match="dropped 1 with no response token"):
        with pytest.raises(DataError, match="no usable examples"):
            encode_records([Record("x:1", messages=tuple(CHAT["messages"]))], tokenizer, max_seq_len=4)


# --- bad input: one exception type, naming the file, the line and what is wrong ---------------------------------


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder has no"):
        read_records(str(tmp_path / "empty"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        read_records(str(tmp_path / "data.csv"))


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, CHAT, '{"messages": [', CHAT])
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        read_records(path)


def test_skip_bad_rows_reports_count_once(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, "not json", {"foo": 1}, CHAT])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        records, skipped = read_records(path, skip_bad_rows=True)
    assert skipped == 2 and len(records) == 2
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and re.search(r"skipped 2 bad row\(s\).*d\.jsonl:2", messages[0])  # said once


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + json.dumps(TEXT).encode() + b"\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 14 of the line\)"):
        read_records(str(path))
    with pytest.warns(UserWarning, match=r"skipped 1 bad row\(s\).*d\.jsonl:2: not valid UTF-8"):
        records, skipped = read_records(str(path), skip_bad_rows=True)
    assert skipped == 1 and [r.source.rsplit(":", 1)[1] for r in records] == ["1", "3"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"foo": 1}, "expected 'messages', 'prompt'\\+'response' or 'text' fields, found: foo"),
        ({"prompt": "hi"}, "field 'response' must be a string, it is missing"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "human", "content": "hi"}]}, "messages\\[0\\] has role 'human'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no 'assistant' message"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "content'\\] must be a string"),
        ({"messages": [*CHAT["messages"], {"role": "system", "content": "x"}]}, "only the first message may be"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_invalid_record(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, row])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*" + message):
        read_records(path)


def test_empty_data_set(tmp_path, tokenizer):
    from lightning_horizon.data.sft import SFTDataModule

    path = write_jsonl(tmp_path / "d.jsonl", ["", ""])
    with pytest.raises(DataError, match="no training records"):
        SFTDataModule(DataConfig(path=path), tokenizer).setup("fit")
    path = write_jsonl(tmp_path / "bad.jsonl", ["oops"])
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(DataError, match="no training records"):
        SFTDataModule(DataConfig(path=path, skip_bad_rows=True), tokenizer).setup("fit")


def test_tokenizer_without_chat_template(tmp_path, tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match=r"chat/prompt-response record\(s\) \(first: x:1\).*no chat template"):
        encode_records([Record("x:1", messages=tuple(CHAT["messages"]))], bare, 64)
    assert len(encode_records([Record("x:1", text="plain text is fine")], bare, 64)) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_seq_len": 0}, "data.max_seq_len must be a positive integer"),
        ({"batch_size": -1}, "data.batch_size must be a positive integer"),
        ({"format": "csv"}, "data.format='csv'"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"num_workers": -1}, "num_workers"),
        ({"path": "x.jsonl", "val_path": "y.jsonl", "val_fraction": 0.1}, "choose one"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataConfig()  # defaults are valid
