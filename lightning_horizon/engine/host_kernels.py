"""Host-memory kernels (one pass each over flat CPU buffers), with a C++ build and a pure-PyTorch fallback.

* :func:`fused_adamw_`: one-pass AdamW (below); :func:`fused_adamw_many_`: several in one call, the GIL released
  once (the engine steps a layer's parameters so).
* :func:`fold_`: gradient accumulation, ``dst (+)= src`` from a BF16 slab into the FP32 gradient, returning the sum of
  squares of the result (the clip-by-norm statistic in the same pass: 10 bytes/param instead of 14).
* :func:`pack_bf16_`: FP32 masters -> BF16 pinned staging (what ``copy_`` does), with an explicit thread count.

Every kernel takes ``num_threads``: the engine runs several host workers at once (optimizer, gradient fold,
upload packing), each with ``EngineConfig.host_threads`` threads. A kernel hands its 64 KiB blocks to its threads
dynamically: a thread whose core is busy with another of the engine's threads (the main thread launching the GPU
work) then takes fewer blocks instead of holding the whole call back, as an equal static share did.

The CPU optimizer is bound by host-memory bandwidth. Upcasting a BF16 gradient, stepping ``torch.optim.AdamW`` and
refreshing the BF16 copy of the weights as three passes moves ~46 bytes/param; :func:`fused_adamw_` does it in one
pass (~34 bytes/param with FP32 gradients, ~28 with BF16 ones): clip coefficient and clip-by-value on the gradient,
the AdamW update exactly as torch's CPU ``fused=True`` kernel computes it, and the BF16 copy of the new parameter.

The kernels (``cuda/host_kernels.cpp``; ``lightning_horizon/csrc/`` in an installed wheel) are compiled with ``torch.utils.cpp_extension.load`` on
first use (never at import), into ``TORCH_EXTENSIONS_DIR`` (torch's default cache when unset). :func:`host_kernels_available` is the
``HAS_HOST_KERNELS`` flag, evaluated once, lazily: it is False when ``LIGHTNING_HORIZON_NO_EXTENSIONS=1`` or when the
build fails (one warning), and every function then computes the same values with torch ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .config import STATE_DTYPE_NAMES

_PACKAGE = Path(__file__).resolve().parents[1]
# An installed wheel ships the source inside the package (lightning_horizon/csrc); a clone keeps it in cuda/.
_SOURCE = next(
    (p for p in (_PACKAGE / "csrc" / "host_kernels.cpp", _PACKAGE.parent / "cuda" / "host_kernels.cpp") if p.is_file()),
    _PACKAGE / "csrc" / "host_kernels.cpp",
)
_FALLBACK_CHUNK = 1 << 22  # elements per chunk of the fallback (bounds its temporaries)

BUILD_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=off",
]
if platform.machine().lower() in ("x86_64", "amd64"):
    # 512-bit vectors where the CPU has them (gcc's default for AVX-512 CPUs is 256; no effect without AVX-512): on
    # the H200 host's Xeon the int8-moment AdamW ran 15-19% faster with them, bf16 3-5%, fp32 0-5%
    # (benchmarks/bench_kernel_variants.py, 2026-12-04; benchmarks/RESULTS.md). An x86 flag: other compilers' targets reject it.
    BUILD_FLAGS.append("-mprefer-vector-width=512")
"""Compiler flags of the host kernels (no -ffast-math, no implicit FP contraction: see cuda/host_kernels.cpp)."""

_lock = threading.Lock()
_module = None
_tried = False


def _extensions_disabled() -> bool:
    return os.environ.get("LIGHTNING_HORIZON_NO_EXTENSIONS", "0").lower() not in ("", "0", "false", "no")


def _load():
    """Builds (first call only) and imports the extension; None when disabled or when the build fails."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if _extensions_disabled():
            return None
        try:
            from torch.utils.cpp_extension import load

            name = f"lightning_horizon_host_kernels_{_cpu_tag()}"
            build_directory = _build_directory(name)
            clear_stale_build_lock(build_directory)
            if not os.path.exists(os.path.join(build_directory, f"{name}.so")):
                print(
                    "lightning_horizon: building the host kernels (AdamW, gradient fold) for this CPU, once: about a "
                    f"minute ({build_directory})",
                    file=sys.stderr,
                    flush=True,
                )
            _module = load(
                name=name,
                sources=[str(_SOURCE)],
                build_directory=build_directory,
                extra_cflags=BUILD_FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - any build or import failure means: use the fallback
            warnings.warn(
                f"lightning_horizon: the fused AdamW CPU kernel could not be built ({type(exc).__name__}: {exc}); "
                "using the slower PyTorch path. Install a C++ compiler (g++) and ninja to enable it, or set "
                "LIGHTNING_HORIZON_NO_EXTENSIONS=1 to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
            _module = None
        return _module


_STALE_LOCK_S = 600.0
"""Age of a build lock beyond which no build still holds it (a build of the kernels takes about a minute)."""


def _build_directory(name: str) -> str:
    """Where the kernels are built and cached: ``$TORCH_EXTENSIONS_DIR`` (else torch's default root), one folder per
    Python and torch version, then per CPU (``name``)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    versions = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    path = os.path.join(root, versions, name)
    os.makedirs(path, exist_ok=True)
    return path


def clear_stale_build_lock(build_directory: str, stale_after: float = _STALE_LOCK_S, poll_s: float = 1.0) -> bool:
    """Makes sure the next build in ``build_directory`` cannot wait forever on a dead process's lock.

    torch's JIT build holds ``<build_directory>/lock`` while it compiles, and a second process waits for that file
    to go, with no limit. A build killed by a signal (a timeout, the OOM killer, a scheduler's time limit) leaves the
    file behind, and every later process would then hang in silence before its first step. This waits while the
    lock is younger than ``stale_after`` seconds (another process is building), then removes it with a warning.
    Returns whether a stale lock was removed.
    """
    lock = os.path.join(build_directory, "lock")
    told = False
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return False
        if age >= stale_after:
            warnings.warn(
                f"lightning_horizon: removed a stale build lock of the host kernels ({lock}, {age:.0f} s old: the "
                "process that built them was killed); building them again",
                RuntimeWarning,
                stacklevel=2,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            return True
        if not told:
            print(
                f"lightning_horizon: waiting for another process's build of the host kernels ({lock}); a lock older "
                f"than {stale_after:.0f} s is taken as stale",
                file=sys.stderr,
            )
            told = True
        time.sleep(min(poll_s, max(stale_after - age, 0.0)))


def _cpu_tag() -> str:
    """A short hash of the CPU's features: builds use -march=native, so a shared cache must not mix CPUs."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def host_kernels_available() -> bool:
    """``HAS_HOST_KERNELS``: whether the C++ kernels are usable (builds them on the first call)."""
    return _load() is not None


def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    copy: torch.Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    clip_coef: float | torch.Tensor | None = None,
    clip_value: float | None = None,
    num_threads: int | None = None,
    use_extension: bool | None = None,
    seed: int = 0,
    exp_avg_scale: torch.Tensor | None = None,
    exp_avg_sq_scale: torch.Tensor | None = None,
) -> float:
    """One AdamW step (``maximize=False``, ``amsgrad=False``) on flat contiguous CPU tensors, in place. Returns the
    seconds the update itself took (the kernel's: measured while it runs without the GIL, so a wait to take the GIL
    back is not in it).

    Args:
        param: FP32. grad: BF16 or FP32 (read only: scaling and clamping are not written back).
        exp_avg, exp_avg_sq: FP32, or both BF16 (``optimizer_state_dtype="bf16"``): the moments are then updated in
            FP32 and stored with stochastic rounding, unbiased, its random bits a function of each element's index
            and ``seed`` (the same in the kernel and the fallback). Or int8 ``exp_avg`` and uint8 ``exp_avg_sq``
            (``optimizer_state_dtype="int8"``): blockwise codes (:class:`MomentFormat`, ``QBLOCK`` elements per
            block) with their FP32 block scales ``exp_avg_scale`` and ``exp_avg_sq_scale``, decoded, updated in FP32
            (the parameter's update uses the FP32 moments) and encoded again in the same pass.
        copy: BF16 buffer that receives ``param.to(torch.bfloat16)`` after the update, or None.
        step: The step count *after* incrementing (1 on the first step), as in ``state["step"]``.
        clip_coef: Multiplies the gradient first (``clip_grad_norm_``'s coefficient).
        clip_value: Then clamps it to ``[-clip_value, clip_value]`` (``clip_grad_value_``).
        num_threads: OpenMP threads of the kernel (default ``torch.get_num_threads()``).
        use_extension: Force (True) or refuse (False) the C++ kernel; default: use it when available.
        seed: Seed of the stochastic rounding of BF16 moments (one per parameter and step).
    """
    update = AdamwUpdate(
        param, grad, exp_avg, exp_avg_sq, copy, lr, beta1, beta2, eps, weight_decay, step, clip_coef, clip_value, seed,
        exp_avg_scale, exp_avg_sq_scale,
    )  # fmt: skip
    return fused_adamw_many_([update], num_threads=num_threads, use_extension=use_extension)


class AdamwUpdate(NamedTuple):
    """The arguments of one :func:`fused_adamw_` update, for :func:`fused_adamw_many_` (same meanings)."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    copy: torch.Tensor | None
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float
    clip_coef: float | torch.Tensor | None = None
    clip_value: float | None = None
    seed: int = 0
    exp_avg_scale: torch.Tensor | None = None
    exp_avg_sq_scale: torch.Tensor | None = None


def fused_adamw_many_(
    updates: Sequence[AdamwUpdate], *, num_threads: int | None = None, use_extension: bool | None = None
) -> float:
    """Several :func:`fused_adamw_` updates, one after another, in one call: the kernel checks them all first, then
    runs them with the GIL released once (not once per update: a thread that takes the GIL back waits for the
    others holding it). Returns the seconds the updates themselves took."""
    module = _load() if use_extension is not False else None
    if use_extension and module is None:
        raise RuntimeError("the fused AdamW extension is not available (see the warning issued when it was built)")
    arguments = [_kernel_arguments(u) for u in updates]
    if module is not None:
        return module.fused_adamw_many(arguments, _threads(num_threads))
    for a in arguments:  # all checked before any is applied, as in the kernel
        _check_reference(*a[:5], exp_avg_scale=a[-2], exp_avg_sq_scale=a[-1])
    start = time.perf_counter()
    for a in arguments:
        _reference(*a)
    return time.perf_counter() - start


def _kernel_arguments(u: AdamwUpdate) -> tuple:
    """``u`` as the kernel's argument tuple: Python floats and ints, the seed as 32 bits."""
    coef = None if u.clip_coef is None else float(u.clip_coef)
    value = None if u.clip_value is None else float(u.clip_value)
    hyper = (float(x) for x in (u.lr, u.beta1, u.beta2, u.eps, u.weight_decay, u.step))
    return (
        u.param, u.grad, u.exp_avg, u.exp_avg_sq, u.copy, *hyper, coef, value, int(u.seed) & 0xFFFFFFFF,
        u.exp_avg_scale, u.exp_avg_sq_scale,
    )  # fmt: skip


def _reference(
    param, grad, exp_avg, exp_avg_sq, copy, lr, beta1, beta2, eps, weight_decay, step, coef, value, seed,
    exp_avg_scale=None, exp_avg_sq_scale=None,
):  # fmt: skip
    """The pure-PyTorch path: torch's single-tensor AdamW formula, chunk by chunk (BF16 moments: in FP32, stored
    with the kernel's stochastic rounding; int8 moments: decoded, updated in FP32, encoded as the kernel does).
    Checked first by :func:`_check_reference`."""
    quantized = exp_avg.dtype == torch.int8
    n = param.numel()
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    flat = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    copy_flat = copy.view(-1) if copy is not None else None
    compact = exp_avg.dtype == torch.bfloat16
    seed = int(seed) & 0xFFFFFFFF
    seed_bits = _hash32(torch.tensor([seed]))
    # compact moments: sqrt(v) times the reciprocal of sqrt(1 - beta2^step), both rounded to FP32 as in the kernel
    inv_bias_correction2_sqrt = (1 / torch.tensor(bias_correction2_sqrt, dtype=torch.float32)).item()
    with torch.no_grad():
        for start in range(0, n, _FALLBACK_CHUNK):
            p, g, m_stored, v_stored = (t[start : start + _FALLBACK_CHUNK] for t in flat)
            blocks = slice(start // QBLOCK, (start + p.numel() + QBLOCK - 1) // QBLOCK)
            if quantized:
                m = dequantize_moment(m_stored, exp_avg_scale[blocks], EXP_AVG_FORMAT)
                v = dequantize_moment(v_stored, exp_avg_sq_scale[blocks], EXP_AVG_SQ_FORMAT)
            else:
                m, v = (m_stored.float(), v_stored.float()) if compact else (m_stored, v_stored)
            g = g.float() if g.dtype != torch.float32 else g.clone() if coef is not None or value is not None else g
            if coef is not None:
                g.mul_(coef)
            if value is not None:
                g.clamp_(-value, value)
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if quantized:
                codes, exp_avg_scale[blocks] = quantize_moment(
                    m, EXP_AVG_FORMAT, _random20(start, m.numel(), seed_bits)
                )
                m_stored.copy_(codes)
                codes, exp_avg_sq_scale[blocks] = quantize_moment(v, EXP_AVG_SQ_FORMAT)
                v_stored.copy_(codes)
            elif compact:  # 32 random bits per element: their low half rounds m, their high half v
                r = _element_bits(start, m.numel(), seed_bits)
                m_stored.copy_(_stochastic_bf16(m, r & 0xFFFF))
                v_stored.copy_(_stochastic_bf16(v, r >> 16))
            if compact or quantized:
                denom = (v.sqrt() * inv_bias_correction2_sqrt).add_(eps)
            else:
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
            if copy_flat is not None:
                copy_flat[start : start + _FALLBACK_CHUNK].copy_(p)


def _check_reference(param, grad, exp_avg, exp_avg_sq, copy, *, exp_avg_scale=None, exp_avg_sq_scale=None) -> None:
    """Raises ValueError for the arguments :func:`_reference` cannot update (the kernel's checks)."""
    if param.dtype != torch.float32:
        raise ValueError("param must be float32")
    if exp_avg.dtype == torch.int8:
        _check_int8_state(param.numel(), exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale)
    elif exp_avg.dtype not in (torch.float32, torch.bfloat16) or exp_avg_sq.dtype != exp_avg.dtype:
        raise ValueError(
            "exp_avg and exp_avg_sq must both be float32, both bfloat16, or int8 and uint8 (with their scales)"
        )
    if grad.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"grad must be float32 or bfloat16, got {grad.dtype}")
    n = param.numel()
    if any(t.numel() != n for t in (grad, exp_avg, exp_avg_sq)) or (copy is not None and copy.numel() != n):
        raise ValueError("all buffers must have the same number of elements")


def _check_int8_state(n, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale) -> None:
    blocks = (n + QBLOCK - 1) // QBLOCK
    if exp_avg_sq.dtype != torch.uint8:
        raise ValueError(f"with int8 exp_avg, exp_avg_sq must be uint8, got {exp_avg_sq.dtype}")
    for name, t in (("exp_avg_scale", exp_avg_scale), ("exp_avg_sq_scale", exp_avg_sq_scale)):
        if t is None or t.dtype != torch.float32 or t.numel() != blocks or not t.is_contiguous():
            raise ValueError(f"int8 moments need {name}: a contiguous float32 tensor of {blocks} block scales")


_MASK32 = 0xFFFFFFFF


def _element_bits(start: int, count: int, seed_bits: torch.Tensor) -> torch.Tensor:
    """The kernel's ``element_bits`` of elements ``start .. start + count - 1``: 32 random bits each (int64), the
    index xor the call's hashed seed times an odd constant."""
    x = (torch.arange(start, start + count, dtype=torch.int64) & _MASK32) ^ seed_bits
    # x * 0x9E3779B9 modulo 2^32 in two products that stay below 2^63 (int64 must not overflow)
    high = ((x * (0x9E3779B9 >> 16)) & 0xFFFF) << 16
    return (x * (0x9E3779B9 & 0xFFFF) + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The kernel's ``hash32`` (Wellons' lowbias32) on int64 tensors holding 32-bit values: a call's seed bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _stochastic_bf16(values: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """FP32 -> BF16 rounding up with probability (dropped bits / 2^16), as the kernel's ``float_to_bf16_stochastic``
    with 16 random bits ``r`` per element; non-finite values round to nearest as torch does."""
    bits = values.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + r) >> 16) & 0xFFFF
    out = rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(values)
    return torch.where(finite, out, values.to(torch.bfloat16))


# ------------------------------------------------------------------------------ int8 blockwise optimizer state
QBLOCK = 256
"""Elements per quantisation block of int8 moments: each block has one FP32 scale per moment (0.03 bytes/param)."""
_MANTISSA = 3  # mantissa bits of both int8 moment formats


@dataclasses.dataclass(frozen=True)
class MomentFormat:
    """An 8-bit floating-point code of a moment relative to its block's scale (the block's largest magnitude, kept
    in FP32): code 0 is zero, code ``c >= 1`` is ``2 ** (E - bias) * (1 + f / 8)`` with ``E, f = divmod(c - 1, 8)``,
    so the block's largest element codes as 1.0 (its magnitude times the scale's reciprocal, rounded once, is 1 or
    1 - 2^-24, never above; a signed code rounds 1 - 2^-24 down with probability 2^-20) and smaller ones keep 3
    mantissa bits over ``bias`` binades.

    * ``exp_avg`` (signed, int8): sign and magnitude codes 0..121, 15 binades below the block maximum; stochastic
      rounding (unbiased: small changes of a moment survive in expectation), values under the smallest code round
      to it or to zero with the matching probability.
    * ``exp_avg_sq`` (unsigned, uint8): codes 0..249, 31 binades; round to nearest; a positive value never becomes
      zero (below the smallest code it is stored as the smallest code). A second moment rounded to zero would make
      ``m / (sqrt(v) + eps)`` explode; rounded up, the update can only shrink.
    """

    bias: int
    signed: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    @functools.cached_property
    def table(self) -> torch.Tensor:
        """The value of each code (indexed by the code's byte), FP32: the float whose bits are ``(c - 1) << 20``
        over the format's exponent bias (the kernel decodes with the same integer ops)."""
        codes = torch.arange(256, dtype=torch.int64)
        if self.signed:
            codes = torch.where(codes > 127, codes - 256, codes)
        mag = codes.abs()
        bits = (((mag - 1) << 20) + ((127 - self.bias) << 23)) & _MASK32
        value = bits.to(torch.int32).view(torch.float32)
        value = torch.where(mag > 0, value, torch.zeros(()))
        return torch.where(codes < 0, -value, value)


EXP_AVG_FORMAT = MomentFormat(bias=15, signed=True)
EXP_AVG_SQ_FORMAT = MomentFormat(bias=31, signed=False)


def dequantize_moment(codes: torch.Tensor, scale: torch.Tensor, fmt: MomentFormat) -> torch.Tensor:
    """FP32 values of int8/uint8 ``codes`` (flat or any shape, ``QBLOCK`` elements per ``scale`` entry)."""
    flat = codes.reshape(-1)
    values = fmt.table[flat.view(torch.uint8).to(torch.int64)]
    per_element = scale.reshape(-1).repeat_interleave(QBLOCK)[: flat.numel()]
    return (values * per_element).view(codes.shape)


def quantize_moment(
    values: torch.Tensor, fmt: MomentFormat, random_bits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of FP32 ``values`` (flat), block by block as the kernel stores them. ``random_bits``
    (int64, 20 random bits per element) select stochastic rounding for a signed format; None rounds to nearest."""
    n = values.numel()
    blocks = (n + QBLOCK - 1) // QBLOCK
    padded = torch.zeros(blocks * QBLOCK, dtype=torch.float32)
    padded[:n] = values.reshape(-1)
    padded = padded.view(blocks, QBLOCK)
    magnitude = padded.abs() if fmt.signed else padded
    scale = magnitude.amax(dim=1, keepdim=True)  # NaN propagates: a diverged block stays diverged
    usable = (scale > 0) & torch.isfinite(scale)
    # times the reciprocal scale rounded once, as the kernel computes it
    u = torch.where(usable, magnitude * torch.where(usable, scale, torch.ones(())).reciprocal(), torch.zeros(()))
    bits = u.view(torch.int32).to(torch.int64)
    if random_bits is None:
        add: torch.Tensor | int = 1 << 19
        low = (u * 2.0**fmt.bias >= 0.5).to(torch.int64)
    else:
        r = torch.zeros(blocks * QBLOCK, dtype=torch.int64)
        r[:n] = random_bits.reshape(-1)
        add = r.view(blocks, QBLOCK)
        low = (add < (u.clamp(max=2.0**-fmt.bias) * 2.0 ** (fmt.bias + 20)).to(torch.int32)).to(torch.int64)
    code = ((bits + add) >> 20) - (((127 - fmt.bias) << _MANTISSA) - 1)
    below = u < 2.0**-fmt.bias
    if fmt.signed:
        code = torch.where(below, low, code)
        code = torch.where(padded < 0, -code, code)
    else:  # never zero for a positive value
        code = torch.where(below, torch.ones_like(code), code)
        code = torch.where(u > 0, code, torch.zeros_like(code))
    codes = code.reshape(-1)[:n].to(fmt.dtype)
    return codes, scale.reshape(-1)


def _random20(start: int, count: int, seed_bits: torch.Tensor) -> torch.Tensor:
    """20 random bits per element (the top of :func:`_element_bits`) for the stochastic rounding of int8
    ``exp_avg``."""
    return _element_bits(start, count, seed_bits) >> 12


def fold_(
    dst: torch.Tensor,
    src: torch.Tensor,
    overwrite: bool,
    num_threads: int | None = None,
    use_extension: bool | None = None,
) -> float:
    """``dst.copy_(src)`` (``overwrite``) or ``dst.add_(src)`` on flat contiguous CPU tensors (``dst`` FP32, ``src``
    FP32 or BF16: the same values as those torch ops), returning ``(dst ** 2).sum()`` of the result."""
    module = _load() if use_extension is not False else None
    if use_extension and module is None:
        raise RuntimeError("the host kernels extension is not available (see the warning issued when it was built)")
    if module is not None:
        return module.fold(dst, src, overwrite, _threads(num_threads))
    if overwrite:
        dst.copy_(src)
    else:
        dst.add_(src)
    return float(torch.linalg.vector_norm(dst, dtype=torch.float64) ** 2)


def pack_bf16_(
    dst: torch.Tensor, src: torch.Tensor, num_threads: int | None = None, use_extension: bool | None = None
) -> None:
    """``dst.copy_(src)`` from a flat FP32 tensor into a flat BF16 one (round to nearest even, bit for bit as torch)."""
    module = _load() if use_extension is not False and dst.dtype == torch.bfloat16 else None
    if use_extension and module is None:
        raise RuntimeError("the host kernels extension is not available (see the warning issued when it was built)")
    if module is not None and src.dtype == torch.float32 and src.is_contiguous() and dst.is_contiguous():
        module.pack_bf16(dst, src, _threads(num_threads))
    else:
        dst.copy_(src)


def _threads(num_threads: int | None) -> int:
    return torch.get_num_threads() if num_threads is None else max(1, int(num_threads))


# ---------------------------------------------------------------------------------- torch.optim.AdamW integration
def adamw_group_scalars(optimizer: torch.optim.Optimizer, group: dict) -> dict[str, float] | None:
    """``lr, beta1, beta2, eps, weight_decay`` of one param group when :func:`fused_adamw_` computes exactly the
    update ``optimizer`` would (a plain ``torch.optim.AdamW``, no amsgrad/maximize/capturable/differentiable, scalar
    hyper-parameters); None otherwise."""
    if type(optimizer) is not torch.optim.AdamW:
        return None
    if any(group.get(key, False) for key in ("amsgrad", "maximize", "capturable", "differentiable")):
        return None
    if not group.get("decoupled_weight_decay", True):
        return None
    try:
        beta1, beta2 = group["betas"]
        names = ("lr", "beta1", "beta2", "eps", "weight_decay")
        values = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        return {name: _as_float(value) for name, value in zip(names, values)}
    except (KeyError, TypeError, ValueError):
        return None


def adamw_state(
    state: dict, param: torch.Tensor, group: dict, moments: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(step, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale)`` of one parameter's AdamW state with moments
    stored as ``moments`` (FP32, BF16, or ``torch.int8``: int8/uint8 codes with FP32 block scales; the scales are
    None otherwise), initialised as torch's AdamW does on its first step when empty; moments stored otherwise (a
    resumed checkpoint) are converted in place (:func:`convert_adamw_state`). None when the state is not CPU tensors
    the kernel can update in place."""
    if len(state) == 0:
        with torch.inference_mode(False):
            # torch.optim.Adam._init_group: a 0-dim CPU `step`, float32 for fused (the default dtype's otherwise)
            fused = group.get("fused") or group.get("capturable")
            dtype = torch.float64 if not fused and torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.zeros((), dtype=dtype, device=param.device)
            for key, fmt in _FORMATS.items():
                code_dtype = fmt.dtype if moments == torch.int8 else moments
                state[key] = torch.zeros_like(param, dtype=code_dtype, memory_format=torch.preserve_format)
                if moments == torch.int8:
                    state[key + "_scale"] = torch.zeros(_num_blocks(param.numel()), dtype=torch.float32)
    step = state.get("step")
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.device.type != "cpu" or step.requires_grad:
        return None
    for key in _FORMATS:
        t = state.get(key)
        ok = isinstance(t, torch.Tensor) and t.dtype in _STORED_DTYPES and t.device.type == "cpu"
        if not ok or t.shape != param.shape or not t.is_contiguous() or t.requires_grad:
            return None
    convert_adamw_state(state, moments)
    scales = (state["exp_avg_scale"], state["exp_avg_sq_scale"]) if moments == torch.int8 else (None, None)
    return step, state["exp_avg"], state["exp_avg_sq"], *scales


_FORMATS = {"exp_avg": EXP_AVG_FORMAT, "exp_avg_sq": EXP_AVG_SQ_FORMAT}
_STORED_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)


def _num_blocks(numel: int) -> int:
    return (numel + QBLOCK - 1) // QBLOCK


def stored_moments_dtype(state: dict) -> torch.dtype | None:
    """How an AdamW state's moments are stored: FP32, BF16, ``torch.int8`` (codes and block scales), or None (no
    moments)."""
    t = state.get("exp_avg")
    if not isinstance(t, torch.Tensor):
        return None
    return torch.int8 if t.dtype in (torch.int8, torch.uint8) else t.dtype


_conversion_warned: set[tuple[torch.dtype, torch.dtype]] = set()


def convert_adamw_state(state: dict, dtype: torch.dtype) -> None:
    """Stores an AdamW state's moments as ``dtype`` (FP32, BF16 or ``torch.int8``), in place: int8 codes are decoded
    exactly to FP32, then rounded to the target (to nearest for int8). Warns once per direction when values change
    (FP32 state resumed with BF16 or int8 moments; BF16 and int8 resumed in FP32 are exact)."""
    current = stored_moments_dtype(state)
    if current is None or current == dtype:
        return
    exact = True
    with torch.inference_mode(False):
        for key, fmt in _FORMATS.items():
            t = state[key]
            if current == torch.int8:
                values = dequantize_moment(t, state.pop(key + "_scale"), fmt)
            else:
                values = t.float()
            if dtype == torch.int8:
                codes, scale = quantize_moment(values, fmt)
                state[key], state[key + "_scale"] = codes.view(t.shape), scale
                exact = exact and torch.equal(dequantize_moment(codes, scale, fmt).view(t.shape), values)
            else:
                state[key] = values.to(dtype)
                exact = exact and (dtype == torch.float32 or torch.equal(state[key].float(), values))
    if not exact and (current, dtype) not in _conversion_warned:
        _conversion_warned.add((current, dtype))
        warnings.warn(
            f"optimizer state stored as {STATE_DTYPE_NAMES.get(current, current)} converted to "
            f"{STATE_DTYPE_NAMES.get(dtype, dtype)} (optimizer_state_dtype differs from the checkpoint's): the moments "
            "are rounded once",
            stacklevel=4,
        )


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.requires_grad:
            raise ValueError("not a scalar")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("not a number")
    return float(value)
