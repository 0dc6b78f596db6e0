"""The host kernels (one-pass AdamW, gradient fold, BF16 pack) and their PyTorch fallbacks against torch, and the
engine's use of them."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lightning_horizon import HorizonEngine
from lightning_horizon.engine import host_kernels
from lightning_horizon.engine.host_kernels import fold_, fused_adamw_, host_kernels_available, pack_bf16_
from tests.helpers import clone, make_batch, rel_err, tiny_model

PATHS = [
    pytest.param(True, id="kernel"),
    pytest.param(False, id="fallback"),
]


def _skip_without_kernel(use_extension: bool) -> None:
    if use_extension and not host_kernels_available():
        pytest.skip("the fused AdamW extension could not be built here (no usable C++ compiler)")


ULPS = 2e-6
"""Bound of :func:`_max_rel` between two AdamW implementations after a few steps: a few float32 ulps of each
element. torch's own kernels round differently on different CPUs (FMA contraction, AVX2 vs AVX-512 builds): one ulp
of the tensor's scale on an element 1/20 of it reads 1.2e-6 (measured up to 1.5e-6 on an AMD Zen 3 CPU)."""


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    # relative to each element, with a floor at the tensor's scale (moments pass through zero)
    floor = want.abs().max().clamp_min(1e-30) * 1e-3
    return ((got - want).abs() / want.abs().clamp_min(floor)).max().item()


def _run_pair(n, grad_dtype, use_extension, torch_fused, weight_decay=0.1, clip_coef=None, clip_value=None, steps=10):
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen).to(grad_dtype) for _ in range(steps)]
    ref = p0.clone().requires_grad_()
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt = torch.optim.AdamW([ref], **hyper, fused=torch_fused, foreach=False if not torch_fused else None)
    param, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    lp_copy = torch.empty(n, dtype=torch.bfloat16)
    for step, g in enumerate(grads, 1):
        # what the engine's shadow path hands torch: the upcast gradient, clipped in place
        ref_grad = g.to(torch.float32, copy=True)
        if clip_coef is not None:
            ref_grad.mul_(torch.tensor(clip_coef, dtype=torch.float32))
        if clip_value is not None:
            ref_grad.clamp_(-clip_value, clip_value)
        ref.grad = ref_grad
        opt.step()
        fused_adamw_(
            param, g, m, v, lp_copy, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, step=step,
            clip_coef=clip_coef, clip_value=clip_value, use_extension=use_extension,
        )  # fmt: skip
    state = opt.state[ref]
    return (param, m, v, lp_copy), (ref.detach(), state["exp_avg"], state["exp_avg_sq"])


@pytest.mark.parametrize("use_extension", PATHS)
@pytest.mark.parametrize("torch_fused", [True, False], ids=["torch_fused", "torch_single"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32_grad", "bf16_grad"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(weight_decay=0.0), dict(clip_coef=0.37), dict(clip_value=0.5), dict(clip_coef=0.8, clip_value=0.3)],
    ids=["wd", "no_wd", "clip_coef", "clip_value", "both"],
)
def test_matches_torch_adamw(use_extension, torch_fused, grad_dtype, options):
    _skip_without_kernel(use_extension)
    (param, m, v, lp_copy), (ref_p, ref_m, ref_v) = _run_pair(4099, grad_dtype, use_extension, torch_fused, **options)
    for name, got, want in [("param", param, ref_p), ("exp_avg", m, ref_m), ("exp_avg_sq", v, ref_v)]:
        assert _max_rel(got, want) < ULPS, name
    assert torch.equal(lp_copy, param.to(torch.bfloat16))


@pytest.mark.parametrize("use_extension", PATHS)
@pytest.mark.parametrize("n", [1, 7, 17, 1000003])
def test_odd_sizes_and_tails(use_extension, n):
    _skip_without_kernel(use_extension)
    (param, m, v, lp_copy), (ref_p, ref_m, ref_v) = _run_pair(n, torch.bfloat16, use_extension, True, steps=3)
    for got, want in [(param, ref_p), (m, ref_m), (v, ref_v)]:
        assert _max_rel(got, want) < ULPS
    assert torch.equal(lp_copy, param.to(torch.bfloat16))


def test_kernel_and_fallback_agree_and_copy_rounds_like_torch():
    _skip_without_kernel(True)
    n = 1 << 16
    results = []
    for use_extension in (True, False):
        gen = torch.Generator().manual_seed(3)
        param = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 100
        param[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 3.3895e38, -1.0])
        grad = torch.randn(n, generator=gen).to(torch.bfloat16)
        m, v, lp_copy = torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        fused_adamw_(param, grad, m, v, lp_copy, **kw, use_extension=use_extension)
        want = param.to(torch.bfloat16)
        finite = ~param.isnan()
        assert torch.equal(lp_copy[finite].view(torch.int16), want[finite].view(torch.int16))  # bit-exact, signed zeros
        assert lp_copy[~finite].isnan().all()
        results.append((param, m, v))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-6, atol=0, equal_nan=True)


