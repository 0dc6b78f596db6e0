"""Sharded, atomic, checksummed checkpoints: :class:`HorizonCheckpointIO`.

A checkpoint is a directory (Lightning's ``ModelCheckpoint`` names it ``...ckpt``)::

    epoch=0-step=10.ckpt/
      horizon.json                format version, per-file size + crc32, model layout and config, optimizer layout
      trainer.pt                  the rest of Lightning's checkpoint dict (loops, callbacks, LR schedulers, epoch,
                                  global_step, hyper-parameters, precision state, optimizer param_groups), RNG states
      model/embed.safetensors     FP32 masters of one store group, keyed by Hugging Face parameter name
      model/layers.0.safetensors  ...
      model/norm.safetensors, model/lm_head.safetensors
      model/extra.safetensors     tensors of the LightningModule outside the streamed model (if any)
      optim/layers.0.safetensors  optimizer state of the group's parameters: ``<param name>.exp_avg`` etc.
      optim.1/...                 a second optimizer, if any

Saving writes everything under a hidden temporary name next to the target (``.NAME.tmp-PID-RANDOM``), fsyncs it,
writes ``horizon.json`` last and renames the directory into place (an atomic exchange with ``renameat2`` when a
checkpoint of that name exists). A process killed mid-save leaves the previous checkpoint untouched; its stale
temporary directory is removed by the next save of that name, and every stale temporary of the folder by
:class:`~lightning_horizon.checkpoint_callback.HorizonModelCheckpoint` when training starts.

Tensors are written straight from their memory (the store's group views, the optimizer's state tensors) with the
file's crc32 computed on the same bytes: the save needs no memory beyond the store. Loading verifies every file's
size and checksum *before* anything is restored (:mod:`.checkpoint_reader`), then hands Lightning lazy views
(:class:`ShardedStateDict`, :class:`LazyOptimizerStates`) that the strategy streams tensor by tensor into the store.

The writer is synchronous: a background writer would either need a snapshot of the masters and optimizer state
(memory proportional to the model, which the host cannot spare) or an engine hook that holds each group's next
optimizer update until the group is written. Writing runs at disk speed (crc32 adds ~0.3 s/GB on one core).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from typing_extensions import override

from lightning_horizon.checkpoint_reader import (  # noqa: F401  (re-exported: the checkpoint API is this module)
    FORMAT_VERSION,
    META_FILE,
    TRAINER_FILE,
    CheckpointError,
    CheckpointReader,
    LazyOptimizerStates,
    ShardedStateDict,
    is_horizon_checkpoint,
    load_from_checkpoint,
    load_sharded,
)
from lightning_horizon.engine.adapter import describe
from lightning_horizon.engine.store import unique_groups
from lightning_horizon.files import file_crc32, fsync_dir, publish, remove_stale, temporary_path, write_safetensors

LAYOUT_KEY = "horizon_layout"
"""Key under which the strategy passes the store layout inside Lightning's checkpoint dict (removed on save)."""


