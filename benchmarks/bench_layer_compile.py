"""Micro-benchmark: one decoder layer as the engine runs it, eager vs ``torch.compile`` (not a test).

    python cuda/bench_layer_compile.py [--shape 7b|3b] [--batch 16] [--seq 2048] [--repeats 5]

Per step and layer the engine runs a no-grad forward (the forward pass), then in the backward a recomputing forward
with grad and ``torch.autograd.grad`` for the layer's input and weights. Two layer instances with their own
weights alternate, as two GPU slots do. Prints the time of one layer's work, its TFLOP/s (matmul + attention
FLOPs of the three passes: forward, recomputed forward, backward), and how many times Dynamo compiled.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

SHAPES = {  # hidden, intermediate, heads, kv heads (Qwen2.5)
    "7b": (3584, 18944, 28, 4),
    "3b": (2048, 11008, 16, 2),
    "tiny": (64, 128, 4, 2),
}


def build(shape: str, device: torch.device):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    h, i, nh, kv = SHAPES[shape]
    cfg = Qwen2Config(
        hidden_size=h,
        intermediate_size=i,
        num_attention_heads=nh,
        num_key_value_heads=kv,
        num_hidden_layers=2,
        vocab_size=1024,
        max_position_embeddings=32768,
    )
    cfg._attn_implementation = "sdpa"
    layers = [Qwen2DecoderLayer(cfg, layer_idx=j).to(device, torch.bfloat16) for j in range(2)]
    return cfg, layers, Qwen2RotaryEmbedding(cfg).to(device)


def layer_flops(cfg, tokens: int, seq: int) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * d
    params = h * (h + 2 * kv) + h * h + 3 * h * i
    attn = 2 * 2 * tokens * seq * h / 2  # QK^T and PV, causal half
    return 4 * (2 * params * tokens + attn)  # forward + recomputed forward + backward (2x)


def run(layers, hidden, pos, repeats: int) -> float:
    params = [list(m.parameters()) for m in layers]

    def once():
        for j, m in enumerate(layers):
            with torch.no_grad():
                m(hidden, position_embeddings=pos, attention_mask=None)
            x = hidden.detach().requires_grad_(True)
            with torch.enable_grad():
                out = m(x, position_embeddings=pos, attention_mask=None)
                out = out[0] if isinstance(out, tuple) else out
                torch.autograd.grad(out, [x, *params[j]], torch.ones_like(out))

    for _ in range(2):
        once()
    _sync(hidden.device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    _sync(hidden.device)
    return (time.perf_counter() - start) / (repeats * len(layers))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg, layers, rotary = build(args.shape, device)
    hidden = torch.randn(args.batch, args.seq, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    position_ids = torch.arange(args.seq, device=device).unsqueeze(0)
    pos = rotary(hidden, position_ids)
    flops = layer_flops(cfg, args.batch * args.seq, args.seq)

    eager = run(layers, hidden, pos, args.repeats)
    print(
        f"{args.shape} {args.batch}x{args.seq} eager    {eager * 1e3:8.2f} ms/layer  {flops / eager / 1e12:6.1f} TFLOP/s"
    )
    start = time.perf_counter()
    for m in layers:
        m.compile()
    compiled = run(layers, hidden, pos, args.repeats)
    warm = time.perf_counter() - start
    frames = counters["stats"]["unique_graphs"]
    print(
        f"{args.shape} {args.batch}x{args.seq} compiled {compiled * 1e3:8.2f} ms/layer  {flops / compiled / 1e12:6.1f} "
        f"TFLOP/s  ({eager / compiled:.3f}x eager; {frames} graphs, {warm:.0f} s incl. compilation)"
    )


if __name__ == "__main__":
    main()
