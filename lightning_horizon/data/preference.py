"""Preference pairs for DPO and reward models: records, tokenisation and a resumable Lightning DataModule.

A pair is one prompt with a preferred (``chosen``) and a dispreferred (``rejected``) reply. Accepted record forms (one
per JSONL line, Parquet row or Hugging Face dataset row; forms may be mixed):

- ``{"prompt": str, "chosen": str, "rejected": str}``, optionally with a ``"system"`` string: one user turn, then
  either reply;
- ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``: a conversation, then each reply as a
  list holding one assistant message (the conversational form of TRL's preference datasets);
- ``{"chosen": [messages], "rejected": [messages]}``: two whole conversations that differ only in their last
  message, an assistant reply (the form of Anthropic's HH-RLHF).

Only the reply's tokens are scored (its end-of-turn token included); the prompt, system and template tokens are not.
With a tokenizer that has no chat template, string prompts and replies are concatenated as plain text (the reply
ends with EOS) and message lists are refused. A pair is truncated to ``max_seq_len`` tokens per side (the start is
kept); a pair with no reply token left on either side is dropped and counted.

A batch of ``B`` pairs holds ``2B`` right-padded rows, the chosen replies first and the rejected ones after them
(one forward pass scores both), with ``attention_mask``, ``position_ids``, ``labels`` and ``index``: each pair's
position in its split (the key of the reference log-probabilities, see :mod:`lightning_horizon.preference`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_horizon.data.config import DataConfig
from lightning_horizon.data.encode import EncodedDocs, _render_ids
from lightning_horizon.data.errors import DataError
from lightning_horizon.data.packing import collate_padded
from lightning_horizon.data.records import _check_messages, read_records
from lightning_horizon.data.sft import SFTDataModule

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TRAIN = ASSETS / "preference.jsonl"
BUNDLED_VAL = ASSETS / "preference_val.jsonl"


@dataclass(frozen=True)
class PreferencePair:
    """One validated preference record."""

    source: str
    """Where it came from: ``file:line``, ``file, row N`` or ``dataset[split], row N``."""
    prompt: tuple[dict[str, str], ...] | str
    """The conversation before the replies (chat messages), or a plain-text prompt."""
    chosen: str
    """The preferred reply."""
    rejected: str
    """The dispreferred reply."""


def _reply(value: Any, key: str, source: str) -> str:
    """A reply given as a string or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataError(f"{source}: {key!r} as a list must hold exactly one assistant message")
        return _check_messages(value, source)[0]["content"]
    got = "missing" if value is None else f"a {type(value).__name__}"
    raise DataError(f"{source}: field {key!r} must be a string or a list of messages, it is {got}")


