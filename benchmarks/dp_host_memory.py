"""Host memory of a data-parallel run on one node against one process (the CPU, gloo): proportional set size (PSS,
shared pages split between the processes that map them) summed over the processes, after 3 AdamW steps with
clipping (FP32 compute, so the figures are the host store's, not a GPU run's staging).

    python benchmarks/dp_host_memory.py --layers 8 --hidden 1024     # ~120 M parameters

Prints one row per process count: the PSS sum, per parameter, its ratio to the first row, and its parts (anonymous
memory: each process's own heap; shared memory: the node's store; files: libraries) and the PSS sum at the moment
every process has built its model, before the store exists (``--meta``: the processes other than rank 0 build theirs
on the meta device, as ``recipes.sft`` does). ``--grad-reduce device --sharded-streaming``: the node's collectives
(reduce-scatter of the gradients, all-gather of the layers) over gloo, as NCCL runs them on GPUs.

``--layouts 1x1 2x2 --node-store sharded``: rows of N processes on each of M simulated nodes (separate stores on
this one machine); the figures are then per node (the largest node's PSS sum), so a sharded node store shows what
one node of a real cluster holds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from lightning_horizon.engine import HorizonEngine
from lightning_horizon.engine.data_parallel import DataParallel


def _pss() -> dict[str, int]:
    """This process's PSS and its parts (anonymous, shared memory, files), bytes."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("Pss", "Pss_Anon", "Pss_Shmem", "Pss_File"):
            out[key] = int(line.split()[1]) * 1024
    if "Pss" not in out:
        raise RuntimeError("no Pss in /proc/self/smaps_rollup")
    return out


def _model(args, meta: bool = False) -> Qwen2ForCausalLM:
    if meta:  # what recipes.sft does in the processes that do not fill their node's store
        with torch.device("meta"):
            return _model(args)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, vocab_size=32000,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).float()


def _run(rank: int, world: int, local: int, args, init: str, out: str) -> None:
    torch.set_num_threads(1)
    parallel = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        parallel = DataParallel(local_rank=rank % local, local_world_size=local)
    model = _model(args, meta=args.meta and rank % local > 0)
    numel = sum(p.numel() for p in model.parameters())
    if parallel is not None:
        parallel.barrier()  # every process holds its model now: the moment of setup where copies add up
    built = _pss()["Pss"]
    engine = HorizonEngine(
        model,
        device="cpu",
        compute_dtype="fp32",
        accumulate_grads=True,
        parallel=parallel,
        grad_reduce=args.grad_reduce,
        sharded_streaming=args.sharded_streaming,
        node_store=args.node_store,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(3):
        ids = torch.randint(0, 32000, (1, 64), generator=torch.Generator().manual_seed(100 * step + rank))
        model(input_ids=ids, labels=ids).loss.backward()
        engine.clip_grad_norm_(1.0)
        engine.step(opt)
        opt.zero_grad()
    engine.synchronize()
    Path(f"{out}-{world}-{rank}.json").write_text(json.dumps({"pss": _pss(), "numel": numel, "built": built}))
    if parallel is not None:
        parallel.barrier()  # every process measured before any exits (shared pages stay split the same way)
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--meta", action="store_true", help="processes other than rank 0 build their model on the meta device"
    )
    ap.add_argument("--grad-reduce", default="host", help="EngineConfig.grad_reduce (host, device)")
    ap.add_argument("--sharded-streaming", action="store_true", help="EngineConfig.sharded_streaming")
    ap.add_argument("--node-store", default="replicated", help="EngineConfig.node_store (replicated, sharded)")
    ap.add_argument(
        "--layouts", nargs="+", help="rows as PROCESSESxNODES (e.g. 1x1 2x2; replaces --processes): figures per node"
    )
    args = ap.parse_args()
    layouts = (
        [tuple(map(int, x.split("x"))) for x in args.layouts] if args.layouts else [(p, 1) for p in args.processes]
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for local, nodes in layouts:
            world, tag = local * nodes, f"{local}x{nodes}"
            init = os.path.join(tmp, f"init{tag}")
            mp.spawn(_run, args=(world, local, args, init, os.path.join(tmp, tag)), nprocs=world, join=True)
            parts = [json.loads(Path(tmp, f"{tag}-{world}-{r}.json").read_text()) for r in range(world)]
            per_node = []
            for node in range(nodes):
                mine = parts[node * local : (node + 1) * local]
                total = {k: sum(p["pss"].get(k, 0) for p in mine) for k in ("Pss", "Pss_Anon", "Pss_Shmem", "Pss_File")}
                total["built"] = sum(p["built"] for p in mine)
                per_node.append(total)
            rows.append((tag, max(per_node, key=lambda t: t["Pss"]), parts[0]["numel"]))
    base = rows[0][1]["Pss"]
    print(
        f"{'processes':>9} {'PSS sum GiB':>12} {'B/param':>8} {'vs first':>9} "
        f"{'anon GiB':>9} {'shmem GiB':>10} {'file GiB':>9} {'models built GiB':>17}"
    )
    for world, pss, numel in rows:
        print(
            f"{world:>9} {pss['Pss'] / 2**30:>12.2f} {pss['Pss'] / numel:>8.1f} {pss['Pss'] / base:>9.2f} "
            f"{pss['Pss_Anon'] / 2**30:>9.2f} {pss['Pss_Shmem'] / 2**30:>10.2f} {pss['Pss_File'] / 2**30:>9.2f} "
            f"{pss['built'] / 2**30:>17.2f}"
        )


if __name__ == "__main__":
    main()
