"""Export to a Hugging Face directory, from a checkpoint (command line, no GPU) and from a live engine: what is at
OUT_DIR is never lost silently, generation stops where a reply ends, the tokenizer gives the training ids."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, GenerationConfig

import lightning_horizon  # noqa: F401
from lightning_horizon.checkpoint import CheckpointReader
from lightning_horizon.checkpoint_callback import HorizonModelCheckpoint
from lightning_horizon.data.tokenizer import as_exported
from lightning_horizon.export import check_out_dir, export_checkpoint, export_hf, main
from tests.helpers import LMModule, clone, loader, make_batch, tiny_model

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    module = LMModule(tiny_model("llama", tied=True), total=6)
    # a source model's generation settings: the checkpoint must carry them to the export
    module.model.generation_config = GenerationConfig(temperature=0.6, top_p=0.9, do_sample=True, eos_token_id=[5, 7])
    saves = HorizonModelCheckpoint(dirpath=tmp, filename="step-{step}", every_n_train_steps=6)
    trainer = L.Trainer(
        strategy="horizon",
        accelerator="cpu",
        devices=1,
        max_steps=6,
        precision="32-true",
        callbacks=[saves],
        **{**QUIET, "enable_checkpointing": True},
    )
    trainer.fit(module, loader(8))
    assert (tmp / "last.ckpt").is_dir()
    engine = trainer.strategy.engine
    if engine is not None:  # the strategy may keep its engine after fit: the masters, as a plain model
        engine.synchronize()
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


class ExportAtTrainEnd(L.Callback):
    """Exports from the strategy's live engine when training ends (before the strategy's teardown)."""

    def __init__(self, out, tokenizer) -> None:
        self.out, self.tokenizer, self.masters = out, tokenizer, None

    def on_train_end(self, trainer, pl_module) -> None:
        engine = trainer.strategy.engine
        assert engine is not None
        export_hf(engine, self.out, dtype="fp32", tokenizer=self.tokenizer, max_shard_bytes=40_000)
        self.masters = [p.detach().clone() for p in engine.model.parameters()]


def test_export_hf_from_a_live_engine_with_tokenizer_and_shards(tmp_path, tokenizer):
    module = LMModule(tiny_model("qwen2", vocab_size=len(tokenizer)), total=3)
    export = ExportAtTrainEnd(tmp_path / "hf", as_exported(tokenizer, module.model.config))
    trainer = L.Trainer(
        strategy="horizon", accelerator="cpu", devices=1, max_steps=3, precision="32-true", callbacks=[export], **QUIET
    )
    trainer.fit(module, loader(8))
    out = export.out
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    for p, q in zip(model.parameters(), export.masters):
        assert torch.equal(p, q)
    if trainer.strategy.engine is not None:
        trainer.strategy.engine.close()
        trainer.strategy.engine = None
    batch = make_batch(4)
    assert torch.equal(_logits(model, batch), _logits(module.model, batch))


# ---------------------------------------------------------------------------------- what is at OUT_DIR survives
def _cli(*args: str) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        return int(exit.code), ""
    return 0, ""


def test_a_non_empty_out_dir_is_refused_unless_overwrite(trained, tmp_path, capsys):
    ckpt = trained[0] / "last.ckpt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _cli(ckpt, out)[0] == 2
    assert "is not empty (notes.txt)" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(ckpt, out)
    assert _cli(ckpt, out, "--overwrite")[0] == 0  # asked for: replaced, atomically
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert _cli(ckpt, tmp_path / "new")[0] == 0  # a new directory needs nothing


def test_a_checkpoint_is_never_replaced_even_with_overwrite(trained, tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    ckpt = ckpts / "last.ckpt"
    shutil.copytree(trained[0] / "last.ckpt", ckpt)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = {
        ckpt: "is a checkpoint",  # export CKPT CKPT
        ckpts: "holds the checkpoint",  # export run/checkpoints/last.ckpt run/checkpoints
        tmp_path / "run": "holds the checkpoint",
        ckpt / "hf": "lies inside the checkpoint",
    }
    for out, message in cases.items():
        for flags in ((), ("--overwrite",)):
            assert _cli(ckpt, out, *flags)[0] == 2, (out, flags)
            assert message in capsys.readouterr().err
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    CheckpointReader(ckpt)  # still complete and verified
    with pytest.raises(ValueError, match="current directory"):
        check_out_dir(Path.cwd(), overwrite=True)


# ------------------------------------------------------------------------------------- generation stops, ids match
def _always_says(model, token_id: int):
    """Makes a tied tiny model emit ``token_id`` after any input: the layers add nothing to the residual stream (zero
    output projections), and every embedding is the same vector except ``token_id``'s, which is twice as long."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.copy_(torch.linspace(-1, 1, embed.shape[1]).expand_as(embed))
        embed[token_id] *= 2
    return model


