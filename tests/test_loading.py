"""The streaming loader: safetensors straight into the host store's layout, no second copy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from lightning_horizon.engine import HorizonEngine
from lightning_horizon.engine.store import HostStore
from lightning_horizon.loading import check_model_dir, load_hf_model
from tests.helpers import make_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path, family="llama", tied=False, shard="20KB", **kw):
    model = tiny_model(family, tied=tied, **kw)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    return model


@pytest.mark.parametrize(
    "family,tied,shard", [("llama", True, "20KB"), ("qwen2", False, "20KB"), ("qwen2", False, "1GB")]
)
def test_loads_exactly_into_store_layout(tmp_path, family, tied, shard):
    ref = saved(tmp_path, family, tied, shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "20KB")
    model = load_hf_model(tmp_path, attn_implementation="eager")
    assert not model.training
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), n
    for (n, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, c), n  # rotary inv_freq re-created exactly
    batch = make_batch(0)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    # the flat buffers are taken over as they are: no copy
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    store = HostStore.adopt(_groups(model))
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == ptrs
    assert {g.master.untyped_storage().data_ptr() for g in store.groups} == set(ptrs)


def test_meta_gives_the_checkpoint_structure_without_reading_a_weight(tmp_path):
    """``meta=True`` (the processes of a data-parallel node that do not fill its store): the checkpoint's own config
    (not a named model's), every tensor on the meta device, tied weights tied, and no weight read (the weight files
    hold garbage here, so reading one would fail)."""
    ref = saved(tmp_path, "qwen2", tied=True, hidden_size=48, shard="1GB")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_model(tmp_path)
    model = load_hf_model(tmp_path, meta=True)
    assert model.config.hidden_size == 48 and not model.training
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]


def _groups(model):
    from lightning_horizon.engine.adapter import describe

    return describe(model).store_groups()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_node_of_a_sharded_store_reads_only_its_layers(tmp_path, monkeypatch, dtype):
    """``node=(rank, nodes)``: the layers other nodes hold (``assign_homes``, as the store assigns them) stay on the
    meta device and their keys are never read; every other parameter equals a full load. Together the nodes read
    every layer once."""
    from lightning_horizon import loading

    tiny_model("qwen2", tied=True, layers=3).save_pretrained(tmp_path)
    full = dict(load_hf_model(tmp_path, dtype=dtype).named_parameters())
    read: list[str] = []
    original = loading.SafetensorsReader.read_into
    monkeypatch.setattr(
        loading.SafetensorsReader,
        "read_into",
        lambda self, key, target: read.append(key) or original(self, key, target),
    )
    layers_read = []
    for node in (0, 1):
        read.clear()
        part = dict(load_hf_model(tmp_path, dtype=dtype, node=(node, 2)).named_parameters())
        meta = {n for n, p in part.items() if p.is_meta}
        assert meta and all(".layers." in n for n in meta)
        assert not meta & set(read) and set(read) == set(part) - meta - {"lm_head.weight"}  # (tied)
        for name, p in part.items():
            assert name in meta or torch.equal(p, full[name]), name
        layers_read.append({n.split(".")[2] for n in set(part) - meta if ".layers." in n})
    assert not layers_read[0] & layers_read[1] and layers_read[0] | layers_read[1] == {"0", "1", "2"}


def test_engine_trains_a_loaded_model(tmp_path):
    ref = saved(tmp_path, "qwen2")
    model = load_hf_model(tmp_path, attn_implementation="eager")
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        batch = make_batch(1)
        loss = model(**batch).loss
        with torch.no_grad():
            want = ref(**batch).loss
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    finally:
        engine.close()


def test_bf16_loading_gives_plain_tensors(tmp_path):
    ref = saved(tmp_path, "llama")
    model = load_hf_model(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16))


def _rewrite(tmp_path, edit):
    """Re-saves the weights as one model.safetensors after `edit(state)`."""
    index = tmp_path / "model.safetensors.index.json"
    state = {}
    from safetensors.torch import load_file

    for f in set(json.loads(index.read_text())["weight_map"].values()):
        state.update(load_file(tmp_path / f))
        os.remove(tmp_path / f)
    index.unlink()
    edit(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    saved(tmp_path)
    _rewrite(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    saved(tmp_path)
    _rewrite(tmp_path, lambda s: s.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected key 'model\.layers\.9\.extra' in .*model\.safetensors"):
        load_hf_model(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    saved(tmp_path)
    _rewrite(tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model\.norm\.weight' in .*model\.safetensors.*\(31,\)"):
        load_hf_model(tmp_path)


def test_inconsistent_tied_weights_are_refused(tmp_path):
    saved(tmp_path, tied=True)
    _rewrite(tmp_path, lambda s: s.update({"lm_head.weight": torch.randn_like(s["model.embed_tokens.weight"])}))
    with pytest.raises(
        ValueError, match=r"(lm_head|embed_tokens).* is tied to .*(lm_head|embed_tokens).*different values"
    ):
        load_hf_model(tmp_path)


def test_missing_shard_is_named(tmp_path):
    saved(tmp_path)
    os.remove(tmp_path / "model-00002-of-00010.safetensors")
    with pytest.raises(ValueError, match="model-00002-of-00010.safetensors, which is missing"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "empty"])
@pytest.mark.parametrize("shard", ["20KB", "1GB"])
def test_unreadable_safetensors_file_is_named(tmp_path, damage, shard):
    saved(tmp_path, shard=shard)
    file = tmp_path / ("model.safetensors" if shard == "1GB" else "model-00003-of-00010.safetensors")
    data = file.read_bytes()
    if damage == "corrupted":
        data = data[:8] + b"\xff" * 16 + data[24:]  # the header's JSON
    file.write_bytes({"corrupted": data, "truncated": data[:-100], "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"cannot read the safetensors file {re.escape(str(file))} .*corrupted or"):
        check_model_dir(tmp_path)  # before anything is built
    with pytest.raises(ValueError, match=rf"cannot read the safetensors file {re.escape(str(file))}"):
        load_hf_model(tmp_path)


def test_model_dir_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path / 'nope'}: no such directory"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="models/nope/x: no such directory"):
        check_model_dir("models/nope/x")  # a relative path, not a hub id (those are org/name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is an empty directory"):
        load_hf_model(tmp_path / "empty")
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights_only has no config.json.*\(it holds model.safetensors\)"):
        load_hf_model(tmp_path / "weights_only")
    check_model_dir("Qwen/Qwen2.5-7B")  # a hub id: left to the download


def test_the_source_generation_config_is_kept(tmp_path):
    model = saved(tmp_path)
    GenerationConfig(temperature=0.7, top_p=0.8, do_sample=True, eos_token_id=[1, 2]).save_pretrained(tmp_path)
    loaded = load_hf_model(tmp_path)
    assert loaded.generation_config.top_p == 0.8 and loaded.generation_config.eos_token_id == [1, 2]
    assert model.generation_config.top_p is None  # not a default


# ------------------------------------------------------------------------------------------ peak host memory
_MAKE = textwrap.dedent(
    """
    import json, sys, torch
    from lightning_horizon.checkpoint import write_safetensors
    out = sys.argv[1]
    h, inter, layers, vocab = 1024, 2816, 16, 32000
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=h, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
               max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="float32")
    json.dump(cfg, open(f"{out}/config.json", "w"))
    def layer(i):
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,)}
    shards = [{"model.embed_tokens.weight": (vocab, h)}]
    for i in range(0, layers, 4):
        shards.append({k: v for j in range(i, i + 4) for k, v in layer(j).items()})
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(k, torch.float32, s) for k, s in shard.items()]
        write_safetensors(f"{out}/{name}", specs, lambda k: torch.randn(shard[k], generator=g) * 0.02, fsync=False)
        weight_map.update({k: name for k in shard})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{out}/model.safetensors.index.json", "w"))
    """
)

_MEASURE = textwrap.dedent(
    """
    import json, os, sys, time, torch
    import lightning_horizon
    from lightning_horizon.checkpoint import save_sharded
    from lightning_horizon.loading import check_model_dir, load_hf_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    src, ckpt = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    reset_peak()
    base = status("VmRSS:")
    t = time.monotonic()
    model = load_hf_model(src)
    load_s = time.monotonic() - t
    load_peak = status("VmHWM:") - base
    masters = sum(p.numel() * 4 for p in model.parameters())
    # optimizer state as AdamW keeps it: two moments per parameter
    params = list(model.named_parameters())
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for i, (_, p) in enumerate(params)}
    layout = {"prefix": "", "groups": [["all", [n for n, _ in params]]], "config": model.config.to_dict(),
              "class": type(model).__name__,
              "optimizers": [{"class": "torch.optim.adamw.AdamW", "param_names": [n for n, _ in params]}]}
    checkpoint = {"state_dict": model.state_dict(), "epoch": 0, "global_step": 3, "horizon_layout": layout,
                  "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-3, "params": list(state)}]}]}
    footprint = masters * 3
    before = status("VmRSS:")
    reset_peak()
    t = time.monotonic()
    save_sharded(checkpoint, ckpt, fsync=False)
    save_s = time.monotonic() - t
    save_peak = status("VmHWM:") - before
    print(json.dumps(dict(masters=masters, footprint=footprint, load_peak=load_peak, save_peak=save_peak,
                          load_s=load_s, save_s=save_s)))
    """
)


@pytest.mark.slow
def test_peak_host_memory_of_loading_and_saving_a_1gb_model(tmp_path):
    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    src.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _MAKE, str(src)], check=True, cwd=ROOT, env=env)
    shards = [p.stat().st_size for p in src.glob("*.safetensors")]
    assert sum(shards) > 1e9
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(src), str(ckpt)],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    print(
        f"\nmasters {r['masters'] / mib:.0f} MiB, largest shard {max(shards) / mib:.0f} MiB: load peak over baseline "
        f"{r['load_peak'] / mib:.0f} MiB in {r['load_s']:.1f} s; save of {r['footprint'] / mib:.0f} MiB "
        f"(masters + Adam state) peak over footprint {r['save_peak'] / mib:.0f} MiB in {r['save_s']:.1f} s"
    )
    small = 64 * mib
    assert r["load_peak"] <= r["masters"] + small  # read with pread, never mapped: no shard in the resident set
    assert r["save_peak"] <= small
