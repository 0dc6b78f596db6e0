"""CUDA checks (run on a machine with an NVIDIA GPU: `pytest -m gpu`)."""

from __future__ import annotations

import gc

import lightning as L
import pytest
import torch

import lightning_horizon  # noqa: F401
from lightning_horizon import HorizonEngine
from tests.helpers import LMModule, clone, loader, make_batch, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
NOISE_ONLY = ("k_proj.bias",)


def normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def cpu_reference(ref, batch):
    r = clone(ref)
    loss = r(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in r.named_parameters()}


@pytest.mark.parametrize("family,tied,k", [("qwen2", False, 1), ("llama", True, 2), ("qwen2", True, 3)])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_gradient_parity(family, tied, k, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model(family, tied=tied, layers=4, hidden_size=128, intermediate_size=256, attn_implementation="sdpa")
    batch = make_batch(0, batch=2, seq=64)
    want_loss, want = cpu_reference(ref, batch)
    m = clone(ref)
    engine = HorizonEngine(m, device="cuda", compute_dtype=dtype, checkpoint_every=k)
    try:
        loss = m(**batch).loss
        loss.backward()
        assert abs(loss.item() - want_loss) < (1e-4 if dtype == "fp32" else 2e-2)
        embed_group, _ = engine.store.entry(m.model.embed_tokens.weight)
        if tied:  # the head's part is summed with the embedding's rows on the GPU and lands in FP32: no BF16 buffer
            assert embed_group.grad_lp is None
        for name, p in m.named_parameters():
            grad = engine.gradient(p)
            assert grad is not None and grad.device.type == "cpu" and grad.dtype == torch.float32
            if name.endswith(NOISE_ONLY):
                continue
            assert normwise(grad, want[name]) < tol, name
    finally:
        engine.close()


def test_cuda_lightning_training_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model("llama", tied=True)
    runs = []
    for accelerator in ("gpu", "cpu"):
        module = LMModule(clone(ref), total=8)
        trainer = L.Trainer(
            strategy="horizon",
            accelerator=accelerator,
            devices=1,
            max_steps=8,
            precision="32-true",
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(module, loader(8))
        if accelerator == "gpu":
            assert module.device.type == "cuda"
        runs.append(module)
    for a, b in zip(runs[0].losses, runs[1].losses):
        assert a == pytest.approx(b, rel=1e-4)


def test_qwen2_1_5b_shape_trains_within_gpu_memory_bound():
    """A Qwen2.5-1.5B-shaped random model: 10 steps, loss falls, GPU peak far below the model's size."""
    from transformers import Qwen2Config

    from lightning_horizon import HorizonStrategy
    from lightning_horizon.benchmark import run

    cfg = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    # The bound is for streaming alone: resident slots and kept layers use spare GPU memory on purpose.
    strategy = HorizonStrategy(resident_layers=0, keep_activations=0)
    result = run(cfg, batch_size=2, seq_len=1024, steps=10, warmup=2, strategy=strategy)
    print(result.row())
    assert result.losses[-1] < result.losses[0]
    layer = 1536 * (1536 + 2 * 256 + 1536) + 3 * 1536 * 8960 + 1536 * 2 + 2 * 256  # weights of one layer
    head = 151936 * 1536
    unit_bytes = 2 * max(layer, head)
    activations = 28 * 2 * 1024 * 1536 * 2 + 2 * 1024 * (16 * 1536 + 6 * 8960) * 2  # checkpoints + one layer
    loss_chunk = 2048 * 151936 * 12
    bound = 3 * unit_bytes + activations + loss_chunk + 2 * 2**30  # + CUDA context / allocator slack
    assert result.gpu_peak_gib * 2**30 < bound


@pytest.mark.parametrize("compiled", [False, None], ids=["eager", "default"])
def test_no_device_wide_synchronisation_inside_a_step(monkeypatch, compiled):
    """Slot reuse, uploads and gradient copies are ordered by events only: the engine never synchronises the device
    (with compiled layers, from the second step on: Inductor's compilation in the first step synchronises)."""
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(1), real(*a, **k)))
    ref = tiny_model("qwen2", layers=6, hidden_size=256, intermediate_size=512, attn_implementation="sdpa")
    engine = HorizonEngine(ref, device="cuda", compute_dtype="bf16", compile_layers=compiled)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    try:
        for step in range(4):
            if step == 1 and compiled is None:
                calls.clear()
            loss = ref(**make_batch(step, batch=2, seq=64)).loss
            loss.backward()
            engine.step(opt)
        assert calls == []
    finally:
        engine.close()


