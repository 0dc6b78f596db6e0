"""Frozen parameters held once in the compute dtype (``EngineConfig.frozen_dtype="compute"``, the default).

Under BF16 compute, a parameter that does not require gradients when the engine is built (the base model under LoRA,
a frozen part of a full fine-tune) has no FP32 master, gradient, optimizer state or weight copy: it lives in a BF16
group of its own that the uploads read directly. The streamed layers computed with exactly these BF16 values before
(the upload rounded the FP32 master), so a run trains the same weights as with ``frozen_dtype="fp32"``, bit for bit;
these tests check that, the bytes, checkpoints across both settings, a second Trainer, and the refusal of a frozen
parameter made trainable.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_horizon  # noqa: F401  (registers "horizon")
from lightning_horizon import HorizonStrategy
from lightning_horizon.engine.footprint import host_bytes
from lightning_horizon.engine.store import FROZEN_SUFFIX
from tests.helpers import EngineProbe, LMModule, clone, loader, tiny_model
from tests.test_workflows import lora

pytest.importorskip("peft")

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def fit(module, frozen_dtype: str, steps: int = 4, precision: str = "bf16-mixed", **kw):
    probe = EngineProbe()
    trainer = L.Trainer(
        strategy=HorizonStrategy(frozen_dtype=frozen_dtype),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        precision=precision,
        callbacks=[probe, *kw.pop("callbacks", [])],
        **{**QUIET, **kw},
    )
    trainer.fit(module, loader(8))
    return probe.engine, trainer


def family(name: str):
    from tests.test_families import family_model

    return family_model(name)


@pytest.mark.parametrize("name", ["qwen2", "llama3", "mistral", "qwen3_moe"])
def test_lora_with_a_bf16_base_trains_the_same_weights_as_fp32_masters(name):
    """The same losses and adapter weights, bit for bit, with the frozen base in BF16 as with FP32 masters for it;
    the frozen base is stored once in BF16 (2 bytes/param) and has no gradient buffer, copy or optimizer state."""
    ref = lora(family(name))
    runs = {}
    for frozen_dtype in ("compute", "fp32"):
        module = LMModule(clone(ref), lr=1e-2, total=4)
        engine, _ = fit(module, frozen_dtype)
        runs[frozen_dtype] = module, engine
    (got, engine), (want, _) = runs["compute"], runs["fp32"]
    assert got.losses == want.losses
    for (n, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p, q), n
        else:  # the frozen base: the BF16 value the layers computed with in both runs
            assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), n

    store = engine.store
    frozen = [g for g in store.groups if g.frozen]
    assert frozen and all(g.name.endswith(FROZEN_SUFFIX) and g.master.dtype == torch.bfloat16 for g in frozen)
    assert all(not sp.param.requires_grad for g in frozen for sp in g.params)
    assert all(sp.param.requires_grad for g in store.groups if not g.frozen for sp in g.params)
    frozen_numel = sum(sp.numel for g in frozen for sp in g.params)
    frozen_bytes = sum(g.master.nbytes for g in frozen)
    assert frozen_bytes == 2 * engine.shape.frozen_numel
    assert frozen_bytes < 2 * frozen_numel * 1.1  # 2 bytes/param, plus the 128-element alignment
    assert engine.shape.trainable_params == sum(p.numel() for p in got.model.parameters() if p.requires_grad)
    fp32_bytes = sum(g.master.nbytes for g in store.groups if not g.frozen)
    assert fp32_bytes == 4 * engine.shape.store_numel
    # the footprint the planner and the preflight use counts the same bytes
    footprint = host_bytes(engine.shape, torch.bfloat16, False, False, 3, False)
    assert footprint["frozen parameters"] == frozen_bytes and footprint["masters"] == fp32_bytes


def test_a_frozen_embedding_and_norms_of_a_full_fine_tune_are_held_in_bf16():
    """Not only LoRA: any parameter frozen at setup (here the embedding and every norm, untied lm_head trained)."""
    ref = tiny_model("llama")
    runs = {}
    for frozen_dtype in ("compute", "fp32"):
        model = clone(ref)
        for n, p in model.named_parameters():
            if "embed" in n or "norm" in n:
                p.requires_grad_(False)
        module = LMModule(model, lr=1e-2, total=4)
        engine, _ = fit(module, frozen_dtype)
        runs[frozen_dtype] = module, engine
    (got, engine), (want, _) = runs["compute"], runs["fp32"]
    assert got.losses == want.losses
    for (n, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        assert torch.equal(p, q.to(p.dtype)), n
    assert {g.name for g in engine.store.groups if g.frozen} >= {"embed.frozen", "norm.frozen", "layers.0.frozen"}
    assert engine.shape.embedding_numel == 0  # a frozen embedding has no FP32 gradient rows either


def test_fp32_compute_keeps_frozen_parameters_in_fp32():
    engine, _ = fit(LMModule(lora(tiny_model("qwen2")), total=2), "compute", steps=2, precision="32-true")
    assert not any(g.frozen for g in engine.store.groups)
    assert all(g.master.dtype == torch.float32 for g in engine.store.groups)


class Unfreezes(LMModule):
    """Gradual unfreezing: the embedding, frozen at setup, becomes trainable at step 2."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            self.model.get_input_embeddings().weight.requires_grad_(True)
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)