def parse_pair(raw: Any, source: str) -> PreferencePair:
    """Validate one raw preference record (see the module docstring); raises ``DataError`` naming ``source``."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if "chosen" not in raw or "rejected" not in raw:
        keys = ", ".join(sorted(map(str, raw))) or "none"
        raise DataError(f"{source}: expected 'chosen' and 'rejected' fields (and 'prompt'), found: {keys}")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{source}: 'system' must be a string, got {type(system).__name__}")
    prompt = raw.get("prompt")
    if prompt is None:  # two whole conversations with a common prefix
        chosen, rejected = (_conversation(raw[k], k, source) for k in ("chosen", "rejected"))
        if chosen[:-1] != rejected[:-1]:
            raise DataError(
                f"{source}: 'chosen' and 'rejected' conversations differ before their last message; without a "
                "'prompt' field they must share every message but the final assistant reply"
            )
        messages: tuple[dict[str, str], ...] | str = tuple(_with_system(chosen[:-1], system, source))
        return PreferencePair(source, messages, chosen[-1]["content"], rejected[-1]["content"])
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{source}: field 'prompt' is empty")
        messages = (
            prompt if system is None else tuple(_with_system([{"role": "user", "content": prompt}], system, source))
        )
    elif isinstance(prompt, list | tuple):
        messages = tuple(_with_system(_check_prompt(prompt, source), system, source))
    else:
        raise DataError(
            f"{source}: field 'prompt' must be a string or a list of messages, it is a {type(prompt).__name__}"
        )
    return PreferencePair(
        source, messages, _reply(raw["chosen"], "chosen", source), _reply(raw["rejected"], "rejected", source)
    )


def _conversation(value: Any, key: str, source: str) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise DataError(f"{source}: without a 'prompt' field, {key!r} must be a list of messages")
    messages = _check_messages(value, source)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"{source}: {key!r} must end with an assistant reply after at least one message")
    return messages


def _check_prompt(prompt: Sequence[Any], source: str) -> list[dict[str, str]]:
    if not prompt:
        raise DataError(f"{source}: 'prompt' must be a non-empty list of messages")
    # _check_messages wants an assistant message somewhere: check the prompt with a placeholder reply appended.
    return _check_messages([*prompt, {"role": "assistant", "content": ""}], source)[:-1]


def _with_system(messages: list[dict[str, str]], system: str | None, source: str) -> list[dict[str, str]]:
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        raise DataError(f"{source}: both a 'system' field and a first message with role 'system'")
    return [{"role": "system", "content": system}, *messages]


# ------------------------------------------------------------------------------------------------- tokenisation
def _side(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, reply: str, chat: bool
) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + reply and the mask of the reply's tokens."""
    if not chat:
        assert isinstance(pair.prompt, str)
        prompt = tokenizer(pair.prompt, add_special_tokens=True)["input_ids"]
        answer = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer = [*answer, tokenizer.eos_token_id]
        return [*prompt, *answer], [False] * len(prompt) + [True] * len(answer)
    messages = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else list(pair.prompt)
    before = _render_ids(tokenizer, messages, add_generation_prompt=True)
    full = _render_ids(tokenizer, [*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
    if full[: len(before)] != before:
        raise DataError(
            f"{pair.source}: the tokenizer's chat template does not render the prompt as a prefix of prompt + reply, "
            "so the reply's tokens cannot be located"
        )
    return full, [False] * len(before) + [True] * (len(full) - len(before))


def encode_pairs(
    pairs: Sequence[PreferencePair], tokenizer: PreTrainedTokenizerBase, max_seq_len: int, what: str = "data"
) -> EncodedDocs:
    """Tokenise ``pairs`` into ``2 * len`` documents (pair ``i``: document ``2i`` chosen, ``2i + 1`` rejected), with
    labels on the replies only; truncate each side to ``max_seq_len`` and drop pairs left without a reply token."""
    if max_seq_len <= 0:
        raise DataError(f"max_seq_len must be > 0, got {max_seq_len}")
    chat = bool(getattr(tokenizer, "chat_template", None))
    if not chat:
        bad = next((p for p in pairs if not isinstance(p.prompt, str)), None)
        if bad is not None:
            raise DataError(
                f"{what}: {bad.source} has a conversation as its prompt but the tokenizer has no chat template; use "
                "a chat model's tokenizer or string prompts"
            )
    docs: list[tuple[list[int], list[bool]]] = []
    num_truncated = num_dropped = 0
    for pair in pairs:
        sides = [_side(tokenizer, pair, reply, chat) for reply in (pair.chosen, pair.rejected)]
        if any(len(ids) > max_seq_len for ids, _ in sides):
            num_truncated += 1
            sides = [(ids[:max_seq_len], mask[:max_seq_len]) for ids, mask in sides]
        for _, mask in sides:
            if mask:
                mask[0] = False
        if not all(any(mask) for _, mask in sides):
            num_dropped += 1
            continue
        docs.extend(sides)
    if num_truncated or num_dropped:
        warnings.warn(
            f"{what}: truncated {num_truncated} of {len(pairs)} pair(s) to max_seq_len={max_seq_len}; dropped "
            f"{num_dropped} with no reply token left",
            stacklevel=2,
        )
    if not docs:
        raise DataError(f"{what}: no usable preference pairs ({len(pairs)} read, {num_dropped} dropped)")
    return EncodedDocs.from_lists(docs)


def collate_pairs(docs: EncodedDocs, pairs: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """``2B`` right-padded rows (chosen replies first, then rejected) and each pair's ``index``."""
    rows = [(2 * i,) for i in pairs] + [(2 * i + 1,) for i in pairs]
    batch = collate_padded(docs, rows, pad_id)
    batch["index"] = torch.tensor(list(pairs), dtype=torch.int64)
    return batch


class PairDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[(pair, pair, ...)]`` (see :func:`collate_pairs`)."""

    def __init__(self, docs: EncodedDocs, pad_id: int) -> None:
        self.docs, self.pad_id = docs, pad_id

    def __len__(self) -> int:
        return len(self.docs) // 2

    def __getitem__(self, pairs: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return collate_pairs(self.docs, pairs, self.pad_id)


class PreferenceDataModule(SFTDataModule):
    """Preference pairs for :class:`~lightning_horizon.preference.DPOModule` (and reward models).

    Settings are a :class:`DataConfig` (``pack`` must be false: pairs are scored one per row; ``path=None`` reads
    the preference set bundled with the package and its validation split). The training dataloader is resumable
    like the SFT one. :meth:`reference_dataloaders` yields every pair of each split once, in order, for computing
    the reference log-probabilities.
    """

    def __init__(self, config: DataConfig | None = None, tokenizer: PreTrainedTokenizerBase | str | None = None):
        config = config if config is not None else DataConfig(pack=False)
        if config.pack:
            raise DataError("data.pack must be false for preference pairs: each pair is scored in rows of its own")
        super().__init__(config, tokenizer)

    bundled = (BUNDLED_TRAIN, BUNDLED_VAL)

    @override
    def _read(self, path: str, fmt: str, split: str, skip_bad_rows: bool) -> tuple[list, int]:
        return read_records(path, fmt, split, skip_bad_rows, parse=parse_pair)

    @override
    def _encode(self, records: list, what: str) -> EncodedDocs:
        return encode_pairs(records, self.tokenizer, self.config.max_seq_len, what=what)

    @override
    def _rows(self, docs: EncodedDocs) -> list[tuple[int, ...]]:
        return [(i,) for i in range(len(docs) // 2)]  # a row of the sampler is a pair (two rows of the batch)

    @override
    def _dataset(self, docs: EncodedDocs, rows: list[tuple[int, ...]]) -> PairDataset:
        return PairDataset(docs, self.pad_id)

    def reference_dataloaders(self) -> dict[str, DataLoader]:
        """Every pair of each split once, in order (``train``, and ``val`` when there is validation data)."""
        if self.train_docs is None:
            self.setup("fit")
        assert self.train_docs is not None
        loaders = {"train": self._in_order(self.train_docs, self.train_rows)}
        if self.val_docs is not None:
            loaders["val"] = self._in_order(self.val_docs, self.val_rows)
        return loaders