def test_env_var_forces_the_fallback(monkeypatch):
    monkeypatch.setattr(host_kernels, "_tried", False)
    monkeypatch.setattr(host_kernels, "_module", None)
    monkeypatch.setenv("LIGHTNING_HORIZON_NO_EXTENSIONS", "1")
    assert not host_kernels_available()
    with pytest.raises(RuntimeError, match="not available"):
        fused_adamw_(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), None, lr=1, beta1=0.9,
                     beta2=0.9, eps=1e-8, weight_decay=0, step=1, use_extension=True)  # fmt: skip


def _train(use_fused: bool, steps: int = 5, clip: float | None = None):
    model = tiny_model("qwen2")
    engine = HorizonEngine(model, device="cpu", compute_dtype="bf16")
    engine.optim.use_fused = use_fused
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    calls = []
    original = host_kernels.fused_adamw_many_
    try:
        import lightning_horizon.engine.optimizer as optimizer_module

        optimizer_module.fused_adamw_many_ = lambda *a, **k: calls.append(1) or original(*a, **k)
        for step in range(steps):
            model(**make_batch(20 + step)).loss.backward()
            if clip is not None:
                engine.clip_grad_norm_(clip)
            engine.step(opt)
            opt.zero_grad()
        engine.synchronize()
        copies = {
            g.name: (g.copy.clone() if g.copy is not None else None, g.master.clone()) for g in engine.store.groups
        }
    finally:
        optimizer_module.fused_adamw_many_ = original
        engine.close()
    return model, opt, copies, len(calls)


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no_clip", "clip_norm"])
def test_engine_fused_path_matches_shadow_path(clip):
    _skip_without_kernel(True)
    fused_model, fused_opt, fused_copies, fused_calls = _train(True, clip=clip)
    plain_model, plain_opt, _, plain_calls = _train(False, clip=clip)
    assert fused_calls > 0 and plain_calls == 0
    for (name, p), q in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert rel_err(p, q) < 1e-5, name
    for name, (lp_copy, master) in fused_copies.items():
        if lp_copy is not None:
            assert torch.equal(lp_copy, master.to(lp_copy.dtype)), name
    sd, sd_plain = fused_opt.state_dict(), plain_opt.state_dict()
    assert sd["param_groups"] == sd_plain["param_groups"]
    assert sd["state"].keys() == sd_plain["state"].keys()
    for i, state in sd["state"].items():
        want = sd_plain["state"][i]
        assert state.keys() == want.keys()
        for key in state:
            assert (state[key].shape, state[key].dtype, state[key].device) == (
                want[key].shape,
                want[key].dtype,
                want[key].device,
            ), (i, key)
        assert float(state["step"]) == 5.0


def test_state_dict_resumes_with_plain_torch_adamw():
    """A checkpoint of the fused path loads into a plain AdamW, which continues as the fused path does."""
    _skip_without_kernel(True)
    model, opt, _, _ = _train(True, steps=2)
    ref = clone(model)
    ref.zero_grad(set_to_none=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a checkpoint round trip (load_state_dict aliases)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        batch = make_batch(99)
        model(**batch).loss.backward()
        ref_batch_loss = ref(**batch).loss
        ref_batch_loss.backward()
        engine.step(opt)
        ref_opt.step()
        engine.synchronize()
    finally:
        engine.close()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p, q) < 1e-5, name


