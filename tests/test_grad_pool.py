"""Pooled compute-dtype gradients (issue #14, item 3): without clipping and accumulation, each group's gradients go
from a few pooled buffers straight into its update; no whole-model gradient buffer exists. Everything else keeps the
whole-model buffers, and the weights are bit-identical either way."""

from __future__ import annotations

import time
import warnings

import lightning as L
import pytest
import torch

import lightning_horizon  # noqa: F401  (registers "horizon")
from lightning_horizon import HorizonEngine, HorizonStrategy, WorkerError
from lightning_horizon.engine import EngineConfig
from lightning_horizon.engine.optimizer import LayerOptimizer
from tests.helpers import EngineProbe, LMModule, clone, loader, make_batch, tiny_model

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class PoolWatch(L.Callback):
    """Each time an update has read a group's gradients (on the optimizer worker), records how many distinct
    compute-dtype gradient buffers the groups point at and whether every one is a buffer of the pool."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, bool]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        engine = trainer.strategy.engine
        consumed = engine.optim.on_consumed

        def watch(group) -> None:
            self.samples.append(held_buffers(engine))
            consumed(group)

        engine.optim.on_consumed = watch


def held_buffers(engine) -> tuple[int, bool]:
    pool = engine.sink.pool
    pooled = {b.data_ptr() for b in pool.buffers} if pool is not None else set()
    held = {g.grad_lp.data_ptr() for g in engine.store.groups if g.grad_lp is not None}
    return len(held), held <= pooled


def fit(model, steps=20, precision="32-true", callbacks=(), module=None, **settings):
    module = module or LMModule(model, total=steps)
    probe = EngineProbe()
    trainer = L.Trainer(
        strategy=HorizonStrategy(**settings),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        precision=precision,
        callbacks=[probe, *callbacks],
        **QUIET,
    )
    trainer.fit(module, loader(8))
    return module, probe.engine


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("precision,tied", [("bf16-mixed", False), ("bf16-mixed", True), ("32-true", True)])
def test_pooled_gradients_give_bit_identical_weights(precision, tied):
    """(a) 24 AdamW steps through the Trainer: the pooled gradients give exactly the weights of whole-model buffers,
    and (b) while they run the groups never point at more than the pool's buffers."""
    ref = tiny_model("qwen2", tied=tied, layers=6)  # enough layers for four buffers to hold less than the model
    watch = PoolWatch()
    pooled, engine = fit(clone(ref), steps=24, precision=precision, callbacks=[watch], grad_pool_buffers=4)
    whole, whole_engine = fit(clone(ref), steps=24, precision=precision, grad_pool_buffers=0)
    assert_identical(pooled.model, whole.model)
    assert pooled.losses == whole.losses

    assert engine.config.updates_in_backward and engine.sink.pool is not None
    assert whole_engine.config.updates_in_backward and whole_engine.sink.pool is None
    pool = engine.sink.pool
    assert engine.num_overlapped_updates > 0
    assert 1 <= pool.peak_leased <= len(pool.buffers) == 4
    assert len(watch.samples) == 24 * (6 + 3 - tied)  # every step: embedding, layers, norm, untied lm_head
    assert all(count <= len(pool.buffers) and in_pool for count, in_pool in watch.samples)
    itemsize = engine.dtype.itemsize
    assert pool.nbytes == len(pool.buffers) * engine.shape.grad_group_numel * itemsize
    assert pool.nbytes < (engine.shape.store_numel - engine.shape.embedding_numel * (not tied)) * itemsize


def plain_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def one_pass(model, i):
    return model(**make_batch(i)).loss


def two_passes(model, i):
    """A loss from two forward passes: a layer's gradient is complete only at the end of the whole backward."""
    return model(**make_batch(i)).loss + model(**make_batch(100 + i)).loss


def raw_run(model, steps=20, optimizer=None, begin=True, loss=one_pass, **config):
    """A plain loop over the raw engine (``begin_step`` before each backward, as the strategy does)."""
    engine = HorizonEngine(model, device="cpu", compute_dtype="bf16", **config)
    opt = optimizer(model) if optimizer else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    try:
        for i in range(steps):
            if begin:
                engine.begin_step(opt)
            loss(model, i).backward()
            engine.step(opt)
            opt.zero_grad()
        engine.synchronize()
    finally:
        engine.close()
    return engine


def test_back_pressure_with_two_buffers_and_a_slow_optimizer(monkeypatch):
    """Two buffers, a tied lm_head (its lease waits for the embedding's rows all through the backward) and an
    optimizer slower than the backward: landings wait for a free buffer, never more than two are leased, nothing
    hangs, and the weights are those of whole-model buffers."""
    ref = tiny_model("llama", tied=True, layers=4)
    want = clone(ref)
    raw_run(want, steps=6, grad_pool_buffers=0)
    apply = LayerOptimizer._apply

    def slow_apply(self, *args, **kwargs):
        time.sleep(0.01)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(LayerOptimizer, "_apply", slow_apply)
    got = clone(ref)
    engine = raw_run(got, steps=6, grad_pool_buffers=2, updates_in_backward=True)
    assert engine.sink.pool is not None and engine.sink.pool.peak_leased == 2
    assert engine.num_overlapped_updates == 6 * (4 + 2)
    assert_identical(got, want)