def _peak_after_steps(layers: int, offload: bool, dtype: str = "bf16", width: int = 1024, steps: int = 2):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = tiny_model(
        "llama", layers=layers, hidden_size=width, intermediate_size=width * 11 // 4, attn_implementation="sdpa"
    )
    engine = HorizonEngine(
        model, device="cuda", compute_dtype=dtype, offload_checkpoints=offload, resident_layers=0, keep_activations=0
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grads = None
    try:
        for step in range(steps):
            batch = make_batch(0, batch=8, seq=1024)
            batch["input_ids"] = batch["input_ids"] % 128
            loss = model(**batch).loss
            loss.backward()
            if step == 0:
                grads = {n: engine.gradient(p).clone() for n, p in model.named_parameters()}
            engine.step(opt)
        engine.synchronize()
        return torch.cuda.max_memory_allocated(), grads
    finally:
        engine.close()


@pytest.mark.parametrize("upload", ["cast", "copy", "pack"])
def test_close_gives_the_gpu_memory_back_at_once(upload):
    """A closed engine holds no GPU memory, without waiting for a garbage collection: the FP32 cast stage of
    ``cast_on_gpu`` once stayed allocated until one, and a deeper model's run then measured the shallower one's."""
    settings = {"cast": {}, "copy": {"weight_copy": True}, "pack": {"cast_on_gpu": False}}[upload]

    def run_one() -> None:
        model = tiny_model("llama", layers=2, hidden_size=256, intermediate_size=704)
        engine = HorizonEngine(model, device="cuda", resident_layers=0, keep_activations=0, **settings)
        try:
            assert bool(engine.config.cast_on_gpu) == (upload == "cast")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            model(**make_batch(0, batch=2, seq=64)).loss.backward()
            engine.step(opt)
            engine.synchronize()
        finally:
            engine.close()

    gc.disable()  # what is freed must be freed by close, not by a collection
    try:
        run_one()  # the first run's lasting allocations (library workspaces) happen here
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        run_one()
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
    finally:
        gc.enable()
    assert after - before < 2**20, f"{(after - before) / 2**20:.1f} MiB of GPU memory still allocated after close"


def test_offloaded_checkpoints_keep_gpu_memory_independent_of_depth():
    shallow, _ = _peak_after_steps(8, offload=True)
    deep, _ = _peak_after_steps(16, offload=True)
    resident, _ = _peak_after_steps(16, offload=False)
    print(
        f"peak allocated: 8 layers {shallow / 2**20:.0f} MiB, 16 layers {deep / 2**20:.0f} MiB (offloaded), "
        f"16 layers {resident / 2**20:.0f} MiB (resident checkpoints)"
    )
    assert deep < 1.05 * shallow
    assert resident > deep
    # Same gradients either way, checked in FP32 (BF16 attention backward is not bitwise deterministic run to run,
    # so a BF16 comparison only measures that noise).
    torch.backends.cuda.matmul.allow_tf32 = False
    _, offloaded = _peak_after_steps(4, offload=True, dtype="fp32", width=256, steps=1)
    _, resident_grads = _peak_after_steps(4, offload=False, dtype="fp32", width=256, steps=1)
    for name, g in resident_grads.items():
        assert normwise(offloaded[name], g) < 1e-5, name


@pytest.mark.parametrize("mode", ["direct", "nocopy"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_sparse_experts_match_dense(dtype, mode, monkeypatch):
    """Expert-sparse streaming on CUDA: the routing pre-hook, partial uploads and partial gradient rows give the
    dense engine's losses and weights after 3 AdamW steps, with fewer bytes each way. ``nocopy``: experts are packed
    from the FP32 masters through the small pinned pool, here of 1,000 elements so every upload takes many chunks."""
    from lightning_horizon.engine import streamer
    from tests.test_sparse_experts import moe_model, run_engine

    monkeypatch.setattr(streamer, "EXPERT_STAGING_NUMEL", 1000)
    ref = moe_model("mixtral")
    dense = run_engine(ref, sparse=False, mode=mode, device="cuda", dtype=dtype)
    sparse = run_engine(ref, sparse=True, mode=mode, device="cuda", dtype=dtype)
    assert sparse[0] == pytest.approx(dense[0], rel=1e-6)
    for name, w in dense[3].items():
        assert normwise(sparse[3][name], w) < 1e-6, name
    assert sparse[5]["bytes_h2d"] < 0.9 * dense[5]["bytes_h2d"]
    assert sparse[5]["bytes_d2h"] < 0.9 * dense[5]["bytes_d2h"]


def test_cuda_resume_from_checkpoint(tmp_path):
    """A horizon checkpoint written during a CUDA run resumes on CUDA: 10 + resume + 10 steps equal 20 steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.test_checkpoint import fit

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model("llama", tied=True)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    full, _ = fit(clone(ref), 20, loader(20), callbacks=[cb], accelerator="gpu")
    resumed, trainer = fit(clone(ref), 20, loader(20), ckpt_path=tmp_path / "epoch=0-step=10.ckpt", accelerator="gpu")
    assert trainer.global_step == 20
    assert resumed.losses == pytest.approx(full.losses[10:], rel=1e-5)
    for (name, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        assert normwise(p, q) < 1e-5, name


@pytest.mark.parametrize("mode", ["fold", "nocopy"])
def test_cuda_host_kernels_match_torch_ops(mode):
    """On CUDA (host kernels on by default): accumulated gradients folded by the kernel, split across slabs, and
    uploads packed by the kernel train like the engine with torch ops."""
    from lightning_horizon.engine import footprint
    from tests.test_sparse_experts import moe_model

    ref = moe_model("mixtral")
    results = []
    for kernels in (True, False):
        model = clone(ref)
        real = footprint.MAX_SLAB_NUMEL
        footprint.MAX_SLAB_NUMEL = 999  # every layer's and the head's gradient spans several slabs
        try:
            engine = HorizonEngine(model, device="cuda", compute_dtype="fp32", host_kernels=kernels,
                                   accumulate_grads=mode == "fold", weight_copy=mode != "nocopy", cast_on_gpu=False,
                                   track_grad_norm=True)  # fmt: skip
        finally:
            footprint.MAX_SLAB_NUMEL = real
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        norms = []
        try:
            for step in range(3):
                for m in range(2 if mode == "fold" else 1):
                    model(**make_batch(10 * step + m, batch=1, seq=5, pad=False)).loss.backward()
                engine.finish_backward()
                norms.append(float(engine.clip_grad_norm_(0.5)))
                engine.step(opt)
            engine.synchronize()
        finally:
            engine.close()
        results.append((norms, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (k_norms, k_weights), (t_norms, t_weights) = results
    assert k_norms == pytest.approx(t_norms, rel=1e-5)
    for name, w in t_weights.items():
        assert normwise(k_weights[name], w) < 1e-5, name


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_masters_cast_on_the_gpu_train_like_the_weight_copy_and_cpu_packing(dtype, monkeypatch):
    """``cast_on_gpu`` (the default without a weight copy): uploads copy the page-locked FP32 masters to the GPU in
    chunks (here of 1,000 elements, so every layer takes many) and cast them there. Losses and weights after 5 AdamW
    steps with clipping equal those of uploads from the BF16 weight copy and of CPU packing, which round the same
    masters the same way (round to nearest even); its uploads carry the FP32 bytes (2x the BF16 ones)."""
    from lightning_horizon.engine import streamer

    monkeypatch.setattr(streamer, "CAST_STAGE_NUMEL", 1000)
    ref = tiny_model("qwen2", tied=True)
    runs = {}
    for mode, config in {
        "cast": dict(weight_copy=False),
        "copy": dict(weight_copy=True),
        "pack": dict(weight_copy=False, cast_on_gpu=False),
    }.items():
        model = clone(ref)
        engine = HorizonEngine(model, device="cuda", compute_dtype=dtype, track_grad_norm=True, **config)
        assert engine.config.cast_on_gpu == (mode == "cast")
        if mode == "cast":  # page-locked in place, so the DMA reads the masters themselves
            assert all(g.master.is_pinned() for g in engine.store.groups)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        try:
            for step in range(5):
                loss = model(**make_batch(step, batch=2, seq=64)).loss
                loss.backward()
                losses.append(loss.item())
                engine.clip_grad_norm_(0.5)
                engine.step(opt)
            engine.synchronize()
            uploaded = engine.streamer.bytes_h2d / engine.streamer.num_uploads
        finally:
            engine.close()
        runs[mode] = losses, {n: p.detach().clone() for n, p in model.named_parameters()}, uploaded
    cast_losses, cast_weights, cast_bytes = runs["cast"]
    for mode in ("copy", "pack"):
        losses, weights, uploaded = runs[mode]
        assert cast_losses == pytest.approx(losses, rel=1e-6), mode
        for name, w in weights.items():
            assert normwise(cast_weights[name], w) < 1e-6, (mode, name)
        assert cast_bytes == pytest.approx(uploaded * (2 if dtype == "bf16" else 1), rel=0.01), mode


def test_rows_added_on_cuda_give_the_same_sums_on_every_run():
    """The tied head's FP32 gradient on the GPU receives the embedding's rows, with every repeated token id added to
    one row (``add_rows_``): five runs give the same sums bit for bit (CUDA's ``index_add_`` adds repeats with atomics
    in no fixed order), within float rounding of a float64 sum."""
    from lightning_horizon.engine.gradients import add_rows_

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16384,), generator=gen)  # ~256 repeats of every id
    rows = torch.randn(16384, 512, generator=gen)
    runs = [add_rows_(torch.zeros(64, 512, device="cuda"), ids.cuda(), rows.cuda()).cpu() for _ in range(5)]
    for run in runs[1:]:
        assert torch.equal(run, runs[0])
    want = torch.zeros(64, 512, dtype=torch.float64).index_add_(0, ids, rows.double())
    assert (runs[0].double() - want).abs().max().item() < 1e-3
    half = add_rows_(torch.zeros(64, 512, device="cuda"), ids.cuda(), rows.cuda().bfloat16()).cpu()  # rows upcast
    assert (half.double() - want).abs().max().item() < 1.0


def _train_on_cuda(ref, steps: int, optimizer, check=None, **config):
    """``steps`` optimizer steps of a clone of ``ref`` streamed to CUDA: (losses, weights); ``check(engine)`` runs
    after the last step."""
    model = clone(ref)
    engine = HorizonEngine(model, device="cuda", **config)
    opt = optimizer(model.parameters())
    losses = []
    try:
        for step in range(steps):
            loss = model(**make_batch(step, batch=2, seq=64)).loss
            loss.backward()
            losses.append(loss.item())
            engine.step(opt)
        engine.synchronize()
        if check is not None:
            check(engine)
    finally:
        engine.close()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("keep", [2, None])
def test_cuda_kept_layers_match_recomputation(keep):
    """On CUDA: layers that keep their graph (a fixed count, or sized from the first step's measured memory)
    train like full recomputation (FP32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model("llama", layers=6, hidden_size=256, intermediate_size=512, attn_implementation="sdpa")

    def check(engine):
        if engine.config.keep_activations is None:
            assert engine.num_kept_layers > 0  # an H200/H100 has room for every graph of this model
        assert engine.streamer.num_unclaimed() == len(engine.streamer.slots)

    results = [
        _train_on_cuda(ref, 4, lambda ps: torch.optim.AdamW(ps, lr=1e-3), check, compute_dtype="fp32",
                       keep_activations=setting, resident_layers=None if setting is None else 6)
        for setting in (0, keep)
    ]  # fmt: skip
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for name, w in results[0][1].items():
        assert normwise(results[1][1][name], w) < 1e-5, name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_compiled_layers_match_eager(dtype):
    """compile_layers on CUDA (Inductor/Triton kernels) trains like eager layers: FP32 weights to 1e-5 after three
    steps; BF16 losses to BF16 rounding (fused kernels round at other places than eager ones)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model("qwen2", layers=4, hidden_size=256, intermediate_size=512, attn_implementation="sdpa")
    results = [
        _train_on_cuda(ref, 3, lambda ps: torch.optim.SGD(ps, lr=1e-1), compute_dtype=dtype, compile_layers=compiled)
        for compiled in (False, True)
    ]
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5 if dtype == "fp32" else 2e-2)
    for name, w in results[0][1].items() if dtype == "fp32" else ():
        if not name.endswith(NOISE_ONLY):  # zero gradient in exact arithmetic: only rounding noise to compare
            assert normwise(results[1][1][name], w) < 1e-5, name


def test_cuda_lora_hidden_states_and_generate():
    """The drop-in workflows on CUDA (compiled layers by default): a LoRA model's loss plus a term on the last hidden
    state gives the CPU reference's gradients for exactly the adapters, and generate gives the same tokens."""
    peft = pytest.importorskip("peft")
    torch.backends.cuda.matmul.allow_tf32 = False
    base = tiny_model("qwen2", layers=3, hidden_size=64, intermediate_size=128, attn_implementation="sdpa")
    torch.manual_seed(1)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = make_batch(0, batch=2, seq=32)

    def loss_of(model):
        out = model(**batch, output_hidden_states=True)
        return out.loss + out.hidden_states[-1].float().pow(2).mean()

    r = clone(ref)
    want_loss = loss_of(r)
    want_loss.backward()
    want = {n: p.grad for n, p in r.named_parameters() if p.requires_grad}
    prompt = batch["input_ids"][:, :8]
    want_tokens = r.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    m = clone(ref)
    engine = HorizonEngine(m, device="cuda", compute_dtype="fp32")
    try:
        loss = loss_of(m)
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-4)
        loss.backward()
        engine.finish_backward()
        got = {n: engine.gradient(p) for n, p in m.named_parameters()}
        assert {n for n, g in got.items() if g is not None} == set(want)
        for name, g in want.items():
            assert normwise(got[name], g) < 1e-4, name
        with torch.no_grad():
            tokens = m.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens.cpu(), want_tokens)
    finally:
        engine.close()


@pytest.mark.parametrize("weight_copy", [True, False], ids=["copy", "nocopy"])
def test_cuda_lora_bf16_base_trains_as_fp32_masters(weight_copy):
    """LoRA under BF16 compute on CUDA: with the frozen base held in page-locked BF16 groups that the uploads read
    directly (``frozen_dtype="compute"``, the default) the adapters train as with FP32 masters for the base
    (``frozen_dtype="fp32"``, whose uploads round the same values), with and without the adapters' weight copy (the
    frozen groups then go up through the staging buffers); the base is never written."""
    from lightning_horizon import HorizonStrategy
    from lightning_horizon.engine.store import FROZEN_SUFFIX
    from tests.helpers import EngineProbe
    from tests.test_workflows import lora

    pytest.importorskip("peft")
    ref = lora(tiny_model("qwen2", layers=3, hidden_size=64, intermediate_size=128, attn_implementation="sdpa"))
    runs = {}
    for frozen_dtype in ("compute", "fp32"):
        module, probe = LMModule(clone(ref), lr=1e-2, total=4), EngineProbe()
        trainer = L.Trainer(
            strategy=HorizonStrategy(frozen_dtype=frozen_dtype, weight_copy=weight_copy),
            accelerator="gpu",
            devices=1,
            max_steps=4,
            precision="bf16-mixed",
            callbacks=[probe],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, loader(8))
        runs[frozen_dtype] = module, probe.engine
    (got, engine), (want, _) = runs["compute"], runs["fp32"]
    frozen = [g for g in engine.store.groups if g.frozen]
    assert frozen and all(g.name.endswith(FROZEN_SUFFIX) and g.master.dtype == torch.bfloat16 for g in frozen)
    assert got.losses == pytest.approx(want.losses, rel=1e-3)
    assert got.losses[-1] < got.losses[0]
    start = dict(ref.named_parameters())
    for (name, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        if p.requires_grad:  # the adapters' updates agree (CUDA kernels need not be bitwise deterministic)
            assert p.dtype == torch.float32 and normwise(p - start[name], q - start[name]) < 1e-2, name
        else:  # the base: the BF16 values both runs computed with, unchanged
            assert p.dtype == torch.bfloat16 and torch.equal(p, start[name].to(torch.bfloat16)), name
            assert torch.equal(q.to(torch.bfloat16), p), name


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_dpo_sequence_logprobs_match_cpu(dtype, tol):
    """DPO's per-sequence log-probabilities through the engine on CUDA (chunked head, chosen and rejected rows in
    one pass): values and gradients of the DPO loss against plain PyTorch on the CPU in FP32."""
    from lightning_horizon.preference import DPOSettings, dpo_loss, label_token_counts, sequence_logprobs
    from tests.test_preference import reference_logps

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model("qwen2", tied=True, layers=4, hidden_size=128, intermediate_size=256, attn_implementation="sdpa")
    batch = make_batch(3, batch=4, seq=64)
    reference = torch.tensor([-300.0, -310.0, -305.0, -290.0])
    settings, counts = DPOSettings(beta=0.1), label_token_counts(batch["labels"])
    cpu = clone(ref)
    want_logps = reference_logps(cpu, batch)
    want, _, _ = dpo_loss(want_logps, reference, counts, settings)
    want.mean().backward()
    m = clone(ref)
    engine = HorizonEngine(m, device="cuda", compute_dtype=dtype, loss_chunk_tokens=50)
    try:
        logps = sequence_logprobs(m, batch["input_ids"], batch["labels"], batch["attention_mask"])
        assert logps.device.type == "cuda" and logps.dtype == torch.float32
        assert normwise(logps.cpu(), want_logps) < (1e-5 if dtype == "fp32" else 1e-2)
        got, _, _ = dpo_loss(logps, reference, counts, settings)
        got.mean().backward()
        for name, p in m.named_parameters():
            if name.endswith(NOISE_ONLY):
                continue
            assert normwise(engine.gradient(p), dict(cpu.named_parameters())[name].grad) < tol, name
    finally:
        engine.close()


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_reward_model_matches_cpu(dtype, tol):
    """A ...ForSequenceClassification (the score head streamed) on CUDA: pooled scores and the Bradley-Terry
    gradients against Hugging Face on the CPU in FP32."""
    from lightning_horizon.preference import bradley_terry_loss, last_token_scores
    from tests.test_reward import classifier, padded_batch

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = classifier("llama", hidden_size=128, intermediate_size=256)
    batch = padded_batch(5)
    batch = {k: torch.cat((v[:2], v[1:])) for k, v in batch.items()}  # pairs (0, 1) and (1, 2)
    cpu = clone(ref)
    scores = cpu(**batch).logits.squeeze(-1)
    bradley_terry_loss(scores[:2], scores[2:]).mean().backward()
    m = clone(ref)
    engine = HorizonEngine(m, device="cuda", compute_dtype=dtype)
    try:
        got = last_token_scores(m, batch).squeeze(-1)
        assert normwise(got.float().cpu(), scores.detach()) < (1e-4 if dtype == "fp32" else 3e-2)
        bradley_terry_loss(got[:2], got[2:]).mean().backward()
        for name, p in m.named_parameters():
            assert normwise(engine.gradient(p), dict(cpu.named_parameters())[name].grad) < tol, name
    finally:
        engine.close()


@pytest.mark.parametrize("reduce", ["host", "device", "device+sharded"])
def test_cuda_data_parallel_code_path_with_one_nccl_process(tmp_path, reduce, monkeypatch):
    """The data-parallel engine on a GPU with an NCCL default group (one process: the machine's one GPU): the shared
    store is page-locked per process, host tensors travel over the gloo group beside NCCL, and 4 steps with clipping
    and accumulation equal the one-process engine (1e-6). With ``grad_reduce="device"`` every group's gradient goes
    through an NCCL reduce-scatter on its own stream and down through the page-locked FP32 stages, 10,000 elements
    at a time (a layer in several pieces). With ``sharded_streaming`` every acquired unit goes through an NCCL
    all-gather on the streamer's gather stream (one process: its shard is the whole unit)."""
    import torch.distributed as dist

    from lightning_horizon.engine import gradients
    from lightning_horizon.engine.data_parallel import DataParallel, NodeReduce

    monkeypatch.setattr(gradients, "REDUCE_STAGE_NUMEL", 10_000)
    reduce, sharded = reduce.split("+")[0], reduce.endswith("+sharded")
    gathers = []
    all_gather = NodeReduce.all_gather
    monkeypatch.setattr(
        NodeReduce, "all_gather", lambda self, out: (gathers.append(out.numel()), all_gather(self, out))
    )

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model("qwen2", tied=True, layers=4, hidden_size=128, intermediate_size=256, attn_implementation="sdpa")
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1, device_id=torch.device("cuda", 0)
    )
    try:
        results = []
        for parallel in (None, DataParallel(local_rank=0, local_world_size=1)):
            model = clone(ref)
            engine = HorizonEngine(
                model,
                device="cuda",
                compute_dtype="bf16",
                accumulate_grads=True,
                parallel=parallel,
                grad_reduce=reduce,
                sharded_streaming=sharded,
                # both recompute every layer: kept layers train like recomputation only to ~1e-5, and the two
                # engines' memory (so their kept counts, which sharded streaming agrees on) may differ
                keep_activations=0 if sharded else None,
            )
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for step in range(4):
                for micro in range(2):
                    (model(**make_batch(10 * step + micro, batch=2, seq=64)).loss / 2).backward()
                engine.clip_grad_norm_(0.5)
                engine.step(opt)
                opt.zero_grad()
            reduced = parallel is not None and reduce == "device"
            assert bool(engine.sink._all_stages) == reduced  # the shards came down through the FP32 stages
            # every decoder-layer run and head use of the 8 passes (forward, recompute, backward) gathered its unit
            assert (len(gathers) >= 8 * (2 * 4 + 1)) == (parallel is not None and sharded), len(gathers)
            engine.close()
            results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        assert dist.get_backend() == "nccl"
        for name, want in results[0].items():
            assert (results[1][name] - want).abs().max().item() <= 1e-6, name
        assert max((p - results[0][n]).abs().max().item() for n, p in ref.named_parameters()) > 1e-4
    finally:
        dist.destroy_process_group()


def test_two_processes_on_one_gpu_share_the_node_store_and_equal_one_process(tmp_path):
    """Two data-parallel processes on the machine's one GPU (gloo: NCCL needs a GPU per process): both page-lock
    the node's shared store, their gradients land through pinned slabs into the node's one gradient buffer under its
    mutexes, and 10 AdamW steps with clipping and accumulation equal one process with the global batch (1e-5)."""
    import pytest

    from tests.test_data_parallel import _single, _spawn

    torch.backends.cuda.matmul.allow_tf32 = False
    stats = _spawn(tmp_path, 2, 2, device="cuda")
    want, single = _single(2, device="cuda")
    for rank in range(2):
        got = torch.load(tmp_path / f"weights{rank}.pt")
        for name, value in want.items():
            assert (got[name] - value).abs().max().item() <= 1e-5, (rank, name)
        assert stats[rank]["norms"] == pytest.approx(single["norms"], rel=1e-5)
        assert stats[rank]["grads_shared"]