def test_non_adamw_optimizers_keep_the_shadow_path():
    class MyAdamW(torch.optim.AdamW):
        pass

    model = torch.nn.Linear(3, 3)
    assert (
        host_kernels.adamw_group_scalars(MyAdamW(model.parameters()), MyAdamW(model.parameters()).param_groups[0])
        is None
    )
    opt = torch.optim.AdamW(model.parameters(), amsgrad=True)
    assert host_kernels.adamw_group_scalars(opt, opt.param_groups[0]) is None
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3))
    assert host_kernels.adamw_group_scalars(opt, opt.param_groups[0])["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("use_extension", PATHS)
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [0, 7, 3 * 16384 + 5])
def test_fold_is_copy_or_add_with_the_sum_of_squares(use_extension, src_dtype, n):
    _skip_without_kernel(use_extension)
    gen = torch.Generator().manual_seed(n)
    src = torch.randn(n, generator=gen).to(src_dtype)
    start = torch.randn(n, generator=gen)
    for overwrite in (True, False):
        dst = start.clone()
        sumsq = fold_(dst, src, overwrite, num_threads=3, use_extension=use_extension)
        want = src.float() if overwrite else start + src.float()  # torch's add_ computes in FP32: same rounding
        assert torch.equal(dst, want)
        assert sumsq == pytest.approx(float((want.double() ** 2).sum()), rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("use_extension", PATHS)
def test_pack_bf16_rounds_as_torch(use_extension):
    _skip_without_kernel(use_extension)
    src = torch.randn(2 * 16384 + 11, generator=torch.Generator().manual_seed(0)) * 1e3
    src[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38])
    src[4:8] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130])  # ties to even, a subnormal
    got = torch.empty(src.numel(), dtype=torch.bfloat16)
    pack_bf16_(got, src, num_threads=2, use_extension=use_extension)
    want = src.to(torch.bfloat16)
    assert torch.isnan(got[0])  # NaN stays NaN (its payload may differ from torch's vectorised cast)
    assert torch.equal(got[1:].view(torch.int16), want[1:].view(torch.int16))


def _accumulate(kernels: bool, weight_copy: bool, steps: int = 3, micro: int = 3):
    """Gradient accumulation with clipping by norm through the engine, with or without the host kernels."""
    model = tiny_model("llama", tied=True)
    engine = HorizonEngine(
        model, device="cpu", compute_dtype="bf16", host_kernels=kernels, weight_copy=weight_copy,
        accumulate_grads=True, track_grad_norm=True, host_threads=2,
    )  # fmt: skip
    assert engine.sink.kernels == kernels and engine.streamer.kernels == kernels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    norms, grads = [], None
    try:
        for step in range(steps):
            for m in range(micro):
                model(**make_batch(100 * step + m)).loss.backward()
            engine.finish_backward()
            if grads is None:
                grads = {n: engine.gradient(p).clone() for n, p in model.named_parameters()}
            norms.append(float(engine.clip_grad_norm_(0.5)))
            engine.step(opt)
        engine.synchronize()
        return norms, grads, {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        engine.close()


@pytest.mark.parametrize("weight_copy", [True, False], ids=["copy", "pack"])
def test_engine_host_kernels_fold_and_pack_match_torch_ops(weight_copy):
    """The fold kernel lands the same FP32 gradients as copy_/add_ and its norm matches vector_norm's; packing
    uploads the same BF16 weights: training with and without the kernels agrees."""
    _skip_without_kernel(True)
    k_norms, k_grads, k_weights = _accumulate(True, weight_copy)
    t_norms, t_grads, t_weights = _accumulate(False, weight_copy)
    for name, g in t_grads.items():
        assert torch.equal(k_grads[name], g), name
    assert k_norms == pytest.approx(t_norms, rel=1e-6)
    for name, w in t_weights.items():
        assert rel_err(k_weights[name], w) < 1e-5, name


# --------------------------------------------------------------------------------------------- BF16 moments
def test_bf16_moments_kernel_and_fallback_agree_bit_for_bit():
    """optimizer_state_dtype=bf16: the kernel and the PyTorch fallback store the same BF16 moments (the same
    stochastic rounding, from the same hash of index and seed) and the same parameters to a few ulps."""
    _skip_without_kernel(True)
    n = 70001
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(6)]
    results = []
    for use_extension in (True, False):
        p, m, v = p0.clone(), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        copy = torch.empty(n, dtype=torch.bfloat16)
        for step, g in enumerate(grads, 1):
            fused_adamw_(p, g, m, v, copy, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
                         clip_coef=0.7, use_extension=use_extension, seed=step * 7919)  # fmt: skip
        results.append((p, m, v, copy))
    (kp, km, kv, kc), (fp, fm, fv, fc) = results
    assert torch.equal(km.view(torch.int16), fm.view(torch.int16))
    assert torch.equal(kv.view(torch.int16), fv.view(torch.int16))
    assert _max_rel(kp, fp) < ULPS and torch.equal(kc, kp.to(torch.bfloat16))


