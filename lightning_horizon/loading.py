"""Streaming loader: a Hugging Face model directory straight into the host store, tensor by tensor.

``load_hf_model(path)`` never materialises a second copy of the weights:

1. The model is built with its *parameters* on the meta device (a patched ``nn.Module.register_parameter``, as
   accelerate's ``init_empty_weights(include_buffers=False)`` does). Buffers are created for real on the CPU, so
   non-persistent buffers such as the rotary ``inv_freq`` get their exact values from the model's own ``__init__``;
   any buffer still on the meta device afterwards is re-initialised with the model's ``_init_weights``.
2. For FP32 (what the engine keeps), :meth:`HostStore.from_meta` allocates the store's flat per-group buffers
   (uninitialised) and turns every parameter into a view into them. ``HostStore.adopt`` later takes these buffers
   over without a copy. Other dtypes get one plain tensor per parameter.
3. Each safetensors file is read one tensor at a time with ``pread`` (:class:`SafetensorsReader`, no memory map):
   a tensor of the target's dtype straight into its view, any other in chunks cast into it. The only extra memory
   is one chunk (64 MiB), whatever the size of the shards.

Missing, unexpected, mis-shaped or inconsistently tied tensors raise a ``ValueError`` naming the key and the file;
an unreadable (corrupted, truncated, empty) safetensors file one naming the file. :func:`check_model_dir` checks a
local model directory before anything is built: it exists, holds a ``config.json`` and readable safetensors headers.
The source's ``generation_config.json`` becomes the model's ``generation_config`` (an export writes it again).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import struct
from collections.abc import Collection, Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lightning_horizon.engine.adapter import describe
from lightning_horizon.engine.store import HostStore

_CHUNK_BYTES = 64 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$", r"rotary_emb\.original_inv_freq$")


def load_hf_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    num_labels: int | None = None,
    meta: bool = False,
    node: tuple[int, int] | None = None,
) -> nn.Module:
    """A ``...ForCausalLM`` with the weights of ``path`` (a local directory or a hub id), streamed from safetensors.

    With ``num_labels``, a ``...ForSequenceClassification`` with that many outputs instead (a reward model: 1): the
    checkpoint's ``lm_head`` is not loaded, and a ``score`` head it lacks (a causal LM's checkpoint) starts from the
    model's initialisation, ``normal(0, initializer_range)``.

    With ``dtype=torch.float32`` the parameters are views into flat buffers laid out as the engine's host store
    (``HorizonEngine`` adopts them without copying once it builds its store with ``HostStore.adopt``). The model is
    returned in eval mode, as ``from_pretrained`` does.

    With ``meta=True`` only the model's structure, from its config: every tensor on the meta device and no weight
    read (the processes of a data-parallel node other than local rank 0, whose parameters become views into the
    store that local rank 0 fills).

    With ``node=(node_rank, num_nodes)`` (a sharded node store, ``EngineConfig.node_store="sharded"``): only the
    decoder layers this node holds (:func:`~lightning_horizon.engine.data_parallel.assign_homes`, what the store
    assigns) and the parts every node holds are read and given memory; the other layers' parameters stay on the meta
    device, so a node's setup never holds the whole model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    directory = _resolve(path)
    if not meta:  # (it reads the weight files' headers; the process that loads the weights checks them)
        check_model_dir(directory)
    config = AutoConfig.from_pretrained(directory)
    auto = AutoModelForCausalLM
    if num_labels is not None:
        config.num_labels, auto = num_labels, AutoModelForSequenceClassification
    if meta:  # no weights: the store's values come from local rank 0
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    else:
        with params_on_meta():
            model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        away = away_parameters(model, *node) if node is not None else {}
        materialize(model, dtype, away=away)
        if num_labels is None:
            load_safetensors_into(model, directory, away=away.values())
        else:
            missing = load_safetensors_into(
                model, directory, skip=(r"^lm_head\.",), may_miss=("score.weight",), away=away.values()
            )
            if missing:
                with torch.no_grad():
                    model.score.weight.normal_(0.0, float(getattr(config, "initializer_range", 0.02)))
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    return model


