"""SFTDataModule: batches, seeded order, a resumed run continues with exactly the next batches, learnable data."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_horizon.data import DataConfig, SFTDataModule, count_real_tokens, prepare_model_for_packing


@pytest.fixture
def small_jsonl(tmp_path) -> str:
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}"} for i in range(38)]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("pack", [True, False])
def test_bundled_batches(tokenizer, pack):
    dm = SFTDataModule(DataConfig(max_seq_len=128, batch_size=4, pack=pack), tokenizer)
    dm.setup("fit")
    dm.setup("fit")  # idempotent
    batch = next(iter(dm.train_dataloader()))
    keys = {"input_ids", "labels", "position_ids"} | ({"attention_mask"} if not pack else set())
    assert set(batch) == keys
    shape = batch["input_ids"].shape
    assert shape[0] == 4 and (shape[1] == 128 if pack else shape[1] <= 128)
    assert all(t.dtype == torch.int64 and t.shape == shape for t in batch.values())
    assert 0 < count_real_tokens(batch) <= shape.numel()
    val = list(dm.val_dataloader())
    assert val and sum(b["input_ids"].shape[0] for b in val) == len(dm.val_rows)


def test_order_is_seeded_and_changes_per_epoch(tokenizer, small_jsonl):
    def first_epochs(seed: int) -> list[list[torch.Tensor]]:
        loader = SFTDataModule(DataConfig(path=small_jsonl, batch_size=4, pack=False, seed=seed), tokenizer)
        loader = loader.train_dataloader()
        return [[b["input_ids"] for b in loader] for _ in range(2)]

    a, b, c = first_epochs(0), first_epochs(0), first_epochs(1)
    same = lambda x, y: len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))  # noqa: E731
    assert same(a[0], b[0]) and same(a[1], b[1])
    assert not same(a[0], a[1]) and not same(a[0], c[0])
    assert len(a[0]) == math.ceil(38 / 4)


def test_val_fraction_split(tokenizer, small_jsonl):
    dm = SFTDataModule(DataConfig(path=small_jsonl, pack=False, val_fraction=0.25), tokenizer)
    dm.setup("fit")
    assert len(dm.train_docs) + len(dm.val_docs) == 38 and len(dm.val_docs) == 10


class Recorder(pl.LightningModule):
    """Trivial module that records the batches it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tokenizer, path, max_steps, ckpt_dir=None, ckpt_path=None, num_workers=0) -> list[torch.Tensor]:
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)] if ckpt_dir else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(ckpt_dir),
        callbacks=callbacks,
        limit_val_batches=0,
    )
    config = DataConfig(path=path, batch_size=4, pack=False, shuffle=True, seed=3, num_workers=num_workers)
    module = Recorder()
    trainer.fit(module, datamodule=SFTDataModule(config, tokenizer), ckpt_path=ckpt_path)
    return module.seen


def test_resume_continues_with_the_next_batches(tokenizer, small_jsonl, tmp_path):
    # 38 documents / 4 = 10 batches per epoch; 25 steps cross two epoch boundaries.
    full = _fit(tokenizer, small_jsonl, 25, ckpt_dir=tmp_path / "ckpt")
    assert len(full) == 25
    for step in (7, 10, 13):  # mid epoch 0, exactly at the end of epoch 0, mid epoch 1
        (ckpt,) = tmp_path.joinpath("ckpt").glob(f"*step={step}.ckpt")
        state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        assert (state["epoch"], state["position"]) == divmod(step, 10)
        resumed = _fit(tokenizer, small_jsonl, 25, ckpt_path=str(ckpt), num_workers=1 if step == 13 else 0)
        assert len(resumed) == 25 - step, step
        for i, (a, b) in enumerate(zip(full[step:], resumed)):
            assert torch.equal(a, b), f"resumed from step {step}: batch {step + i} differs"


@pytest.mark.slow
def test_bundled_data_is_learnable(tokenizer):
    from tests.helpers import tiny_model

    model = tiny_model(
        "qwen2", layers=2, hidden_size=64, intermediate_size=128, vocab_size=len(tokenizer),
        attn_implementation=None, max_position_embeddings=32768,
    )  # fmt: skip
    prepare_model_for_packing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dm = SFTDataModule(DataConfig(max_seq_len=256, batch_size=4), tokenizer)
    losses = []
    batches = iter(dm.train_dataloader())
    for _ in range(80):
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)  # about 7.0 -> 3.0 nats


def test_shipped_assets_are_up_to_date_and_small():
    from lightning_horizon.data import make_assets

    assert make_assets.main(["--check"]) == 0, "run python -m lightning_horizon.data.make_assets"
    assert (make_assets.ASSETS_DIR / make_assets.TRAIN_FILE).stat().st_size < 1_500_000


@pytest.mark.parametrize("num_rows,shuffle", [(24, True), (22, False), (5, True)])
def test_processes_share_out_the_global_batches_of_one_process(num_rows, shuffle):
    """With N processes each takes its rows of every global batch of one process with N times the batch: together
    exactly the one-process batches (an incomplete last one filled from the epoch's start), the same number of batches
    in every process, and a position that means the same global batch whatever N."""
    from lightning_horizon.data.loader import ResumableBatchSampler

    one = ResumableBatchSampler(num_rows, 6, shuffle, seed=3)
    for world in (2, 3):
        shares = [
            ResumableBatchSampler(num_rows, 6 // world, shuffle, 3, num_replicas=world, rank=r) for r in range(world)
        ]
        for epoch in (0, 1):
            parts = [s.batches(epoch) for s in shares]
            assert all(len(p) == len(one) for p in parts)
            for i, want in enumerate(one.batches(epoch)):
                got = [row for p in parts for row in p[i]]
                assert got[: len(want)] == list(want)
                assert len(got) == 6  # padded: every process a full share
        assert shares[0].state_dict() == {**one.state_dict()}  # the fingerprint names the global batch
