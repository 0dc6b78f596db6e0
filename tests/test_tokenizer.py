"""The default tokenizer (deterministic offline BPE, cached atomically) and loading user tokenizers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from lightning_horizon.data.errors import DataError
from lightning_horizon.data.tokenizer import (
    CACHE_ENV,
    ENDOFTEXT,
    IM_END,
    IM_START,
    as_exported,
    build_default_tokenizer,
    bundled_data_path,
    load_tokenizer,
    train_tokenizer,
)


def test_training_is_deterministic():
    data = bundled_data_path().read_bytes()
    first, second = train_tokenizer(data), train_tokenizer(data)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert 1024 < len(first) <= 2048


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == tokenizer.pad_token == ENDOFTEXT
    for token in (ENDOFTEXT, IM_START, IM_END):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.decode(tokenizer("Sort 3, 1, 2 ü")["input_ids"]) == "Sort 3, 1, 2 ü"  # byte level: no unknowns


def test_chat_template_marks_assistant_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2"},
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n<|im_start|>user\nAnd 1 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n1 + 1 = 2<|im_end|>\n"
    )
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "2 + 3 = 5<|im_end|>1 + 1 = 2<|im_end|>"


def test_cache_is_reused_and_env_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = build_default_tokenizer()
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].startswith("tokenizer-"), entries  # no temp folder left behind
    stamp = (tmp_path / entries[0] / "tokenizer.json").stat().st_mtime_ns
    second = build_default_tokenizer()
    assert (tmp_path / entries[0] / "tokenizer.json").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert first.get_vocab() == second.get_vocab()
    assert isinstance(second, PreTrainedTokenizerFast) and second.chat_template == first.chat_template


def test_load_tokenizer_from_local_folder(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.pad_token_id == tokenizer.pad_token_id


def test_load_tokenizer_without_chat_template(tokenizer, tmp_path):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=ENDOFTEXT)
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(DataError, match="no chat template"):
        load_tokenizer(str(tmp_path / "bare"))
    plain = load_tokenizer(str(tmp_path / "bare"), require_chat_template=False)
    assert plain.pad_token == ENDOFTEXT  # pad falls back to EOS


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))


def _bundled_records():
    from lightning_horizon.data.records import read_records

    assets = bundled_data_path().parent
    return read_records(str(assets / "instruct.jsonl"))[0] + read_records(str(assets / "instruct_val.jsonl"))[0]


def assert_same_ids_on_every_bundled_document(a, b) -> None:
    """Both tokenizers give the same ids and loss masks on each of the 3200 bundled documents."""
    from lightning_horizon.data.encode import encode_records

    records = _bundled_records()
    assert len(records) == 3200
    x, y = encode_records(records, a, 1 << 30), encode_records(records, b, 1 << 30)
    assert torch.equal(x.offsets, y.offsets) and torch.equal(x.input_ids, y.input_ids)
    assert torch.equal(x.trainable, y.trainable)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_default_tokenizer_round_trips_through_an_export_directory(tokenizer, tmp_path, model_type):
    # AutoTokenizer picks the class from the model's config.json: Qwen2Tokenizer (its own pre-tokenizer, whatever
    # tokenizer.json says) for qwen2, the tokenizers backend for llama. The default tokenizer must not care.
    config = AutoConfig.for_model(model_type, hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    tokenizer.save_pretrained(tmp_path)
    config.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == {"qwen2": "Qwen2Tokenizer", "llama": "TokenizersBackend"}[model_type]
    assert loaded(" 42")["input_ids"] == tokenizer(" 42")["input_ids"]
    assert_same_ids_on_every_bundled_document(tokenizer, loaded)
    assert_same_ids_on_every_bundled_document(tokenizer, as_exported(tokenizer, config))


def test_load_tokenizer_from_a_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"holds no tokenizer .*it has config.json"):
        load_tokenizer(str(tmp_path))
