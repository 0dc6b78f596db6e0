"""Gradient parity of the streaming engine against plain Hugging Face autograd (FP32 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_horizon import HorizonEngine
from tests.helpers import VOCAB, clone, make_batch, rel_err, tiny_model

FAMILIES = ["qwen2", "llama"]


def reference_grads(model, batches, scale=1.0):
    model.zero_grad()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        (loss * scale).backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def engine_grads(model, batches, scale=1.0, **config):
    config.setdefault("compute_dtype", "fp32")
    engine = HorizonEngine(model, device="cpu", **config)
    losses = []
    try:
        for batch in batches:
            loss = model(**batch).loss
            (loss * scale).backward()
            losses.append(loss.item())
        return losses, {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        engine.close()


def assert_grads_close(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        err = rel_err(got[name], want[name])
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradient_parity(family, tied, k):
    ref = tiny_model(family, tied=tied, layers=4)
    batch = make_batch(0)
    want_losses, want = reference_grads(clone(ref), [batch])
    got_losses, got = engine_grads(clone(ref), [batch], checkpoint_every=k)
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    assert_grads_close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_accumulation_parity(family):
    """Two micro-batches, loss / 2 each (what Lightning does with accumulate_grad_batches=2): FP32 sum on the host."""
    ref = tiny_model(family, tied=True)
    batches = [make_batch(1), make_batch(2)]
    _, want = reference_grads(clone(ref), batches, scale=0.5)
    _, got = engine_grads(clone(ref), batches, scale=0.5, checkpoint_every=2)
    assert_grads_close(got, want)


def test_logits_path_and_custom_loss():
    """Without labels the model returns logits; a loss computed from them backpropagates through the engine."""
    ref = tiny_model("llama")
    batch = make_batch(3, pad=False)
    ids = batch["input_ids"]

    def custom(model):
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))

    r = clone(ref)
    custom(r).backward()
    want = {n: p.grad.clone() for n, p in r.named_parameters()}
    m = clone(ref)
    engine = HorizonEngine(m, device="cpu", compute_dtype="fp32")
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, r(input_ids=ids).logits, atol=1e-5)
    custom(m).backward()
    engine.finish_backward()
    assert_grads_close({n: p.grad for n, p in m.named_parameters()}, want)
    engine.close()


def test_masters_stay_fp32_and_compute_is_bf16():
    model = tiny_model("qwen2")
    engine = HorizonEngine(model, device="cpu", compute_dtype="bf16")
    try:
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(s.buf.dtype == torch.bfloat16 for s in engine.streamer.slots)
        seen = []
        hook = engine.parts.layers[0].register_forward_hook(lambda m, a, kw, out: seen.append(out), with_kwargs=True)
        loss = model(**make_batch(0)).loss
        hook.remove()
        assert seen and seen[0].dtype == torch.bfloat16
        loss.backward()
        # without accumulation, layer gradients stay in the compute dtype on the host; the optimizer upcasts them
        layer = engine.store.by_name["layers.0"]
        assert layer.grad_lp.dtype == torch.bfloat16 and layer.grad is None
        assert all(engine.gradient(p).dtype == torch.float32 for p in model.parameters())
    finally:
        engine.close()


def test_accumulation_keeps_fp32_gradients():
    model = tiny_model("qwen2")
    engine = HorizonEngine(model, device="cpu", compute_dtype="bf16", accumulate_grads=True)
    try:
        model(**make_batch(0)).loss.backward()
        engine.finish_backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        assert engine.store.by_name["layers.0"].grad is not None
    finally:
        engine.close()


def test_unannounced_accumulation_switches_to_fp32_with_a_warning():
    ref = tiny_model("llama")
    batches = [make_batch(5), make_batch(6)]
    _, want = reference_grads(clone(ref), batches, scale=0.5)
    m = clone(ref)
    engine = HorizonEngine(m, device="cpu", compute_dtype="fp32")  # fp32 compute: exact, no warning needed
    engine.sink.dtype = torch.bfloat16  # pretend the compute dtype is narrow to see the warning path
    try:
        (m(**batches[0]).loss * 0.5).backward()
        with pytest.warns(UserWarning, match="gradient accumulation detected"):
            (m(**batches[1]).loss * 0.5).backward()
        engine.finish_backward()
        assert_grads_close({n: p.grad for n, p in m.named_parameters()}, want)
    finally:
        engine.close()


def test_bf16_loss_close_to_fp32():
    ref = tiny_model("qwen2")
    batch = make_batch(4)
    want = ref(**batch).loss.item()
    m = clone(ref)
    engine = HorizonEngine(m, device="cpu", compute_dtype="bf16")
    got = m(**batch).loss.item()
    engine.close()
    assert abs(got - want) < 2e-2


def test_state_dict_keys_unchanged_and_views_into_store():
    ref = tiny_model("qwen2", tied=True)
    keys = list(ref.state_dict().keys())
    engine = HorizonEngine(ref, device="cpu", compute_dtype="fp32")
    try:
        assert list(ref.state_dict().keys()) == keys
        embed = engine.store.by_name["embed"]
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
        assert ref.model.embed_tokens.weight.data_ptr() == embed.master.data_ptr()
        assert "lm_head" not in engine.store.by_name  # tied weights stored once
        layer = engine.store.by_name["layers.1"]
        ptrs = [p.data_ptr() for p in ref.model.layers[1].parameters()]
        lo, hi = layer.master.data_ptr(), layer.master.data_ptr() + layer.master.numel() * 4
        assert all(lo <= p < hi for p in ptrs)
    finally:
        engine.close()


def test_refuses_non_decoder_model_with_clear_message():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="encoder-decoder"):
        HorizonEngine(model, device="cpu")


def test_plain_pytorch_loop_matches_optimizer_step():
    """The README's Lightning-free loop: engine.step(optimizer) equals optimizer.step() after the backward."""
    ref = tiny_model("llama", tied=True)
    m = clone(ref)
    engine = HorizonEngine(m, device="cpu", compute_dtype="fp32", checkpoint_every=2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        batch = make_batch(10 + step)
        loss_ref = ref(**batch).loss
        loss_ref.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt_ref.zero_grad()
        loss = m(**batch).loss
        loss.backward()
        engine.clip_grad_norm_(0.5)
        engine.step(opt)
        opt.zero_grad()
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    engine.synchronize()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert rel_err(p, q) < 1e-5, n
    sd, sd_ref = opt.state_dict(), opt_ref.state_dict()
    assert sd["state"].keys() == sd_ref["state"].keys()
    assert float(sd["state"][0]["step"]) == 5.0
    engine.close()


def _train_resident(resident: int, steps: int = 3, micro: int = 2):
    model = tiny_model("qwen2", layers=4)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", resident_layers=resident, accumulate_grads=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, uploads = [], []
    try:
        assert engine.num_resident_slots == min(resident, 3)  # 4 layers + head = 5 units, 2 slots already
        for step in range(steps):
            before = engine.stats["num_uploads"]
            for m in range(micro):
                loss = model(**make_batch(10 * step + m)).loss
                loss.backward()
                losses.append(loss.item())
            engine.step(opt)
            engine.synchronize()
            uploads.append(engine.stats["num_uploads"] - before)
        return losses, uploads, {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        engine.close()


def test_resident_slots_reuse_layers_between_passes_and_micro_batches():
    """With a slot for every unit, each unit is uploaded once per weight version (once per step), not once per pass;
    results are the same as with two slots."""
    base_losses, base_uploads, base_weights = _train_resident(0)
    losses, uploads, weights = _train_resident(10)
    assert base_uploads[0] > 2 * 5  # two slots: each micro-batch's forward and backward upload again
    assert uploads == [5, 5, 5]  # every slot: 4 layers + head, once per step
    assert losses == base_losses
    for name, w in base_weights.items():
        assert torch.equal(weights[name], w), name
    _, some, _ = _train_resident(1)
    assert 5 < some[0] < base_uploads[0]


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_resident_slots_added_after_the_first_step(family):
    """The automatic path: slots added once the first step has run (hooks installed, MoE router and expert hooks on
    the new templates) train exactly like two slots."""
    from tests.test_sparse_experts import moe_model

    ref = moe_model("mixtral") if family == "mixtral" else tiny_model("qwen2", layers=4)
    runs = []
    for extra in (0, 8):
        model = clone(ref)
        engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", resident_layers=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        try:
            for step in range(3):
                loss = model(**make_batch(step, batch=1, seq=5, pad=False)).loss
                loss.backward()
                losses.append(loss.item())
                engine.step(opt)
                if step == 0:  # what resident_layers=None does on CUDA with spare memory for `extra` slots
                    engine.add_resident_slots(extra)
            engine.synchronize()
            assert engine.num_resident_slots == (min(extra, len(engine.units) - 2))
            runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
        finally:
            engine.close()
    assert runs[0][0] == runs[1][0]
    for name, w in runs[0][1].items():
        assert torch.equal(runs[1][1][name], w), name


def _train_kept(ref, keep: int, k: int, steps: int = 3, resident: int = 8):
    model = clone(ref)
    engine = HorizonEngine(
        model, device="cpu", compute_dtype="fp32", checkpoint_every=k, resident_layers=resident, keep_activations=keep
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], None
    try:
        for step in range(steps):
            loss = model(**make_batch(step, batch=1, seq=5, pad=False)).loss
            loss.backward()
            losses.append(loss.item())
            if grads is None:
                grads = {n: engine.gradient(p).clone() for n, p in model.named_parameters()}
            engine.step(opt)
        engine.synchronize()
        assert engine.streamer.num_unclaimed() == len(engine.streamer.slots)  # every kept slot was released
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return losses, grads, weights, engine.stats["num_layer_runs"]  # streamed forward, recomputation, backward
    finally:
        engine.close()


@pytest.mark.parametrize("family,k,keep", [("qwen2", 1, 2), ("qwen2", 2, 3), ("qwen2", 1, 4), ("mixtral", 1, 1)])
def test_kept_layers_match_recomputation(family, k, keep):
    """Layers that keep their forward graph give exactly the gradients and weights of recomputation, and their
    forward runs once instead of twice (MoE: router aux loss and expert-sparse streaming through kept layers)."""
    from tests.test_sparse_experts import moe_model

    ref = moe_model("mixtral") if family == "mixtral" else tiny_model("qwen2", layers=4)
    base_losses, base_grads, base_weights, base_runs = _train_kept(ref, 0, k)
    losses, grads, weights, runs = _train_kept(ref, keep, k)
    assert losses == base_losses
    for name, g in base_grads.items():
        assert torch.equal(grads[name], g), name
    for name, w in base_weights.items():
        assert torch.equal(weights[name], w), name
    layers = len(ref.model.layers)
    slots = min(2 + 8, layers + 1)  # resident=8, at most one slot per unit
    kept = layers - -(-(layers - min(keep, slots - 2, layers)) // k) * k  # whole segments at the end
    assert kept > 0 and base_runs - runs >= 3 * 2 * kept  # each step: kept layers run once, not twice


def test_kept_layers_are_capped_by_free_slots():
    """Without spare slots nothing is kept (two slots must stay free for streaming), and training is unchanged."""
    ref = tiny_model("qwen2", layers=4)
    base = _train_kept(ref, 0, 1, resident=0)
    capped = _train_kept(ref, 10, 1, resident=0)
    assert capped[0] == base[0] and capped[3] == base[3]


def test_dropped_pass_releases_kept_slots():
    """A forward whose loss is dropped without a backward does not leak the kept layers' slots."""
    model = tiny_model("qwen2", layers=4)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", resident_layers=8, keep_activations=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        total = len(engine.streamer.slots)
        loss = model(**make_batch(0)).loss
        assert engine.streamer.num_unclaimed() == total - 3
        del loss
        for step in range(2):
            model(**make_batch(step)).loss.backward()
            engine.step(opt)
        engine.synchronize()
        assert engine.streamer.num_unclaimed() == total
    finally:
        engine.close()


def test_sized_kept_count_shrinks_for_longer_passes():
    """keep_activations=None: the count sized from the first step (set here as a CUDA step would) holds for passes
    of up to that step's tokens, and shrinks in proportion for longer ones (a layer's graph grows with its tokens)."""
    model = tiny_model("qwen2", layers=6)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", resident_layers=8, keep_activations=None)
    try:
        total = len(engine.streamer.slots)
        runner = engine.runner  # as the first step on CUDA sizes it, from 2 x 12 tokens:
        runner.keep_layers, runner.graph_tokens, runner.keep_sized = 4, 24, True
        for seq, kept in ((12, 4), (6, 4), (24, 2), (48, 1), (60, 0)):
            loss = model(**make_batch(0, seq=seq)).loss
            assert total - engine.streamer.num_unclaimed() == kept, seq
            loss.backward()
            assert engine.streamer.num_unclaimed() == total
    finally:
        engine.close()


@pytest.mark.parametrize("micro", [1, 2], ids=["direct", "fold"])
@pytest.mark.parametrize("frozen", ["embedding_and_layer0", "layer1_attention"])
def test_frozen_parameters_match_plain_pytorch(frozen, micro):
    """Partial fine-tuning: frozen parameters (a whole unit, or part of one) get no gradient and stay unchanged;
    the trainable ones match plain PyTorch, with and without accumulation."""
    ref = tiny_model("llama", layers=3)
    for name, p in ref.named_parameters():
        if frozen == "embedding_and_layer0":
            p.requires_grad_(not (name.startswith("model.embed_tokens") or name.startswith("model.layers.0.")))
        else:
            p.requires_grad_(not name.startswith("model.layers.1.self_attn."))
    m = clone(ref)
    for (_, p), q in zip(ref.named_parameters(), m.parameters()):
        q.requires_grad_(p.requires_grad)
    engine = HorizonEngine(m, device="cpu", compute_dtype="fp32", accumulate_grads=micro > 1)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    try:
        for step in range(3):
            for k in range(micro):
                batch = make_batch(10 * step + k)
                ref(**batch).loss.backward()
                m(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 0.5)
            opt_ref.step()
            opt_ref.zero_grad()
            engine.clip_grad_norm_(0.5)
            engine.step(opt)
        engine.synchronize()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            assert rel_err(p, q) < 1e-5, name
            if not p.requires_grad:
                assert engine.gradient(p) is None, name
    finally:
        engine.close()


def test_kept_layers_leave_the_large_slots_to_the_head():
    """A head larger than a layer fits only the two original slots: with three layers holding slots until their
    backward, the head still streams and results match recomputation."""
    ref = tiny_model("qwen2", layers=4, vocab_size=4096)  # head 4096 x 32 > one layer
    engine = HorizonEngine(clone(ref), device="cpu", compute_dtype="fp32", resident_layers=8, keep_activations=8)
    head, layer = engine.units[engine.head_uid].numel, max(u.numel for u in engine.units[: engine.head_uid])
    engine.close()
    assert head > layer
    base = _train_kept(ref, 0, 1)
    kept = _train_kept(ref, 8, 1)  # capped at (5 slots - 2) = 3 kept layers
    assert kept[0] == base[0] and base[3] - kept[3] == 3 * 2 * 3


def test_compiled_layers_match_eager():
    """compile_layers: the same losses, gradients and weights as eager layers, and every slot's template shares the
    compiled graphs (one forward graph without grad and one with, not one per slot or layer)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = tiny_model("qwen2", layers=4)
    results = []
    for compiled in (False, True):
        model = clone(ref)
        engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", resident_layers=2, compile_layers=compiled)
        # SGD: AdamW would blow up rounding noise in gradients that are zero in exact arithmetic (k_proj.bias)
        opt = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9)
        losses = []
        try:
            for step in range(2):
                loss = model(**make_batch(step)).loss
                loss.backward()
                losses.append(loss.item())
                grads = {n: engine.gradient(p).clone() for n, p in model.named_parameters()}
                engine.step(opt)
            engine.synchronize()
            results.append((losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
        finally:
            engine.close()
    (want_losses, want_grads, want_weights), (losses, grads, weights) = results
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert_grads_close(grads, want_grads, tol=1e-4)
    assert_grads_close(weights, want_weights, tol=1e-5)
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_default_compiles_only_where_kernels_can_be_built(monkeypatch):
    """compile_layers=None: eager on the CPU; on CUDA eager (with a log note) when Triton or a C compiler is missing."""
    from lightning_horizon.engine import config

    engine = HorizonEngine(tiny_model("qwen2", layers=2), device="cpu", compute_dtype="fp32")
    try:
        assert engine.bank.compiled == set()
    finally:
        engine.close()
    monkeypatch.setattr(config.shutil, "which", lambda name: None)
    assert config.can_compile() is False


def test_model_zero_grad_forgets_the_engines_gradients():
    """``model.zero_grad()`` between two backwards (instead of ``optimizer.zero_grad()``): the second gradients are
    those of the second backward alone, not a sum with the host-held first ones."""
    base = tiny_model("qwen2", tied=True)
    batch = make_batch(0)
    _, want = reference_grads(clone(base), [batch])
    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        for _ in range(2):
            model.zero_grad()
            model(**batch).loss.backward()
            assert_grads_close({n: p.grad.clone() for n, p in model.named_parameters()}, want)
    finally:
        engine.close()
    assert "zero_grad" not in model.__dict__  # closing gives the model its own zero_grad back


def test_zero_grad_of_a_module_holding_the_model_forgets_the_engines_gradients():
    """The same through a module that holds the model (a LightningModule, a PEFT wrapper): its ``zero_grad()``."""
    base = tiny_model("qwen2")
    batch = make_batch(1)
    _, want = reference_grads(clone(base), [batch])
    holder = torch.nn.ModuleDict({"model": clone(base)})
    model = holder["model"]
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    engine.guard_zero_grad(holder)
    try:
        for _ in range(2):
            holder.zero_grad()
            model(**batch).loss.backward()
            assert_grads_close({n: p.grad.clone() for n, p in model.named_parameters()}, want)
    finally:
        engine.close()
    assert "zero_grad" not in holder.__dict__ and "zero_grad" not in model.__dict__


def test_cast_on_gpu_is_decided_by_the_device_and_the_weight_copy():
    """``cast_on_gpu=None`` (default) uploads the FP32 masters and casts on the GPU exactly when a CUDA run has no
    weight copy; it never applies on the CPU (layers are used in place) or beside the copy (uploads read the copy)."""
    from lightning_horizon.engine.config import EngineConfig, resolve

    def cast(**kw):
        return resolve(EngineConfig(host_kernels=False, compile_layers=False, **kw)).cast_on_gpu

    assert cast(device="cuda:0", weight_copy=False) is True
    assert cast(device="cuda:0", weight_copy=False, cast_on_gpu=False) is False
    assert cast(device="cuda:0", weight_copy=True) is False
    assert cast(device="cpu", weight_copy=False, cast_on_gpu=True) is False
    default = resolve(EngineConfig(device="cuda:0", host_kernels=False, compile_layers=False))
    assert default.cast_on_gpu is True and default.weight_copy is False  # weight_copy=None: no copy to keep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_rows_scattered_in_chunks_give_the_same_sums_bit_for_bit(dtype):
    from lightning_horizon.engine.gradients import scatter_rows_

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (101,), generator=gen)  # many repeats: the order of the additions matters
    rows = torch.randn(101, 5, generator=gen).mul(torch.logspace(-4, 4, 101).unsqueeze(1)).to(dtype)
    want = torch.randn(7, 5, generator=gen)
    got = want.clone()
    want.index_add_(0, ids, rows.to(torch.float32))
    for chunk_numel in (1, 5, 15, 499, 10**6):
        got_chunked = got.clone()
        scatter_rows_(got_chunked, ids, rows, chunk_numel)
        assert torch.equal(got_chunked, want), chunk_numel
    empty = got.clone()
    scatter_rows_(empty, ids[:0], rows[:0], 5)
    assert torch.equal(empty, got)


def test_engine_scatters_the_embedding_gradient_in_chunks(monkeypatch):
    from lightning_horizon.engine import gradients

    batches = [make_batch(0, batch=2, seq=16), make_batch(1, batch=2, seq=16)]
    model = tiny_model("qwen2", tied=False)
    _, whole = engine_grads(clone(model), batches)
    calls = []
    scatter = gradients.scatter_rows_
    monkeypatch.setattr(gradients, "scatter_rows_", lambda *a: calls.append((len(a[2]), a[3])) or scatter(*a))
    monkeypatch.setattr(gradients, "EMBEDDING_FOLD_NUMEL", model.config.hidden_size * 3)
    _, chunked = engine_grads(clone(model), batches)
    # the rows come to the host 3 at a time too: 11 chunks of each batch's 32 tokens, the last one of 2
    assert [rows for rows, _ in calls] == ([3] * 10 + [2]) * 2
    assert {numel for _, numel in calls} == {model.config.hidden_size * 3}
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


@pytest.mark.parametrize("family,tied,dtype", [("qwen2", False, "fp32"), ("llama", True, "bf16")])
def test_engine_gathers_the_embedding_rows_in_chunks(monkeypatch, family, tied, dtype):
    """The forward's embedding lookup reads the FP32 masters ``EMBEDDING_FOLD_NUMEL`` elements at a time (here 3
    rows, 11 chunks for 32 tokens, the last one partial): the same losses and gradients as one lookup of the whole
    batch, bit for bit."""
    from lightning_horizon.engine import gradients

    batches = [make_batch(0, batch=2, seq=16), make_batch(1, batch=2, seq=16)]
    model = tiny_model(family, tied=tied)
    whole = engine_grads(clone(model), batches, compute_dtype=dtype)
    embedding = torch.nn.functional.embedding
    rows = []

    def spy(ids, weight, *args, **kwargs):
        if weight.shape == model.get_input_embeddings().weight.shape:
            rows.append(ids.numel())
        return embedding(ids, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "embedding", spy)
    monkeypatch.setattr(gradients, "EMBEDDING_FOLD_NUMEL", model.config.hidden_size * 3)
    chunked = engine_grads(clone(model), batches, compute_dtype=dtype)
    assert rows and max(rows) == 3 and sum(rows) == 2 * 32, rows
    assert chunked[0] == whole[0]
    for name in whole[1]:
        assert torch.equal(chunked[1][name], whole[1][name]), name


def test_embedding_gradient_in_chunks_leaves_the_padding_row_without_gradient(monkeypatch):
    """An untied embedding with a padding id: its rows come to the host 3 at a time, the padding id's rows are dropped
    in each chunk (``nn.Embedding`` gives that row no gradient), and the gradients equal Hugging Face's."""
    from lightning_horizon.engine import gradients

    ref = tiny_model("qwen2", tied=False, pad_token_id=5)
    batch = make_batch(4, batch=2, seq=16)
    batch["input_ids"][0, -4:] = 5
    batch["input_ids"][1, 3] = 5
    want_model = clone(ref)
    want_model(**batch).loss.backward()
    want = {n: p.grad for n, p in want_model.named_parameters()}
    monkeypatch.setattr(gradients, "EMBEDDING_FOLD_NUMEL", ref.config.hidden_size * 3)
    _, got = engine_grads(clone(ref), [batch])
    assert torch.equal(got["model.embed_tokens.weight"][5], torch.zeros_like(want["model.embed_tokens.weight"][5]))
    assert_grads_close(got, want)


def test_close_frees_the_slots_and_leaves_the_model_usable():
    """``close`` gives the slots' memory back at once (on a GPU: without waiting for a garbage collection to find an
    engine kept alive by a reference cycle); the model then runs as an ordinary CPU model with the trained weights."""
    model = tiny_model("llama", layers=2)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", resident_layers=0, keep_activations=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(0)
    model(**batch).loss.backward()
    engine.step(opt)
    slots = list(engine.streamer.slots)
    assert slots and all(s.buf.untyped_storage().nbytes() > 0 for s in slots)
    engine.close()
    assert all(s.buf.untyped_storage().nbytes() == 0 for s in slots)
    plain = clone(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)


@pytest.mark.parametrize("path", ["labels", "logits"])
def test_tied_embedding_gradient_summed_on_the_compute_device(path):
    """A tied lm_head's gradient stays on the compute device in FP32 until the embedding's rows are added to it, and
    the sum lands in the host's FP32 buffer once (no compute-dtype copy of it on the host). Same gradients as Hugging
    Face, with a padding row (nn.Embedding gives it no gradient; the lm_head's part of that row stays), through the
    loss path and through a loss computed from the logits."""
    ref = tiny_model("qwen2", tied=True, pad_token_id=5)
    batch = make_batch(4)
    batch["input_ids"][0, -2:] = 5
    if path == "logits":
        labels = batch.pop("labels")

    def loss_of(model):
        if path == "labels":
            return model(**batch).loss
        logits = model(**batch).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))

    want_model = clone(ref)
    loss_of(want_model).backward()
    want = {n: p.grad for n, p in want_model.named_parameters()}
    assert want["model.embed_tokens.weight"][5].abs().sum() > 0  # the lm_head's part of the padding row
    model = clone(ref)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        loss_of(model).backward()
        group, sp = engine.store.entry(model.model.embed_tokens.weight)
        assert engine.sink.direct and group.grad_lp is None  # the head's part never landed in the compute dtype
        assert engine.runner.tied_grad is None
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        engine.close()
    assert_grads_close(got, want)


