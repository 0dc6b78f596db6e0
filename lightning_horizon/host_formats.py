"""Host bytes per parameter of each optimizer-state format and training mode, and the largest model each host size
trains with them: the tables in the README, printed by ``python -m lightning_horizon.host_formats``.

Computed with the engine's own accounting (:func:`lightning_horizon.engine.footprint.host_bytes`, the function the
planner and the strategy's preflight use) over a dense decoder with the Qwen2.5-72B shape's proportions (embedding
share, 80 layers; untied lm_head), scaled to N parameters. Bytes/param is the part that grows with N (FP32 masters,
optimizer state, gradients); the fixed part (the process's overhead, the gradient pool, the preflight's margin) is
added once when the largest model is solved for. Uploads are the default GPU path (``cast_on_gpu``: the page-locked
FP32 masters are copied to the GPU and cast there), so there is no weight copy and no pinned upload staging. Modes: *no clipping* (automatic
optimization without clipping or accumulation: gradients go from a pool of a few layers straight into their
update), *clipping* (``gradient_clip_val``: every gradient is kept, in BF16, until the global norm is known),
*accumulation* (``accumulate_grad_batches > 1``: FP32 gradients). The pinned BF16 weight copy (``weight_copy=True``,
off by default) would add 2 bytes/param. The last row is LoRA
(``peft=lora``, rank 16 on every linear layer): the frozen base in BF16, masters, state and gradients only for the
adapters.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import torch

from lightning_horizon.engine.config import STATE_DTYPES
from lightning_horizon.engine.footprint import PREFLIGHT_MARGIN_BYTES, StoreShape, adamw_state_bytes, host_bytes

HOSTS = {"128 GiB": 128 * 2**30, "512 GiB": 512 * 2**30, "1 TiB": 2**40, "1.5 TiB": 3 * 2**39, "2 TiB": 2**41}
"""Host memory sizes of the README's table."""
MODES = {"no clipping": (False, True), "clipping": (False, False), "accumulation": (True, False)}
"""Training mode -> (accumulate in FP32, gradients through the pool)."""
GRAD_POOL_BUFFERS = 4
"""``EngineConfig.grad_pool_buffers``'s default."""
NUM_GRAD_SLABS = 2


LORA = "lora r=16"
"""The table's LoRA row: PEFT's LoRA of rank 16 on every linear layer, the frozen base in BF16 (``peft=lora``)."""


@cache
def reference_shape(lora: bool = False) -> StoreShape:
    """The Qwen2.5-72B shape's store (counted on the meta device); ``lora``: with :data:`LORA`'s adapters."""
    from lightning_horizon.lora import PeftSettings
    from lightning_horizon.models import ModelConfig, build_hf_config
    from lightning_horizon.planner import model_shape

    config = build_hf_config(ModelConfig(
        name="qwen2_72b", model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, attention_bias=True,
    ))  # fmt: skip
    peft = PeftSettings(method="lora", r=16) if lora else None
    return model_shape(config, peft=peft, frozen=lora).store


def scaled_shape(num_params: float, lora: bool = False) -> StoreShape:
    """A store of ``num_params`` parameters with the reference's proportions (80 layers, each scaled)."""
    ref = reference_shape(lora)
    f = num_params / ref.num_params
    return dataclasses.replace(
        ref,
        num_params=int(num_params),
        trainable_params=int(ref.optimizer_params * f),
        frozen_numel=int(ref.frozen_numel * f),
        store_numel=int(ref.store_numel * f),
        embedding_numel=int(ref.embedding_numel * f),
        layer_numel=int(ref.layer_numel * f),
        unit_numel=int(ref.unit_numel * f),
        grad_group_numel=int(ref.grad_group_numel * f),
    )


def footprint(
    num_params: float, state: str, mode: str, weight_copy: bool = False, lora: bool = False
) -> dict[str, int]:
    """Host bytes by component of a GPU run of ``num_params`` parameters with AdamW state ``state`` (``lora``: of
    :data:`LORA`)."""
    accumulate, pooled = MODES[mode]
    return host_bytes(
        scaled_shape(num_params, lora), torch.bfloat16, accumulate, weight_copy, NUM_GRAD_SLABS, True,
        optimizer_state_bytes=adamw_state_bytes(STATE_DTYPES[state]),
        grad_pool=GRAD_POOL_BUFFERS if pooled else 0, cast_on_gpu=not weight_copy,
    )  # fmt: skip


def bytes_per_param(state: str, mode: str, lora: bool = False) -> float:
    """The host bytes each further parameter costs (no weight copy)."""
    big, small = 100e9, 50e9
    grow = sum(footprint(big, state, mode, lora=lora).values()) - sum(footprint(small, state, mode, lora=lora).values())
    return grow / (big - small)


def largest_model(host: float, state: str, mode: str, lora: bool = False) -> float:
    """The most parameters whose footprint (no weight copy) plus the preflight's margin fits ``host`` bytes."""
    lo, hi = 0.0, host
    for _ in range(60):
        mid = (lo + hi) / 2
        fits = sum(footprint(mid, state, mode, lora=lora).values()) + PREFLIGHT_MARGIN_BYTES <= host
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


def table() -> str:
    """The README's table: bytes/param and the largest model (billions of parameters) per host, per format and
    mode."""
    head = "| optimizer state | mode | host B/param | " + " | ".join(HOSTS) + " |"
    lines = [head, "|" + "---|" * (3 + len(HOSTS))]
    for state in STATE_DTYPES:
        for mode in MODES:
            sizes = " | ".join(f"{largest_model(h, state, mode) / 1e9:.0f} B" for h in HOSTS.values())
            lines.append(f"| {state} | {mode} | {bytes_per_param(state, mode):.2f} | {sizes} |")
    sizes = " | ".join(f"{largest_model(h, 'fp32', 'clipping', lora=True) / 1e9:.0f} B" for h in HOSTS.values())
    lines.append(f"| fp32, {LORA} | clipping | {bytes_per_param('fp32', 'clipping', lora=True):.2f} | {sizes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