@pytest.mark.parametrize("use_extension", PATHS)
def test_bf16_moments_decay_in_expectation(use_extension):
    """v * 0.999 changes v by less than half a BF16 ulp: round to nearest would keep v forever; stochastic rounding
    decays it as FP32 does, on average (and matches the FP32 update of the first moment to within rounding)."""
    _skip_without_kernel(use_extension)
    n, steps = 20000, 300
    p = torch.zeros(n)
    m = torch.full((n,), 0.5, dtype=torch.bfloat16)
    v = torch.full((n,), 1.0, dtype=torch.bfloat16)
    zero = torch.zeros(n)
    for step in range(1, steps + 1):
        fused_adamw_(p, zero, m, v, None, lr=0.0, beta1=0.99, beta2=0.999, eps=1e-8, weight_decay=0.0, step=step,
                     use_extension=use_extension, seed=step)  # fmt: skip
    assert v.float().mean().item() == pytest.approx(0.999**steps, rel=0.01)  # RNE would leave 1.0
    assert m.float().mean().item() == pytest.approx(0.5 * 0.99**steps, rel=0.01)
    assert v.float().std().item() > 0  # rounded up or down per element: not one value


def test_seed_changes_the_rounding_and_same_seed_repeats_it():
    n = 5000
    results = []
    for seed in (1, 1, 2):
        m, v = torch.full((n,), 0.3, dtype=torch.bfloat16), torch.full((n,), 0.7, dtype=torch.bfloat16)
        fused_adamw_(torch.zeros(n), torch.full((n,), 0.1), m, v, None, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1, use_extension=False, seed=seed)  # fmt: skip
        results.append(v.view(torch.int16).clone())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


# --------------------------------------------------------------------------------------------- int8 moments
def _int8_state(n: int) -> list[torch.Tensor]:
    blocks = (n + host_kernels.QBLOCK - 1) // host_kernels.QBLOCK
    return [torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks),
            torch.zeros(blocks)]  # fmt: skip


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32], ids=["bf16_grad", "fp32_grad"])
@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clipped"])
def test_int8_moments_kernel_and_fallback_agree_bit_for_bit(grad_dtype, clip):
    """optimizer_state_dtype=int8: the kernel and the PyTorch fallback store the same codes and block scales (a
    partial last block included; gradients of magnitudes spread over many binades, so every code path is used) and
    the same parameters to a few ulps."""
    _skip_without_kernel(True)
    n = 3 * 2**14 + 1000 + 17  # several OpenMP work items and a partial last block
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=gen)
    spread = torch.exp(torch.randn(n, generator=gen) * 4)
    grads = [(torch.randn(n, generator=gen) * spread).to(grad_dtype) for _ in range(5)]
    grads[2][:300] = 0  # a block whose first moment decays and a second moment that must not reach zero
    kw = dict(clip_coef=0.5, clip_value=3.0) if clip else {}
    results = []
    for use_extension in (True, False):
        p, m, v, ms, vs = p0.clone(), *_int8_state(n)
        copy = torch.empty(n, dtype=torch.bfloat16)
        for step, g in enumerate(grads, 1):
            fused_adamw_(p, g, m, v, copy, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
                         use_extension=use_extension, seed=step * 7919, exp_avg_scale=ms, exp_avg_sq_scale=vs,
                         **kw)  # fmt: skip
        results.append((p, m, v, ms, vs, copy))
    (kp, km, kv, kms, kvs, kc), (fp, fm, fv, fms, fvs, _) = results
    assert torch.equal(km, fm) and torch.equal(kv, fv)
    assert torch.equal(kms, fms) and torch.equal(kvs, fvs)
    assert _max_rel(kp, fp) < ULPS and torch.equal(kc, kp.to(torch.bfloat16))
    assert int(km.abs().max()) == 121 and int(kv.max()) == 249  # each block's largest element is exactly 1.0
    assert bool((kv > 0).all())  # every element had a nonzero gradient once: no second moment rounds to zero


