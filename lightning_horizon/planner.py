"""The planner: host memory, GPU memory and step time of a run, predicted before anything is allocated.

The model is built on the meta device only to count each streamed unit's parameters: the embedding, each decoder
layer (layers may differ), the head (final norm + lm_head). Tied embeddings are stored once on the host, but the
head still streams its (shared) weight to the GPU. Notation: N = unique parameters, L = decoder layers, U = the
largest GPU unit (a decoder layer, or the head = final norm + lm_head; the embedding is gathered on the host and
never sits on the GPU), P_layers = parameters of all layers, V = vocab, H = hidden, I = intermediate size,
B x S = micro-batch tokens T, A = accumulate_grad_batches, K = checkpoint_every, c = bytes of compute_dtype (2 for
bf16), m = bytes of master_dtype (4 for fp32).

Host memory: the engine's own accounting, :func:`lightning_horizon.engine.footprint.host_bytes` over the store's
element counts (:class:`~lightning_horizon.engine.footprint.StoreShape`: N' = N with every parameter padded to 128
elements, as the store lays them out; a test checks a real engine's buffers against it):
    master weights       m * N' (N': the trained parameters only when frozen ones are held apart, below)
    optimizer state      8 * N for AdamW (two FP32 moments; step counters are negligible), 0 for SGD; N = the
                         trained parameters (with LoRA, ``peft=``, the adapters)
    frozen parameters    c * F' (F' = parameters frozen at setup, padded: the base model under LoRA), held in the
                         compute dtype with ``frozen_dtype=compute`` and no gradient, state or copy
    gradients            4 * N' with A > 1 (FP32 accumulation); with A = 1 c * N' in the compute dtype, the
                         embedding's rows in FP32; with A = 1 and no clipping (the updates run during the backward)
                         only the embedding's FP32 rows, and
    pinned gradient pool     grad_pool_buffers * G * c instead (G = the largest store group but the embedding, whose
                         FP32 buffer also takes a tied lm_head's gradient: each layer's gradients go from the pool to
                         its update)
    pinned upload staging    2 * min(64 Mi, U) * c, on a GPU without weight_copy and with cast_on_gpu=false (FP32 ->
                         BF16 packing in chunks; with cast_on_gpu, the default, uploads read the pinned masters)
    pinned gradient slabs    num_grad_slabs * min(256 Mi, largest layer) * c, on a GPU with A > 1 (larger
                         gradients are split across slabs)
    pinned weight copy   c * N' (with weight_copy; ``None``: none with cast_on_gpu, the default, otherwise the
                         engine's rule, :func:`~lightning_horizon.engine.footprint.weight_copy_fits`, against
                         this machine)
    process overhead     2 GiB (torch, Python), 4 GiB on a GPU (with CUDA's host side and what a first compile of
                         the layers keeps)

GPU memory:
    weight slots         num_slots * U * c (resident slots and kept activations, `resident_layers` and
                         `keep_activations`, are sized after the first step from the GPU memory this plan leaves
                         unused: not counted here)
    segment checkpoints  ceil(L / K) * B * S * H * c (:class:`~lightning_horizon.engine.segments.Segments`)
    recompute working set    min(K, L) * B * S * (8 * H + 3 * I) * c -- one layer's saved activations with an
                         SDPA/flash kernel, ~B*S*(16H + 6I) bytes in bf16 (8 hidden-sized tensors: norm in/out,
                         q, attention out, o-proj out, residual, post-norm, MLP out; 3 intermediate-sized: gate,
                         up, act*up), K layers of it while a segment is recomputed
    layer gradients      2 * U * c (one unit's gradients + the flat copy that goes down)
    upload cast buffer   min(32 Mi, U) * 4, with cast_on_gpu and no weight copy (FP32 masters are cast there)
    loss chunk           min(loss_chunk_tokens, B * S) * V * (c + 4 + 4) (logits, FP32 upcast, FP32 grad)
    head grad accumulator    V * H * 4
    CUDA context + slack 1.5 GiB

Without a GPU (`hardware.gpu_memory_bytes == 0`) compute runs on the CPU: the "GPU" components are the compute
device's working set in host memory (no CUDA context), and host + GPU components together are checked against
`host_memory_bytes`.

Step time (per optimizer step; the terms overlap, the step is their maximum and the bottleneck their argmax):
    gpu compute   A * (8 * P_layers * T + 2 * P_rec * T + 6 * V * H * T + 2 * B * S^2 * d_q * (4 * L + L_rec))
                  / gpu_bf16_tflops (cpu_tflops without a GPU). 8 P T = forward, recompute with graph, backward
                  (2 + 2 + 4). With K > 1 a segment's inputs are first recomputed without a graph: the layers that
                  are not the last of their segment (L_rec of them, P_rec parameters) run forward once more.
                  6 V H T: lm_head forward + backward (chunked, never recomputed). The attention term counts
                  causal QK^T and PV (d_q = heads * head_dim) for the same passes. This is eager layers with
                  every layer recomputed, at the profile's measured eager rate: kept activations skip the
                  recompute of the last layers and compiled layers run faster, so on CUDA it is an upper bound.
    h2d upload    A * c * (2 * P_layers + P_rec + P_head) / h2d_bytes_per_s: each layer goes up for the forward and
                  for the backward, the L_rec layers once more for the recompute ("3x minus the last of each
                  segment"); the head once per micro-batch.
    d2h gradients A * c * (P_layers + P_head) / d2h_bytes_per_s
    cpu optimizer N / cpu_adam_params_per_s
    host memory   (28 * N [AdamW reads master, grad, 2 moments, writes master, 2 moments] + 2 * N [BF16 packing]
                  + A * (upload bytes + 3 * down bytes [grads land, are read and folded into FP32]))
                  / host_memory_bytes_per_s -- ~40 B/param with A = 1, K = 1
    tokens/s = B * S * A / step
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from lightning_horizon.config_groups import engine_config
from lightning_horizon.engine.adapter import describe, find_causal_lm
from lightning_horizon.engine.config import GRAD_POOL_BUFFERS, EngineConfig, as_dtype
from lightning_horizon.engine.footprint import (
    CAST_STAGE_NUMEL,
    StoreShape,
    adamw_state_bytes,
    adamw_traffic_bytes,
    grad_pool_needed,
    host_bytes,
    weight_copy_fits,
)
from lightning_horizon.engine.segments import Segments
from lightning_horizon.hardware import HardwareProfile, load_profile
from lightning_horizon.lora import PeftSettings, apply_peft
from lightning_horizon.models import ModelConfig, build_hf_config, from_mapping
from lightning_horizon.precision import SUPPORTED, normalize_precision

GiB = 1024**3
CUDA_OVERHEAD_BYTES = int(1.5 * GiB)
CPU_LAYER_EFFICIENCY = 0.3
"""Fraction of the profile's measured CPU matmul rate (``cpu_tflops``, one 768^3 FP32 matmul) that training whole
decoder layers on the CPU reaches (small matmuls, attention, norms, the engine's bookkeeping): 0.25-0.35 measured on
a 2-core machine with the default tiny model (2026-12-02; the undereated plan predicted 3-4x the real tokens/s)."""

# optimizer name -> (state bytes/param, host-memory traffic bytes/param of one update)
OPTIMIZERS = {"adamw": (8, 28), "adam": (8, 28), "sgd": (0, 12)}


def precision_dtype(precision: Any) -> torch.dtype:
    """The compute dtype of a Trainer ``precision`` flag the horizon strategy accepts (``bf16-mixed``, ``32-true``)."""
    try:
        return SUPPORTED[normalize_precision(precision)]
    except ValueError as err:
        raise ValueError(f"trainer.precision: {err}") from None


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of the streamed units of a decoder-only LM (from a meta-device model)."""

    name: str
    """A label for tables (model_type and size)."""
    hidden_size: int
    """H."""
    intermediate_size: int
    """I (of the MLP)."""
    vocab_size: int
    """V."""
    num_attention_heads: int
    """Query heads."""
    head_dim: int
    """Width of one head."""
    embedding_params: int
    """Parameters of the input embedding (on the host only)."""
    layer_params: tuple[int, ...]
    """Parameters of each decoder layer."""
    head_params: int
    """Final norm + lm_head weight, as streamed to the GPU (the lm_head counted even when tied)."""
    num_params: int
    """Unique parameters of the model (tied weights once): what the host stores."""
    store: StoreShape
    """Elements of the host store and streamed units as the engine lays them out (what its memory is counted on)."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def largest_gpu_unit_params(self) -> int:
        """U: the largest unit that sits on the GPU (a layer or the head)."""
        return max(max(self.layer_params, default=0), self.head_params)


def model_shape(
    hf_config: PretrainedConfig, name: str | None = None, peft: PeftSettings | None = None, frozen: bool = False
) -> ModelShape:
    """Count each unit's parameters on a meta-device model (nothing is allocated); with ``peft``, the model with its
    adapters; ``frozen``: frozen parameters are held in the compute dtype (``EngineConfig.frozen_store_dtype``)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        if peft is not None and peft.enabled:
            model = find_causal_lm(apply_peft(model, peft))
    parts = describe(model)
    embed, lm_head, layers, norm = parts.embed, parts.lm_head, parts.layers, parts.norm
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    num_params = sum(p.numel() for p in model.parameters())  # each Parameter once: tied weights counted once
    size = f"{num_params / 1e9:.2f}B" if num_params >= 1e9 else f"{num_params / 1e6:.1f}M"
    return ModelShape(
        name=name or f"{hf_config.model_type} {size}",
        hidden_size=hidden,
        intermediate_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        num_attention_heads=heads,
        head_dim=head_dim,
        embedding_params=sum(p.numel() for p in embed.parameters()),
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        head_params=sum(p.numel() for p in norm.parameters()) + sum(p.numel() for p in lm_head.parameters()),
        num_params=num_params,
        store=StoreShape.of(parts, frozen=frozen),
    )


@dataclass(frozen=True)
class PlanSettings:
    """The run settings a plan depends on (names as in the config: data.*, trainer.*, optim.*; the engine's are
    ``strategy.*``, an :class:`EngineConfig`)."""

    batch_size: int
    """Sequences per micro-batch (data.batch_size)."""
    max_seq_len: int
    """Tokens per sequence (data.max_seq_len)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine's settings (strategy.*); the plan resolves ``weight_copy=None`` with the engine's own rule."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step (trainer.accumulate_grad_batches)."""
    clip_gradients: bool = False
    """Gradients are clipped (trainer.gradient_clip_val): they are kept until the step, so no gradient pool."""
    optimizer: str = "adamw"
    """Host optimizer (optim.name): adamw, adam or sgd."""
    master_dtype: torch.dtype = torch.float32
    """dtype of the host master weights."""
    compute_dtype: torch.dtype = torch.bfloat16
    """dtype of streamed weights and activations (from trainer.precision: bf16-mixed -> bf16, 32-true -> fp32)."""
    devices: int = 1
    """GPUs per node (trainer.devices), each with the micro-batch above (data parallel; planned only, see below)."""
    num_nodes: int = 1
    """Nodes (trainer.num_nodes); what each node holds is ``engine.node_store`` (``EngineConfig.node_store``)."""

    @property
    def node_store(self) -> str:
        """``engine.node_store``: with several nodes, ``sharded`` (each node's host holds its 1/num_nodes of the
        decoder layers, with their optimizer state, and every layer's weights cross the network) or ``replicated``
        (each node holds everything; only the gradients are all-reduced across nodes)."""
        return self.engine.node_store

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_seq_len", "accumulate_grad_batches", "devices", "num_nodes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        object.__setattr__(self, "master_dtype", as_dtype(self.master_dtype))
        object.__setattr__(self, "compute_dtype", as_dtype(self.compute_dtype))


@dataclass
class Plan:
    """Predicted memory and step time of one run on one machine."""

    shape: ModelShape
    """Parameter counts of the model's units."""
    hardware: HardwareProfile
    """The machine planned for."""
    settings: PlanSettings
    """The run settings."""
    host_bytes: dict[str, int] = field(default_factory=dict)
    """Host memory by component."""
    gpu_bytes: dict[str, int] = field(default_factory=dict)
    """Compute-device memory by component (in host memory when there is no GPU)."""
    step_seconds: dict[str, float] = field(default_factory=dict)
    """Each step-time term (they overlap)."""
    unpredicted: list[str] = field(default_factory=list)
    """Step-time terms left out for want of a rate in the hardware profile (the GPU links or the network of an
    ``auto`` profile): the predicted step is then a lower bound."""

    @property
    def compute_on_gpu(self) -> bool:
        return self.hardware.has_gpu

    @property
    def host_total_bytes(self) -> int:
        """Host memory needed, including the compute working set when compute runs on the CPU."""
        total = sum(self.host_bytes.values())
        return total if self.compute_on_gpu else total + self.gpu_total_bytes

    @property
    def gpu_total_bytes(self) -> int:
        return sum(self.gpu_bytes.values())

    @property
    def host_fits(self) -> bool:
        return self.host_total_bytes <= self.hardware.host_memory_bytes

    @property
    def gpu_fits(self) -> bool:
        return not self.compute_on_gpu or self.gpu_total_bytes <= self.hardware.gpu_memory_bytes

    @property
    def fits(self) -> bool:
        return self.host_fits and self.gpu_fits

    @property
    def step_time_s(self) -> float:
        return max(self.step_seconds.values())

    @property
    def bottleneck(self) -> str:
        return max(self.step_seconds, key=self.step_seconds.__getitem__)

    @property
    def num_gpus(self) -> int:
        """GPUs of the run (devices x num_nodes)."""
        return self.settings.devices * self.settings.num_nodes

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over every GPU."""
        s = self.settings
        return s.batch_size * s.max_seq_len * s.accumulate_grad_batches * self.num_gpus

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def model_tflops(self) -> float:
        """6 * N * T / step, the honest model TFLOP/s of the design brief."""
        return 6 * self.shape.num_params * self.tokens_per_step / self.step_time_s / 1e12


def plan(
    hf_config: PretrainedConfig,
    hardware: HardwareProfile,
    *,
    batch_size: int,
    max_seq_len: int,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    optimizer: str = "adamw",
    master_dtype: torch.dtype | str = torch.float32,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    name: str | None = None,
    engine: EngineConfig | None = None,
    peft: PeftSettings | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    **engine_settings: Any,
) -> Plan:
    """Predict host memory, GPU memory and step time (formulas in the module docstring); allocates nothing.

    ``engine`` (and ``engine_settings``, fields of :class:`EngineConfig` by name: ``checkpoint_every=4``) are the
    engine's settings, as ``strategy.*`` in the recipes."""
    engine = dataclasses.replace(engine or EngineConfig(), **engine_settings)
    settings = PlanSettings(
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        engine=engine,
        accumulate_grad_batches=accumulate_grad_batches,
        clip_gradients=bool(gradient_clip_val),
        optimizer=optimizer,
        master_dtype=master_dtype,
        compute_dtype=compute_dtype,
        devices=devices,
        num_nodes=num_nodes,
    )
    frozen = dataclasses.replace(engine, compute_dtype=settings.compute_dtype).frozen_store_dtype() is not None
    return plan_shape(model_shape(hf_config, name=name, peft=peft, frozen=frozen), hardware, settings)


def plan_from_config(
    cfg: Any, vocab_size: int | None = None, hardware: HardwareProfile | None = None, rows_per_example: int = 1
) -> Plan:
    """The plan of a composed `sft.yaml` config (model, hardware, data, strategy, trainer, optim blocks).

    `vocab_size` is the tokenizer's (needed when `model.vocab_size` is null); `hardware` defaults to
    `load_profile(cfg.hardware)`; `rows_per_example`: rows of a batch per example of `data.batch_size` (2 for
    preference pairs: the chosen and the rejected reply).
    """
    model_cfg = ModelConfig.from_dict(cfg.model)
    hardware = hardware if hardware is not None else load_profile(cfg.hardware)
    precision = cfg.trainer.precision
    if precision == "auto":  # the recipe's default: BF16 compute on a GPU, FP32 on the CPU
        precision = "bf16-mixed" if hardware.has_gpu else "32-true"
    return plan(
        build_hf_config(model_cfg, vocab_size=vocab_size),
        hardware,
        batch_size=cfg.data.batch_size * rows_per_example,
        max_seq_len=cfg.data.max_seq_len,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        optimizer=cfg.optim.name,
        compute_dtype=precision_dtype(precision),
        name=model_cfg.name,
        engine=engine_config(cfg.strategy),
        peft=from_mapping(PeftSettings, cfg.peft, prefix="peft") if "peft" in cfg else None,
        devices=_count_of(cfg.trainer.get("devices", 1), "trainer.devices"),
        num_nodes=_count_of(cfg.trainer.get("num_nodes", 1), "trainer.num_nodes"),
    )


def _count_of(value: Any, key: str) -> int:
    """A positive device or node count (``auto`` = 1: the horizon strategy's default)."""
    if value in ("auto", None):
        return 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive number of GPUs or nodes (or auto), got {value!r}")
    return value


def plan_shape(shape: ModelShape, hardware: HardwareProfile, settings: PlanSettings) -> Plan:
    """`plan` from already counted units (cheap: used to try alternative settings)."""
    s = settings
    n, num_layers = shape.num_params, shape.num_layers
    hidden, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    c = s.compute_dtype.itemsize
    m = s.master_dtype.itemsize
    unit = shape.store.unit_numel
    k = s.engine.checkpoint_every
    b, seq = s.batch_size, s.max_seq_len
    tokens = b * seq
    trained = shape.store.optimizer_params  # parameters with masters' updates, optimizer state and gradients
    state_bytes, optimizer_traffic = OPTIMIZERS[s.optimizer]
    if s.optimizer == "adamw" and s.engine.optimizer_state_dtype != "fp32":  # compact moments (one-pass AdamW)
        state_bytes = adamw_state_bytes(s.engine.state_dtype)
        optimizer_traffic = adamw_traffic_bytes(s.engine.state_dtype)
    accumulate = s.accumulate_grad_batches > 1
    # the strategy's rule (automatic optimization, as the recipes train): updates during the backward unless clipping
    run = dataclasses.replace(s.engine, accumulate_grads=accumulate, updates_in_backward=not s.clip_gradients)
    if run.grad_pool_buffers is None:  # the engine's rule, against this machine's host memory
        whole = host_bytes(
            shape.store, s.compute_dtype, accumulate, False, s.engine.num_grad_slabs, hardware.has_gpu,
            optimizer_state_bytes=state_bytes, master_bytes=m,
        )  # fmt: skip
        needed = grad_pool_needed(whole, hardware.host_memory_bytes)
        run = dataclasses.replace(run, grad_pool_buffers=GRAD_POOL_BUFFERS if needed else 0)
    pool = run.pooled_grads

    cast_on_gpu = hardware.has_gpu and s.engine.cast_on_gpu is not False  # the engine's rule (config.resolve)

    def footprint(weight_copy: bool) -> dict[str, int]:  # the engine's own accounting (engine/footprint.py)
        return host_bytes(
            shape.store, s.compute_dtype, accumulate, weight_copy, s.engine.num_grad_slabs, hardware.has_gpu,
            optimizer_state_bytes=state_bytes, master_bytes=m, grad_pool=pool, cast_on_gpu=cast_on_gpu,
        )  # fmt: skip

    if s.engine.weight_copy is None:  # the engine's rule (config.resolve), against this machine's host memory
        keep = weight_copy_fits(hardware.has_gpu, footprint(True), hardware.host_memory_bytes)
        s = dataclasses.replace(s, engine=dataclasses.replace(s.engine, weight_copy=keep and not cast_on_gpu))
    masters_uploaded = cast_on_gpu and not s.engine.weight_copy  # uploads carry the FP32 masters, cast on the GPU
    pinned = "pinned " if hardware.has_gpu else ""
    gradients = "fp32" if accumulate else f"{dtype_name(s.compute_dtype)}, embedding fp32"
    if pool:
        gradients = "embedding fp32; the others in the pool"
    labels = {
        "masters": f"master weights ({dtype_name(s.master_dtype)}, {m} B/param)",
        "optimizer state": f"optimizer state ({s.optimizer}, {state_bytes:.3g} B/param)",
        "gradients": f"gradients ({gradients})",
        "upload staging": f"{pinned}upload staging (2 x {_size(shape.store.staging_numel * c)})",
        "gradient slabs": f"{pinned}gradient slabs ({s.engine.num_grad_slabs} x {_size(shape.store.slab_numel * c)})",
        "gradient pool": f"{pinned}gradient pool ({pool} x {_size(shape.store.grad_group_numel * c)})",
        "weight copy": f"{pinned}weight copy ({dtype_name(s.compute_dtype)}, {c} B/param)",
        "frozen parameters": f"{pinned}frozen parameters ({dtype_name(s.compute_dtype)}, {c} B/param)",
        "process overhead": "process overhead",
    }
    host = {labels[key]: value for key, value in footprint(bool(s.engine.weight_copy)).items()}
    segments = Segments(num_layers, k)
    gpu = {
        f"weight slots ({s.engine.num_slots} x largest unit)": s.engine.num_slots * unit * c,
        f"segment checkpoints ({segments.num_checkpoints} x B x S x H)": segments.num_checkpoints * tokens * hidden * c,
        f"recompute working set (K = {min(k, num_layers)} layer(s))": min(k, num_layers)
        * tokens
        * (8 * hidden + 3 * inter)
        * c,
        "layer gradients (unit + flat copy)": 2 * unit * c,
        "loss chunk (logits, fp32 upcast, fp32 grad)": min(s.engine.loss_chunk_tokens, tokens) * vocab * (c + 4 + 4),
        "head fp32 gradient accumulator": vocab * hidden * 4,
    }
    if masters_uploaded:
        gpu["upload cast buffer (fp32)"] = min(CAST_STAGE_NUMEL, unit) * m
    if hardware.has_gpu:
        gpu["CUDA context + allocator slack"] = CUDA_OVERHEAD_BYTES

    # Layers that are not the last of their segment run forward once more (the no-graph recompute) when K > 1.
    recomputed = [i for i, recompute in segments.backward_order() if recompute]
    params_layers = sum(shape.layer_params)
    params_recomputed = sum(shape.layer_params[i] for i in recomputed)
    d_q = shape.num_attention_heads * shape.head_dim
    attention_flops = 2 * b * seq * seq * d_q * (4 * num_layers + len(recomputed))
    flops = 8 * params_layers * tokens + 2 * params_recomputed * tokens + 6 * vocab * hidden * tokens + attention_flops
    uploaded = 2 * params_layers + params_recomputed + shape.head_params
    # bytes per uploaded parameter: the compute dtype; trained parameters' FP32 masters when they are uploaded as such
    upload = uploaded * (c + (m - c) * trained / n if masters_uploaded else c)
    download = c * (params_layers + shape.head_params) * trained / n  # only trained parameters' gradients go down
    acc = s.accumulate_grad_batches
    # the optimizer's pass (its weight-copy write only with the copy) + what uploads read (and, packing on the CPU,
    # the FP32 read and the staging write before it) + gradients down and folded
    copy_write = 0 if s.engine.weight_copy or not hardware.has_gpu else c
    packing = (
        (m + c) * uploaded * trained / n if hardware.has_gpu and not s.engine.weight_copy and not cast_on_gpu else 0
    )
    host_traffic = (optimizer_traffic - copy_write + 2) * trained + acc * (upload + packing + 3 * download)
    if hardware.has_gpu:
        steps = {
            "gpu compute": acc * flops / (hardware.gpu_bf16_tflops * 1e12),
            "h2d upload": acc * upload / hardware.h2d_bytes_per_s,
            "d2h gradients": acc * download / hardware.d2h_bytes_per_s,
        }
    else:  # the matmul rate measured by the profile, derated by what whole layers reach on a CPU
        steps = {"cpu compute": acc * flops / (hardware.cpu_tflops * CPU_LAYER_EFFICIENCY * 1e12)}
    steps["cpu optimizer"] = trained / hardware.cpu_adam_params_per_s
    steps["host memory traffic"] = host_traffic / hardware.host_memory_bytes_per_s
    unpredicted: list[str] = []
    if s.devices > 1 or s.num_nodes > 1:
        host, steps, unpredicted = _several_gpus(host, steps, s, hardware, acc * upload, acc * download, shape)
    return Plan(
        shape=shape,
        hardware=hardware,
        settings=s,
        host_bytes=host,
        gpu_bytes=gpu,
        step_seconds=steps,
        unpredicted=unpredicted,
    )


# Host components held once per node's store (scaled by the node's share of it) vs once per process (per GPU).
_PER_PROCESS = ("upload staging", "gradient slabs", "process overhead")


def _several_gpus(
    host: dict[str, int],
    steps: dict[str, float],
    s: PlanSettings,
    hardware: HardwareProfile,
    upload: float,
    download: float,
    shape: ModelShape,
) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """Per-node host memory, the step terms and the terms left out for want of a rate of ``s.devices`` GPUs on each of ``s.num_nodes`` nodes (the scaling
    model of ``docs/scaling.md``), from the one-GPU figures. Every GPU runs the same micro-batches (data parallel).

    Within a node the GPUs share one host store: each uploads 1/devices of every layer over its own PCIe link and
    the layer is all-gathered over the GPU links; gradients are reduce-scattered there and each GPU sends its share
    down. Across nodes, ``sharded``: each node holds 1/num_nodes of the decoder layers (and steps them) besides the
    embedding, norm and head, which every node holds, and every layer's shards cross the network (from the layer's
    node before the gather, gradient shards back to it); ``replicated``: each node holds and steps everything, and
    the gradients are all-reduced across nodes.
    """
    n, m = s.devices, s.num_nodes
    unpredicted = []  # terms whose rate the profile lacks (an `auto` profile measures neither): left out
    if n > 1 and hardware.has_gpu and hardware.gpu_link_bytes_per_s <= 0:
        unpredicted.append(
            f"gpu links: hardware {hardware.name!r} has no gpu_link_bytes_per_s (NVLink bandwidth per GPU and "
            "direction)"
        )
    if m > 1 and hardware.network_bytes_per_s <= 0:
        unpredicted.append(f"network: hardware {hardware.name!r} has no network_bytes_per_s (per node and direction)")
    layers = sum(shape.layer_params)
    held = layers / shape.num_params if shape.num_params else 0.0  # of the store: the layers' part
    streamed = layers / (layers + shape.head_params) if layers else 0.0  # of the bytes streamed: the layers' part
    # of the model's store each node holds, steps and uploads: its share of the layers, and the rest whole
    share = held / m + (1 - held) if s.node_store == "sharded" else 1.0
    upload_share = streamed / m + (1 - streamed) if s.node_store == "sharded" else 1.0
    per_node = {}
    for label, value in host.items():
        per_process = any(label.split(" (")[0].endswith(key) for key in _PER_PROCESS)
        per_node[label] = int(value * n) if per_process else int(value * share)
    out = dict(steps)
    for key in ("h2d upload", "d2h gradients"):
        if key in steps:  # (a CPU run has no transfers)
            out[key] = steps[key] * upload_share / n
    out["cpu optimizer"] = steps["cpu optimizer"] * share
    out["host memory traffic"] = steps["host memory traffic"] * share
    if n > 1 and hardware.has_gpu and hardware.gpu_link_bytes_per_s > 0:  # all-gather of each layer, reduce-scatter
        # of its gradients over the GPU links
        out["gpu links (all-gather, reduce-scatter)"] = (
            (upload + download) * (n - 1) / n / hardware.gpu_link_bytes_per_s
        )
    if m > 1 and hardware.network_bytes_per_s > 0:  # per node: the other nodes' shards of every layer in, gradient
        # shards out (or a gradient all-reduce)
        crossing = (upload + download) * streamed if s.node_store == "sharded" else 2 * download
        out["network"] = crossing * (m - 1) / m / hardware.network_bytes_per_s
    return per_node, out, unpredicted


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's short name in tables: fp32, bf16, fp16."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _size(num_bytes: float) -> str:
    """A short human size for labels: 128 MiB, 1.5 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"
