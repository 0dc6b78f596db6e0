"""`Trainer(strategy="horizon")` against the same LightningModule trained with plain PyTorch on the CPU."""

from __future__ import annotations

import time
import warnings

import lightning as L
import pytest
import torch

import lightning_horizon  # noqa: F401  (registers "horizon")
from lightning_horizon import HorizonPrecision, HorizonStrategy, WorkerError
from tests.helpers import EngineProbe, LMModule, clone, loader, rel_err, tiny_model

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
# The true gradient of a key-projection bias is zero (softmax is shift-invariant), so every implementation's gradient
# there is rounding noise, which Adam scales up to lr-sized steps: those tensors are compared with a looser bound.
NOISE_ONLY = ("k_proj.bias",)


def fit(strategy, model, steps=20, precision="32-true", **kw):
    module = LMModule(model, total=steps)
    probe = EngineProbe()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        precision=precision,
        callbacks=[probe],
        **QUIET,
        **kw,
    )
    trainer.fit(module, loader(8))  # 4 batches per epoch, seen again and again: the loss must fall
    trainer.probe = probe
    return module, trainer


@pytest.mark.parametrize(
    "family,accumulate,clip",
    [
        ("qwen2", 1, 1.0),  # clipping: updates run during the next forward
        ("llama", 2, 1.0),  # accumulation: FP32 gradients on the host
        ("qwen2", 1, None),  # nothing between backward and step: updates overlap the backward itself
        ("llama", 2, None),
    ],
)
def test_training_parity_with_plain_pytorch(family, accumulate, clip):
    ref = tiny_model(family, tied=family == "llama")
    got, trainer = fit("horizon", clone(ref), gradient_clip_val=clip, accumulate_grad_batches=accumulate)
    want, _ = fit("auto", clone(ref), gradient_clip_val=clip, accumulate_grad_batches=accumulate)
    engine = trainer.probe.engine
    assert engine.sink.direct == (accumulate == 1)
    assert (engine.num_overlapped_updates > 0) == (clip is None)
    assert len(got.losses) == len(want.losses) == 20 * accumulate
    for a, b in zip(got.losses, want.losses):
        assert a == pytest.approx(b, rel=1e-5)
    assert got.losses[-1] < got.losses[0]
    for (name, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        tol = 2e-4 if name.endswith(NOISE_ONLY) else 1e-5
        assert rel_err(p, q) < tol, name


def test_clip_by_value_parity():
    ref = tiny_model("llama")
    got, _ = fit("horizon", clone(ref), steps=5, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    want, _ = fit("auto", clone(ref), steps=5, gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    for p, q in zip(got.model.parameters(), want.model.parameters()):
        assert rel_err(p, q) < 1e-5


def test_bf16_mixed_keeps_fp32_masters():
    module, trainer = fit("horizon", tiny_model("qwen2"), steps=4, precision="bf16-mixed")
    engine = trainer.probe.engine
    assert isinstance(trainer.strategy.precision_plugin, HorizonPrecision)
    assert engine.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    for state in trainer.optimizers[0].state.values():
        assert state["exp_avg"].dtype == torch.float32
    assert module.device == torch.device("cpu")


def test_fit_then_validate_then_test_in_one_process():
    module = LMModule(tiny_model("qwen2"), total=6)
    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=6, precision="32-true", **QUIET)
    trainer.fit(module, loader(12), loader(4))
    masters = [p.data_ptr() for p in module.model.parameters()]
    assert trainer.strategy.engine is None  # closed at teardown
    val = trainer.validate(module, loader(4), verbose=False)
    test = trainer.test(module, loader(4), verbose=False)
    assert [p.data_ptr() for p in module.model.parameters()] == masters  # the store is adopted, not copied
    assert val[0]["val_loss"] == pytest.approx(test[0]["test_loss"], rel=1e-6)
    # validation ran on the weights after the last update
    model = clone(module.model)
    with torch.no_grad():
        plain = [model(**batch).loss.item() for batch in loader(4)]
    assert module.val_losses[-2:] == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true", "16-true"])
def test_unsupported_precision_is_refused(precision):
    with pytest.raises(ValueError, match="does not support precision"):
        L.Trainer(strategy="horizon", accelerator="cpu", devices=1, precision=precision, **QUIET)


def test_float16_mixed_is_refused():
    # On the CPU Lightning itself turns 16-mixed into bf16-mixed; on a GPU it reaches the plugin, which refuses it.
    with pytest.raises(ValueError, match="loss scaling"):
        HorizonPrecision("16-mixed")


def test_several_devices_run_data_parallel_and_one_device_does_not():
    """devices=2 is data parallel (Lightning's subprocess launcher, a distributed sampler over both processes; the
    runs themselves are in tests/test_data_parallel.py); one device starts no process group and no launcher."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=2, **QUIET)
    strategy = trainer.strategy
    assert strategy.is_distributed and strategy.world_size == 2
    assert isinstance(strategy.launcher, _SubprocessScriptLauncher)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    single = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, **QUIET).strategy
    assert not single.is_distributed and single.launcher is None and single.distributed_sampler_kwargs is None
    assert single.root_device == torch.device("cpu")


def test_strategy_options_are_validated():
    with pytest.raises(ValueError, match="checkpoint_every"):
        HorizonStrategy(checkpoint_every=0)
    assert isinstance(
        L.Trainer(strategy=HorizonStrategy(checkpoint_every=2), accelerator="cpu", **QUIET).strategy, HorizonStrategy
    )


def test_optimizer_over_foreign_parameters_is_refused():
    class Extra(LMModule):
        def configure_optimizers(self):
            return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)

    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=1, **QUIET)
    with pytest.raises(ValueError, match="not part of the streamed"):
        trainer.fit(Extra(tiny_model()), loader(4))


@pytest.mark.parametrize("where", ["prefetch", "gradient", "optimizer"])
def test_worker_exception_reaches_fit_quickly(where, monkeypatch):
    from lightning_horizon.engine import gradients, optimizer, streamer

    def boom(*a, **k):
        raise RuntimeError(f"injected failure in the {where} worker")

    target = {
        "prefetch": (streamer.LayerStreamer, "_load"),
        "gradient": (gradients.GradientSink, "_report"),
        "optimizer": (optimizer.LayerOptimizer, "_update"),
    }[where]
    monkeypatch.setattr(*target, boom)
    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=3, precision="32-true", **QUIET)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=f"injected failure in the {where} worker"):
        trainer.fit(LMModule(tiny_model()), loader(8))
    assert time.monotonic() - start < 10


def test_forking_dataloader_workers_are_warned_about():
    from torch.utils.data import DataLoader

    from tests.helpers import RandomTokens

    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=1, precision="32-true", **QUIET)
    forked = DataLoader(RandomTokens(4), batch_size=2, num_workers=1, multiprocessing_context="fork")
    with pytest.warns(UserWarning, match="page-locked"):
        trainer.strategy.process_dataloader(forked)
    spawned = DataLoader(RandomTokens(4), batch_size=2, num_workers=1, multiprocessing_context="spawn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.strategy.process_dataloader(spawned)
    assert not [w for w in caught if "page-locked" in str(w.message)]


@pytest.mark.parametrize("available_gib,expected", [(64, True), (0.5, False)])
def test_weight_copy_auto_follows_available_host_memory(available_gib, expected):
    """The one rule of weight_copy=None (the engine's and the planner's): on for a GPU when the host footprint with
    the copy fits; the engine counts its existing masters as available to it."""
    from lightning_horizon.engine.adapter import describe
    from lightning_horizon.engine.footprint import StoreShape, auto_weight_copy

    shape = StoreShape.of(describe(tiny_model("qwen2")))
    available = int(available_gib * 2**30)
    if expected:
        assert auto_weight_copy(shape, torch.bfloat16, False, 3, True, available)
    else:
        with pytest.warns(UserWarning, match="weight copy"):
            assert not auto_weight_copy(shape, torch.bfloat16, False, 3, True, available)
    assert not auto_weight_copy(shape, torch.bfloat16, False, 3, False, 2**50)  # never for CPU compute


def test_weight_copy_auto_counts_the_existing_frozen_base_as_available():
    """A LoRA model's frozen base already holds its bytes when the engine is built (MemAvailable no longer counts
    them): the adapters' weight copy is kept when only the rest of the footprint fits what is available."""
    from lightning_horizon.engine.adapter import describe
    from lightning_horizon.engine.footprint import StoreShape, auto_weight_copy, host_bytes
    from tests.test_workflows import lora

    model = lora(tiny_model("qwen2"))
    shape = StoreShape.of(describe(model.get_base_model()), frozen=True)
    assert shape.frozen_numel > shape.store_numel
    footprint = host_bytes(shape, torch.bfloat16, False, True, 3, True)
    still_needed = sum(footprint.values()) - footprint["masters"] - footprint["frozen parameters"]
    assert auto_weight_copy(shape, torch.bfloat16, False, 3, True, still_needed)
    with pytest.warns(UserWarning, match="weight copy"):
        assert not auto_weight_copy(shape, torch.bfloat16, False, 3, True, still_needed - 1)


def test_weight_copy_auto_is_off_on_the_cpu():
    """Uploads on the CPU are plain copies: a weight copy would cost 2-4 bytes/param and buy nothing."""
    module, trainer = fit("horizon", tiny_model("qwen2"), steps=2)
    engine = trainer.probe.engine
    assert engine.config.weight_copy is False
    assert all(g.copy is None for g in engine.store.groups)
    _, trainer = fit(HorizonStrategy(weight_copy=True), tiny_model("qwen2"), steps=2)
    assert trainer.probe.engine.config.weight_copy is True


def test_preflight_refuses_a_run_the_host_cannot_hold(monkeypatch):
    """Before the optimizer's state exists (PyTorch allocates it at the first step), the strategy refuses a run whose
    remaining host memory exceeds what the machine has, naming each component; with room, the same run trains."""
    from lightning_horizon import hardware

    monkeypatch.setattr(hardware, "_usable_host_memory_bytes", lambda: 512 * 2**20)
    model = tiny_model()
    start = clone(model)
    with pytest.raises(MemoryError, match=r"not enough host memory(.|\n)*optimizer state(.|\n)*The same run with"):
        fit("horizon", model, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))  # refused before a step
    monkeypatch.setattr(hardware, "_usable_host_memory_bytes", lambda: 4 * 2**30)
    trained, _ = fit("horizon", model, steps=2)
    assert not all(torch.equal(p, q) for p, q in zip(trained.model.parameters(), start.parameters()))


