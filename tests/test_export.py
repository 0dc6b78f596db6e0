"""Export to a Hugging Face directory, from a checkpoint (command line, no GPU) and from a live engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

import lightning_horizon  # noqa: F401
from lightning_horizon.export import export_hf
from tests.helpers import LMModule, clone, loader, make_batch, tiny_model

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    module = LMModule(tiny_model("llama", tied=True), total=6)
    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=6, precision="32-true", **QUIET)
    trainer.fit(module, loader(8))
    trainer.save_checkpoint(tmp / "last.ckpt")
    engine = trainer.strategy.engine
    engine.synchronize()
    # the trained masters, as a plain model (the engine's forward replaced by the model's own)
    engine.close()
    trainer.strategy.engine = None
    return tmp, clone(module.model)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_command_line_export_of_a_checkpoint(trained, dtype):
    tmp, masters = trained
    out = tmp / f"hf-{dtype}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [sys.executable, "-m", "lightning_horizon.export", str(tmp / "last.ckpt"), str(out), "--dtype", dtype],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = make_batch(3)
    want, got = _logits(masters, batch), _logits(model, batch)
    if dtype == "fp32":
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_export_hf_from_a_live_engine_with_tokenizer_and_shards(tmp_path):
    from lightning_horizon.data.tokenizer import build_default_tokenizer

    module = LMModule(tiny_model("qwen2"), total=3)
    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=3, precision="32-true", **QUIET)
    trainer.fit(module, loader(8))
    engine = trainer.strategy.engine
    tok = build_default_tokenizer(cache_dir=str(tmp_path / "tok"))
    out = export_hf(engine, tmp_path / "hf", dtype="fp32", tokenizer=tok, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    masters = [p.detach().clone() for p in module.model.parameters()]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    for p, q in zip(model.parameters(), masters):
        assert torch.equal(p, q)
    engine.close()
    trainer.strategy.engine = None
    batch = make_batch(4)
    assert torch.equal(_logits(model, batch), _logits(module.model, batch))
