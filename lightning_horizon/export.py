"""Export to a Hugging Face directory: ``config.json``, safetensors (bf16 or fp32), the tokenizer if given.

From a horizon checkpoint directory, without a GPU and one tensor at a time::

    python -m lightning_horizon.export CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--tokenizer PATH]

From a live model or engine (the recipe): ``export_hf(model_or_engine, out_dir, dtype="bf16", tokenizer=None)``.

Either way the output is written into a temporary directory next to ``OUT_DIR`` and renamed into place when complete.
Tied weights are written once (the config's ``tie_word_embeddings`` ties them again on load), and the files are the
usual ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lightning_horizon.checkpoint import CheckpointReader
from lightning_horizon.engine.config import as_dtype
from lightning_horizon.files import numel, publish, write_safetensors

MAX_SHARD_BYTES = 5 * 1024**3

Entry = tuple[str, Sequence[int], Callable[[], torch.Tensor]]
"""(name, shape, read): ``read()`` returns the tensor when it is written."""


def export_hf(
    model_or_engine: Any,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    tokenizer: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Writes ``model_or_engine`` (a Hugging Face causal LM, possibly streamed by a ``HorizonEngine``, or the engine)
    as a Hugging Face directory. ``tokenizer``: a tokenizer object or a path to load one from."""
    model = getattr(model_or_engine, "model", model_or_engine)
    if hasattr(model_or_engine, "synchronize"):
        model_or_engine.synchronize()
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(
            f"export_hf needs a Hugging Face model or a HorizonEngine, got {type(model_or_engine).__name__}"
        )
    state = model.state_dict()  # views (the engine's pre-hook waits for pending updates first)
    seen: set[tuple] = set()
    entries: list[Entry] = []
    for name, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # a tied alias: stored once
        seen.add(ident)
        entries.append((name, tuple(t.shape), lambda t=t: t))
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    return _export(entries, config, out_dir, _dtype(dtype), tokenizer, max_shard_bytes)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    tokenizer: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Writes the master weights of a horizon checkpoint directory as a Hugging Face directory (CPU only)."""
    reader = CheckpointReader(checkpoint)
    config = reader.model_config
    if config is None:
        raise ValueError(f"{checkpoint} holds no model config (saved without the horizon strategy): cannot export it")
    config = dict(config)
    if reader.model_class:
        config["architectures"] = [reader.model_class]
    entries: list[Entry] = []
    for g in reader.meta["model"]["groups"]:
        if g["name"] == "extra":
            continue
        file = str(reader.path / g["file"])
        for name, shape in g["params"]:
            entries.append((name, tuple(shape), lambda f=file, n=name: _read(f, n)))
    return _export(entries, config, out_dir, _dtype(dtype), tokenizer, max_shard_bytes)


def _read(file: str, name: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)


def _export(
    entries: list[Entry], config: dict, out_dir: str | os.PathLike, dtype: torch.dtype, tokenizer: Any, max_shard: int
) -> Path:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        size = torch.empty((), dtype=dtype).element_size()
        shards: list[list[Entry]] = [[]]
        used = 0
        for e in entries:
            nbytes = numel(e[1]) * size
            if shards[-1] and used + nbytes > max_shard:
                shards.append([])
                used = 0
            shards[-1].append(e)
            used += nbytes
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for file, shard in zip(names, shards):
            reads = {n: r for n, _, r in shard}
            specs = [(n, dtype, s) for n, s, _ in shard]
            write_safetensors(
                tmp / file,
                specs,
                lambda n, reads=reads: reads[n]().to(dtype),
                metadata={"format": "pt"},
                fsync=False,
            )
            weight_map.update({n: file for n, _, _ in shard})
        if len(shards) > 1:
            total = sum(numel(s) * size for _, s, _ in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(config)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            tokenizer.save_pretrained(str(tmp))
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dtype(value: str | torch.dtype) -> torch.dtype:
    try:
        return as_dtype(value)
    except ValueError:
        raise ValueError(f"unknown export dtype {value!r}; use bf16 or fp32") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_horizon.export", description="Export a horizon checkpoint as a Hugging Face model"
    )
    parser.add_argument("checkpoint", help="horizon checkpoint directory (e.g. checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="output directory (written atomically)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id to save alongside")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1024**3)
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.tokenizer, int(args.max_shard_gb * 1024**3))
    print(f"exported {args.checkpoint} -> {out} ({args.dtype})")


if __name__ == "__main__":
    main()
