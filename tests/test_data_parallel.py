"""Data parallelism over several processes (gloo on the CPU): the result equals one process with the global batch.

Each test spawns real processes (``torch.multiprocessing``, a file rendezvous), each running the engine over its
slice of every global micro-batch; one node's processes share one store (:mod:`lightning_horizon.engine.data_parallel`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_horizon.engine import HorizonEngine
from lightning_horizon.engine.data_parallel import DataParallel, assign_owners, data_parallel_config
from lightning_horizon.engine.shared_memory import PREFIX, SHM_DIR
from tests.helpers import make_batch, tiny_model

ROWS = 2  # rows per process per micro-batch
STEPS, ACCUMULATE, CLIP = 10, 2, 0.5


def _global_batch(step: int, micro: int, world: int) -> dict[str, torch.Tensor]:
    # No padding: every row carries the same number of loss tokens, so the mean over the global batch equals the mean
    # of the processes' means (what averaging gradients computes, as with DDP)
    return make_batch(1000 * step + micro, batch=ROWS * world, seq=12, pad=False)


def _train(model, engine, rank: int, world: int, data_world: int, stats: dict) -> None:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    losses = []
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            batch = _global_batch(step, micro, data_world)
            rows = slice(rank * ROWS * data_world // world, (rank + 1) * ROWS * data_world // world)
            loss = model(**{k: v[rows] for k, v in batch.items()}).loss / ACCUMULATE
            loss.backward()
            losses.append(loss.item())
        stats.setdefault("norms", []).append(float(engine.clip_grad_norm_(CLIP)))
        engine.step(opt)
        opt.zero_grad()
    engine.synchronize()
    stats["losses"] = losses
    stats["state_numel"] = sum(s["exp_avg"].numel() for s in opt.state.values())


def _worker(rank: int, world: int, local_world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model = tiny_model("qwen2", tied=True, seed=rank)  # every process draws its own: rank 0's must win
        parallel = DataParallel(local_rank=rank % local_world, local_world_size=local_world)
        engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", parallel=parallel)
        buffer = engine.store.node_buffers[0]
        base = buffer.tensor.data_ptr()
        stats = {
            "shared": all(base <= p.data_ptr() < base + buffer.nbytes for p in model.parameters()),
            "shared_bytes": buffer.nbytes,
            "shm_names_left": sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}-*")),
        }
        _train(model, engine, rank, world, world, stats)
        engine.close()
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}/weights{rank}.pt")
        Path(f"{out}/stats{rank}.json").write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


def _single(world: int) -> tuple[dict[str, torch.Tensor], dict]:
    model = tiny_model("qwen2", tied=True, seed=0)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", accumulate_grads=True)
    stats: dict = {}
    _train(model, engine, 0, 1, world, stats)
    engine.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, stats


def _spawn(tmp_path: Path, world: int, local_world: int) -> list[dict]:
    mp.spawn(_worker, args=(world, local_world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return [json.loads((tmp_path / f"stats{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(
    "world,local_world", [(2, 2), (4, 4), (4, 2)], ids=["2proc-1node", "4proc-1node", "2nodes-x-2proc"]
)
def test_data_parallel_equals_one_process_with_the_global_batch(tmp_path, world, local_world):
    """10 AdamW steps with clipping and 2 accumulated micro-batches: every process's weights equal one process
    trained on the global batch (1e-5), on one node and on two simulated nodes (separate stores)."""
    stats = _spawn(tmp_path, world, local_world)
    want, single = _single(world)
    for rank in range(world):
        got = torch.load(tmp_path / f"weights{rank}.pt")
        for name, value in want.items():
            assert (got[name] - value).abs().max().item() <= 1e-5, (rank, name)
        # the clipped norm is the global batch's, in every process
        assert stats[rank]["norms"] == pytest.approx(single["norms"], rel=1e-5)
        assert stats[rank]["shared"], "a parameter is not a view into the node's shared store"
    # the weights moved and clipping was active (the test would not see a missing update or clip otherwise)
    assert max(single["norms"]) > CLIP
    start = tiny_model("qwen2", tied=True, seed=0)
    assert max((p - want[n]).abs().max().item() for n, p in start.named_parameters()) > 1e-3


def test_one_store_per_node_and_optimizer_state_shared_out(tmp_path):
    """Host memory does not grow with the processes: the masters are one shared buffer per node, named nowhere once
    every process mapped it, and each process holds the optimizer state of the groups it owns only (together,
    exactly one model's state)."""
    stats = _spawn(tmp_path, 2, 2)
    model = tiny_model("qwen2", tied=True)
    numel = sum(p.numel() for p in model.parameters())
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    one_process = [g.master.nbytes for g in engine.store.groups]  # the store of a run in one process
    engine.close()
    assert stats[0]["shared_bytes"] == stats[1]["shared_bytes"]
    # the same buffers, each rounded up to a page
    assert sum(one_process) <= stats[0]["shared_bytes"] <= sum(one_process) + 4096 * len(one_process)
    assert stats[0]["state_numel"] > 0 and stats[1]["state_numel"] > 0
    assert stats[0]["state_numel"] + stats[1]["state_numel"] == numel
    assert all(not [n for n in s["shm_names_left"] if f"-{os.getpid()}-" in n] for s in stats)
    assert not [p for p in SHM_DIR.glob(f"{PREFIX}-*") if "store-" in p.name and _creator_gone(p.name)]


def _creator_gone(name: str) -> bool:
    pid = int(name.split("-")[2])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_owners_balance_groups_by_size():
    model = tiny_model("qwen2", tied=False, layers=4)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        owners = assign_owners(engine.store.groups, 2)
        load = [0, 0]
        for group in engine.store.groups:
            load[owners[group.name]] += group.numel
        assert set(owners.values()) == {0, 1}
        assert max(load) - min(load) <= max(g.numel for g in engine.store.groups)
        assert assign_owners(engine.store.groups, 2) == owners  # the same in every process
    finally:
        engine.close()


def test_settings_a_data_parallel_run_cannot_honour_are_refused():
    from lightning_horizon.engine import EngineConfig

    with pytest.raises(ValueError, match="weight_copy=True keeps a BF16 copy"):
        data_parallel_config(EngineConfig(weight_copy=True))
    with pytest.raises(ValueError, match="grad_pool_buffers"):
        data_parallel_config(EngineConfig(grad_pool_buffers=4))
    cfg = data_parallel_config(EngineConfig())
    assert cfg.accumulate_grads and not cfg.updates_in_backward and cfg.weight_copy is False


def test_data_parallel_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DataParallel(local_rank=0, local_world_size=1)