def test_int8_formats_decode_and_round_as_documented():
    fmt_m, fmt_v = host_kernels.EXP_AVG_FORMAT, host_kernels.EXP_AVG_SQ_FORMAT
    # code c >= 1 is 2^(E - bias) * (1 + f/8), E, f = divmod(c - 1, 8); the largest code is exactly 1.0
    assert fmt_m.table[121].item() == 1.0 and fmt_m.table[1].item() == 2.0**-15
    assert fmt_m.table[(-121) & 0xFF].item() == -1.0 and fmt_m.table[0].item() == 0.0
    assert fmt_v.table[249].item() == 1.0 and fmt_v.table[1].item() == 2.0**-31
    assert fmt_v.table[2].item() == 1.125 * 2**-31
    # values that are codes times a power-of-two scale round trip exactly
    values = torch.tensor([0.0, 1.0, -0.5, 0.625, -(2.0**-15), 1.875 * 2**-3] + [0.0] * 250) * 4
    codes, scale = host_kernels.quantize_moment(values, fmt_m)
    assert scale.tolist() == [4.0] and torch.equal(host_kernels.dequantize_moment(codes, scale, fmt_m), values)
    # the second moment never rounds a positive value to zero; round to nearest otherwise
    v = torch.tensor([1.0, 1e-30, 0.0, 0.53, 0.56] + [0.5] * 251)  # codes in [0.5, 1): 1/16 apart
    codes, scale = host_kernels.quantize_moment(v, fmt_v)
    decoded = host_kernels.dequantize_moment(codes, scale, fmt_v)
    assert decoded[1] > 0 and decoded[2] == 0
    assert decoded[3].item() == 0.5 and decoded[4].item() == 0.5625
    # the first moment's stochastic rounding is unbiased: the mean over seeds approaches the value
    x = torch.full((256 * 64,), 0.3)
    x[::256] = 1.0  # block scale 1.0: 0.3 lies between two codes
    seeds = [host_kernels._random20(0, x.numel(), host_kernels._hash32(torch.tensor([s]))) for s in range(8)]
    means = [host_kernels.dequantize_moment(*host_kernels.quantize_moment(x, fmt_m, r), fmt_m) for r in seeds]
    got = torch.stack(means).mean(0)[x != 1.0].mean().item()
    assert got == pytest.approx(0.3, rel=2e-3) and not any(torch.equal(means[0], m) for m in means[1:])