def _unfreezing_module():
    model = tiny_model("llama")
    model.get_input_embeddings().weight.requires_grad_(False)
    return Unfreezes(model)


def test_a_frozen_parameter_made_trainable_is_refused_with_the_setting_to_use():
    module = _unfreezing_module()
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"model\.embed_tokens\.weight.*frozen_dtype='fp32'") as err:
        fit(module, "compute", steps=4)
    assert "without an FP32 master" in str(err.value)
    assert len(module.losses) == 2  # stopped before the third step computed anything
    assert not torch.equal(module.model.model.layers[0].mlp.up_proj.weight, start["model.layers.0.mlp.up_proj.weight"])


def test_unfreezing_trains_with_frozen_dtype_fp32():
    module = _unfreezing_module()
    start = module.model.get_input_embeddings().weight.detach().clone()
    fit(module, "fp32", steps=4)
    assert not torch.equal(module.model.get_input_embeddings().weight, start)


def test_unfreezing_a_lora_layer_is_refused_before_the_layer_runs():
    """A decoder layer's frozen weight (the streamed path, checked when its template is bound)."""

    class UnfreezeLayer(LMModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                self.model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.requires_grad_(True)
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.q_proj\.base_layer\.weight"):
        fit(UnfreezeLayer(lora(tiny_model("qwen2"))), "compute", steps=3)


def test_checkpoints_resume_across_frozen_dtypes(tmp_path):
    """A checkpoint of a LoRA run with the base in BF16 resumes exactly with either setting (the base's BF16 values
    are exact in FP32), and one saved with FP32 frozen masters resumes into BF16 (rounded, as the layers used it)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ref = lora(tiny_model("qwen2"))
    every4 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    straight = LMModule(clone(ref), total=8)
    fit(straight, "compute", steps=8, enable_checkpointing=True, callbacks=[every4])  # 4 batches per epoch
    ckpt = tmp_path / "epoch=0-step=4.ckpt"
    for frozen_dtype in ("compute", "fp32"):
        module = LMModule(clone(ref), total=8)
        trainer = L.Trainer(
            strategy=HorizonStrategy(frozen_dtype=frozen_dtype),
            accelerator="cpu",
            devices=1,
            max_steps=8,
            precision="bf16-mixed",
            **QUIET,
        )
        trainer.fit(module, loader(8), ckpt_path=ckpt)
        assert module.losses == straight.losses[4:], frozen_dtype
        for (n, p), q in zip(module.model.named_parameters(), straight.model.parameters()):
            assert torch.equal(p.to(q.dtype), q), (frozen_dtype, n)

    # saved with FP32 frozen masters, resumed with the base in BF16: the base rounded, as the layers used it
    fp32_run = LMModule(clone(ref), total=8)
    fit(fp32_run, "fp32", steps=4, enable_checkpointing=True, default_root_dir=tmp_path / "fp32")
    saved = next((tmp_path / "fp32").rglob("*.ckpt"))
    module = LMModule(clone(ref), total=8)
    fit_from = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=5, precision="bf16-mixed", **QUIET)
    fit_from.fit(module, loader(8), ckpt_path=saved)
    base = {n: p for n, p in fp32_run.model.named_parameters() if not p.requires_grad}
    for n, p in module.model.named_parameters():
        if n in base:
            assert p.dtype == torch.bfloat16 and torch.equal(p, base[n].to(torch.bfloat16)), n


def test_a_second_trainer_adopts_the_bf16_base_without_a_copy():
    module = LMModule(lora(tiny_model("qwen2")), total=4)
    fit(module, "compute", steps=2)
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    pointers = [p.data_ptr() for p in frozen]
    engine, _ = fit(module, "compute", steps=2)
    assert [p.data_ptr() for p in frozen] == pointers
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert any(g.frozen for g in engine.store.groups)