def test_remaining_host_memory_counts_what_each_optimizer_will_allocate():
    from lightning_horizon.engine.adapter import describe
    from lightning_horizon.engine.footprint import StoreShape, still_to_allocate

    model = tiny_model()
    shape = StoreShape.of(describe(model))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    adam, amsgrad = torch.optim.AdamW(params), torch.optim.Adam(params, amsgrad=True)
    sgd, momentum = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for opt, per_param in ((adam, 8), (amsgrad, 12), (sgd, 0), (momentum, 4)):
        got = still_to_allocate(shape, torch.bfloat16, False, True, 3, True, [opt])
        assert got["optimizer state"] == per_param * n
        assert got["gradients"] == 4 * shape.embedding_numel and "upload staging" not in got  # the copy uploads
    compact = still_to_allocate(shape, torch.bfloat16, False, True, 3, True, [adam], torch.bfloat16)
    assert compact["optimizer state"] == 4 * n  # optimizer_state_dtype=bf16: AdamW's moments in 2 bytes each
    accumulating = still_to_allocate(shape, torch.bfloat16, True, False, 3, True, [sgd])
    assert accumulating["gradients"] == 4 * shape.store_numel
    assert accumulating["upload staging"] == 2 * shape.staging_numel * 2
    assert accumulating["gradient slabs"] == 3 * shape.slab_numel * 2


