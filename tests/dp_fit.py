"""A data-parallel fit with ``Trainer(strategy="horizon", devices=N)`` on the CPU, launched as a user runs it
(``python -m tests.dp_fit --devices 2 --out DIR``: Lightning's launcher starts the other processes). Writes the final
weights and each process's losses under ``--out``; ``tests/test_data_parallel.py`` compares them with one process
trained on the global batch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch.utils.data import DataLoader, DistributedSampler

from lightning_horizon import HorizonStrategy
from tests.helpers import LMModule, loader, tiny_model


class Module(LMModule):
    rows = 2

    def train_dataloader(self):
        # Each process its slice of every global batch, in order (Lightning's own sampler would shuffle): global
        # batch k of one process with `rows * world` rows is the union of the processes' batches k
        data = loader(n=self.n_samples, batch=self.rows)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data.dataset, batch_size=self.rows, sampler=sampler)

    def configure_model(self) -> None:
        if self.model is None:  # --meta-model: built here, on the meta device outside local rank 0 (README)
            with torch.device("meta" if self.trainer.local_rank > 0 else "cpu"):
                self.model = tiny_model("qwen2", tied=True, seed=0)
            self.built_on_meta = self.model.lm_head.weight.is_meta

    def on_after_backward(self) -> None:  # reads the gradient the update will use (averaged over the processes)
        grad = self.model.model.norm.weight.grad
        self.norm_grads.append(grad.norm().item() if grad is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument(
        "--num-nodes", type=int, default=1, help="NODE_RANK, MASTER_ADDR and MASTER_PORT from the environment"
    )
    ap.add_argument("--batch", type=int, default=2, help="rows per process")
    ap.add_argument("--steps", type=int, default=10, help="max_steps")
    ap.add_argument("--epoch-steps", type=int, default=10, help="optimizer steps per epoch (the data set's size)")
    ap.add_argument("--accumulate", type=int, default=2)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", help="checkpoint path written at the end")
    ap.add_argument("--resume", help="checkpoint to resume from")
    ap.add_argument("--fail-rank", type=int, default=-1, help="this rank raises at step 2")
    ap.add_argument("--validate", action="store_true", help="trainer.validate after fit (a second engine)")
    ap.add_argument(
        "--no-hook",
        action="store_true",
        help="no on_after_backward (with --clip 0: nothing between the "
        "backward and the step, where one process would update during the backward)",
    )
    ap.add_argument("--grad-reduce", default="host", help="the strategy's grad_reduce")
    ap.add_argument("--sharded-streaming", action="store_true", help="the strategy's sharded_streaming")
    ap.add_argument("--node-store", default="replicated", help="the strategy's node_store")
    ap.add_argument(
        "--torch-io", action="store_true", help="Lightning's TorchCheckpointIO instead of the horizon format"
    )
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds each step sleeps (a run to kill)")
    ap.add_argument(
        "--meta-model", action="store_true", help="the model is built in configure_model, on meta outside local rank 0"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    cls = type("Plain", (Module,), {"on_after_backward": LMModule.on_after_backward}) if args.no_hook else Module
    module = cls(None if args.meta_model else tiny_model("qwen2", tied=True, seed=0), lr=1e-3, total=20)
    module.norm_grads = []
    module.rows = args.batch
    module.n_samples = args.epoch_steps * args.accumulate * args.batch * args.devices * args.num_nodes
    steps = args.steps

    class Fail(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_rank == args.fail_rank and trainer.global_step == 2:
                raise RuntimeError(f"rank {args.fail_rank} fails on purpose")
            if args.sleep:
                import time

                # one write per line: two processes share the pipe (print writes the newline separately)
                sys.stdout.write(f"step {trainer.global_step} rank {trainer.global_rank}\n")
                sys.stdout.flush()
                time.sleep(args.sleep)

    trainer = L.Trainer(
        strategy=HorizonStrategy(
            grad_reduce=args.grad_reduce, sharded_streaming=args.sharded_streaming, node_store=args.node_store
        ),
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision="32-true",
        max_steps=steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Fail()],
        use_distributed_sampler=False,
        plugins=[TorchCheckpointIO()] if args.torch_io else None,
    )
    trainer.fit(module, ckpt_path=args.resume)
    stats = {}
    if args.save:  # which of the checkpoint's files this process writes
        import lightning_horizon.checkpoint as checkpoint

        write, stats["wrote"] = checkpoint.write_safetensors, []

        def recording(path, *rest, **kwargs):
            stats["wrote"].append(f"{Path(path).parent.name}/{Path(path).name}")
            return write(path, *rest, **kwargs)

        checkpoint.write_safetensors = recording
        trainer.save_checkpoint(args.save)
        checkpoint.write_safetensors = write
    if args.validate:  # the same rows in every process: the validation loss is the same everywhere
        module.val_losses = []
        trainer.validate(module, dataloaders=loader(n=4, batch=2), verbose=False)
        stats["val_losses"] = module.val_losses
    out = Path(args.out)
    rank = trainer.global_rank
    # (with a sharded node store, the layers other nodes hold are on the meta device here: left out)
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.is_meta}
    torch.save(weights, out / f"weights{rank}.pt")
    (out / f"stats{rank}.json").write_text(
        json.dumps(
            {
                "losses": module.losses,
                "norm_grads": module.norm_grads,
                "world": trainer.world_size,
                "built_on_meta": getattr(module, "built_on_meta", False),
                **stats,
            }
        )
    )


if __name__ == "__main__":
    main()