@pytest.mark.parametrize("then", ["step", "zero_grad"])
def test_tied_head_gradient_without_an_embedding_backward(then):
    """``inputs_embeds`` (a leaf here): the backward has no embedding node, so the tied weight's gradient is the
    head's part alone, held on the compute device when the backward ends. The step must apply it (weights as plain
    PyTorch's after one AdamW step), and zero_grad must discard it (the step then leaves the tied weight as it is)."""
    ref = tiny_model("qwen2", tied=True)
    batch = make_batch(5, pad=False)
    embeds = torch.randn(*batch["input_ids"].shape, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def one_step(model, engine=None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(inputs_embeds=embeds, labels=batch["labels"]).loss.backward()
        if then == "zero_grad":
            model.zero_grad()
        if engine is not None:
            engine.step(opt)
        else:
            opt.step()

    want = clone(ref)
    one_step(want)
    got = clone(ref)
    engine = HorizonEngine(got, device="cpu", compute_dtype="fp32")
    try:
        one_step(got, engine)
        engine.synchronize()
        assert engine.runner.tied_grad is None
    finally:
        engine.close()
    weight = "model.embed_tokens.weight"
    moved = dict(got.named_parameters())[weight].ne(dict(ref.named_parameters())[weight]).any()
    assert bool(moved) == (then == "step")
    for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters()):
        assert rel_err(a.detach(), b.detach()) < 1e-5, name


def test_worker_counts_event_waits_apart_from_its_work():
    """``wait_s`` (a job blocked on a copy's event) is part of ``busy_s`` and reported per worker in the stats."""
    import time

    from lightning_horizon.engine.workers import WorkerGroup

    class SlowEvent:
        def synchronize(self):
            time.sleep(0.05)

    workers = WorkerGroup()
    worker = workers.worker("test")
    try:
        worker.submit(lambda: (worker.wait_event(SlowEvent()), time.sleep(0.02)))
        worker.drain()
        assert 0.05 <= worker.wait_s < worker.busy_s
        assert worker.busy_s - worker.wait_s >= 0.02
    finally:
        workers.close()

    model = tiny_model("llama")
    engine = HorizonEngine(model, device="cpu")
    stats = engine.stats
    engine.close()
    assert stats["fold_wait_s"] == stats["optimizer_wait_s"] == 0.0  # the CPU path has no copy events