def looks_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local directory rather than a Hugging Face hub id (``org/name``)."""
    text = str(path)
    return (
        Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~"))
        or os.sep in text.strip(os.sep).split(os.sep, 1)[-1]
        or not _HUB_ID.match(text)
    )


def check_model_dir(path: str | os.PathLike) -> None:
    """Raises ``ValueError`` naming ``path`` and what is missing unless it is a readable Hugging Face model
    directory: it exists, has a ``config.json`` and safetensors weights whose headers read (a hub id that is not a
    local path is left to the download)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        if looks_local(path):
            raise ValueError(f"{path}: no such directory (a Hugging Face hub id has the form org/name)")
        return
    if not directory.is_dir():
        raise ValueError(f"{path} is a file; it must be a Hugging Face model directory")
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        raise ValueError(
            f"{path} is an empty directory: expected config.json, safetensors weights "
            "and tokenizer files (a save_pretrained directory)"
        )
    if "config.json" not in names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"{path} has no config.json, so it is not a Hugging Face model directory (it holds {shown})")
    for name in weight_files(directory):
        with _open(directory / name):
            pass


@contextlib.contextmanager
def _open(file: Path) -> Iterator[Any]:
    """``safe_open`` that names the file when it cannot be read."""
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: unreadable either way
        raise ValueError(
            f"cannot read the safetensors file {file} ({file.stat().st_size if file.exists() else 0} bytes): {err}. "
            "The file is corrupted or truncated: download or save it again"
        ) from err
    with handle as f:
        yield f


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers on the CPU."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def away_parameters(model: nn.Module, node_rank: int, num_nodes: int) -> dict[int, str]:
    """``{id: name}`` of the parameters of the decoder layers other nodes hold under a sharded node store
    (:func:`~lightning_horizon.engine.data_parallel.assign_homes` over the model's layers, as the store assigns
    them), for a model that is not yet in memory (meta parameters are fine)."""
    from lightning_horizon.engine.data_parallel import assign_homes
    from lightning_horizon.engine.store import split_frozen

    groups = describe(model).store_groups()
    homes = assign_homes(split_frozen(groups, None), num_nodes)
    return {id(p): n for name, named in groups if homes.get(name, node_rank) != node_rank for n, p in named}


def materialize(model: nn.Module, dtype: torch.dtype = torch.float32, away: Container[int] = ()) -> HostStore | None:
    """Gives the meta parameters of ``model`` uninitialised host memory (store buffers when FP32 and supported);
    those whose ids are in ``away`` (another node's layers, :func:`away_parameters`) stay on the meta device."""
    store = None
    if dtype == torch.float32:
        try:
            groups = describe(model).store_groups()
        except ValueError:
            groups = None
        if groups is not None:
            kept = [(name, named) for name, named in groups if not any(id(p) in away for _, p in named)]
            store = HostStore.from_meta(model, kept)
    if store is None:
        replaced: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and p.is_meta and id(p) not in away:
                    if id(p) not in replaced:
                        replaced[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=p.requires_grad)
                    module._parameters[key] = replaced[id(p)]
    _init_meta_buffers(model)
    return store


def initialize_on_host(model: nn.Module) -> HostStore | None:
    """Materialises a causal LM built on the meta device (``with torch.device("meta"):`` in ``configure_model``)
    straight into the host store's layout and initialises it with the model's own initialisation, module by module.

    The FP32 buffers are allocated once, uninitialised, and filled in place (``PreTrainedModel.init_weights``, or
    each module's ``reset_parameters`` for other models): host memory never holds more than the masters, however
    the model was meant to be built (its dtype included: the masters are FP32). Only a model whose parameters are
    all on the meta device is taken: part real, part meta is refused (the real values would have to be copied).
    Returns the store layout it allocated (``HostStore.adopt`` takes it over), or None when the model has no
    parameter on the meta device."""
    params = list(model.parameters())
    meta = [p for p in params if p.is_meta]
    if not meta:
        return None
    if len(meta) != len(params):
        name = next(n for n, p in model.named_parameters() if p.is_meta)
        raise ValueError(
            f"parameter {name!r} is on the meta device but {len(params) - len(meta)} other parameter(s) are not: build "
            "the whole model on the meta device (the horizon strategy then materialises it straight into host "
            "memory) or none of it"
        )
    store = materialize(model, torch.float32)
    with torch.no_grad():
        if hasattr(model, "init_weights"):
            model.init_weights()
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return store