@pytest.mark.parametrize("use_extension", PATHS)
def test_int8_moments_train_like_fp32_on_a_quadratic(use_extension):
    """Elements whose gradients differ by orders of magnitude within a block (where linear 8-bit quantisation
    would zero the small ones' second moments and blow their updates up) converge as with FP32 moments."""
    _skip_without_kernel(use_extension)
    n = 4096
    gen = torch.Generator().manual_seed(1)
    target, p0 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    curvature = torch.logspace(-3, 1, n)[torch.randperm(n, generator=gen)]
    losses = {}
    for dtype in ("fp32", "int8"):
        p = p0.clone()
        state = _int8_state(n) if dtype == "int8" else [torch.zeros(n), torch.zeros(n), None, None]
        for step in range(1, 301):
            g = (p - target) * curvature
            fused_adamw_(p, g, state[0], state[1], None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.0, step=step, use_extension=use_extension if dtype == "int8" else False,
                         seed=step, exp_avg_scale=state[2], exp_avg_sq_scale=state[3])  # fmt: skip
            assert torch.isfinite(p).all()
        losses[dtype] = ((p - target) ** 2 * curvature).mean().item()
    start = ((p0 - target) ** 2 * curvature).mean().item()
    assert losses["int8"] < start / 20 and losses["int8"] == pytest.approx(losses["fp32"], rel=0.5)


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path, capsys):
    """A build killed by a signal leaves torch's lock file: the next process must not wait on it forever."""
    import threading
    import time

    from lightning_horizon.engine.host_kernels import clear_stale_build_lock

    assert clear_stale_build_lock(str(tmp_path)) is False  # no lock: returns at once
    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert clear_stale_build_lock(str(tmp_path)) is True
    assert not lock.exists()

    lock.write_text("")  # a build in progress elsewhere: waited for until its process removes the lock
    threading.Timer(0.3, lock.unlink).start()
    start = time.monotonic()
    assert clear_stale_build_lock(str(tmp_path), stale_after=60, poll_s=0.05) is False
    assert 0.25 <= time.monotonic() - start < 5
    assert "waiting for another process's build" in capsys.readouterr().err

    lock.write_text("")  # a lock nobody removes: taken as stale once it is older than stale_after
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert clear_stale_build_lock(str(tmp_path), stale_after=0.3, poll_s=0.05) is True


def test_the_kernels_build_in_a_folder_per_python_torch_and_cpu(tmp_path, monkeypatch):
    from lightning_horizon.engine import host_kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = host_kernels._build_directory("lightning_horizon_host_kernels_abc")
    assert os.path.isdir(path) and path.startswith(str(tmp_path))
    assert f"torch{torch.__version__}" in path and path.endswith("lightning_horizon_host_kernels_abc")


def test_loading_the_kernels_clears_a_stale_lock_first(tmp_path, monkeypatch):
    import time

    import torch.utils.cpp_extension as cpp_extension

    from lightning_horizon.engine import host_kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_HORIZON_NO_EXTENSIONS", raising=False)
    monkeypatch.setattr(host_kernels, "_tried", False)
    monkeypatch.setattr(host_kernels, "_module", None)
    lock = os.path.join(
        host_kernels._build_directory(f"lightning_horizon_host_kernels_{host_kernels._cpu_tag()}"), "lock"
    )
    open(lock, "w").close()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    seen = {}

    def fake_load(name, sources, build_directory, **kwargs):
        seen["lock_left"] = os.path.exists(os.path.join(build_directory, "lock"))
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert host_kernels._load() == "module"
    assert seen == {"lock_left": False}


