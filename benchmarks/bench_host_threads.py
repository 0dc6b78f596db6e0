"""Micro-benchmark of the host kernels' thread use (not a test).

    python cuda/bench_host_threads.py [N]

On N elements (default 233M, one Qwen2.5-7B layer): torch's ``add_`` of a BF16 tensor into an FP32 one (main thread
and a worker thread), the fold kernel and the one-pass AdamW kernel alone at 2/4/8/16 threads, then both running at
once in two threads with several thread splits (what the engine's gradient and optimizer workers do). Fold GB/s
count 10 bytes per element (read BF16, read and write FP32).
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from lightning_horizon.engine.host_kernels import fold_, fused_adamw_, host_kernels_available


def _best(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    if not host_kernels_available():
        raise SystemExit("the host kernels could not be built here")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 233_000_000
    dst, src = torch.randn(n), torch.randn(n).to(torch.bfloat16)
    p, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
    g, c = torch.randn(n).to(torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)

    def fold(t):
        return lambda: fold_(dst, src, False, num_threads=t)

    def adam(t):
        return lambda: fused_adamw_(p, g, m, v, c, num_threads=t, **hyper)

    print("torch threads", torch.get_num_threads())
    print(f"torch add_ bf16->fp32 main thread: {n * 10 / _best(lambda: dst.add_(src)) / 1e9:.1f} GB/s")
    out: dict[str, float] = {}
    worker = threading.Thread(target=lambda: out.setdefault("t", _best(lambda: dst.add_(src))))
    worker.start()
    worker.join()
    print(f"torch add_ in a worker thread: {n * 10 / out['t'] / 1e9:.1f} GB/s")
    for t in (2, 4, 8, 16):
        print(
            f"fold kernel T={t}: {n * 10 / _best(fold(t)) / 1e9:.1f} GB/s   adamw T={t}: {n / _best(adam(t)) / 1e9:.2f} Gparam/s"
        )
    for tf, ta in ((8, 16), (16, 16), (4, 12), (8, 8)):
        res: dict[str, float] = {}

        def loop(name, fn, k=4, res=res):
            start = time.perf_counter()
            for _ in range(k):
                fn()
            res[name] = (time.perf_counter() - start) / k

        a = threading.Thread(target=loop, args=("fold", fold(tf)))
        b = threading.Thread(target=loop, args=("adam", adam(ta)))
        a.start()
        b.start()
        a.join()
        b.join()
        print(
            f"concurrent fold T={tf} {n * 10 / res['fold'] / 1e9:.1f} GB/s + adamw T={ta} {n / res['adam'] / 1e9:.2f} Gparam/s"
        )


if __name__ == "__main__":
    main()
