"""Data parallelism over several processes (gloo on the CPU): the result equals one process with the global batch.

Each test spawns real processes (``torch.multiprocessing``, a file rendezvous), each running the engine over its
slice of every global micro-batch; one node's processes share one store (:mod:`lightning_horizon.engine.data_parallel`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_horizon.engine import HorizonEngine, gradients
from lightning_horizon.engine.data_parallel import DataParallel, NodeReduce, assign_owners, data_parallel_config
from lightning_horizon.engine.shared_memory import PREFIX, SHM_DIR
from tests.helpers import make_batch, tiny_model

ROWS = 2  # rows per process per micro-batch
STEPS, ACCUMULATE, CLIP = 10, 2, 0.5


def _global_batch(step: int, micro: int, world: int) -> dict[str, torch.Tensor]:
    # No padding: every row carries the same number of loss tokens, so the mean over the global batch equals the mean
    # of the processes' means (what averaging gradients computes, as with DDP)
    return make_batch(1000 * step + micro, batch=ROWS * world, seq=12, pad=False)


def _model(seed: int, lora: bool, meta: bool = False):
    with torch.device("meta" if meta else "cpu"):
        model = tiny_model("qwen2", tied=True, seed=seed)
    if lora:  # PEFT adapters (their init random per process too) over a frozen base
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        for p in model.parameters():  # B starts at zero in PEFT: make the first step's gradients of A non-zero
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
    return model


def _train(model, engine, rank: int, world: int, data_world: int, stats: dict, early: bool = False) -> None:
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    losses = []
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            batch = _global_batch(step, micro, data_world)
            rows = slice(rank * ROWS * data_world // world, (rank + 1) * ROWS * data_world // world)
            loss = model(**{k: v[rows] for k, v in batch.items()}).loss / ACCUMULATE
            loss.backward()
            if early:  # average after every micro-batch (the next micro-batch adds to an averaged gradient)
                engine.reduce_gradients()
            losses.append(loss.item())
        stats.setdefault("norms", []).append(float(engine.clip_grad_norm_(CLIP)))
        engine.step(opt)
        opt.zero_grad()
    engine.synchronize()
    stats["losses"] = losses
    stats["state_numel"] = sum(s["exp_avg"].numel() for s in opt.state.values())


@dataclass(frozen=True)
class Run:
    """How the processes of :func:`_spawn` train."""

    lora: bool = False
    early: bool = False
    """Average the gradients after every micro-batch."""
    device: str = "cpu"
    meta: bool = False
    """The processes other than each node's local rank 0 build their models on the meta device."""
    embed_chunk_rows: int = 0
    """If set, the embedding gradient's rows come to the host this many at a time (``EMBEDDING_FOLD_NUMEL``)."""
    grad_reduce: str = "host"
    reduce_stage_numel: int = 0
    """If set, a reduced shard lands this many elements at a time (``REDUCE_STAGE_NUMEL``)."""
    sharded: bool = False
    """``sharded_streaming``: each process uploads its shard of a layer, the node all-gathers the rest."""
    keep: tuple[int, ...] = ()
    """Per rank: ``keep_activations`` (with 4 resident slots, so the layers have slots to stay in)."""
    node_store: str = "replicated"


def _worker(rank: int, world: int, local_world: int, init: str, out: str, run: Run) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        # every process draws its own: rank 0's must win; with meta, the processes that do not fill their node's
        # store build theirs on the meta device (as recipes.sft does)
        model = _model(rank, run.lora, meta=run.meta and rank % local_world != 0)
        if run.embed_chunk_rows:
            gradients.EMBEDDING_FOLD_NUMEL = run.embed_chunk_rows * model.config.hidden_size
        if run.reduce_stage_numel:
            gradients.REDUCE_STAGE_NUMEL = run.reduce_stage_numel
        parallel = DataParallel(local_rank=rank % local_world, local_world_size=local_world)
        engine = HorizonEngine(
            model,
            device=run.device,
            compute_dtype="fp32",
            parallel=parallel,
            grad_reduce=run.grad_reduce,
            sharded_streaming=run.sharded,
            node_store=run.node_store,
            **({"keep_activations": run.keep[rank], "resident_layers": 4} if run.keep else {}),
        )
        if engine.runner.agree_kept is not None:  # what each grad pass kept
            agree = engine.runner.agree_kept
            engine.runner.agree_kept = lambda count: (
                stats.setdefault("kept", []).append(agree(count)) or stats["kept"][-1]
            )
        buffer = engine.store.node_buffers[0]
        base = buffer.tensor.data_ptr()
        stats = {
            "shared": all(base <= p.data_ptr() < base + buffer.nbytes for p in model.parameters() if not p.is_meta),
            "meta": sorted(n for n, p in model.named_parameters() if p.is_meta),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight if not run.lora else True,
            "shared_bytes": buffer.nbytes,
            "shm_names_left": sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}-*")),
        }
        _train(model, engine, rank, world, world, stats, run.early)
        stats["bytes_d2h"] = engine.sink.bytes_d2h
        stats["bytes_h2d"], stats["bytes_gathered"] = engine.streamer.bytes_h2d, engine.streamer.bytes_gathered
        # the gradients are the node's buffer too: no process holds a gradient buffer of its own
        stats["grads_shared"] = all(
            base <= g.grad.data_ptr() < base + buffer.nbytes for g in engine.store.groups if g.trainable
        )
        stats["node_bytes"] = buffer.resident_bytes
        stats["state_names"] = sorted(parallel.owned_names(engine.store))
        engine.close()
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
        torch.save(weights, f"{out}/weights{rank}.pt")
        Path(f"{out}/stats{rank}.json").write_text(json.dumps(stats))
    finally:
        dist.destroy_process_group()


