"""Benchmark core: N steps of the real training path on random weights and synthetic tokens.

Used by ``python -m recipes.bench``. Metric definitions follow design.md: tokens/s counts real tokens (synthetic
batches have no padding), model TFLOP/s = 6 * N * T / step time with N = all trainable parameters, step time is the
wall time between consecutive optimizer-step ends (so the asynchronous CPU optimizer is included), median over the
steps after warm-up. Host bytes/param = peak RSS / N; GPU peak = ``max_memory_reserved``.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def random_model(hf_config, seed: int = 0) -> torch.nn.Module:
    """A causal LM with N(0, 0.02) weights (norms at 1), built without Hugging Face's slow initialisation."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module a Parameter of its own: tied embeddings would count twice
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():  # non-persistent buffers (rotary inv_freq) are garbage after to_empty
            if hasattr(module, "rope_init_fn") or type(module).__name__.endswith("RotaryEmbedding"):
                fresh = type(module)(config=hf_config)
                for bname, buf in fresh.named_buffers(recurse=False):
                    module._buffers[bname] = buf
    return model


class SyntheticTokens(Dataset):
    def __init__(self, vocab: int, seq: int, n: int, seed: int = 0) -> None:
        self.vocab, self.seq, self.n, self.seed = vocab, seq, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + i % 4)  # 4 distinct samples: the loss must fall
        ids = torch.randint(0, self.vocab, (self.seq,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


class BenchModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-5, fused: bool = True, optimizer: str = "torch") -> None:
        super().__init__()
        self.model, self.lr, self.fused, self.optimizer_name = model, lr, fused, optimizer
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "deepspeed":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=self.lr, adamw_mode=True, weight_decay=0.0)
        return torch.optim.AdamW(params, lr=self.lr, fused=self.fused, weight_decay=0.0)


class _StepTimer(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []
        self.stats: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # between steps only: timing, not part of the step
        self.ends.append(time.perf_counter())
        engine = getattr(trainer.strategy, "engine", None)
        if engine is not None:
            self.stats.append(dict(engine.stats))


@dataclass
class BenchResult:
    system: str
    tokens_per_step: int
    step_s: float
    tokens_per_s: float
    model_tflops: float
    num_params: int
    host_peak_gib: float
    host_bytes_per_param: float
    gpu_peak_gib: float
    losses: list[float]
    breakdown: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident memory of this process while it runs (one run's own peak, unlike ``ru_maxrss``)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def run(
    hf_config,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int = 2,
    strategy: Any = "horizon",
    precision: str = "bf16-mixed",
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    optimizer: str = "torch",
    system: str = "horizon",
) -> BenchResult:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    gc.collect()
    sampler = RssSampler().__enter__()
    model = random_model(hf_config)
    if not (strategy == "horizon" or type(strategy).__name__ == "HorizonStrategy"):
        model.gradient_checkpointing_enable()  # peers: Hugging Face's activation checkpointing, like our recompute
    num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    module = BenchModule(model, optimizer=optimizer)
    data = SyntheticTokens(hf_config.vocab_size, seq_len, batch_size * (steps + 1) * accumulate_grad_batches)
    timer = _StepTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    try:
        trainer.fit(module, DataLoader(data, batch_size=batch_size))
    finally:
        sampler.__exit__()
    ends = timer.ends[accumulate_grad_batches - 1 :: accumulate_grad_batches]
    deltas = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    step_s = statistics.median(deltas) if deltas else float("nan")
    tokens = batch_size * seq_len * accumulate_grad_batches
    breakdown: dict[str, float] = {}
    if len(timer.stats) > warmup + 1:
        first, last = timer.stats[warmup], timer.stats[-1]
        n = (len(timer.stats) - 1 - warmup) / accumulate_grad_batches
        breakdown = {k: (last[k] - first[k]) / n for k in last}
    gpu_peak = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    result = BenchResult(
        system=system,
        tokens_per_step=tokens,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        model_tflops=6 * num_params * tokens / step_s / 1e12,
        num_params=num_params,
        host_peak_gib=sampler.peak / 2**30,
        host_bytes_per_param=sampler.peak / num_params,
        gpu_peak_gib=gpu_peak,
        losses=[float(x) for x in module.losses],
        breakdown=breakdown,
    )
    engine = getattr(trainer.strategy, "engine", None)
    if engine is not None:
        engine.close()
    del trainer, module, model
    gc.collect()
    return result
