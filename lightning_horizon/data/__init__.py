"""Supervised fine-tuning data: records, tokenizer, packing and a resumable Lightning DataModule."""

from lightning_horizon.data.config import DataConfig
from lightning_horizon.data.encode import IGNORE_INDEX, EncodedDocs, encode_records
from lightning_horizon.data.errors import DataError
from lightning_horizon.data.loader import BatchDataset, ResumableBatchSampler, ResumableDataLoader
from lightning_horizon.data.packing import (
    block_causal_mask,
    collate_packed,
    collate_padded,
    count_real_tokens,
    plan_rows,
    prepare_model_for_packing,
)
from lightning_horizon.data.records import Record, read_records
from lightning_horizon.data.sft import SFTDataModule
from lightning_horizon.data.tokenizer import build_default_tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BatchDataset",
    "DataConfig",
    "DataError",
    "EncodedDocs",
    "Record",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "SFTDataModule",
    "block_causal_mask",
    "build_default_tokenizer",
    "collate_packed",
    "collate_padded",
    "count_real_tokens",
    "encode_records",
    "load_tokenizer",
    "plan_rows",
    "prepare_model_for_packing",
    "read_records",
]
