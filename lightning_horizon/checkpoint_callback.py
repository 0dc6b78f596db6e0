"""``HorizonModelCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last`` checkpoint costs no second copy, and
the choice of the checkpoint to resume from.

Lightning's ``ModelCheckpoint(save_last=True)`` saves ``step-N.ckpt`` and then saves ``last.ckpt`` again: two full
writes of the masters and the optimizer state (for a 100B-parameter model, two 1.2 TB writes per save).
``save_last="link"`` makes ``last.ckpt`` a symbolic link to ``step-N.ckpt`` instead, which breaks three things for
checkpoint directories:

- the top-k rotation removes ``step-(N-1).ckpt`` *before* ``last`` is re-linked, so a kill in between leaves a
  dangling ``last.ckpt``, and Lightning re-links by removing the old link first (no atomic replacement);
- a run resumed from ``last.ckpt`` keeps reading through a link whose target the next rotation removes;
- ``cp -r last.ckpt elsewhere`` copies a relative link, not the checkpoint.

:class:`HorizonModelCheckpoint` keeps Lightning's ``"link"`` flow (the top-k checkpoint is written once, ``last`` is
derived from it) but makes ``last`` a real directory whose files are *hard links* to the files just written: it is
built under a temporary name and published with the same atomic exchange as a save (:func:`link_checkpoint`).
Removing ``step-N.ckpt`` later only drops one name of each file; ``last`` keeps the data. Checkpoint files are never
modified in place (every save writes new files and renames a directory), so sharing inodes is safe. Where the file
system refuses hard links, the files are copied.

At the start of training it also removes every temporary that a killed save left in its directory, and after each
``last`` of a resumed run, the top-k checkpoints that no longer belong to the rotation (a kill between a top-k save and
``last``, or Lightning's rule that never removes the checkpoint a run resumed from, leaves such an orphan behind)
once ``last`` is newer than they are.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_horizon.checkpoint_reader import META_FILE, TRAINER_FILE, CheckpointError, CheckpointReader
from lightning_horizon.files import (
    fsync_dir,
    link_tree,
    publish,
    remove_stale,
    remove_stale_temporaries,
    temporary_path,
)


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fsync: bool = True) -> None:
    """Publishes ``dst`` as a checkpoint with the contents of ``src``, by hard links (no data copied), atomically:
    a kill at any moment leaves either the previous ``dst`` or the new one."""
    src, dst = Path(src), Path(dst)
    remove_stale(dst)
    tmp = temporary_path(dst)
    try:
        if src.is_dir():
            link_tree(src, tmp)
            if fsync:
                for root, _, _ in os.walk(tmp):
                    fsync_dir(Path(root))
        else:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        publish(tmp, dst)
        if fsync:
            fsync_dir(dst.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def same_files(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two checkpoint directories already share their metadata file (``b`` links ``a``)."""
    try:
        return os.path.samefile(Path(a) / META_FILE, Path(b) / META_FILE)
    except OSError:
        return False


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """``global_step`` of a complete horizon checkpoint directory (None if it is not one, or unreadable)."""
    path = Path(path)
    try:
        reader = CheckpointReader(path, verify=False)
    except CheckpointError:
        return None
    if reader.global_step is not None:
        return int(reader.global_step)
    try:  # written before horizon.json recorded the step: the trainer state has it
        state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable: not a candidate
        return None
    step = state.get("global_step")
    return int(step) if step is not None else None


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete horizon checkpoint (``*.ckpt``) in ``directory``, by ``global_step``; ``last.ckpt`` on a
    tie. A kill between a top-k save and ``last`` leaves the top-k one newer than ``last``: it is the one chosen."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, bool, str] | None = None
    for entry in directory.iterdir():
        if entry.name.startswith(".") or entry.suffix != ModelCheckpoint.FILE_EXTENSION:
            continue
        step = checkpoint_step(entry)
        if step is None:
            continue
        key = (
            step,
            entry.name == f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}",
            entry.name,
        )
        if best is None or key > best:
            best = key
    return directory / best[2] if best is not None else None


class HorizonModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for horizon checkpoint directories: ``last`` is a hard-linked twin of the checkpoint just
    saved (one write per save, see the module docstring), stale temporaries are removed when training starts, and
    orphaned top-k checkpoints of a resumed run are removed once ``last`` is newer.

    Takes ``ModelCheckpoint``'s arguments; ``save_last=True`` (the default here) means the linked ``last``.
    """

    def __init__(self, *args: Any, save_last: bool | str | None = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last="link" if save_last is True else save_last, **kwargs)

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None:
            remove_stale_temporaries(self.dirpath)

    @override
    def _save_topk_checkpoint(self, trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # The top-k checkpoint becomes `last` too, so it must already record `last`'s path (Lightning sets it just
        # before saving `last`): otherwise a run resumed from the first `last` would save `last-v1.ckpt`.
        if self.save_last and not self.last_model_path:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    @override
    def _link_checkpoint(self, trainer, filepath: str, linkpath: str) -> None:  # type: ignore[override]
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if not same_files(filepath, linkpath):
                link_checkpoint(filepath, linkpath)
            if trainer.ckpt_path is not None:
                self._remove_orphans(trainer, Path(linkpath))
        trainer.strategy.barrier()

    def _remove_orphans(self, trainer, last: Path) -> None:
        """Removes this callback's top-k checkpoints that its rotation no longer tracks and that are older than
        ``last`` (left by a kill between two saves, or kept because the run resumed from them)."""
        tracked = {os.path.abspath(p) for p in (self.best_model_path, self.kth_best_model_path, *self.best_k_models)}
        last_step = checkpoint_step(last)
        if last_step is None:
            return
        template = self.filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        pattern = re.compile(
            ".+".join(re.escape(part) for part in re.split(r"\{[^}]*\}", template))
            + rf"(?:{re.escape(self.CHECKPOINT_JOIN_CHAR)}v\d+)?{re.escape(self.FILE_EXTENSION)}"
        )
        for entry in last.parent.iterdir():
            if (
                entry == last
                or os.path.abspath(entry) in tracked
                or not pattern.fullmatch(entry.name)
                or entry.name.startswith(self.CHECKPOINT_NAME_LAST)
            ):
                continue
            step = checkpoint_step(entry)
            if step is not None and step < last_step:
                trainer.strategy.remove_checkpoint(str(entry))