def _init_meta_buffers(model: nn.Module) -> None:
    for module in model.modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for key in meta:
            module._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
        init = getattr(model, "_init_weights", None)
        if init is None:
            raise ValueError(f"buffers {meta} of {type(module).__name__} were created on the meta device")
        with torch.no_grad():
            init(module)


def weight_files(directory: str | os.PathLike) -> dict[str, list[str]]:
    """``{file name: [keys]}`` of a Hugging Face directory (sharded with an index, or one ``model.safetensors``)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map): {err}") from err
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        for name in files:
            if not (directory / name).is_file():
                raise ValueError(f"{index} names the shard {name}, which is missing from {directory}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        with _open(single) as f:
            return {single.name: list(f.keys())}
    raise ValueError(
        f"no safetensors weights in {directory}: expected model.safetensors or model.safetensors.index.json "
        "(convert .bin checkpoints with `save_pretrained(..., safe_serialization=True)` first)"
    )


def load_safetensors_into(
    model: nn.Module,
    directory: str | os.PathLike,
    skip: Sequence[str] = (),
    may_miss: Sequence[str] = (),
    away: Collection[str] = (),
) -> list[str]:
    """Copies every tensor of the safetensors files in ``directory`` into ``model``'s parameters and buffers.

    ``skip``: patterns of file keys not to load. ``may_miss``: model names the files may lack (returned when they
    do; any other missing name raises). ``away``: names of parameters another node holds (left on the meta device:
    their keys are neither read nor missed)."""
    directory = Path(directory)
    away = set(away)
    targets = {name: target for name, target in _targets(model).items() if target[1] not in away}
    alias_of = {name: first for name, (_, first) in targets.items()}
    loaded: dict[str, str] = {}  # first name of the tensor -> key and file it was loaded from
    ignored = [
        re.compile(p)
        for p in (*_IGNORED_UNEXPECTED, *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []))
    ]
    skipped = [re.compile(p) for p in skip]
    for file_name in sorted(weight_files(directory)):
        file_path = directory / file_name
        with SafetensorsReader(file_path) as f, torch.no_grad():
            for key in f.keys():
                if any(p.search(key) for p in skipped):
                    continue
                if key in away:
                    continue
                if key not in targets:
                    if any(p.search(key) for p in ignored):
                        continue
                    raise ValueError(
                        f"unexpected key {key!r} in {file_path}: {type(model).__name__} has no parameter or buffer "
                        "of that name (wrong model class or config?)"
                    )
                target, first = targets[key]
                shape = f.shape(key)
                if shape != tuple(target.shape):
                    raise ValueError(
                        f"shape mismatch for {key!r} in {file_path}: the file has {shape}, the model expects "
                        f"{tuple(target.shape)}"
                    )
                if first in loaded:  # tied weights present under both names: they must agree
                    if not torch.equal(f.get_tensor(key).to(target.dtype), target):
                        raise ValueError(
                            f"{key!r} in {file_path} is tied to {loaded[first]} in the model but holds different "
                            "values (set tie_word_embeddings to match the checkpoint)"
                        )
                    continue
                f.read_into(key, target)
                loaded[first] = f"{key!r} ({file_path.name})"
    missing = sorted(n for n, first in alias_of.items() if first not in loaded and n == first and _persistent(model, n))
    allowed = [n for n in missing if n in may_miss]
    missing = [n for n in missing if n not in may_miss]
    if missing:
        raise ValueError(
            f"{len(missing)} key(s) missing from the safetensors files in {directory}: {', '.join(missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}"
        )
    return allowed


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class SafetensorsReader:
    """A safetensors file read with ``pread`` into memory the caller owns, never memory-mapped.

    ``safe_open`` maps the whole file: every page a read touches stays in the process's resident set until the file
    is closed, so loading a single-file checkpoint needed the masters plus the whole file (twice the model in
    resident memory for an FP32 file). Here a tensor whose dtype matches its target is read straight into the
    target's memory, and any other in chunks of at most ``_CHUNK_BYTES`` through one reused buffer: the extra
    memory is one chunk, whatever the file's size. The page cache still holds the file (reclaimable, not the
    process's). Use it as a context manager.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with _open(self.path):  # safetensors' own validation of the header (names the file when it fails)
            pass
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, header_len, 8))
        except BaseException:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self._base = 8 + header_len
        self._entries = header
        self._buffer: torch.Tensor | None = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buffer = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._entries[key]["dtype"]
        dtype = _DTYPES.get(name)
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}, which this loader does not read")
        return dtype

    def get_tensor(self, key: str) -> torch.Tensor:
        """A new tensor holding ``key``."""
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def read_into(self, key: str, target: torch.Tensor) -> None:
        """Reads ``key`` into ``target`` (same shape; cast to its dtype)."""
        dtype, shape = self.dtype(key), self.shape(key)
        start, end = self._entries[key]["data_offsets"]
        numel = math.prod(shape)
        if end - start != numel * dtype.itemsize or tuple(target.shape) != shape:
            raise ValueError(f"{self.path}: tensor {key!r} is {end - start} bytes, not {numel} x {dtype}")
        if target.dtype == dtype and target.is_contiguous() and target.device.type == "cpu":
            self._pread(target.view(-1).view(torch.uint8), self._base + start)
            return
        flat = target.view(-1) if target.is_contiguous() else None
        if flat is None:  # a non-contiguous target (never a store view): one temporary tensor
            target.copy_(self.get_tensor(key))
            return
        step = max(1, _CHUNK_BYTES // dtype.itemsize)
        if self._buffer is None or self._buffer.numel() < min(step, numel) * dtype.itemsize:
            self._buffer = torch.empty(min(step, numel) * dtype.itemsize, dtype=torch.uint8)
        for first in range(0, numel, step):
            n = min(step, numel - first)
            chunk = self._buffer[: n * dtype.itemsize]
            self._pread(chunk, self._base + start + first * dtype.itemsize)
            flat[first : first + n].copy_(chunk.view(dtype))

    def _pread(self, dst: torch.Tensor, offset: int) -> None:
        """Fills the contiguous uint8 tensor ``dst`` from the file at ``offset``."""
        total = dst.numel()
        if total == 0:
            return
        view = memoryview((ctypes.c_char * total).from_address(dst.data_ptr())).cast("B")
        done = 0
        while done < total:
            got = os.preadv(self._fd, [view[done : done + (1 << 30)]], offset + done)
            if got <= 0:
                raise ValueError(
                    f"cannot read the safetensors file {self.path}: it ends before tensor data at byte "
                    f"{offset + done}. The file is corrupted or truncated: download or save it again"
                )
            done += got


def _targets(model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """``{state-dict name: (tensor, name of the first alias)}``; tied parameters share the first alias."""
    first_name: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = (p.data, first_name.setdefault(id(p), name))
    for name, b in model.named_buffers(remove_duplicate=False):
        out[name] = (b, first_name.setdefault(id(b), name))
    return out


def _persistent(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in module._parameters or leaf not in module._non_persistent_buffers_set


def _resolve(path: str | os.PathLike) -> Path:
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    if looks_local(path):
        check_model_dir(path)  # raises: names the path and what is wrong
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise ValueError(f"{path} is not a directory (and huggingface_hub is not installed)") from None
    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