def _single(world: int, lora: bool = False, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    model = _model(0, lora)
    engine = HorizonEngine(model, device=device, compute_dtype="fp32", accumulate_grads=True)
    stats: dict = {}
    _train(model, engine, 0, 1, world, stats)
    stats["bytes_d2h"], stats["bytes_h2d"] = engine.sink.bytes_d2h, engine.streamer.bytes_h2d
    engine.close()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, stats


def _start(fn, args: tuple, nprocs: int, deadline_s: float = 300.0) -> None:
    """``mp.spawn(fn, args, nprocs)``, failing (and killing the processes) after ``deadline_s``: processes whose
    collectives do not match wait on each other, and the test must say so rather than hang for the collectives'
    timeout."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} processes of {fn.__name__} still running after {deadline_s:.0f} s (a hang?)")


def _spawn(tmp_path: Path, world: int, local_world: int, **run) -> list[dict]:
    """``world`` processes, ``local_world`` per simulated node, trained as ``Run(**run)`` says."""
    args = (world, local_world, str(tmp_path / "init"), str(tmp_path), Run(**run))
    _start(_worker, args, world)
    return [json.loads((tmp_path / f"stats{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(
    "world,local_world,early,meta,chunk,reduce,sharded",  # chunk: embedding rows, or a reduced shard's piece
    [
        (2, 2, False, False, 3, "host", False),
        (4, 4, False, True, 0, "host", False),
        (4, 2, False, True, 0, "host", False),
        (4, 2, True, False, 0, "host", False),
        (2, 2, False, False, 3, "device", False),
        (4, 4, False, False, 1000, "device", False),
        (4, 2, True, True, 0, "device", False),
        (2, 2, False, False, 0, "host", True),
        (4, 4, False, True, 1000, "device", True),
        (4, 2, True, False, 0, "device", True),
    ],
    ids=[
        "2proc-1node",
        "4proc-1node-meta",
        "2nodes-x-2proc-meta",
        "2nodes-x-2proc-averaged-every-micro-batch",
        "2proc-1node-device-reduce",
        "4proc-1node-device-reduce",
        "2nodes-x-2proc-averaged-every-micro-batch-device-reduce",
        "2proc-1node-sharded-streaming",
        "4proc-1node-meta-sharded-streaming-device-reduce",
        "2nodes-x-2proc-averaged-every-micro-batch-sharded-streaming-device-reduce",
    ],
)
def test_data_parallel_equals_one_process_with_the_global_batch(
    tmp_path, world, local_world, early, meta, chunk, reduce, sharded
):
    """10 AdamW steps with clipping and 2 accumulated micro-batches: every process's weights equal one process
    trained on the global batch (1e-5), on one node and on two simulated nodes (separate stores); also when the
    gradients are averaged after every micro-batch (the next one lands on an averaged gradient), and when the
    processes other than each node's local rank 0 build their models on the meta device (tied weights stay tied).
    On one node, the embedding gradient's rows land 3 at a time: every chunk adds into the node's shared sum.
    With ``grad_reduce="device"`` the node's processes reduce-scatter each group's gradient first (gloo here, NCCL on
    GPUs) and each brings down only its shard: the bytes each process brings down fall by the node's size, except
    the embedding group's (its rows, and the tied head's gradient, take the host path). With 4 processes the shards
    land 1,000 elements at a time (several pieces per layer). With ``sharded_streaming`` each process uploads only its
    shard of every layer and the node's processes all-gather the rest: the bytes each process uploads fall by the
    node's size, and what it gathers makes up the difference."""
    stats = _spawn(
        tmp_path,
        world,
        local_world,
        early=early,
        meta=meta,
        embed_chunk_rows=chunk if reduce == "host" or chunk < 100 else 0,
        reduce_stage_numel=chunk if reduce == "device" and chunk >= 100 else 0,
        grad_reduce=reduce,
        sharded=sharded,
    )
    want, single = _single(world)
    for rank in range(world):
        got = torch.load(tmp_path / f"weights{rank}.pt")
        for name, value in want.items():
            assert (got[name] - value).abs().max().item() <= 1e-5, (rank, name)
        # the clipped norm is the global batch's, in every process
        assert stats[rank]["norms"] == pytest.approx(single["norms"], rel=1e-5)
        assert stats[rank]["shared"], "a parameter is not a view into the node's shared store"
        assert stats[rank]["tied"]
    if reduce == "device":  # each process brought down its shard of every group but the embedding's
        model = tiny_model("qwen2", tied=True, seed=0)
        embedding = model.model.embed_tokens.weight.numel()
        others = sum(p.numel() for p in model.parameters()) - embedding
        calls, rows = STEPS * ACCUMULATE, ROWS * 12 * model.config.hidden_size  # a process's looked-up rows
        assert single["bytes_d2h"] == calls * (others + embedding + rows * world) * 4  # one process: everything
        host_embedding = calls * (embedding + rows) * 4  # the tied head's gradient and this process's rows
        for rank in range(world):
            layers = stats[rank]["bytes_d2h"] - host_embedding
            assert others * 4 * calls / local_world <= layers <= others * 4 * calls / local_world * 1.1, (rank, layers)
    for rank in range(world):
        up, gathered = stats[rank]["bytes_h2d"], stats[rank]["bytes_gathered"]
        if sharded:  # every pass's units in shards (a resident slot is not uploaded again), the rest gathered
            assert up <= single["bytes_h2d"] / local_world * 1.01, (rank, up)
            assert gathered >= single["bytes_h2d"] * (local_world - 1) / local_world * 0.99, (rank, gathered)
        else:
            assert gathered == 0 and up >= single["bytes_h2d"] * 0.99, (rank, up)
    # the weights moved and clipping was active (the test would not see a missing update or clip otherwise)
    assert max(single["norms"]) > CLIP
    start = tiny_model("qwen2", tied=True, seed=0)
    assert max((p - want[n]).abs().max().item() for n, p in start.named_parameters()) > 1e-3


