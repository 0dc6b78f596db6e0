"""The default tokenizer (deterministic offline BPE, cached atomically) and loading user tokenizers."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from lightning_horizon.data.errors import DataError
from lightning_horizon.data.tokenizer import (
    CACHE_ENV,
    ENDOFTEXT,
    IM_END,
    IM_START,
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
