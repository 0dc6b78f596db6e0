"""Export to a Hugging Face directory: ``config.json``, ``generation_config.json``, safetensors (bf16 or fp32), the
tokenizer if given.

From a horizon checkpoint directory, without a GPU and one tensor at a time::

    python -m lightning_horizon.export CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--tokenizer PATH] [--overwrite]

From a live model or engine (the recipe): ``export_hf(model_or_engine, out_dir, dtype="bf16", tokenizer=None)``.

Either way the output is written into a temporary directory next to ``OUT_DIR`` and renamed into place when complete.
Tied weights are written once (the config's ``tie_word_embeddings`` ties them again on load), and the files are the
usual ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.

Nothing at ``OUT_DIR`` is lost silently (:func:`check_out_dir`): a non-empty ``OUT_DIR`` is refused unless
``overwrite`` (``--overwrite``); a checkpoint, a directory that holds one or lies inside one, and the current
directory or one of its parents are refused even then.

Generation: ``config.json`` gets the tokenizer's bos/eos/pad ids where the model config has none, and
``generation_config.json`` is the model's own (a source model's is carried through training and checkpoints) with
the tokenizer's stop tokens added to ``eos_token_id`` (its EOS and the token that ends an assistant turn, e.g.
``<|im_end|>``), so that ``generate`` stops where the fine-tuned model learned to stop.

Tokenizer: the files written are loaded back with ``AutoTokenizer`` next to the export's ``config.json``, as users
will load them; the export is refused if that tokenizer gives other ids than the one given (some model types make
``AutoTokenizer`` rebuild the tokenizer with their own pre-tokenizer: train with
:func:`lightning_horizon.data.tokenizer.as_exported`, as the recipe does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lightning_horizon.checkpoint import CheckpointReader, is_horizon_checkpoint
from lightning_horizon.engine import HorizonEngine
from lightning_horizon.engine.config import as_dtype
from lightning_horizon.files import numel, publish, remove_stale, temporary_path, write_safetensors
from lightning_horizon.models import fill_special_tokens

MAX_SHARD_BYTES = 5 * 1024**3

Entry = tuple[str, Sequence[int], Callable[[], torch.Tensor]]
"""(name, shape, read): ``read()`` returns the tensor when it is written."""


def export_hf(
    model_or_engine: Any,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    tokenizer: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes ``model_or_engine`` (a Hugging Face causal LM, possibly streamed by a ``HorizonEngine``, or the engine)
    as a Hugging Face directory. ``tokenizer``: a tokenizer object or a path to load one from. ``overwrite``: replace
    a non-empty ``out_dir`` (never a checkpoint: see :func:`check_out_dir`)."""
    check_out_dir(out_dir, overwrite)
    model = model_or_engine
    if isinstance(model_or_engine, HorizonEngine):  # (a causal LM's own `.model` is its decoder: not unwrapped)
        model_or_engine.synchronize()
        model = model_or_engine.model
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(
            f"export_hf needs a Hugging Face model or a HorizonEngine, got {type(model_or_engine).__name__}"
        )
    _refuse_adapters([n for n, _ in model.named_parameters()], type(model).__name__)
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
    generation = getattr(model, "generation_config", None)
    generation = generation.to_diff_dict() if generation is not None else None
    return _export(entries, config, generation, out_dir, _dtype(dtype), tokenizer, max_shard_bytes)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    tokenizer: Any = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes the master weights of a horizon checkpoint directory as a Hugging Face directory (CPU only).
    ``overwrite``: replace a non-empty ``out_dir`` (never a checkpoint: see :func:`check_out_dir`)."""
    check_out_dir(out_dir, overwrite)
    reader = CheckpointReader(checkpoint)
    config = reader.model_config
    if config is None:
        raise ValueError(f"{checkpoint} holds no model config (saved without the horizon strategy): cannot export it")
    config = dict(config)
    if reader.model_class:
        config["architectures"] = [reader.model_class]
    _refuse_adapters([n for g in reader.meta["model"]["groups"] for n, _ in g["params"]], f"checkpoint {checkpoint}")
    entries: list[Entry] = []
    for g in reader.meta["model"]["groups"]:
        if g["name"] == "extra":
            continue
        file = str(reader.path / g["file"])
        for name, shape in g["params"]:
            entries.append((name, tuple(shape), lambda f=file, n=name: _read(f, n)))
    return _export(entries, config, reader.generation_config, out_dir, _dtype(dtype), tokenizer, max_shard_bytes)


_ADAPTER_NAMES = (
    ".base_layer.",
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".modules_to_save.",
    ".original_module.",
)


def _refuse_adapters(names: list[str], what: str) -> None:
    """Refuses to write PEFT adapter layers as a plain model: Hugging Face would not load those names."""
    found = [n for n in names if any(key in n for key in _ADAPTER_NAMES)]
    if found:
        raise ValueError(
            f"{what} holds PEFT adapter layers ({found[0]}, ...): a plain Hugging Face export would not load. Save the "
            "adapter with the PeftModel's save_pretrained, or merge it first (merge_and_unload()); "
            "lightning_horizon.lora.export_peft does either (the recipe: peft.export=adapter|merged)"
        )


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises ``ValueError`` unless exporting to ``out_dir`` loses nothing that was not asked for.

    Refused always: ``out_dir`` is a checkpoint, holds one (a ``*.ckpt`` or a horizon checkpoint directory, at any
    depth) or lies inside one; it is the current directory or one of its parents; it is a file. Refused unless
    ``overwrite``: a non-empty directory.
    """
    out = Path(out_dir).expanduser().absolute()
    real = out.resolve()
    for parent in (real, *real.parents):
        if is_horizon_checkpoint(parent) or parent.suffix == ".ckpt":
            what = "is a checkpoint" if parent == real else f"lies inside the checkpoint {parent}"
            raise ValueError(
                f"export OUT_DIR {out} {what}: an export never writes over or into a checkpoint, even with "
                "--overwrite; choose another OUT_DIR"
            )
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"export OUT_DIR {out} is the current directory or one of its parents: choose a new directory")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ValueError(f"export OUT_DIR {out} is a file, not a directory: choose another OUT_DIR")
    found = _find_checkpoint(real)
    if found is not None:
        raise ValueError(
            f"export OUT_DIR {out} holds the checkpoint {found}: an export never replaces checkpoints, even with "
            "--overwrite; choose another OUT_DIR"
        )
    entries = sorted(p.name for p in out.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise ValueError(
            f"export OUT_DIR {out} is not empty ({shown}): pass --overwrite (overwrite=True) to replace it, or "
            "choose another OUT_DIR"
        )


def _find_checkpoint(directory: Path) -> Path | None:
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            path = Path(root) / name
            if path.suffix == ".ckpt" or name == "horizon.json":
                return path.parent if name == "horizon.json" else path
    return None


def is_hf_export(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like a Hugging Face model directory and nothing else: files only, a
    ``config.json`` and safetensors weights, no checkpoint (what an earlier export of the recipe left)."""
    directory = Path(directory)
    if not directory.is_dir() or not (directory / "config.json").is_file():
        return False
    entries = list(directory.iterdir())
    return (
        all(p.is_file() and not p.name.startswith(".") and p.suffix != ".ckpt" for p in entries)
        and any(p.suffix == ".safetensors" for p in entries)
        and not (directory / "horizon.json").exists()
    )


def _read(file: str, name: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)


def _export(
    entries: list[Entry],
    config: dict,
    generation: dict | None,
    out_dir: str | os.PathLike,
    dtype: torch.dtype,
    tokenizer: Any,
    max_shard: int,
) -> Path:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temporary_path(out)
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
        generation = {k: v for k, v in (generation or {}).items() if k != "_from_model_config"}
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            fill_special_tokens(config, generation, tokenizer)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the model config's, where generation has none
            if generation.get(key) is None and config.get(key) is not None:
                generation[key] = config[key]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_generation_config(tmp, generation)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            check_tokenizer_round_trip(tokenizer, tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_generation_config(directory: Path, values: dict) -> None:
    from transformers import GenerationConfig

    GenerationConfig.from_dict(values).save_pretrained(str(directory))


# Texts where tokenizer pipelines differ: digit runs, spaces before numbers, repeated whitespace, Unicode forms.
_PROBES = (
    "Sort 3, 1, 2 ü and add 42 + 1000000.",
    " 42\n\n  x=1;y=22;z=333\t\tend  ",
    "naïve café (cafe\u0301) – “quotes” 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀",
    "I'm here; they'll go. DON'T!",
)


def check_tokenizer_round_trip(tokenizer: Any, directory: str | os.PathLike) -> None:
    """Raises ``ValueError`` if the tokenizer saved in ``directory`` (a model directory with its ``config.json``)
    loads back through ``AutoTokenizer`` with other token ids than ``tokenizer`` (probe texts and a chat)."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(directory))
    probes = list(_PROBES)
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": _PROBES[0]}, {"role": "assistant", "content": _PROBES[1]}]
        try:
            probes.append(tokenizer.apply_chat_template(chat, tokenize=False))
        except Exception:  # noqa: BLE001 - a template that needs other roles: the plain probes still check
            pass
    for text in probes:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = loaded(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise ValueError(
                f"the exported tokenizer loads back (AutoTokenizer, with the export's config.json) as "
                f"{type(loaded).__name__} and tokenizes {text[:60]!r} into {len(got)} tokens, the given "
                f"{type(tokenizer).__name__} into {len(want)}: the exported model would see other ids than in "
                "training. Train with lightning_horizon.data.tokenizer.as_exported(tokenizer, model.config)"
            )


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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT_DIR (never a checkpoint or one holding one)"
    )
    args = parser.parse_args(argv)
    max_shard = int(args.max_shard_gb * 1024**3)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.tokenizer, max_shard, args.overwrite)
    except ValueError as err:  # CheckpointError is one
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {args.checkpoint} -> {out} ({args.dtype})")


if __name__ == "__main__":
    main()
