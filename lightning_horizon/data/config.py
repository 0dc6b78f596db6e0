"""``DataConfig``: every setting of the SFT data pipeline (the same names as the Hydra ``data`` group keys)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_horizon.data.errors import DataError
from lightning_horizon.data.records import FORMATS


@dataclass
class DataConfig:
    """Where the training data is and how it is batched."""

    path: str | None = None
    """Training data: a .jsonl/.json/.parquet file, a folder of them, a ``save_to_disk`` folder or a Hugging Face
    hub id. None: the small instruction set bundled with the package (and its own validation split)."""
    val_path: str | None = None
    """Validation data (same kinds as ``path``). None: the bundled validation split when ``path`` is None, else
    ``val_fraction`` of the training records, else no validation."""
    format: str = "auto"
    """'auto' (from the suffix / folder contents; an id that is not a local path is tried on the hub), 'jsonl',
    'parquet' or 'hf' (Hugging Face ``datasets``)."""
    split: str = "train"
    """Split to read from a Hugging Face dataset given by ``path``."""
    val_split: str = "validation"
    """Split to read from a Hugging Face dataset given by ``val_path``."""
    max_seq_len: int = 512
    """Tokens per row. Longer documents are truncated (start kept); packed rows are exactly this long."""
    batch_size: int = 8
    """Rows per batch (the last batch of an epoch may be smaller unless ``drop_last``)."""
    pack: bool = True
    """Pack whole documents into rows of ``max_seq_len`` (position_ids restart per document, no attention_mask);
    False: one document per row, right-padded, with attention_mask."""
    shuffle: bool = True
    """Shuffle the training rows each epoch (order fixed by ``seed`` and the epoch number)."""
    seed: int = 0
    """Seed of the shuffle and of the ``val_fraction`` split."""
    drop_last: bool = False
    """Drop the last, smaller training batch of each epoch (keeps every batch the same shape)."""
    skip_bad_rows: bool = False
    """Skip malformed or invalid rows (one warning says how many) instead of stopping at the first."""
    num_workers: int = 0
    """DataLoader worker processes (batches are collated in them)."""
    val_fraction: float = 0.0
    """Fraction of the training records held out for validation when ``path`` is set and ``val_path`` is not."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"data.format={self.format!r}: expected one of {', '.join(FORMATS)}")
        for key in ("max_seq_len", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataError(f"data.{key} must be a positive integer, got {value!r}")
        if self.num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and self.val_path is not None:
            raise DataError("data.val_fraction and data.val_path are both set: choose one source of validation data")
        if self.val_fraction > 0 and self.path is None:
            raise DataError("data.val_fraction needs data.path: the bundled set has its own validation split")
