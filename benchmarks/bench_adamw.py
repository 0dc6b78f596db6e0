"""Micro-benchmark of one CPU AdamW group update (not a test).

    python benchmarks/bench_adamw.py 50000000 [--threads T] [--repeats R] [--states fp32,bf16,int8] [--no-copy]
        [--kernel-only]

Compares, on N parameters of one flat FP32 group with a BF16 gradient and a BF16 copy of the weights:
  * torch: upcast the BF16 gradient into an FP32 scratch buffer, ``torch.optim.AdamW(fused=True).step()``, refresh
    the BF16 copy with ``copy_`` (what the engine's shadow path does, ~46 bytes/param of host-memory traffic);
  * kernel: ``lightning_horizon.engine.host_kernels.fused_adamw_`` (one pass, ~28 bytes/param with a BF16 gradient),
    once per moment storage of ``--states`` (fp32: 28 bytes/param; bf16: 20; int8: 16 and the block scales; 4 less
    each with ``--no-copy``, as the engine runs when uploads cast the FP32 masters on the GPU);
  * deepspeed: ``DeepSpeedCPUAdam(adamw_mode=True)`` (+ upcast + copy), when DeepSpeed is importable.
Each row is the median of R timed updates after one warm-up update.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_horizon.engine.host_kernels import QBLOCK, fused_adamw_, host_kernels_available

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocates optimizer state, faults pages in)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shadow_update(opt_cls, n: int, **extra):
    param = torch.nn.Parameter(torch.randn(n))
    grad_lp = torch.randn(n).to(torch.bfloat16)
    scratch = torch.empty(n)
    copy = torch.empty(n, dtype=torch.bfloat16)
    opt = opt_cls([param], **HYPER, **extra)
    param.grad = scratch

    def step():
        scratch.copy_(grad_lp)
        opt.step()
        copy.copy_(param.detach())

    return step


_STATE_BYTES = {"fp32": 28, "bf16": 20, "int8": 16}


def _kernel_update(n: int, use_extension: bool, state: str = "fp32", with_copy: bool = True):
    param = torch.randn(n)
    scales: dict[str, torch.Tensor] = {}
    if state == "fp32":
        m, v = torch.zeros(n), torch.zeros(n)
    elif state == "bf16":
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    else:
        m, v = torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8)
        blocks = -(-n // QBLOCK)
        scales = {"exp_avg_scale": torch.zeros(blocks), "exp_avg_sq_scale": torch.zeros(blocks)}
    grad_lp = torch.randn(n).to(torch.bfloat16)
    copy = torch.empty(n, dtype=torch.bfloat16) if with_copy else None
    count = [0]
    beta1, beta2 = HYPER["betas"]

    def step():
        count[0] += 1
        fused_adamw_(param, grad_lp, m, v, copy, lr=HYPER["lr"], beta1=beta1, beta2=beta2, eps=HYPER["eps"],
                     weight_decay=HYPER["weight_decay"], step=count[0], use_extension=use_extension, seed=count[0],
                     **scales)  # fmt: skip

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=50_000_000, help="parameters in the group")
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--states", default="fp32", help="moment storages of the kernel rows: fp32,bf16,int8")
    parser.add_argument(
        "--no-copy", action="store_true", help="kernel rows write no BF16 copy (the engine's cast_on_gpu)"
    )
    parser.add_argument("--kernel-only", action="store_true", help="only the kernel rows (no torch, DeepSpeed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n
    states = args.states.split(",")
    unknown = sorted(set(states) - set(_STATE_BYTES))
    if unknown:
        parser.error(f"--states: unknown moment storage {unknown}; choose from {sorted(_STATE_BYTES)}")
    rows = []
    if not args.kernel_only:
        rows.append(("torch fused AdamW + upcast + copy", 46, lambda: _shadow_update(torch.optim.AdamW, n, fused=True)))
    if host_kernels_available():
        for state in states:
            label = f"fused_adamw_ kernel, {state} moments" + (", no copy" if args.no_copy else "")
            nbytes = _STATE_BYTES[state] - (4 if args.no_copy else 0)  # the copy: 2 bytes read, 2 written
            rows.append((label, nbytes, lambda s=state: _kernel_update(n, True, s, not args.no_copy)))
    else:
        print("(the fused kernel is not available: its rows are missing)")
    if not args.kernel_only:
        rows.append(("fused_adamw_ PyTorch fallback", None, lambda: _kernel_update(n, False)))
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            rows.append(
                ("DeepSpeedCPUAdam + upcast + copy", 46, lambda: _shadow_update(DeepSpeedCPUAdam, n, adamw_mode=True))
            )
        except ImportError:
            print("(DeepSpeed is not importable: its row is missing)")
    print(f"N = {n:,} params, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'path':<40} {'ms':>9} {'G params/s':>11} {'GB/s (nominal)':>15}")
    for name, bytes_per_param, make in rows:
        seconds = _time(make(), args.repeats)  # buffers of one row at a time
        gbs = f"{n * bytes_per_param / seconds / 1e9:.1f}" if bytes_per_param else "-"
        print(f"{name:<40} {seconds * 1e3:>9.1f} {n / seconds / 1e9:>11.2f} {gbs:>15}")


if __name__ == "__main__":
    main()
