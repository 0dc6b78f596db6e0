"""Tiny models and LightningModules shared by the tests."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 128


def tiny_config(family: str = "qwen2", tied: bool = False, layers: int = 3, **kw):
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    common.update(kw)
    return Qwen2Config(**common) if family == "qwen2" else LlamaConfig(**common)


def tiny_model(family: str = "qwen2", tied: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(family, tied, **kw)
    model = Qwen2ForCausalLM(cfg) if family == "qwen2" else LlamaForCausalLM(cfg)
    return model.float()


def make_batch(seed: int, batch: int = 2, seq: int = 12, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens carry no loss
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -2:] = 0
        labels[0, -2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RandomTokens(Dataset):
    def __init__(self, n: int, seq: int = 12) -> None:
        self.items = [make_batch(1000 + i, batch=1, seq=seq) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.items[i].items()}


class LMModule(L.LightningModule):
    """An ordinary LightningModule around a Hugging Face causal LM: AdamW, warm-up + cosine."""

    def __init__(self, model, lr: float = 1e-2, warmup: int = 3, total: int = 20, fused: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.lr, self.warmup, self.total, self.fused = lr, warmup, total, fused
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.val_losses.append(loss.item())
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("test_loss", loss)
        return loss

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            fused=self.fused,
        )

        def schedule(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EngineProbe(L.Callback):
    """Keeps the horizon strategy's engine of the last training run (the strategy closes it at teardown; a closed
    engine's settings and counters can still be read)."""

    engine = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.engine = getattr(trainer.strategy, "engine", None)


def loader(n: int = 40, batch: int = 2) -> DataLoader:
    return DataLoader(RandomTokens(n), batch_size=batch, shuffle=False)


def clone(model):
    return copy.deepcopy(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