def test_a_first_build_says_what_it_is_doing_and_a_built_one_stays_quiet(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension

    from lightning_horizon.engine import host_kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LIGHTNING_HORIZON_NO_EXTENSIONS", raising=False)
    monkeypatch.setattr(cpp_extension, "load", lambda name, build_directory, **kwargs: "module")
    name = f"lightning_horizon_host_kernels_{host_kernels._cpu_tag()}"
    for built in (False, True):
        monkeypatch.setattr(host_kernels, "_tried", False)
        monkeypatch.setattr(host_kernels, "_module", None)
        if built:
            open(os.path.join(host_kernels._build_directory(name), f"{name}.so"), "w").close()
        assert host_kernels._load() == "module"
        said = "building the host kernels" in capsys.readouterr().err
        assert said is not built


def test_the_largest_element_of_a_block_codes_as_one():
    """The encode multiplies by the scale's reciprocal: the largest element's ratio is 1 or 1 - 2^-24 (never above),
    which codes as 1.0 even with the top random bits, for 2,000 random scales."""
    fmt = host_kernels.EXP_AVG_FORMAT
    blocks = 2000
    scales = torch.rand(blocks) * 100 + 1e-3
    assert (scales * scales.reciprocal() <= 1).all() and (scales * scales.reciprocal() < 1).any()
    values = torch.zeros(blocks, host_kernels.QBLOCK)
    values[:, 0], values[:, 1] = scales, -scales
    random_bits = torch.full((blocks * host_kernels.QBLOCK,), (1 << 20) - 1, dtype=torch.int64)
    codes, scale = host_kernels.quantize_moment(values.reshape(-1), fmt, random_bits)
    assert torch.equal(scale, scales)
    codes = codes.view(blocks, -1)
    assert (codes[:, 0] == 121).all() and (codes[:, 1] == -121).all()  # the code of 1.0 (bias 15)
    assert codes.abs().max() == 121
    codes, _ = host_kernels.quantize_moment(values.abs().reshape(-1), host_kernels.EXP_AVG_SQ_FORMAT)
    assert (codes.view(blocks, -1)[:, 0] == 249).all()  # the code of 1.0 (bias 31), rounded to nearest


def _mixed_updates(seed: int) -> list[host_kernels.AdamwUpdate]:
    """One update per moment storage, gradient dtype, copy and clipping choice, sizes off the block boundaries."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i, (state, grad_dtype, with_copy, clip) in enumerate(
        [("fp32", torch.bfloat16, True, False), ("bf16", torch.float32, False, True), ("int8", torch.bfloat16, True, True),
         ("fp32", torch.float32, False, True), ("int8", torch.float32, False, False)]
    ):  # fmt: skip
        n = 3000 + 517 * i
        if state == "int8":
            m, v, ms, vs = _int8_state(n)
        else:
            dtype = torch.float32 if state == "fp32" else torch.bfloat16
            m, v, ms, vs = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), None, None
        updates.append(
            host_kernels.AdamwUpdate(
                torch.randn(n, generator=gen),
                torch.randn(n, generator=gen).to(grad_dtype),
                m,
                v,
                torch.zeros(n, dtype=torch.bfloat16) if with_copy else None,
                lr=1e-2,
                beta1=0.9,
                beta2=0.95,
                eps=1e-8,
                weight_decay=0.1 * (i % 2),
                step=1.0 + i,
                clip_coef=0.5 if clip else None,
                clip_value=0.8 if clip else None,
                seed=11 * i,
                exp_avg_scale=ms,
                exp_avg_sq_scale=vs,
            )  # fmt: skip
        )
    return updates


def _buffers(u: host_kernels.AdamwUpdate) -> list[torch.Tensor]:
    return [t for t in (u.param, u.exp_avg, u.exp_avg_sq, u.copy, u.exp_avg_scale, u.exp_avg_sq_scale) if t is not None]


@pytest.mark.parametrize("use_extension", PATHS)
def test_many_updates_in_one_call_equal_one_call_each(use_extension):
    """``fused_adamw_many_`` (a layer's parameters in one call, the way the engine steps them) writes exactly what
    ``fused_adamw_`` writes called once per update, for every moment storage, gradient dtype, copy and clipping."""
    _skip_without_kernel(use_extension)
    batched, single = _mixed_updates(0), _mixed_updates(0)
    for _ in range(3):
        seconds = host_kernels.fused_adamw_many_(batched, num_threads=2, use_extension=use_extension)
        assert seconds > 0
        for u in single:
            fused_adamw_(**u._asdict(), num_threads=2, use_extension=use_extension)
    for a, b in zip(batched, single):
        for x, y in zip(_buffers(a), _buffers(b)):
            assert torch.equal(x, y)
    assert not torch.equal(batched[0].param, _mixed_updates(0)[0].param)  # the updates did run


@pytest.mark.parametrize("use_extension", PATHS)
def test_many_updates_refuse_a_bad_one_before_writing_any(use_extension):
    _skip_without_kernel(use_extension)
    updates = _mixed_updates(1)
    bad = updates[3]
    updates[3] = bad._replace(exp_avg_sq=bad.exp_avg_sq[:-1])  # one element short
    before = [[t.clone() for t in _buffers(u)] for u in updates]
    with pytest.raises((ValueError, RuntimeError), match="elements"):
        host_kernels.fused_adamw_many_(updates, num_threads=2, use_extension=use_extension)
    for u, old in zip(updates, before):
        assert all(torch.equal(x, y) for x, y in zip(_buffers(u), old))