# -------------------------------------------------------------------------------------------------------- saving
def save_sharded(checkpoint: dict[str, Any], path: str | os.PathLike, fsync: bool = True, parallel=None) -> None:
    """Writes Lightning's checkpoint dict as a horizon checkpoint directory at ``path`` (atomically).

    With ``parallel`` (a :class:`~lightning_horizon.engine.data_parallel.DataParallel`; every process calls this),
    the processes write together, in parallel: each process of node 0 the master files and the optimizer shards of
    the store groups it owns (its ``optimizer_states`` hold only those; every process's ``state_dict`` views the
    node's shared masters), and global rank 0 also the files of parameters outside the store groups, the trainer
    state and the metadata. With a sharded node store every node's processes write the files of the layers their
    node holds (``path`` must then be on a file system every node sees), node 0's those of the groups every node
    holds. A failure in any process removes the temporary directory and raises in every process;
    nothing is published."""
    path = Path(path)
    checkpoint = dict(checkpoint)
    layout = checkpoint.pop(LAYOUT_KEY, None)
    state_dict = checkpoint.pop("state_dict", None) or {}
    optimizer_states = checkpoint.pop("optimizer_states", None)
    lead = parallel is None or parallel.rank == 0
    tmp: Path | None = None
    error: BaseException | None = None
    if lead:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path)
            tmp = temporary_path(path)
            tmp.mkdir()
        except BaseException as err:  # the other processes learn of it below
            error = err
    if parallel is not None:
        shared = parallel.broadcast_object(str(tmp) if tmp is not None else None)
        if shared is None:
            if error is not None:
                raise error
            raise CheckpointError(f"global rank 0 could not create the temporary directory of {path}")
        tmp = Path(shared)
    assert tmp is not None
    files: dict[str, dict[str, Any]] = {}
    optimizers: list[tuple[dict[str, Any], dict[str, Any]]] = []
    try:
        if parallel is not None and parallel.sharded_nodes and not tmp.is_dir():
            raise CheckpointError(
                f"node {parallel.node_rank} does not see {tmp}, the checkpoint's temporary directory made by global "
                "rank 0: with node_store='sharded' every node writes the files of its layers, so the checkpoint path "
                "must be on a file system every node sees"
            )
        if parallel is None:
            model_meta = _write_model(tmp, state_dict, layout, files, fsync)
        elif parallel.node_rank == 0 or parallel.sharded_nodes:
            model_meta = _write_model(tmp, state_dict, layout, files, fsync, writes=parallel.writes)
        else:
            model_meta = _model_groups(layout)
        if optimizer_states is not None and (parallel is None or parallel.node_rank == 0 or parallel.sharded_nodes):
            names_per_opt = (layout or {}).get("optimizers") or [None] * len(optimizer_states)
            keep = parallel.writes_state if parallel is not None else None
            for i, (opt_state, info) in enumerate(zip(optimizer_states, names_per_opt)):
                optimizers.append(_write_optimizer(tmp, i, opt_state, info, model_meta, files, fsync, keep))
    except BaseException as err:
        error = err
    if parallel is not None:  # every process's files and optimizer parts (or its failure) to every process
        parts = parallel.all_gather_object((files, optimizers, None if error is None else repr(error)))
        failures = [(rank, e) for rank, (_, _, e) in enumerate(parts) if e is not None]
        if failures and error is None:
            rank, what = failures[0]
            error = CheckpointError(f"process {rank} failed to write its part of checkpoint {path}: {what}")
        if error is None and lead:
            for other_files, other_optimizers, _ in parts[1:]:
                files.update(other_files)
                _merge_optimizers(optimizers, other_optimizers, model_meta)
    if error is None and lead:
        try:
            _finish(checkpoint, tmp, path, files, model_meta, optimizers, optimizer_states is not None, fsync)
        except BaseException as err:
            error = err
    if parallel is not None:
        outcome = parallel.broadcast_object(None if error is None else repr(error))
        if outcome is not None and error is None:
            error = CheckpointError(f"global rank 0 failed to publish checkpoint {path}: {outcome}")
    if error is not None:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error