@pytest.mark.parametrize(
    "world,local_world,early,meta",
    [(4, 2, False, True), (4, 2, True, False), (2, 1, False, False)],
    ids=["2nodes-x-2proc-meta", "2nodes-x-2proc-averaged-every-micro-batch", "2nodes-x-1proc"],
)
def test_sharded_node_store_equals_one_process_and_holds_a_share_per_node(tmp_path, world, local_world, early, meta):
    """``node_store="sharded"`` on two simulated nodes: each node's store holds its share of the decoder layers
    (and the embedding, norm and head), the other layers' parameters are on the meta device, each layer's shards
    travel from its node before the node's all-gather and its gradient is reduced to its node only; after 10 AdamW
    steps with clipping and accumulation every weight a process holds equals one process with the global batch
    (1e-5), every weight is held by some node, and each node's shared buffer takes less memory than a replica's."""
    run = dict(early=early, meta=meta, grad_reduce="device", sharded=True, reduce_stage_numel=1000)
    stats = _spawn(tmp_path, world, local_world, node_store="sharded", **run)
    want, single = _single(world)
    held: set[str] = set()
    for rank in range(world):
        got = torch.load(tmp_path / f"weights{rank}.pt")
        assert set(got) | set(stats[rank]["meta"]) == set(want)
        assert stats[rank]["meta"] and all(".layers." in n for n in stats[rank]["meta"]), stats[rank]["meta"]
        for name, value in got.items():
            assert (value - want[name]).abs().max().item() <= 1e-5, (rank, name)
        held |= set(got)
        assert stats[rank]["norms"] == pytest.approx(single["norms"], rel=1e-5)
        assert stats[rank]["shared"] and stats[rank]["tied"]
        assert not set(stats[rank]["state_names"]) & set(stats[rank]["meta"])  # no state of another node's layers
    assert held == set(want)
    nodes = [stats[r] for r in range(0, world, local_world)]
    assert set(nodes[0]["meta"]).isdisjoint(set(model_names := nodes[1]["meta"])) and model_names
    # the same run with replicated nodes: each node's buffer holds every layer's masters and gradients
    (tmp_path / "replicated").mkdir()
    replica = _spawn(tmp_path / "replicated", world, local_world, **run)
    for node in nodes:
        assert node["node_bytes"] < 0.85 * replica[0]["node_bytes"], (node["node_bytes"], replica[0]["node_bytes"])
    assert max(single["norms"]) > CLIP


def test_sharded_streaming_keeps_the_layers_every_process_can_keep(tmp_path):
    """With sharded streaming a kept layer's backward skips its upload and all-gather, so the node's processes must
    keep the same layers: asked for 2 and 1 kept layers, both keep 1 in every pass (the node's smallest), nothing
    hangs, and 10 steps equal one process (1e-5)."""
    stats = _spawn(tmp_path, 2, 2, sharded=True, grad_reduce="device", keep=(2, 1))
    want, _ = _single(2)
    for rank in range(2):
        assert stats[rank]["kept"] == [1] * STEPS * ACCUMULATE, rank
        got = torch.load(tmp_path / f"weights{rank}.pt")
        for name, value in want.items():
            assert (got[name] - value).abs().max().item() <= 1e-5, (rank, name)


def _presence_worker(rank: int, init: str, out: str, reduce: bool) -> None:
    """Two processes land gradients of one group through the sink: ``a`` in both, ``c`` only in rank 1, ``b`` in
    neither; then a second micro-batch with ``a`` only, after the gradients were averaged once."""
    from lightning_horizon.engine.gradients import GradientSink
    from lightning_horizon.engine.workers import WorkerGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        parallel = DataParallel(local_rank=rank, local_world_size=2)
        params = {name: torch.nn.Parameter(torch.zeros(numel)) for name, numel in (("a", 37), ("b", 5), ("c", 11))}
        store = parallel.build_store([("g", list(params.items()))], frozen_dtype=None)
        group = store.groups[0]
        a, b, c = group.params
        workers = WorkerGroup(torch.device("cpu"))
        sink = GradientSink(
            store, torch.device("cpu"), torch.float32, 64, 2, direct=False, workers=workers, scattered=[],
            on_final=lambda groups: None, shared=store.node_grads, reduce=parallel.node_reduce if reduce else None,
        )  # fmt: skip
        value = float(rank + 1)
        sink.submit(
            [(group, a), (group, b), (group, c)],
            [torch.arange(37.0) * value, None, torch.full((11,), 5.0) if rank == 1 else None],
            [group],
        )
        sink.wait()
        parallel.reduce_gradients(store, lambda: None)  # averaged over 2 processes
        first = {sp.name: (sp.has_grad, group.grad_view(sp).clone()) for sp in (a, b, c)}
        parallel.barrier()  # both have read the node's buffer before either lands the next micro-batch into it
        sink.submit([(group, a), (group, b), (group, c)], [torch.ones(37) * value, None, None], [group])
        sink.wait()
        parallel.reduce_gradients(store, lambda: None)
        second = {sp.name: (sp.has_grad, group.grad_view(sp).clone()) for sp in (a, b, c)}
        workers.close()
        result = {"first": first, "second": second, "bytes": sink.bytes_d2h, "numel": group.master.numel()}
        torch.save(result, f"{out}/presence{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reduce", [False, True], ids=["host", "device"])
