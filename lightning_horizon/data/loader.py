"""Seeded, resumable batch order: the training data position is part of the training state.

How Lightning (2.5/2.6) saves it: at checkpoint time ``FitLoop.on_save_checkpoint`` stores ``state_dict()`` of every
train dataloader that has ``state_dict``/``load_state_dict`` (``CombinedLoader._state_dicts``, via the ``_Stateful``
protocol) under ``loops.fit_loop.state_dict.combined_loader``; on resume ``FitLoop.setup_data`` calls
``load_state_dict`` on the freshly built dataloader *before* creating its iterator, and later calls
``sampler.set_epoch(current_epoch)`` at each epoch start.

So :class:`ResumableDataLoader` is stateful: it counts the batches it has handed to the training loop (counted in the
main process when a batch is yielded, so worker prefetching does not count; Lightning does not prefetch from a
dataloader with a length) and its :class:`ResumableBatchSampler` restarts from ``(epoch, position)``. The order of
epoch ``e`` is a permutation of the rows drawn from ``seed + e``: the same for every run with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_horizon.data.encode import EncodedDocs
from lightning_horizon.data.packing import collate_packed, collate_padded


class BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[(row, row, ...)]`` is the collated batch dict."""

    def __init__(
        self, docs: EncodedDocs, rows: list[tuple[int, ...]], max_seq_len: int, pad_id: int, pack: bool
    ) -> None:
        self.docs, self.rows, self.max_seq_len, self.pad_id, self.pack = docs, rows, max_seq_len, pad_id, pack

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row_indices: tuple[int, ...]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in row_indices]
        if self.pack:
            return collate_packed(self.docs, rows, self.max_seq_len, self.pad_id)
        return collate_padded(self.docs, rows, self.pad_id)


class ResumableBatchSampler(Sampler[tuple[int, ...]]):
    """Yields batches of row indices, in a seeded order per epoch, from a resumable position.

    State: ``epoch`` and ``position`` (batches of that epoch already consumed), plus the settings that fix the order
    (checked on load, so resuming with other data or settings fails loudly instead of silently diverging).

    With several processes (``num_replicas``, data parallel), the order is that of one process with the global batch
    (``batch_size * num_replicas`` rows) and process ``rank`` takes its ``batch_size`` rows of each global batch; an
    incomplete last global batch is filled from the start of the epoch's order (as ``DistributedSampler`` pads), so
    every process runs the same number of steps. The position counts global batches: a checkpoint resumes on another
    number of processes with the same global batch.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_rows <= 0 or batch_size <= 0:
            raise ValueError(f"num_rows and batch_size must be > 0, got {num_rows} and {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas} processes")
        self.num_rows, self.batch_size, self.shuffle, self.seed, self.drop_last = (
            num_rows,
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.position = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_rows // self.global_batch_size
        return -(-self.num_rows // self.global_batch_size)

    def batches(self, epoch: int) -> list[tuple[int, ...]]:
        """Every batch of ``epoch`` of this process, in order."""
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.num_rows))
        size = self.global_batch_size
        out = []
        for i in range(len(self)):
            batch = order[i * size : (i + 1) * size]
            if self.num_replicas > 1 and len(batch) < size:  # every process gets a full share
                batch += (order * (size // len(order) + 1))[: size - len(batch)]
            out.append(tuple(batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]))
        return out

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        # Read epoch/position when iteration starts, not when the iterator object is made.
        yield from self.batches(self.epoch)[self.position :]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start: a new epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self) -> None:
        """One more batch consumed; rolls over to the next epoch after the last one."""
        self.position += 1
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            diff = ", ".join(f"{k}: checkpoint {theirs[k]!r} vs now {mine[k]!r}" for k in mine if theirs[k] != mine[k])
            raise ValueError(f"cannot resume the data position: the data or its settings changed ({diff})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`BatchDataset` whose position is saved in checkpoints (``state_dict``)."""

    def __init__(self, dataset: BatchDataset, batch_sampler: ResumableBatchSampler, **kwargs: Any) -> None:
        # batch_size=None: the sampler yields one key per batch and the dataset collates it (in the workers).
        super().__init__(dataset, batch_size=None, sampler=batch_sampler, **kwargs)
        self.resumable_sampler = batch_sampler

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.resumable_sampler.advance()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.resumable_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumable_sampler.load_state_dict(state)
