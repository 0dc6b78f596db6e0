"""Building batches: packing whole documents into fixed-length rows, or padding one document per row.

Every batch is a dict of int64 tensors of shape ``(B, S)``, passed to the model as ``model(**batch)``:

``input_ids``
    Token ids. Padding uses the tokenizer's pad token id.
``labels``
    Targets in the Hugging Face convention (the model shifts them by one): the token id on assistant/response tokens
    (end-of-turn token included) and ``-100`` everywhere else: prompts, template tokens, padding, and the first
    token of every document, so that no token is ever predicted across a document boundary.
``position_ids``
    Positions within each document: they restart at 0 at every document start (and at the padding tail of a packed
    row, which forms its own segment).
``attention_mask`` (unpacked batches only)
    1 on real tokens, 0 on the right padding.

Packed batches (``pack=True``): every row has exactly ``S = max_seq_len`` tokens, made of whole documents (never
split across rows) plus right padding. They carry *no* ``attention_mask``: Hugging Face models (``transformers >=
4.57``, for the ``sdpa`` and ``eager`` attention implementations; ``flash_attention_2`` too) then derive a
block-diagonal causal mask from the restarts in ``position_ids`` (``masking_utils.find_packed_sequence_indices``),
so documents in a row never attend to each other, *provided the forward runs without a KV cache*: with
``config.use_cache=True`` (the default) a training forward makes an empty cache and the detection is skipped, so call
:func:`prepare_model_for_packing` on the model once (sets ``use_cache=False``). For a model that ignores
``position_ids`` when masking, pass :func:`block_causal_mask` as ``attention_mask`` or use ``pack=False``.

Unpacked batches (``pack=False``): one document per row, right-padded to the longest row of the batch.

The number of real (non-padding) tokens is not in the dict (the model's ``forward`` receives every key): use
:func:`count_real_tokens`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from lightning_horizon.data.encode import IGNORE_INDEX, EncodedDocs


def plan_rows(lengths: Sequence[int], max_seq_len: int, pack: bool) -> list[tuple[int, ...]]:
    """Group document indices into rows.

    Unpacked: one document per row, in order. Packed: best-fit decreasing (each document, longest first, goes into
    the open row with the least room that still fits it), deterministic; rows are returned in order of their first
    document. Every document must be at most ``max_seq_len`` long.
    """
    if not pack:
        return [(i,) for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        length = lengths[i]
        if length > max_seq_len:
            raise ValueError(f"document {i} has {length} tokens > max_seq_len={max_seq_len}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    return sorted((tuple(sorted(row)) for row in rows), key=lambda row: row[0])


def collate_packed(docs: EncodedDocs, rows: Sequence[Sequence[int]], max_seq_len: int, pad_id: int) -> dict:
    """A packed batch (see the module docstring): each row is the listed documents back to back, then padding."""
    batch = len(rows)
    input_ids = torch.full((batch, max_seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((batch, max_seq_len), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((batch, max_seq_len), dtype=torch.int64)
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            ids, doc_labels = docs.doc(i)
            end = start + ids.numel()
            if end > max_seq_len:
                raise ValueError(f"row {b} holds {end} tokens > max_seq_len={max_seq_len}")
            input_ids[b, start:end] = ids
            labels[b, start:end] = doc_labels
            position_ids[b, start:end] = torch.arange(ids.numel())
            start = end
        position_ids[b, start:] = torch.arange(max_seq_len - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_padded(docs: EncodedDocs, rows: Sequence[Sequence[int]], pad_id: int) -> dict:
    """An unpacked batch: one document per row, right-padded to the longest, with ``attention_mask``."""
    if any(len(row) != 1 for row in rows):
        raise ValueError("collate_padded takes rows of exactly one document")
    pairs = [docs.doc(row[0]) for row in rows]
    width = max(ids.numel() for ids, _ in pairs)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, (ids, doc_labels) in enumerate(pairs):
        input_ids[b, : ids.numel()] = ids
        labels[b, : ids.numel()] = doc_labels
        attention_mask[b, : ids.numel()] = 1
    position_ids = torch.arange(width, dtype=torch.int64).expand(len(rows), width).contiguous()
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def count_real_tokens(batch: dict) -> int:
    """Number of real (non-padding) tokens in a batch from :func:`collate_packed` or :func:`collate_padded`.

    Unpacked: the sum of ``attention_mask``. Packed: everything except the padding tail of each row, which is the
    row's last ``position_ids`` segment when that segment has no label (every real document has at least one).
    """
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    position_ids, labels = batch["position_ids"], batch["labels"]
    segment = (position_ids == 0).cumsum(dim=1)
    in_last = segment == segment[:, -1:]
    last_is_padding = ~((labels != IGNORE_INDEX) & in_last).any(dim=1)
    padding = (in_last.sum(dim=1) * last_is_padding).sum()
    return int(position_ids.numel() - padding)


PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def prepare_model_for_packing(model: torch.nn.Module) -> None:
    """Make a Hugging Face causal LM separate packed documents: sets ``config.use_cache = False``.

    transformers (checked on 5.23) builds the block-diagonal mask from ``position_ids`` only when the forward has no
    KV cache; with the default ``use_cache=True`` a training forward creates an empty ``DynamicCache``, skips the
    detection, and documents in a packed row silently attend to each other. Call this once on the model before
    training on packed batches (or pass ``use_cache=False`` to every forward, or use :func:`block_causal_mask`).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: not a Hugging Face model")
    config.use_cache = False
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKING_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} may not split packed rows by position_ids; use one of "
            f"{', '.join(PACKING_ATTENTION)}, pack=False, or pass block_causal_mask(position_ids) as attention_mask"
        )


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An explicit additive 4-D mask ``(B, 1, S, S)`` (0 where allowed, dtype's min elsewhere) for packed rows.

    For models that ignore ``position_ids`` when masking: pass it as ``attention_mask`` (Hugging Face uses a 4-D mask
    as given, for "sdpa" and "eager"). Costs ``B * S * S`` elements, so prefer :func:`prepare_model_for_packing`.
    """
    segment = (position_ids == 0).cumsum(dim=1)
    same = segment[:, :, None] == segment[:, None, :]
    size = position_ids.shape[1]
    causal = torch.ones(size, size, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
