"""Packing: whole documents per row, restarting positions, and the same loss/gradients as unpacked batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM
from transformers.masking_utils import find_packed_sequence_indices

from lightning_horizon.data.encode import IGNORE_INDEX, EncodedDocs, encode_records
from lightning_horizon.data.packing import (
    block_causal_mask,
    collate_packed,
    collate_padded,
    count_real_tokens,
    plan_rows,
    prepare_model_for_packing,
)
from lightning_horizon.data.records import read_records
from lightning_horizon.data.sft import BUNDLED_VAL
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def docs(tokenizer) -> EncodedDocs:
    records, _ = read_records(str(BUNDLED_VAL))
    return encode_records(records[:40], tokenizer, max_seq_len=128)


def test_plan_rows_uses_every_document_once_and_fits():
    lengths = [5, 60, 33, 17, 64, 1, 40, 40, 12, 30]
    rows = plan_rows(lengths, max_seq_len=64, pack=True)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 5  # total 302 tokens: best-fit reaches the minimum of ceil(302 / 64) = 5 rows
    assert rows == plan_rows(lengths, max_seq_len=64, pack=True)  # deterministic
    assert plan_rows(lengths, 64, pack=False) == [(i,) for i in range(len(lengths))]
    with pytest.raises(ValueError, match="max_seq_len"):
        plan_rows([65], 64, pack=True)


def test_packed_batch_layout(docs, tokenizer):
    rows = plan_rows(docs.lengths.tolist(), 128, pack=True)[:3]
    batch = collate_packed(docs, rows, 128, tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (3, 128) for t in batch.values())
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            ids, labels = docs.doc(i)
            n = ids.numel()
            assert torch.equal(batch["input_ids"][b, start : start + n], ids)
            assert torch.equal(batch["position_ids"][b, start : start + n], torch.arange(n))
            assert batch["labels"][b, start] == IGNORE_INDEX  # nothing predicted across the boundary
            assert torch.equal(batch["labels"][b, start : start + n], labels)
            start += n
        assert (batch["input_ids"][b, start:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][b, start:] == IGNORE_INDEX).all()
    real = sum(int(docs.lengths[i]) for row in rows for i in row)
    assert count_real_tokens(batch) == real
    # Hugging Face finds one segment per document (plus the padding tail) from position_ids alone.
    segments = find_packed_sequence_indices(batch["position_ids"])
    for b, row in enumerate(rows):
        has_tail = sum(int(docs.lengths[i]) for i in row) < 128
        assert int(segments[b, -1]) + 1 == len(row) + has_tail


def test_count_real_tokens_full_row_and_padded(docs, tokenizer):
    lengths = docs.lengths.tolist()
    exact = collate_packed(docs, [(0, 1)], lengths[0] + lengths[1], tokenizer.pad_token_id)
    assert count_real_tokens(exact) == lengths[0] + lengths[1]
    padded = collate_padded(docs, [(0,), (1,), (2,)], tokenizer.pad_token_id)
    assert count_real_tokens(padded) == sum(lengths[:3])
    assert padded["attention_mask"].dtype == torch.int64
    assert (padded["labels"][padded["attention_mask"] == 0] == IGNORE_INDEX).all()


def _tiny_qwen2(vocab_size: int, attn_implementation: str) -> Qwen2ForCausalLM:
    model = tiny_model(
        "qwen2", layers=2, hidden_size=64, intermediate_size=128, vocab_size=vocab_size,
        attn_implementation=attn_implementation, max_position_embeddings=32768,
    )  # fmt: skip
    assert model.config._attn_implementation == attn_implementation
    return model


def _per_doc_losses(model, batch, doc_of_token):
    logits = model(**batch).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    owner = doc_of_token[:, 1:]
    num_docs = int(doc_of_token.max()) + 1
    return torch.zeros(num_docs).index_add(0, owner[owner >= 0], token_loss[owner >= 0])


@pytest.mark.parametrize("mask_route", ["position_ids", "4d_mask"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_equals_unpacked_loss_and_gradients(docs, tokenizer, attn_implementation, mask_route):
    model = _tiny_qwen2(len(tokenizer), attn_implementation)
    if mask_route == "position_ids":
        prepare_model_for_packing(model)  # HF derives the block-diagonal mask from position_ids
    doc_ids = list(range(6))
    total = sum(int(docs.lengths[i]) for i in doc_ids)
    width = total + 7  # a padding tail too
    pad = tokenizer.pad_token_id

    packed = collate_packed(docs, [tuple(doc_ids[:4]), tuple(doc_ids[4:])], width, pad)
    if mask_route == "4d_mask":  # model keeps use_cache=True: an explicit mask instead
        packed["attention_mask"] = block_causal_mask(packed["position_ids"])
    owner_packed = torch.full((2, width), -1)
    for b, row in enumerate([doc_ids[:4], doc_ids[4:]]):
        start = 0
        for i in row:
            owner_packed[b, start : start + int(docs.lengths[i])] = i
            start += int(docs.lengths[i])
    unpacked = collate_padded(docs, [(i,) for i in doc_ids], pad)
    owner_unpacked = torch.where(unpacked["attention_mask"].bool(), torch.tensor(doc_ids)[:, None], -1)

    losses_packed = _per_doc_losses(model, packed, owner_packed)
    grads_packed = torch.autograd.grad(losses_packed.sum(), list(model.parameters()))
    losses_unpacked = _per_doc_losses(model, unpacked, owner_unpacked)
    grads_unpacked = torch.autograd.grad(losses_unpacked.sum(), list(model.parameters()))

    assert (losses_packed > 0).all()
    torch.testing.assert_close(losses_packed, losses_unpacked, rtol=1e-5, atol=1e-5)
    for (name, _), g_packed, g_unpacked in zip(model.named_parameters(), grads_packed, grads_unpacked):
        torch.testing.assert_close(g_packed, g_unpacked, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(docs, tokenizer, attn_implementation):
    model = _tiny_qwen2(len(tokenizer), attn_implementation).eval()
    prepare_model_for_packing(model)
    n0, n1 = int(docs.lengths[0]), int(docs.lengths[1])
    batch = collate_packed(docs, [(0, 1)], n0 + n1, tokenizer.pad_token_id)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 1:n0] = (changed["input_ids"][0, 1:n0] + 7) % len(tokenizer)  # rewrite document 0
    with torch.no_grad():
        before, after = model(**batch).logits, model(**changed).logits
    torch.testing.assert_close(before[0, n0:], after[0, n0:])
    assert not torch.allclose(before[0, 1:n0], after[0, 1:n0])


def test_prepare_model_for_packing_rejects_unknown_attention():
    model = _tiny_qwen2(32, "eager")
    model.config._attn_implementation = "my_kernel"
    with pytest.raises(ValueError, match="my_kernel"):
        prepare_model_for_packing(model)
