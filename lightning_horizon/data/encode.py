"""Turning records into token ids and loss labels.

Labels follow the Hugging Face convention (the model shifts them): ``labels[t] = input_ids[t]`` where token ``t`` is
part of an assistant reply (its end-of-turn token included) and ``-100`` elsewhere (system, user and template tokens).
Plain-text records train on every token. The first label of every document is ``-100`` whatever it is, so that in a
packed row the previous document's last token predicts nothing. Documents are truncated to ``max_seq_len`` tokens
(the start is kept); a document left with no trainable token is dropped and counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lightning_horizon.data.errors import DataError
from lightning_horizon.data.records import Record

IGNORE_INDEX = -100


@dataclass
class EncodedDocs:
    """Tokenised documents stored flat (one int32 buffer and offsets: cheap to share with worker processes)."""

    input_ids: torch.Tensor
    """All documents' token ids back to back, int32."""
    trainable: torch.Tensor
    """Bool, same length: whether a token carries the loss (its label is itself, else -100)."""
    offsets: torch.Tensor
    """int64, ``len(docs) + 1`` entries: document ``i`` is ``[offsets[i], offsets[i + 1])``."""

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.trainable.shape or self.offsets.ndim != 1:
            raise ValueError("EncodedDocs: input_ids and trainable must have the same shape, offsets must be 1-D")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def doc(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids int64, labels int64) of document ``i``."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.input_ids[start:end].long()
        labels = torch.where(self.trainable[start:end], ids, IGNORE_INDEX)
        return ids, labels

    @classmethod
    def from_lists(cls, docs: Sequence[tuple[list[int], list[bool]]]) -> EncodedDocs:
        lengths = torch.tensor([len(ids) for ids, _ in docs], dtype=torch.int64)
        offsets = torch.zeros(len(docs) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        ids = [t for doc, _ in docs for t in doc]
        mask = [m for _, doc_mask in docs for m in doc_mask]
        return cls(torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool), offsets)


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "generation" in template and "endgeneration" in template


def _chat_with_markers(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_by_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], source: str
) -> tuple[list[int], list[bool]]:
    """Assistant spans for templates without generation markers: render growing prefixes and diff the token ids."""
    ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError(
                f"{source}: the tokenizer's chat template does not render conversations prefix by prefix (it "
                "rewrites earlier turns), so assistant tokens cannot be located; use a template with "
                "{% generation %} markers"
            )
        mask[len(before) : len(through)] = [True] * (len(through) - len(before))
    return ids, mask


def _text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[bool]]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, [True] * len(ids)


def encode_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_seq_len: int, what: str = "data"
) -> EncodedDocs:
    """Tokenise ``records`` (labels on responses only), truncate to ``max_seq_len`` and drop unlearnable ones.

    Raises ``DataError`` if chat records come with a tokenizer that has no chat template, or if nothing is left.
    """
    if max_seq_len <= 0:
        raise DataError(f"max_seq_len must be > 0, got {max_seq_len}")
    num_chat = sum(r.is_chat for r in records)
    if num_chat and not getattr(tokenizer, "chat_template", None):
        first = next(r for r in records if r.is_chat)
        raise DataError(
            f"{what}: {num_chat} chat/prompt-response record(s) (first: {first.source}) but the tokenizer has no chat "
            "template; use a chat model's tokenizer or plain-text records"
        )
    markers = has_generation_markers(tokenizer)
    docs: list[tuple[list[int], list[bool]]] = []
    num_truncated = num_dropped = 0
    for record in records:
        if record.messages is None:
            ids, mask = _text(tokenizer, record.text or "")
        elif markers:
            ids, mask = _chat_with_markers(tokenizer, list(record.messages))
        else:
            ids, mask = _chat_by_prefix(tokenizer, list(record.messages), record.source)
        if len(ids) > max_seq_len:
            num_truncated += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if mask:
            mask[0] = False
        if not any(mask):
            num_dropped += 1
            continue
        docs.append((ids, mask))
    if num_truncated or num_dropped:
        message = (
            f"{what}: truncated {num_truncated} of {len(records)} document(s) to max_seq_len={max_seq_len}; dropped "
            f"{num_dropped} with no response token left"
        )
        warnings.warn(message, stacklevel=2)  # once: the recipe routes warnings into its log
    if not docs:
        raise DataError(f"{what}: no usable examples ({len(records)} record(s) read, {num_dropped} dropped)")
    return EncodedDocs.from_lists(docs)
