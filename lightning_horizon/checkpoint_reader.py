"""Reading horizon checkpoints (see :mod:`lightning_horizon.checkpoint` for the layout and the writer): every file's
size and crc32 verified on open, then lazy views that read one tensor (or one shard) at a time."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Container, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_horizon.files import file_crc32
from lightning_horizon.loading import SafetensorsReader

FORMAT_VERSION = 1
META_FILE = "horizon.json"
TRAINER_FILE = "trainer.pt"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupted, or does not fit the model/optimizer being restored."""


class CheckpointReader:
    """A horizon checkpoint directory, verified on open (sizes and crc32 of every file)."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            what = "does not exist" if not self.path.exists() else f"has no {META_FILE}"
            raise CheckpointError(
                f"{self.path} {what}: not a complete horizon checkpoint (an interrupted save leaves the previous "
                "checkpoint in place and never a partial one under the final name)"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{meta_path} is corrupted: {err}") from err
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{self.path} has checkpoint format version {version}; this build reads {FORMAT_VERSION}"
            )
        if verify:
            self.verify()

    def verify(self) -> None:
        for rel, want in self.meta["files"].items():
            file = self.path / rel
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {file} is missing")
            size = file.stat().st_size
            if size != want["bytes"]:
                raise CheckpointError(
                    f"checkpoint file {file} is truncated or corrupted: {size} bytes, expected {want['bytes']}"
                )
            _, crc = file_crc32(file)
            if crc != want["crc32"]:
                raise CheckpointError(f"checkpoint file {file} is corrupted: crc32 {crc}, expected {want['crc32']}")

    @property
    def model_config(self) -> dict | None:
        return self.meta["model"].get("config")

    @property
    def model_class(self) -> str | None:
        return self.meta["model"].get("class")

    @property
    def generation_config(self) -> dict | None:
        """The model's generation config (``GenerationConfig.to_dict()``) when it was saved with one."""
        return self.meta["model"].get("generation_config")

    @property
    def global_step(self) -> int | None:
        """Lightning's ``global_step`` at the save (None for checkpoints written before it was recorded)."""
        return self.meta.get("global_step")

    def trainer_state(self) -> dict[str, Any]:
        with open(self.path / TRAINER_FILE, "rb") as f:
            try:
                return torch.load(f, map_location="cpu", weights_only=False)
            except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
                raise CheckpointError(f"{self.path / TRAINER_FILE} cannot be read: {err}") from err

    def param_groups(self) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
        """``[(group name, [(parameter name, shape), ...])]`` of the saved model (store groups; extra excluded)."""
        return [
            (g["name"], [(n, tuple(s)) for n, s in g["params"]])
            for g in self.meta["model"]["groups"]
            if g["name"] != "extra"
        ]

    def iter_model(self, skip: Container[str] = ()) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(group name, key, tensor)`` for every saved model tensor (but those of the groups named in ``skip``, whose
        files are not opened), one file open at a time."""
        for g in self.meta["model"]["groups"]:
            if g["name"] in skip:
                continue
            with SafetensorsReader(self.path / g["file"]) as f:  # read, not mapped: see SafetensorsReader
                for name, _ in g["params"]:
                    yield g["name"], name, f.get_tensor(name)

    def optimizer_tensors(
        self, index: int, names: Container[str] | None = None
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(parameter name, state key, tensor)`` for optimizer ``index`` (of the parameters in ``names`` only, when
        given: the others are not read)."""
        for rel in self.meta["optimizers"][index]["files"]:
            with SafetensorsReader(self.path / rel) as f:
                for key in f.keys():
                    pname, _, skey = key.rpartition(".")
                    if names is None or pname in names:
                        yield pname, skey, f.get_tensor(key)


class ShardedStateDict(Mapping):
    """The LightningModule's state dict of a horizon checkpoint, read tensor by tensor on access.

    The horizon strategy streams it into the host store; any other consumer (``load_state_dict``) still works.
    """

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        model = reader.meta["model"]
        self.prefix = model["prefix"]
        self._where: dict[str, tuple[str, str]] = {}
        for g in model["groups"]:
            for name, _ in g["params"]:
                key = name if g["name"] == "extra" else self.prefix + name
                self._where[key] = (g["file"], name)
        for alias, target in model["aliases"].items():
            self._where[alias] = self._where[target]

    def __getitem__(self, key: str) -> torch.Tensor:
        file, name = self._where[key]
        with SafetensorsReader(self.reader.path / file) as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LazyOptimizerStates(Sequence):
    """``checkpoint["optimizer_states"]``: optimizer ``i``'s state dict is read from its shards when indexed."""

    def __init__(self, reader: CheckpointReader, trainer_entries: list[dict[str, Any]]) -> None:
        self.reader = reader
        self.entries = trainer_entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]  # type: ignore[return-value]
        return self.read(index)

    def read(self, index: int, names: Container[str] | None = None) -> dict[str, Any]:
        """Optimizer ``index``'s state dict, with the state of the parameters in ``names`` only when given (a process
        of a data-parallel run reads the state of the layers it steps)."""
        entry = self.entries[index]
        names = self.reader.meta["optimizers"][index]["param_names"]
        ids = [i for g in entry["param_groups"] for i in g["params"]]
        id_of = dict(zip(names, ids))
        state: dict[int, dict[str, Any]] = {}
        for pname, skey, tensor in self.reader.optimizer_tensors(index, names):
            state.setdefault(id_of[pname], {})[skey] = tensor
        for pname, values in entry.get("scalar_state", {}).items():
            if names is None or pname in names:
                state.setdefault(id_of[pname], {}).update(values)
        return {"state": state, "param_groups": entry["param_groups"]}


def load_sharded(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Lightning's checkpoint dict of a horizon checkpoint, with lazy ``state_dict`` and ``optimizer_states``."""
    reader = CheckpointReader(path, verify=verify)
    checkpoint = reader.trainer_state()
    checkpoint["state_dict"] = ShardedStateDict(reader)
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = LazyOptimizerStates(reader, checkpoint["optimizer_states"])
    return checkpoint


def load_from_checkpoint(cls: type, checkpoint_path: str | os.PathLike, strict: bool | None = None, **kwargs: Any):
    """``cls.load_from_checkpoint(path)`` for a horizon checkpoint directory (which ``torch.load``, and so
    Lightning's own ``load_from_checkpoint``, cannot open): the LightningModule built from the saved
    hyper-parameters (``kwargs`` override them, as in Lightning) with every tensor of the checkpoint loaded, on the
    CPU in FP32. For a Hugging Face model alone, export it instead (``python -m lightning_horizon.export``)::

        module = lightning_horizon.load_from_checkpoint(MyModule, "run/checkpoints/last.ckpt")
    """
    from lightning.pytorch.core.saving import _load_state

    checkpoint = load_sharded(checkpoint_path)
    checkpoint.pop("optimizer_states", None)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)


def is_horizon_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()