def test_preflight_names_the_settings_that_would_fit():
    """The refusal lists what each cheaper setting would still need and marks those that fit: here int8 AdamW
    state fits and BF16 state does not; an optimizer the one-pass AdamW cannot step is offered no compact state."""
    import re

    from lightning_horizon.engine.adapter import describe
    from lightning_horizon.engine.config import EngineConfig, resolve
    from lightning_horizon.engine.footprint import (
        PREFLIGHT_MARGIN_BYTES,
        StoreShape,
        check_host_memory,
        still_to_allocate,
    )

    model = tiny_model()
    shape = StoreShape.of(describe(model))
    adamw = torch.optim.AdamW(model.parameters())
    config = resolve(EngineConfig(device="cpu", compute_dtype="bf16", weight_copy=False))
    need = {
        d: sum(still_to_allocate(shape, torch.bfloat16, False, False, 3, False, [adamw], d).values())
        for d in (torch.float32, torch.bfloat16, torch.int8)
    }
    assert need[torch.float32] > need[torch.bfloat16] > need[torch.int8]
    available = PREFLIGHT_MARGIN_BYTES + (need[torch.bfloat16] + need[torch.int8]) / 2
    with pytest.raises(MemoryError) as refused:
        check_host_memory(shape, config, [adamw], available)
    message = str(refused.value)
    assert re.search(r"optimizer_state_dtype=int8 +needs +[\d.]+ GiB  \(fits\)", message), message
    assert re.search(r"optimizer_state_dtype=bf16 +needs +[\d.]+ GiB\n", message), message
    with pytest.raises(MemoryError) as refused:
        check_host_memory(shape, config, [torch.optim.SGD(model.parameters(), lr=0.1)], PREFLIGHT_MARGIN_BYTES)
    assert "optimizer_state_dtype" not in str(refused.value)