def test_a_failed_update_reaches_a_landing_that_waits_for_a_buffer(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("optimizer exploded")

    monkeypatch.setattr(LayerOptimizer, "_apply", broken)
    with pytest.raises(WorkerError, match="optimizer exploded"):
        raw_run(tiny_model("qwen2", layers=4), steps=2, grad_pool_buffers=2, updates_in_backward=True)


@pytest.mark.parametrize(
    "case,message",
    [
        ("no begin_step", "not scheduled during the backward"),
        ("optimizer over some parameters", "not scheduled during the backward"),
        ("two forward passes", "more than one forward pass"),
    ],
)
def test_the_engine_falls_back_to_whole_buffers_when_updates_may_not_follow(case, message):
    """Announced updates during the backward that then do not come (no begin_step; a trainable parameter outside the
    step's optimizer, whose gradient stays until another step; a loss from two forward passes, complete only at the
    end of the whole backward): the engine gives the pool up for good, with a warning, and trains exactly as with
    whole-model buffers."""
    ref = tiny_model("qwen2", tied=True)
    kwargs = {}
    if case == "no begin_step":
        kwargs["begin"] = False
    if case == "optimizer over some parameters":
        # every parameter but the first layer's, whose gradients land last and stay after the step
        kwargs["optimizer"] = lambda m: torch.optim.AdamW(
            [p for n, p in m.named_parameters() if not n.startswith("model.layers.0.")], lr=1e-2
        )
    want = clone(ref)
    got = clone(ref)
    if case == "two forward passes":
        raw_run(want, steps=3, loss=two_passes, optimizer=plain_adamw, grad_pool_buffers=0)
        with pytest.warns(UserWarning, match=message):
            engine = raw_run(got, steps=3, loss=two_passes, optimizer=plain_adamw, updates_in_backward=True,
                             grad_pool_buffers=4)  # fmt: skip
    else:
        raw_run(want, steps=4, grad_pool_buffers=0, **kwargs)
        with pytest.warns(UserWarning, match=message):
            engine = raw_run(got, steps=4, updates_in_backward=True, grad_pool_buffers=4, **kwargs)
    assert engine.sink.pool is None
    assert_identical(got, want)


class ManualModule(LMModule):
    def __init__(self, model) -> None:
        super().__init__(model, total=4)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.model(**batch).loss
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        return loss


@pytest.mark.parametrize("case", ["clip by norm", "clip by value", "accumulation", "manual optimization"])
def test_whole_model_buffers_whenever_gradients_wait_for_the_step(case):
    """(c) Clipping, accumulation and manual optimization keep the whole-model gradient buffers (their parity with
    plain PyTorch is checked in test_strategy.py and test_workflows.py): no pool is even allocated."""
    model = tiny_model("qwen2")
    trainer_args = {
        "clip by norm": dict(gradient_clip_val=1.0),
        "clip by value": dict(gradient_clip_val=1.0, gradient_clip_algorithm="value"),
        "accumulation": dict(accumulate_grad_batches=2),
        "manual optimization": {},
    }[case]
    module = ManualModule(model) if case == "manual optimization" else LMModule(model, total=4)
    probe = EngineProbe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            strategy="horizon", accelerator="cpu", devices=1, max_steps=4, precision="bf16-mixed",
            callbacks=[probe], **QUIET, **trainer_args,
        )  # fmt: skip
        trainer.fit(module, loader(8))
    assert not [w for w in caught if "gradient pool" in str(w.message)]  # never leased, so never given up
    engine = probe.engine
    assert not engine.config.updates_in_backward and engine.config.pooled_grads == 0
    assert engine.sink.pool is None


def test_settings():
    assert EngineConfig(updates_in_backward=True, grad_pool_buffers=4).pooled_grads == 4
    assert EngineConfig(updates_in_backward=True, accumulate_grads=True).pooled_grads == 0
    assert EngineConfig(updates_in_backward=True, grad_pool_buffers=0).pooled_grads == 0
    assert EngineConfig(grad_pool_buffers=2).pooled_grads == 0  # the run does not say the updates follow
    for bad in (1, -1, True):
        with pytest.raises(ValueError, match="grad_pool_buffers"):
            EngineConfig(grad_pool_buffers=bad)
    with pytest.raises(ValueError, match="decided by resolve"):
        EngineConfig(updates_in_backward=True).pooled_grads  # noqa: B018  (automatic: not decided yet)


@pytest.mark.parametrize("fits", [True, False])
def test_the_pool_is_chosen_when_whole_buffers_do_not_fit(monkeypatch, fits):
    """grad_pool_buffers=None: whole-model buffers where the host holds them (the updates also overlap the next
    forward), the pool of four where it does not."""
    from lightning_horizon import hardware

    available = 64 * 2**30 if fits else 1
    monkeypatch.setattr(hardware, "_usable_host_memory_bytes", lambda: available)
    engine = HorizonEngine(tiny_model("qwen2", layers=6), device="cpu", compute_dtype="bf16", updates_in_backward=True)
    try:
        assert engine.config.grad_pool_buffers == (0 if fits else 4)
        assert engine.config.pooled_grads == (0 if fits else 4)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="updates_in_backward is not a strategy setting"):
        HorizonStrategy(updates_in_backward=True)
