"""The plan as a readable table (:func:`format_plan`), and the refusal of a plan that does not fit this machine
(:func:`check_fits`), with the single-setting changes that would make it fit."""

from __future__ import annotations

import dataclasses

from lightning_horizon.hardware import HardwareProfile
from lightning_horizon.planner import Plan, dtype_name, plan_shape


class PlanError(RuntimeError):
    """The run does not fit this machine; the message holds the plan table and what to change."""


def _gb(num_bytes: float) -> str:
    gb = num_bytes / 1e9
    return f"{gb:10.2f}" if gb >= 0.1 or gb == 0 else f"{gb:10.4f}"


def _count(num: float) -> str:
    return f"{num / 1e9:.3f} B" if num >= 1e8 else f"{num / 1e6:.3g} M"


def format_plan(plan: Plan) -> str:
    """A readable table: memory by component against what is available, step-time terms and the bottleneck."""
    s, hw, shape = plan.settings, plan.hardware, plan.shape
    n = shape.num_params
    unit = "largest GPU unit" if plan.compute_on_gpu else "largest layer unit"
    lines = [
        f"Plan: {shape.name} ({_count(n)} params, {shape.num_layers} layers, {unit} "
        f"{_count(shape.largest_gpu_unit_params)} params) on hardware {hw.name!r}",
        f"  batch {s.batch_size} x {s.max_seq_len} tokens, accumulate {s.accumulate_grad_batches}, "
        f"{'clipping' if s.clip_gradients else 'no clipping'}, "
        f"checkpoint_every {s.engine.checkpoint_every}, num_slots {s.engine.num_slots}, "
        f"loss_chunk_tokens {s.engine.loss_chunk_tokens}, "
        f"{s.optimizer}, compute {dtype_name(s.compute_dtype)}",
    ]
    several = plan.num_gpus > 1
    if several:
        lines.append(
            f"  {s.devices} GPU(s) per node x {s.num_nodes} node(s), data parallel (the batch above per GPU), "
            f"{s.node_store} store across nodes: a prediction of the scaling model (docs/scaling.md), not measured; "
            "the strategy runs it with strategy.sharded_streaming=true strategy.grad_reduce=device"
            + (f" strategy.node_store={s.node_store}" if s.num_nodes > 1 else "")
        )
    lines += ["", f"{'Host memory' + (' per node' if several else ''):<52}{'GB':>10}"]
    lines += [f"  {name:<50}{_gb(value)}" for name, value in plan.host_bytes.items() if value]
    if not plan.compute_on_gpu:
        lines.append(f"  {'compute working set (no GPU: below, in host RAM)':<50}{_gb(plan.gpu_total_bytes)}")
    verdict = "fits" if plan.host_fits else "DOES NOT FIT"
    lines.append(
        f"  {'total':<50}{_gb(plan.host_total_bytes)}  of {hw.host_memory_bytes / 1e9:.2f} available "
        f"({plan.host_total_bytes / n:.1f} B/param): {verdict}"
    )
    title = "GPU memory" if plan.compute_on_gpu else "Compute working set (CPU compute, counted in host memory)"
    title += " per GPU" if several else ""
    lines += ["", f"{title:<52}{'GB':>10}"]
    lines += [f"  {name:<50}{_gb(value)}" for name, value in plan.gpu_bytes.items() if value]
    if plan.compute_on_gpu:
        verdict = "fits" if plan.gpu_fits else "DOES NOT FIT"
        lines.append(
            f"  {'total':<50}{_gb(plan.gpu_total_bytes)}  of {hw.gpu_memory_bytes / 1e9:.2f} available: {verdict}"
        )
        lines.append("  (after the first step, resident slots and kept activations use the memory left unused)")
    else:
        lines.append(f"  {'total':<50}{_gb(plan.gpu_total_bytes)}")
    lines += ["", f"{'Step time (terms overlap; step = the largest)':<52}{'s':>10}"]
    for name, seconds in plan.step_seconds.items():
        mark = "  <- bottleneck" if name == plan.bottleneck else ""
        lines.append(f"  {name:<50}{seconds:10.3f}{mark}")
    lines.append(
        f"  {'predicted step':<50}{plan.step_time_s:10.3f}  {plan.tokens_per_step} tokens/step, "
        f"{plan.tokens_per_s:,.0f} tokens/s, {plan.model_tflops:.3g} model TFLOP/s (6NT)"
        + (f", {plan.model_tflops / plan.num_gpus:.3g} per GPU" if several else "")
    )
    for term in plan.unpredicted:
        lines.append(f"  (not predicted, so the step may be longer: {term})")
    if not plan.compute_on_gpu:
        lines.append(
            "  (CPU compute: estimated from a quick matmul measurement, derated to what training reached on a small "
            "CPU: expect +-50%)"
        )
    return "\n".join(lines)