def test_a_gradient_no_process_had_stays_absent_and_one_process_counts_as_the_sum(tmp_path, reduce):
    """What the processes of a node land, through the host path and through the devices' reduce-scatter (gloo
    here): a parameter with a gradient in one process only gets the sum over both (the other counts as zero), one
    with a gradient in neither keeps *no* gradient (a zero one would make AdamW decay its moments and weights), and
    a micro-batch after an early average adds to the node's share of the sum, not to the average."""
    _start(_presence_worker, (str(tmp_path / "init"), str(tmp_path), reduce), 2)
    got = [torch.load(tmp_path / f"presence{rank}.pt") for rank in range(2)]
    for rank in range(2):
        first, second = got[rank]["first"], got[rank]["second"]
        assert first["b"][0] is False and second["b"][0] is False
        assert first["a"][0] and first["c"][0]
        torch.testing.assert_close(first["a"][1], torch.arange(37.0) * 3 / 2, rtol=0, atol=0)
        torch.testing.assert_close(first["c"][1], torch.full((11,), 2.5), rtol=0, atol=0)
        # sum over both micro-batches and processes, averaged: (arange * 3 + 1 + 2) / 2
        torch.testing.assert_close(second["a"][1], (torch.arange(37.0) * 3 + 3) / 2, rtol=0, atol=0)
        torch.testing.assert_close(second["c"][1], torch.full((11,), 2.5), rtol=0, atol=0)
    numel = got[0]["numel"]  # the group's flat length (its parameters, aligned)
    for rank in range(2):
        if reduce:  # twice: its half of the group's FP32 sum and the three presence counts
            half = -(-numel // 2)
            mine = half if rank == 0 else numel - half
            assert got[rank]["bytes"] == 2 * (mine + 3) * 4
        else:  # its own gradients, whole
            assert got[rank]["bytes"] == (37 + 11 * rank + 37) * 4


@pytest.mark.parametrize(
    "world,local_world,device",
    [(2, 2, False), (2, 2, True), (4, 2, True)],
    ids=["host", "device-sharded-streaming", "2nodes-x-2proc-sharded-node-store"],
)
def test_lora_adapters_over_a_frozen_base_equal_one_process(tmp_path, world, local_world, device):
    """PEFT LoRA under data parallelism: the frozen base and the adapters in the node's store, only the adapters
    trained; 2 processes equal one with the global batch (1e-5) and the base does not move. Also with the devices'
    collectives (groups without a trainable parameter, the norms, are not reduced) and with a sharded node store on
    two simulated nodes."""
    device_run = dict(grad_reduce="device", sharded=True, node_store="sharded" if local_world < world else "replicated")
    # (the processes other than each node's first build their models on meta)
    stats = _spawn(tmp_path, world, local_world, lora=True, meta=True, **(device_run if device else {}))
    want, single = _single(world, lora=True)
    start = dict(_model(0, lora=True).named_parameters())
    held = set()
    for rank in range(world):
        got = torch.load(tmp_path / f"weights{rank}.pt")
        assert got.keys() | set(stats[rank]["meta"]) == want.keys()
        for name, value in got.items():
            assert (value - want[name]).abs().max().item() <= 1e-5, (rank, name)
            if "lora_" not in name:
                assert torch.equal(value, start[name]), name
        held |= got.keys()
        assert stats[rank]["norms"] == pytest.approx(single["norms"], rel=1e-5)
    assert held == want.keys()
    assert max((want[n] - start[n]).abs().max().item() for n in want if "lora_" in n) > 1e-4


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
    # the masters and their FP32 gradients once, each buffer rounded up to a page, and a stamp per parameter
    stamps = 8 * len(list(model.parameters()))
    pages = 4096 * (2 * len(one_process) + 1)
    assert 2 * sum(one_process) + stamps <= stats[0]["shared_bytes"] <= 2 * sum(one_process) + stamps + pages
    assert stats[0]["grads_shared"] and stats[1]["grads_shared"]
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


def test_homes_share_the_layers_out_among_the_nodes_by_size():
    """Each decoder layer (its trainable group and its frozen part together) has one home node, largest first to the
    least loaded node, the same in every process; the embedding, norm and head have none (every node holds them).
    The settings a sharded node store needs are refused without them."""
    from lightning_horizon.engine.config import EngineConfig
    from lightning_horizon.engine.data_parallel import assign_homes
    from lightning_horizon.engine.store import split_frozen

    model = tiny_model("qwen2", tied=False, layers=5)
    for p in model.model.layers[1].mlp.parameters():
        p.requires_grad_(False)  # a layer in two groups (layers.1 and layers.1.frozen)
    split = split_frozen(_store_groups(model), torch.bfloat16)
    homes = assign_homes(split, 2)
    names = [name for name, _, _ in split]
    assert set(homes) == {n for n in names if n.startswith("layers.")}
    assert homes["layers.1"] == homes["layers.1.frozen"]
    assert "embed" not in homes and "lm_head" not in homes and "norm" not in homes
    load = [0, 0]
    for name, named, _ in split:
        if name in homes:
            load[homes[name]] += sum(p.numel() for _, p in named)
    assert load[0] and load[1] and max(load) - min(load) <= max(load) // 2
    assert assign_homes(split, 2) == homes and set(assign_homes(split, 5).values()) == set(range(5))
    with pytest.raises(ValueError, match="node_store must be one of"):
        EngineConfig(node_store="mirrored")
    sharded = EngineConfig(node_store="sharded")
    with pytest.raises(ValueError, match="sharded_streaming=True .*grad_reduce='device'"):
        data_parallel_config(sharded, num_nodes=2)
    both = dataclasses.replace(sharded, sharded_streaming=True, grad_reduce="device")
    assert data_parallel_config(both, num_nodes=2).sparse_experts is False  # routed experts stream whole
    assert data_parallel_config(sharded, num_nodes=1).sparse_experts is True  # one node: nothing to share out


def _store_groups(model):
    from lightning_horizon.engine.adapter import describe

    return describe(model).store_groups()


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


@pytest.mark.parametrize("numel", [1, 5, 128, 129, 1000])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8, 16])
def test_reduce_shards_cover_a_group_once_in_order(numel, size):
    bounds = [NodeReduce(None, r, size).bounds(numel) for r in range(size)]
    shard = bounds[0][0]
    assert shard * size >= numel > (shard - 1) * size
    covered = [i for _, start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(numel))  # every element in exactly one shard, shards in rank order
    assert all(0 <= stop - start <= shard for _, start, stop in bounds)


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