def _finish(
    checkpoint: dict[str, Any],
    tmp: Path,
    path: Path,
    files: dict[str, dict[str, Any]],
    model_meta: dict[str, Any],
    optimizers: list[tuple[dict[str, Any], dict[str, Any]]],
    with_optimizers: bool,
    fsync: bool,
) -> None:
    """Writes the trainer state and the metadata (last) and publishes ``tmp`` as ``path``."""
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "files": files,
        "model": model_meta,
    }
    if with_optimizers:
        meta["optimizers"] = [opt_meta for opt_meta, _ in optimizers]
        checkpoint["optimizer_states"] = [rest for _, rest in optimizers]
    checkpoint["horizon_rng"] = _rng_state()
    with open(tmp / TRAINER_FILE, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    files[TRAINER_FILE] = dict(zip(("bytes", "crc32"), file_crc32(tmp / TRAINER_FILE)))
    with open(tmp / META_FILE, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    if fsync:
        for sub in (tmp, *(p for p in tmp.iterdir() if p.is_dir())):
            fsync_dir(sub)
    publish(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def _model_groups(layout: dict | None) -> dict[str, Any]:
    """The part of the model metadata the optimizer writer needs (group of each parameter), from the layout alone:
    what a process that does not write the masters knows."""
    if not layout:
        raise CheckpointError("a checkpoint written by several processes needs the store layout")
    return {"groups": [{"name": name, "params": [[n, None] for n in names]} for name, names in layout["groups"]]}


def _merge_optimizers(
    mine: list[tuple[dict[str, Any], dict[str, Any]]],
    other: list[tuple[dict[str, Any], dict[str, Any]]],
    model_meta: dict[str, Any],
) -> None:
    """Adds another process's optimizer files and per-parameter scalars to rank 0's (each group has one owner)."""
    order = [g["name"] for g in model_meta["groups"]] + ["rest"]

    def rank_of(rel: str) -> int:
        return order.index(rel.split("/", 1)[1].removesuffix(".safetensors"))

    for (meta, rest), (other_meta, other_rest) in zip(mine, other):
        meta["files"] = sorted({*meta["files"], *other_meta["files"]}, key=rank_of)
        for name, values in other_rest["scalar_state"].items():
            rest["scalar_state"].setdefault(name, {}).update(values)


def _write_model(
    tmp: Path,
    state_dict: Mapping[str, Any],
    layout: dict | None,
    files: dict,
    fsync: bool,
    writes: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Writes one file per store group (with ``writes``, only the groups whose names it accepts: several processes
    write one checkpoint); returns the model part of the metadata, every group's."""
    prefix = layout["prefix"] if layout else ""
    seen: dict[tuple, str] = {}  # storage identity -> first key: tied weights are written once
    aliases: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        ident = (
            value.device,
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            tuple(value.stride()),
            value.dtype,
        )
        if value.is_meta:  # a layer another node holds (a sharded node store): no storage to compare
            ident = (*ident, key)
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value
    groups: list[tuple[str, list[str]]] = []
    if layout:
        covered = set()
        for gname, names in layout["groups"]:
            keys = [prefix + n for n in names if prefix + n in tensors]
            covered.update(keys)
            groups.append((gname, keys))
        rest = [k for k in tensors if k not in covered]
        if rest:
            groups.append(("extra", rest))
    else:
        by_group: dict[str, list[str]] = {}
        for key in tensors:
            m = re.search(r"layers\.(\d+)\.", key)
            by_group.setdefault(f"layers.{m.group(1)}" if m else "rest", []).append(key)
        groups = list(by_group.items())
    (tmp / "model").mkdir(exist_ok=True)
    out_groups = []
    for gname, keys in groups:
        if not keys:
            continue
        rel = f"model/{gname}.safetensors"
        names = [k[len(prefix) :] if gname != "extra" else k for k in keys]
        by_name = dict(zip(names, keys))
        specs = [(n, tensors[k].dtype, tuple(tensors[k].shape)) for n, k in zip(names, keys)]
        if writes is None or writes(gname):
            files[rel] = write_safetensors(tmp / rel, specs, lambda n, m=by_name: tensors[m[n]], fsync=fsync)
        out_groups.append({"name": gname, "file": rel, "params": [[n, list(s)] for n, _, s in specs]})
    return {
        "prefix": prefix,
        "groups": out_groups,
        "aliases": aliases,
        "config": (layout or {}).get("config"),
        "generation_config": (layout or {}).get("generation_config"),
        "class": (layout or {}).get("class"),
    }


def _write_optimizer(
    tmp: Path,
    index: int,
    opt_state: Mapping[str, Any],
    info: dict | None,
    model_meta: dict,
    files: dict,
    fsync: bool,
    keep: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Writes the optimizer's per-parameter tensors next to their parameters' groups (with ``keep``, of the groups
    whose names it accepts only)."""
    state = opt_state.get("state", {})
    groups = opt_state["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    names = info["param_names"] if info else [f"param.{i}" for i in ids]
    name_of = dict(zip(ids, names))
    group_of_name = {n: g["name"] for g in model_meta["groups"] for n, _ in g["params"]}
    per_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state.items():
        pname = name_of[pid]
        if keep is not None and not keep(group_of_name.get(pname, "rest")):
            continue
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                per_file.setdefault(group_of_name.get(pname, "rest"), []).append((f"{pname}.{k}", v))
            else:
                scalars.setdefault(pname, {})[k] = v
    folder = "optim" if index == 0 else f"optim.{index}"
    (tmp / folder).mkdir(exist_ok=True)  # several processes write their groups' shards into it
    order = [g["name"] for g in model_meta["groups"]] + ["rest"]
    out_files = []
    for gname in sorted(per_file, key=order.index):
        entries = dict(per_file[gname])
        rel = f"{folder}/{gname}.safetensors"
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in entries.items()]
        files[rel] = write_safetensors(tmp / rel, specs, entries.__getitem__, fsync=fsync)
        out_files.append(rel)
    meta = {
        "class": (info or {}).get("class"),
        "param_names": names,
        "group_sizes": [len(g["params"]) for g in groups],
        "files": out_files,
    }
    rest = {"param_groups": groups, "scalar_state": scalars}
    return meta, rest


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- Lightning CheckpointIO
class HorizonCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing horizon checkpoint directories (the horizon strategy's default).

    Args:
        fsync: Flush every file to disk before the checkpoint is published (needed to survive power loss; a killed
            process alone never leaves a partial checkpoint either way).
        verify: Check sizes and crc32 of every file when loading.
    """

    def __init__(self, fsync: bool = True, verify: bool = True) -> None:
        self.fsync = fsync
        self.verify = verify

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"HorizonCheckpointIO does not support storage_options (got {storage_options!r})")
        save_sharded(checkpoint, path, fsync=self.fsync)

    @override
    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        if path.is_file():
            raise CheckpointError(
                f"{path} is a single-file checkpoint; the horizon strategy saves and resumes checkpoint directories"
            )
        return load_sharded(path, verify=self.verify)

    @override
    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        if not os.path.lexists(path):
            return
        if path.is_dir() and not path.is_symlink():
            # Renamed first so that a half-removed directory never carries a checkpoint's name.
            trash = temporary_path(path, "old")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.remove(path)


# ------------------------------------------------------------------------------------- glue used by the strategy
def store_layout(
    model: torch.nn.Module, module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]
) -> dict[str, Any]:
    """What the writer needs beyond Lightning's dict: the store's groups and parameter names (computed from the model
    ``module`` streams, with or without an engine around it), config, optimizer classes."""
    groups = unique_groups(describe(model).store_groups())
    names = {id(p): n for _, named in groups for n, p in named}
    config = model.config.to_dict() if hasattr(model, "config") else None
    generation = getattr(model, "generation_config", None)
    return {
        "prefix": _prefix_of(module, model),
        "groups": [[name, [n for n, _ in named]] for name, named in groups],
        "config": config,
        "generation_config": generation.to_diff_dict() if generation is not None else None,
        "class": type(model).__name__,
        "optimizers": [_optimizer_info(opt, names) for opt in optimizers],
    }


def _prefix_of(module: torch.nn.Module, model: torch.nn.Module) -> str:
    for name, sub in module.named_modules():
        if sub is model:
            return f"{name}." if name else ""
    raise ValueError("the streamed model is not part of the LightningModule")


def _optimizer_info(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """The optimizer's class and its parameters' names (``names``: parameter id -> name in the store)."""
    params = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", "param_names": params}


def check_model(reader: CheckpointReader, engine) -> None:
    """Refuses a checkpoint whose parameters (names, shapes, grouping) differ from the store's."""
    saved = reader.param_groups()
    # the model's groups as the writer lays them out (a group's frozen part held apart in the store is still its own)
    current = [
        (name, [(n, tuple(p.shape)) for n, p in named]) for name, named in unique_groups(engine.parts.store_groups())
    ]
    if saved == current:
        return
    detail = f"{len(saved)} groups saved, {len(current)} in the model"
    for (sg, sp), (cg, cp) in zip(saved, current):
        if sg != cg or sp != cp:
            diff = next(((a, b) for a, b in zip(sp, cp) if a != b), None)
            if diff is None:
                detail = f"group {sg!r} has {len(sp)} parameters saved, group {cg!r} has {len(cp)} in the model"
            else:
                (sn, ss), (cn, cs) = diff
                detail = f"saved {sn!r} with shape {ss}, the model has {cn!r} with shape {cs}"
            break
    raise CheckpointError(
        f"checkpoint {reader.path} was saved from a different model architecture "
        f"(saved {reader.model_class}, now {type(engine.model).__name__}): {detail}"
    )


def check_optimizers(reader: CheckpointReader, optimizers: Sequence[torch.optim.Optimizer], engine) -> None:
    """Refuses optimizer state saved from another optimizer class or another param-group structure."""
    saved = reader.meta.get("optimizers") or []
    if len(saved) != len(optimizers):
        raise CheckpointError(
            f"checkpoint {reader.path} holds the state of {len(saved)} optimizer(s); configure_optimizers returned "
            f"{len(optimizers)}"
        )
    for i, (meta, opt) in enumerate(zip(saved, optimizers)):
        info = _optimizer_info(opt, {id(sp.param): sp.name for g in engine.store.groups for sp in g.params})
        if meta["class"] is not None and meta["class"] != info["class"]:
            raise CheckpointError(
                f"checkpoint {reader.path} holds the state of a {meta['class']} (optimizer {i}); the resumed run uses "
                f"{info['class']}: resume with the same optimizer class"
            )
        sizes = [len(g["params"]) for g in opt.param_groups]
        if meta["group_sizes"] != sizes or meta["param_names"] != info["param_names"]:
            raise CheckpointError(
                f"checkpoint {reader.path}: optimizer {i} was saved with param groups of sizes {meta['group_sizes']}; "
                f"the resumed optimizer has {sizes} (or other parameters in them): the param-group structure must "
                "match to resume its state"
            )


def load_into_store(state_dict: ShardedStateDict, engine, module: torch.nn.Module, strict: bool = True) -> None:
    """Streams the saved masters into the store's views (one tensor at a time) and the rest into ``module``."""
    reader = state_dict.reader
    check_model(reader, engine)
    by_name = {sp.name: sp for g in engine.store.groups for sp in g.params}
    away = {sp.name for g in engine.store.groups if g.away for sp in g.params}  # other nodes' layers: not read
    skip = {g["name"] for g in reader.meta["model"]["groups"] if all(n in away for n, _ in g["params"])}
    extra: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for group, name, tensor in reader.iter_model(skip=skip):
            if group == "extra":
                extra[name] = tensor
            elif name not in away:
                by_name[name].param.data.copy_(tensor)
                del tensor
    prefix = state_dict.prefix
    stored = {prefix + n for n in by_name}
    if extra or strict:
        result = module.load_state_dict(extra, strict=False)
        if strict:
            missing = [k for k in result.missing_keys if k not in stored and k not in state_dict]
            if missing:
                raise CheckpointError(f"checkpoint {reader.path} lacks {', '.join(missing[:8])}")