def test_exported_model_stops_at_the_end_of_a_reply(tmp_path, tokenizer):
    model = tiny_model("qwen2", tied=True, vocab_size=len(tokenizer))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _always_says(model, im_end)
    tok = as_exported(tokenizer, model.config)
    out = export_hf(model, tmp_path / "hf", dtype="fp32", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id and config["pad_token_id"] == tok.pad_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [im_end, tok.eos_token_id]
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # the causal LM itself, not its `.model` (the decoder)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True)
    ids = torch.tensor([prompt["input_ids"]])
    generated = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert generated[0, ids.shape[1] :].tolist() == [im_end]  # stops at once, where it would otherwise run 20


def test_a_source_generation_config_is_carried_through_the_checkpoint(trained, tmp_path):
    out = export_checkpoint(trained[0] / "last.ckpt", tmp_path / "hf")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["temperature"] == 0.6 and generation["top_p"] == 0.9 and generation["eos_token_id"] == [5, 7]
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.top_p == 0.9


def test_a_tokenizer_that_loads_back_differently_is_refused(tmp_path, tokenizer):
    gpt2_style = copy.deepcopy(tokenizer)
    gpt2_style.backend_tokenizer.normalizer = None
    gpt2_style.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    text = "Done.\nNext"  # ".\n" is one token of the Qwen2 pre-tokenization, two of the GPT-2 one
    assert gpt2_style(text)["input_ids"] != as_exported(gpt2_style, model.config)(text)["input_ids"]
    with pytest.raises(ValueError, match="loads back .* as Qwen2Tokenizer"):
        export_hf(model, tmp_path / "hf", dtype="fp32", tokenizer=gpt2_style)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())  # nothing published, no temporary left
    export_hf(model, tmp_path / "hf", dtype="fp32", tokenizer=as_exported(gpt2_style, model.config))


def test_a_model_with_peft_adapter_layers_is_refused_not_written_broken(tmp_path):
    """PEFT's layer names (``base_layer``, ``lora_A``) would not load as a plain Hugging Face model: the export says
    so and points at the adapter and merged exports, from a live model and from a checkpoint, writing nothing."""
    from tests.test_workflows import lora

    peft_model = lora(tiny_model("qwen2"))
    with pytest.raises(ValueError, match=r"PEFT adapter layers.*merge_and_unload"):
        export_hf(peft_model.base_model.model, tmp_path / "live")
    assert not (tmp_path / "live").exists()

    module = LMModule(peft_model, total=2)
    cb = HorizonModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=2, precision="32-true", logger=False,
              callbacks=[cb], enable_progress_bar=False, enable_model_summary=False).fit(module, loader(4))  # fmt: skip
    with pytest.raises(ValueError, match=r"checkpoint .* holds PEFT adapter layers"):
        export_checkpoint(tmp_path / "ckpts" / "last.ckpt", tmp_path / "from_ckpt")
    assert not (tmp_path / "from_ckpt").exists()
