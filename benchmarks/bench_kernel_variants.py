"""A/B of compile-time variants of the host kernels (not a test): builds ``cuda/host_kernels.cpp`` once per variant
(extra compiler flags, e.g. ``-mprefer-vector-width=512``) and times its AdamW per moment storage.

    python benchmarks/bench_kernel_variants.py --variant=base --variant=-mprefer-vector-width=512 [--n 200000000]
        [--threads 16]

A variant is comma-separated compiler flags added to the product's, or ``base`` (the product's flags only); a
variant ``SOURCE.cpp:flags`` builds another source (an earlier version of the kernels) with the product's flags and
``flags``. Builds run in
parallel (one process each) before any timing, so the timings do not share the CPU with a compiler. Each row: the
median of the kernel's own seconds over the repeats after the first, as G params/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch

from lightning_horizon.engine.host_kernels import BUILD_FLAGS as _PRODUCT_FLAGS

_SOURCE = os.path.join(os.path.dirname(__file__), "..", "cuda", "host_kernels.cpp")


def _source_and_flags(variant: str) -> tuple[str, list[str]]:
    source, _, flags = variant.rpartition(".cpp:")
    source, flags = (source + ".cpp", flags) if source else (_SOURCE, variant)
    return source, [f for f in flags.split(",") if f and f != "base"]


def _name(variant: str) -> str:
    tag = "".join(c if c.isalnum() else "_" for c in variant)
    return f"lh_kernel_variant_{tag}"


def _load(variant: str, root: str):
    from torch.utils.cpp_extension import load

    build = os.path.join(root, _name(variant))
    os.makedirs(build, exist_ok=True)
    source, flags = _source_and_flags(variant)
    return load(
        name=_name(variant),
        sources=[source],
        build_directory=build,
        extra_cflags=_PRODUCT_FLAGS + flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _time(module, state: str, n: int, threads: int, repeats: int) -> float:
    param = torch.randn(n)
    grad = torch.randn(n).to(torch.bfloat16)
    scales: tuple = (None, None)
    if state == "fp32":
        m, v = torch.zeros(n), torch.zeros(n)
    elif state == "bf16":
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    else:
        blocks = (n + 255) // 256
        m, v = torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8)
        scales = (torch.zeros(blocks), torch.zeros(blocks))
    seconds = [
        module.fused_adamw(
            param, grad, m, v, None, 1e-4, 0.9, 0.95, 1e-8, 0.1, float(s + 1), None, None, threads, s, *scales
        )  # fmt: skip
        for s in range(repeats + 1)
    ]
    return n / statistics.median(seconds[1:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", dest="variants", action="append", required=True, help="base, or flags")
    parser.add_argument("--n", type=int, default=200_000_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--states", default="fp32,bf16,int8")
    parser.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lh_kernel_variants"))
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    if args.build_only:
        _load(args.variants[0], args.root)
        return
    builds = [
        subprocess.Popen([sys.executable, __file__, f"--variant={v}", "--build-only", "--root", args.root])
        for v in args.variants
    ]
    if any(b.wait() != 0 for b in builds):
        raise SystemExit("a variant failed to build")
    states = args.states.split(",")
    print(f"n={args.n} threads={args.threads} (G params/s, kernel's own time)")
    print(f"{'variant':48s}" + "".join(f"{s:>8s}" for s in states))
    for variant in args.variants:
        module = _load(variant, args.root)
        rates = [_time(module, s, args.n, args.threads, args.repeats) for s in states]
        print(f"{variant:48s}" + "".join(f"{r:8.2f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