# Single-setting changes tried when a run does not fit, as (config key, PlanSettings field).
_KNOBS = (
    ("strategy.loss_chunk_tokens", "loss_chunk_tokens"),
    ("strategy.num_slots", "num_slots"),
    ("strategy.checkpoint_every", "checkpoint_every"),
    ("data.batch_size", "batch_size"),
    ("data.max_seq_len", "max_seq_len"),
)


def _alternatives(plan: Plan, hardware: HardwareProfile) -> list[str]:
    """Single-setting changes that make the plan fit (the mildest value of each), as CLI overrides."""
    s = plan.settings
    candidates: dict[str, list[int]] = {
        "loss_chunk_tokens": [v for v in (2048, 1024, 512, 256) if v < s.engine.loss_chunk_tokens],
        "num_slots": [v for v in (2,) if v < s.engine.num_slots],
        "checkpoint_every": [v for v in (2, 4, 8, 16) if v != s.engine.checkpoint_every],
        "batch_size": [s.batch_size // 2**i for i in range(1, 8) if s.batch_size // 2**i >= 1],
        "max_seq_len": [s.max_seq_len // 2**i for i in range(1, 6) if s.max_seq_len // 2**i >= 256],
    }
    found = []
    for key, name in _KNOBS:
        for value in candidates[name]:
            if name in ("batch_size", "max_seq_len"):
                trial_settings = dataclasses.replace(s, **{name: value})
            else:
                trial_settings = dataclasses.replace(s, engine=dataclasses.replace(s.engine, **{name: value}))
            trial = plan_shape(plan.shape, hardware, trial_settings)
            if trial.fits:
                found.append(f"{key}={value}")
                break
    if s.clip_gradients and plan_shape(plan.shape, hardware, dataclasses.replace(s, clip_gradients=False)).fits:
        found.append(
            "trainer.gradient_clip_val=null (the gradients then go through the pool, not a whole-model buffer)"
        )
    return found


def check_fits(plan: Plan, hardware: HardwareProfile | None = None) -> None:
    """Raise `PlanError` (with the table and concrete suggestions) when host or GPU memory is exceeded.

    With `hardware.gpu_memory_bytes == 0` compute runs on the CPU: only host memory is checked, with the compute
    working set counted in it.
    """
    if hardware is not None and hardware != plan.hardware:
        plan = plan_shape(plan.shape, hardware, plan.settings)
    hardware = plan.hardware
    if plan.fits:
        return
    problems, advice = [], []
    if not plan.host_fits:
        per_param = plan.host_total_bytes / plan.shape.num_params
        problems.append(
            f"host memory: needs {plan.host_total_bytes / 1e9:.1f} GB ({per_param:.1f} B/param for "
            f"{plan.shape.num_params / 1e9:.2f} B params), {hardware.name!r} has {hardware.host_memory_bytes / 1e9:.1f} GB"
        )
        advice.append(
            f"use a machine with at least {plan.host_total_bytes / 1e9:.0f} GB of host RAM (e.g. hardware=h200, "
            "1.5 TB) or a smaller model"
        )
    if not plan.gpu_fits:
        largest = max(plan.gpu_bytes, key=plan.gpu_bytes.__getitem__)
        problems.append(
            f"GPU memory: needs {plan.gpu_total_bytes / 1e9:.1f} GB, {hardware.name!r} has "
            f"{hardware.gpu_memory_bytes / 1e9:.1f} GB (largest component: {largest})"
        )
    alternatives = _alternatives(plan, hardware)
    if alternatives:
        advice.append("any one of these fits: " + ", ".join(alternatives))
    elif not plan.gpu_fits:
        advice.append(
            "no single setting makes it fit: lower data.batch_size and data.max_seq_len together, "
            "or use a GPU with more memory"
        )
    raise PlanError(
        "the run does not fit: "
        + "; ".join(problems)
        + ".\nSuggestion: "
        + "; ".join(advice)
        + ".\n\n"
        + format_plan(plan)
    )