# ------------------------------------------------------------------------ Trainer(strategy="horizon", devices=N)
REPO = Path(__file__).resolve().parents[1]


def _fit(out: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m tests.dp_fit ARGS`` as a user launches a script (Lightning starts the other processes)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a clean launch, whatever the test process inherited
    cmd = [sys.executable, "-m", "tests.dp_fit", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights{rank}.pt")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def _ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("reduce", ["host", "device", "device+sharded"])
def test_trainer_with_two_devices_equals_one_device_with_the_global_batch(tmp_path, reduce):
    """Lightning launches 2 processes (accumulate 2, clip 0.5, AdamW + schedule, 10 steps): both end with the
    weights of 1 process with twice the rows (1e-5), and ``on_after_backward`` of each step's last micro-batch sees
    the averaged gradient (as with DDP). The model is built in ``configure_model``, on the meta device in the second
    process (what the README advises: one model per node at setup). ``HorizonStrategy(grad_reduce=...)``: summed on
    the host or reduce-scattered over the processes first; ``sharded_streaming=True``: each process uploads half of
    every layer and the two all-gather the rest, in the fit and in the validation after it."""
    grad_reduce, sharded = reduce.split("+")[0], ["--sharded-streaming"] if reduce.endswith("+sharded") else []
    two = ("--devices", "2", "--batch", "2", "--validate", "--meta-model", "--grad-reduce", grad_reduce, *sharded)
    _ok(_fit(tmp_path / "two", *two))
    _ok(_fit(tmp_path / "one", "--devices", "1", "--batch", "4", "--validate"))
    one = _weights(tmp_path / "one")
    assert _max_diff(_weights(tmp_path / "two", 0), one) <= 1e-5
    assert _max_diff(_weights(tmp_path / "two", 1), _weights(tmp_path / "two", 0)) == 0
    start = dict(tiny_model("qwen2", tied=True, seed=0).named_parameters())
    assert _max_diff(start, one) > 1e-3  # it trained
    stats = [json.loads((tmp_path / d / "stats0.json").read_text()) for d in ("two", "one")]
    stats.append(json.loads((tmp_path / "two" / "stats1.json").read_text()))
    assert stats[0]["world"] == 2 and stats[1]["world"] == 1
    assert stats[2]["built_on_meta"] and not stats[0]["built_on_meta"]
    synced = [s["norm_grads"][1::2] for s in stats]  # the accumulated step's last micro-batch
    assert synced[0] == pytest.approx(synced[1], rel=1e-5) and synced[2] == synced[0]
    # trainer.validate after fit builds a second engine (a fresh shared store) from the trained weights
    assert stats[0]["val_losses"] == pytest.approx(stats[1]["val_losses"], rel=1e-5)
    assert stats[2]["val_losses"] == stats[0]["val_losses"] and len(stats[0]["val_losses"]) == 2


def test_without_clipping_or_hooks_the_updates_still_wait_for_the_averaged_gradients(tmp_path):
    """Nothing between the backward and the step (no clipping, no gradient hook): one process then updates each layer
    as soon as its gradient lands. With several processes the update must wait for the average (it did not once:
    the weights were 1.1e-2 off); 2 processes equal 1 with the global batch."""
    _ok(_fit(tmp_path / "two", "--devices", "2", "--batch", "2", "--clip", "0", "--no-hook"))
    _ok(_fit(tmp_path / "one", "--devices", "1", "--batch", "4", "--clip", "0", "--no-hook"))
    assert _max_diff(_weights(tmp_path / "two"), _weights(tmp_path / "one")) <= 1e-5


def test_checkpoint_of_two_processes_resumes_on_one_and_four(tmp_path):
    """Each process writes the master files of its half of the store groups and the optimizer shards of the layers
    it steps, in parallel; the checkpoint resumes with 1, 2 and 4
    processes (each reads the state of the layers it now owns) and continues exactly as a 1-process checkpoint
    resumed in 1 process (1e-5: the gradients' averaging order differs)."""
    two, one = tmp_path / "two.ckpt", tmp_path / "one.ckpt"
    _ok(_fit(tmp_path / "a", "--devices", "2", "--batch", "2", "--save", str(two)))
    _ok(_fit(tmp_path / "b", "--devices", "1", "--batch", "4", "--save", str(one)))
    meta = json.loads((two / "horizon.json").read_text())
    groups = [g["name"] for g in meta["model"]["groups"]]
    assert meta["optimizers"][0]["files"] == [f"optim/{g}.safetensors" for g in groups]  # every process's shards
    written = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file() and p.name != "horizon.json")
    assert sorted(meta["files"]) == written  # each with its size and crc32, checked on load
    # the two processes wrote disjoint halves of the master files (and each the optimizer shards of its layers)
    wrote = [set(json.loads((tmp_path / "a" / f"stats{r}.json").read_text())["wrote"]) for r in (0, 1)]
    for kind in ("model/", "optim/"):
        mine = [{f for f in w if f.startswith(kind)} for w in wrote]
        assert mine[0] and mine[1] and not mine[0] & mine[1], kind
        assert sorted(mine[0] | mine[1]) == [f for f in written if f.startswith(kind)], kind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    _ok(_fit(tmp_path / "want", "--devices", "1", "--batch", "4", "--steps", "20", "--resume", str(one)))
    want = _weights(tmp_path / "want")
    for devices, rows in (("1", "4"), ("2", "2"), ("4", "1")):
        out = tmp_path / f"resumed{devices}"
        _ok(_fit(out, "--devices", devices, "--batch", rows, "--steps", "20", "--resume", str(two)))
        assert _max_diff(_weights(out), want) <= 1e-5, devices
    assert _max_diff(_weights(tmp_path / "resumed1"), _weights(tmp_path / "b")) > 1e-4  # it trained on
    # the Hugging Face export of the 2-process checkpoint holds the trained weights
    from transformers import AutoModelForCausalLM

    from lightning_horizon.export import main as export_main

    export_main([str(two), str(tmp_path / "hf"), "--dtype", "fp32"])
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").named_parameters())
    assert _max_diff({k: v.detach() for k, v in exported.items()}, _weights(tmp_path / "a")) == 0


@pytest.mark.parametrize("sharded", [False, True], ids=["host", "sharded-device"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_that_raises_stops_every_process(tmp_path, rank, sharded):
    """A process raising mid-training ends the whole run with a non-zero exit within seconds (the others' next
    collective fails, or the launcher stops them): no hang, no process left, no shared memory left. Also when the
    others wait in a layer's all-gather (sharded streaming, gradients reduce-scattered)."""
    before = set(SHM_DIR.glob(f"{PREFIX}-*"))
    t0 = time.monotonic()
    flags = ["--sharded-streaming", "--grad-reduce", "device"] if sharded else []
    run = _fit(tmp_path, "--devices", "2", "--fail-rank", str(rank), *flags, timeout=120)
    assert run.returncode != 0
    assert f"rank {rank} fails on purpose" in run.stdout + run.stderr
    assert time.monotonic() - t0 < 100
    assert not subprocess.run(["pgrep", "-f", f"tests.dp_fit --out {tmp_path}"], capture_output=True).stdout
    assert set(SHM_DIR.glob(f"{PREFIX}-*")) <= before


def test_preflight_counts_per_process_parts_once_per_process_and_the_state_once():
    """The node's processes share the masters, the FP32 gradients (one buffer of the node) and split the optimizer
    state; each adds its own upload staging and gradient slabs on a GPU: the preflight of each process counts the
    node's total."""
    from lightning_horizon.engine.footprint import (
        PREFLIGHT_MARGIN_BYTES,
        REDUCE_STAGE_NUMEL,
        check_host_memory,
        still_to_allocate,
    )

    model = tiny_model("qwen2", tied=True)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", accumulate_grads=True)
    try:
        opt = torch.optim.AdamW(model.parameters())
        for on_gpu in (False, True):
            args = (engine.shape, torch.bfloat16, True, False, 3, on_gpu, [opt])
            one, four = still_to_allocate(*args), still_to_allocate(*args, processes=4)
            assert four["optimizer state"] == one["optimizer state"] > 0
            assert four["gradients"] == one["gradients"] == 4 * engine.shape.store_numel
            reduced = still_to_allocate(*args, processes=4, grad_reduce="device")
            if on_gpu:
                for part in ("upload staging", "gradient slabs"):
                    assert four[f"{part} (x 4 processes)"] == 4 * one[part] > 0
                # grad_reduce="device": each process's two FP32 stages for its shards of the reduced gradients
                stages = reduced.pop("reduced-gradient stages (x 4 processes)")
                assert stages == 4 * 2 * REDUCE_STAGE_NUMEL * 4 and reduced == four
            else:
                assert four == one == reduced  # nothing per process on a CPU
        one = still_to_allocate(engine.shape, torch.float32, True, False, 3, False, [opt])
        available = sum(one.values()) + PREFLIGHT_MARGIN_BYTES
        check_host_memory(engine.shape, engine.config, [opt], available, processes=4)  # the node's total is one's
        with pytest.raises(MemoryError, match="gradients"):
            check_host_memory(engine.shape, engine.config, [opt], available - one["gradients"], processes=4)
        # a sharded node store: the node allocates its share of the state and of the gradients only
        half = still_to_allocate(engine.shape, torch.float32, True, False, 3, False, [opt], node_share=0.5)
        assert half["optimizer state"] == one["optimizer state"] // 2 and half["gradients"] == one["gradients"] // 2
        check_host_memory(engine.shape, engine.config, [opt], sum(half.values()) + PREFLIGHT_MARGIN_BYTES, 4, 0.5)
    finally:
        engine.close()


def test_killed_processes_leave_no_shared_memory(tmp_path):
    """``kill -9`` of every process mid-training: the node's store was unlinked as soon as every process had mapped
    it, so nothing of the run stays in /dev/shm."""
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "tests.dp_fit", "--out", str(out), "--devices", "2", "--steps", "50", "--sleep", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        seen = set()
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            seen.update(re.findall(r"step 1 rank (\d+)", line))  # lines of the two processes may interleave
            if len(seen) == 2 or time.monotonic() > deadline:
                break
        assert seen == {"0", "1"}, "the run did not reach its second step"
        pids = [proc.pid, *_children(proc.pid)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    left = [p.name for p in SHM_DIR.glob(f"{PREFIX}-*") if any(f"-{pid}-" in p.name for pid in pids)]
    assert not left


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _nodes(out: Path, nodes: int, *args: str, timeout: int = 240) -> list[str]:
    """``python -m tests.dp_fit ARGS --num-nodes NODES`` on ``nodes`` simulated nodes (one launch per node, with
    ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, as a cluster scheduler starts them); returns their logs, and
    fails unless every node exits 0."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in range(nodes):
        env = {**os.environ, "PYTHONPATH": str(REPO), "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # fmt: skip
        for key in ("LOCAL_RANK", "WORLD_SIZE"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "tests.dp_fit", "--out", str(out), "--num-nodes", str(nodes), *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [log if p.returncode == 0 else f"exit {p.returncode}\n{log}" for p, log in zip(procs, logs)]


def _held(out: Path, world: int) -> dict[str, torch.Tensor]:
    """Every weight some process of a run holds (a sharded node store: each node its layers)."""
    held: dict[str, torch.Tensor] = {}
    for rank in range(world):
        held.update(_weights(out, rank))
    return held


SHARDED_STORE = ("--node-store", "sharded", "--sharded-streaming", "--grad-reduce", "device", "--no-hook")


def test_sharded_node_store_under_lightning_checkpoints_and_resumes_on_other_layouts(tmp_path):
    """``Trainer(strategy=HorizonStrategy(node_store="sharded", ...), devices=2, num_nodes=2)`` on two simulated
    nodes: the weights the nodes hold together equal one process with the global batch (1e-5), each node holding only
    its layers, also after a ``trainer.validate`` (a second engine over the same model); every node writes the
    checkpoint's files of its layers; the checkpoint resumes in 1 process exactly as a 1-process checkpoint does, a
    1-process checkpoint resumes on the two sharded nodes, and the Hugging Face export holds the trained weights. A
    hook that reads gradients is refused (the other nodes' layers have none here)."""
    one, sharded = tmp_path / "one.ckpt", tmp_path / "sharded.ckpt"
    logs = _nodes(tmp_path / "a", 2, "--devices", "2", "--batch", "1", "--save", str(sharded), "--validate",
                  *SHARDED_STORE)  # fmt: skip
    assert not [log for log in logs if log.startswith("exit")], "\n".join(log[-3000:] for log in logs)
    _ok(_fit(tmp_path / "b", "--devices", "1", "--batch", "4", "--save", str(one), "--validate"))
    want = _weights(tmp_path / "b")
    stats = [json.loads((tmp_path / "a" / f"stats{r}.json").read_text()) for r in range(4)]
    assert stats[0]["world"] == 4
    held = _held(tmp_path / "a", 4)
    assert set(held) == set(want) and _max_diff(held, want) <= 1e-5
    layers = [{n for n in _weights(tmp_path / "a", r) if ".layers." in n} for r in (0, 2)]  # one process per node
    assert layers[0] and layers[1] and not layers[0] & layers[1]
    val = json.loads((tmp_path / "b" / "stats0.json").read_text())["val_losses"]
    assert all(s["val_losses"] == pytest.approx(val, rel=1e-5) for s in stats)
    # each node wrote the files of its layers, node 0 those of the groups every node holds
    wrote = [{f for f in s["wrote"] if f.startswith("model/layers.")} for s in stats]
    assert wrote[0] | wrote[1] and wrote[2] | wrote[3] and not (wrote[0] | wrote[1]) & (wrote[2] | wrote[3])
    assert not [f for s in stats[2:] for f in s["wrote"] if not f.split("/")[1].startswith("layers.")]
    _ok(_fit(tmp_path / "want", "--devices", "1", "--batch", "4", "--steps", "20", "--resume", str(one)))
    want = _weights(tmp_path / "want")
    _ok(_fit(tmp_path / "resumed1", "--devices", "1", "--batch", "4", "--steps", "20", "--resume", str(sharded)))
    assert _max_diff(_weights(tmp_path / "resumed1"), want) <= 1e-5
    logs = _nodes(tmp_path / "resumed2x2", 2, "--devices", "2", "--batch", "1", "--steps", "20", "--resume", str(one),
                  *SHARDED_STORE)  # fmt: skip
    assert not [log for log in logs if log.startswith("exit")], "\n".join(log[-3000:] for log in logs)
    assert _max_diff(_held(tmp_path / "resumed2x2", 4), want) <= 1e-5
    assert _max_diff(want, _weights(tmp_path / "b")) > 1e-4  # it trained on
    from transformers import AutoModelForCausalLM

    from lightning_horizon.export import main as export_main

    export_main([str(sharded), str(tmp_path / "hf"), "--dtype", "fp32"])
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").named_parameters())
    assert _max_diff({k: v.detach() for k, v in exported.items()}, held) == 0
    # with the strategy's own clipping only: a hook that reads param.grad is refused, in every node
    logs = _nodes(tmp_path / "hook", 2, "--devices", "1", *SHARDED_STORE[:-1])
    assert all(log.startswith("exit") and "reads gradients" in log for log in logs), logs[0][-2000:]
    # another checkpoint format would save the other nodes' layers as meta tensors: refused, nothing written
    logs = _nodes(tmp_path / "io", 2, "--devices", "1", "--steps", "2", "--save", str(tmp_path / "io.ckpt"),
                  "--torch-io", *SHARDED_STORE)  # fmt: skip
    assert all(log.startswith("exit") and "only the horizon checkpoint format" in log for log in logs), logs[0][-2000:]
    assert not (tmp_path / "io.ckpt").exists()


def test_two_nodes_launched_as_a_cluster_launches_them(tmp_path):
    """``Trainer(devices=1, num_nodes=2)`` on two simulated nodes (two processes started with ``NODE_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``, as a cluster scheduler starts them): each node builds its own store, node 0's
    weights reach node 1, and both equal one process with the global batch (1e-5); node 0 writes the checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    out.mkdir()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # fmt: skip
        for key in ("LOCAL_RANK", "WORLD_SIZE"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "tests.dp_fit", "--out", str(out), "--devices", "1", "--num-nodes", "2",
               "--batch", "2", "--save", str(tmp_path / "ck.ckpt")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    _ok(_fit(tmp_path / "one", "--devices", "1", "--batch", "4"))
    want = _weights(tmp_path / "one")
    for rank in (0, 1):
        assert _max_diff(_weights(out, rank), want) <= 1e-5
    assert json.loads((out / "stats1.json").read_text())["world"] == 2
    meta = json.loads((tmp_path / "ck.ckpt" / "horizon.json").read_text())
    assert len(meta["optimizers"][0]["files"]) == len(meta["model"]["groups"])


def _moe(seed: int):
    from tests.test_sparse_experts import moe_model

    model = moe_model("mixtral", seed=seed)
    # No load-balancing loss: it is taken over each process's batch, which is not a share of the global batch's (as
    # with DDP); the test compares the language-model loss's gradients
    model.config.output_router_logits = False
    return model


def _moe_train(model, engine, rank: int, world: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(3):
        for micro in range(2):
            batch = make_batch(100 * step + micro, batch=world, seq=5, pad=False)
            rows = slice(rank, rank + 1) if world > 1 and engine.parallel is not None else slice(None)
            (model(**{k: v[rows] for k, v in batch.items()}).loss / 2).backward()
        engine.clip_grad_norm_(0.05)
        engine.step(opt)
        opt.zero_grad()
    engine.synchronize()


def _moe_worker(
    rank: int, world: int, init: str, out: str, reduce: str, sharded: bool, sparse: bool, store: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model = _moe(seed=rank)  # rank 0's weights win
        local = 1 if store == "sharded" else world  # a sharded node store: one process on each of 2 nodes
        parallel = DataParallel(local_rank=rank % local, local_world_size=local)
        settings = {"sparse_experts": sparse, "grad_reduce": reduce, "sharded_streaming": sharded, "node_store": store}
        engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", parallel=parallel, **settings)
        _moe_train(model, engine, rank, world)
        engine.close()
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
        torch.save(weights, f"{out}/moe{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "reduce,sharded,sparse,store",
    [
        ("host", False, True, "replicated"),
        ("device", False, True, "replicated"),
        ("device", True, True, "replicated"),
        ("device", True, False, "replicated"),
        ("device", True, True, "sharded"),
    ],
)
def test_sparse_experts_equal_one_process(tmp_path, reduce, sharded, sparse, store):
    """A Mixtral of 16 experts, one row per process: each process's tokens reach different experts, so expert
    gradients land sparsely (only the hit experts' rows) into the node's one buffer, zero-filled by the first landing
    of a step (``host``), or enter the devices' reduce-scatter as zeros outside the hit rows (``device``). 3 AdamW
    steps with clipping and accumulation equal one process with the global batch (1e-5). With sharded streaming each
    process uploads its shard of a layer and, sparse, the experts its own tokens reach after the gather (or, dense,
    the experts too in its shard). With a sharded node store (2 nodes of one process) the experts stream whole, from
    their layer's node."""
    args = (2, str(tmp_path / "init"), str(tmp_path), reduce, sharded, sparse, store)
    _start(_moe_worker, args, 2)
    model = _moe(seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", sparse_experts=True, accumulate_grads=True)
    _moe_train(model, engine, 0, 2)
    engine.close()
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    held = set()
    for rank in range(2):
        got = torch.load(tmp_path / f"moe{rank}.pt")
        assert set(got) == set(want) or store == "sharded"
        for name, value in got.items():
            assert (value - want[name]).abs().max().item() <= 1e-5, (rank, name)
        held |= set(got)
    assert held == set(want)
    experts = [n for n in want if ".experts." in n]
    assert experts and max((want[n] - start[n]).abs().max().item() for n in experts) > 1e-4
