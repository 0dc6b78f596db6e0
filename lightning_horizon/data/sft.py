"""``SFTDataModule``: supervised fine-tuning data for Lightning, from a :class:`DataConfig` and a tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_horizon.data.config import DataConfig
from lightning_horizon.data.encode import EncodedDocs, encode_records
from lightning_horizon.data.errors import DataError
from lightning_horizon.data.loader import BatchDataset, ResumableBatchSampler, ResumableDataLoader
from lightning_horizon.data.packing import plan_rows
from lightning_horizon.data.records import read_records
from lightning_horizon.data.tokenizer import build_default_tokenizer, load_tokenizer

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TRAIN = ASSETS / "instruct.jsonl"
BUNDLED_VAL = ASSETS / "instruct_val.jsonl"


def _split_off(records: list, fraction: float, seed: int) -> tuple[list, list]:
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = max(1, round(len(records) * fraction))
    if num_val >= len(records):
        raise DataError(f"val_fraction={fraction} leaves no training records out of {len(records)}")
    val = sorted(order[:num_val])
    held = set(val)
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in val]


class SFTDataModule(pl.LightningDataModule):
    """Training (and validation) batches for supervised fine-tuning; see ``lightning_horizon.data.packing`` for
    exactly what a batch holds.

    The training dataloader is resumable: its position (epoch, batch) is saved in Lightning checkpoints and a resumed
    run continues with exactly the next batch. Data are read and tokenised once, in ``setup`` (idempotent), in
    memory. ``tokenizer``: a tokenizer object, a local folder or hub id to load one from, or None for the project's
    default tokenizer (:func:`build_default_tokenizer`).
    """

    def __init__(self, config: DataConfig | None = None, tokenizer: PreTrainedTokenizerBase | str | None = None):
        super().__init__()
        self.config = config if config is not None else DataConfig()
        self._tokenizer_arg = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = tokenizer if not isinstance(tokenizer, str | None) else None
        self.train_docs: EncodedDocs | None = None
        self.val_docs: EncodedDocs | None = None
        self.train_rows: list[tuple[int, ...]] = []
        self.val_rows: list[tuple[int, ...]] = []

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if isinstance(self._tokenizer_arg, str):
                self._tokenizer = load_tokenizer(self._tokenizer_arg, require_chat_template=False)
            else:
                self._tokenizer = build_default_tokenizer()
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
        return pad

    bundled = (BUNDLED_TRAIN, BUNDLED_VAL)
    """The training and validation files read when ``config.path`` is None."""

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_docs is not None:
            return
        cfg = self.config
        train_path = cfg.path if cfg.path is not None else str(self.bundled[0])
        train, _ = self._read(train_path, cfg.format, cfg.split, cfg.skip_bad_rows)
        if not train:
            raise DataError(f"{train_path}: no training records")
        val: list = []
        if cfg.val_path is not None:
            val, _ = self._read(cfg.val_path, cfg.format, cfg.val_split, cfg.skip_bad_rows)
            if not val:
                raise DataError(f"{cfg.val_path}: no validation records")
        elif cfg.path is None:
            val, _ = self._read(str(self.bundled[1]), "auto", "train", False)
        elif cfg.val_fraction > 0:
            train, val = _split_off(train, cfg.val_fraction, cfg.seed)
        self.train_docs = self._encode(train, train_path)
        self.train_rows = self._rows(self.train_docs)
        if cfg.drop_last and len(self.train_rows) < cfg.batch_size:
            raise DataError(
                f"{train_path}: {len(self.train_rows)} row(s) < batch_size={cfg.batch_size} with drop_last: no batch"
            )
        if val:
            self.val_docs = self._encode(val, cfg.val_path or "validation")
            self.val_rows = self._rows(self.val_docs)
        log.info(
            "data: %d training documents in %d rows, %d validation documents",
            len(self.train_docs),
            len(self.train_rows),
            len(self.val_docs) if self.val_docs is not None else 0,
        )

    def _read(self, path: str, fmt: str, split: str, skip_bad_rows: bool) -> tuple[list, int]:
        """Records of ``path`` (:func:`read_records`)."""
        return read_records(path, fmt, split, skip_bad_rows)

    def _encode(self, records: list, what: str) -> EncodedDocs:
        """Tokenised documents of ``records`` (:func:`encode_records`)."""
        return encode_records(records, self.tokenizer, self.config.max_seq_len, what=what)

    def _rows(self, docs: EncodedDocs) -> list[tuple[int, ...]]:
        """The rows of a batch: documents packed into rows of ``max_seq_len`` (or one per row)."""
        return plan_rows(docs.lengths.tolist(), self.config.max_seq_len, self.config.pack)

    def _dataset(self, docs: EncodedDocs, rows: list[tuple[int, ...]]) -> BatchDataset:
        return BatchDataset(docs, rows, self.config.max_seq_len, self.pad_id, self.config.pack)

    def _process_share(self) -> tuple[int, int]:
        """``(processes, this process's rank)`` of a data-parallel run: each reads its rows of every global batch."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 1, 0
        if trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                f"{type(self).__name__} shards every global batch over the {trainer.world_size} processes itself (its "
                "order and position resume exactly): pass Trainer(use_distributed_sampler=False)"
            )
        return trainer.world_size, trainer.global_rank

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_docs is None:
            self.setup("fit")
        assert self.train_docs is not None
        cfg = self.config
        world, rank = self._process_share()
        sampler = ResumableBatchSampler(
            len(self.train_rows), cfg.batch_size, cfg.shuffle, cfg.seed, cfg.drop_last, num_replicas=world, rank=rank
        )
        return ResumableDataLoader(self._dataset(self.train_docs, self.train_rows), sampler, **self._worker_args())

    @override
    def val_dataloader(self) -> DataLoader | list:
        if self.train_docs is None:
            self.setup("validate")
        if self.val_docs is None:
            return []
        return self._in_order(self.val_docs, self.val_rows)

    def _in_order(self, docs: EncodedDocs, rows: list[tuple[int, ...]]) -> DataLoader:
        """Every row once, in order, in batches of ``batch_size``."""
        batches = ResumableBatchSampler(len(rows), self.config.batch_size, shuffle=False, seed=0)
        return DataLoader(self._dataset(docs, rows), batch_size=None, sampler=batches.batches(0), **self._worker_args())

    def _worker_args(self) -> dict:
        # Workers are spawned, not forked: the kernel copies page-locked memory eagerly into a forked child, so each
        # forked worker of a horizon run would duplicate every pinned host buffer of the engine.
        workers = self.config.num_workers
        return {"num_workers": workers, "multiprocessing_context": "spawn" if workers else None}
