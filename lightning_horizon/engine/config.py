"""Settings of the streaming engine, and the dtype names they accept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def as_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)}") from None


@dataclass
class EngineConfig:
    """Settings of the streaming engine (the same names are used by the strategy and the recipes' ``strategy:``)."""

    device: str | torch.device | None = None
    """Compute device; None picks ``cuda`` when available, else ``cpu``."""
    compute_dtype: str | torch.dtype = "bf16"
    """Dtype of the streamed weights and activations (masters stay FP32)."""
    checkpoint_every: int = 1
    """K: keep every K-th layer's input in the forward; backward recomputes the K-1 layers in between."""
    num_slots: int = 2
    """GPU weight slots (2 = double buffering)."""
    resident_layers: int | None = None
    """Extra GPU slots, one decoder layer each, that keep layers resident between uses: the backward finds the
    layers the forward left, and micro-batches of one step reuse them (uploads and FP32 -> BF16 packing happen once
    per weight version instead of once per pass). None: on CUDA, after the first step, as many as the measured
    unused GPU memory holds (up to every layer) while a fifth of the device, or as much again as the first step's
    working set if that is more, stays free; 0: none. Set a number (or 0) when later batches can be much longer
    than the first."""
    num_grad_slabs: int = 3
    """Pinned slabs for gradients in flight to the host."""
    loss_chunk_tokens: int = 2048
    """Rows of logits computed at once by the chunked loss."""
    pin_masters: bool = False
    """Page-lock the FP32 master buffers too (uploads come from pinned BF16 staging, so this is rarely useful)."""
    track_grad_norm: bool = False
    """Record per-parameter gradient norms as gradients land (makes clipping by norm free); the strategy sets it."""
    weight_copy: bool = True
    """Keep a copy of the masters in the compute dtype in pinned host memory (+2 bytes/param for BF16), refreshed
    by the optimizer: uploads then need no FP32 -> BF16 packing on the way. Off: every upload packs from FP32."""
    offload_checkpoints: bool | None = None
    """Move segment checkpoints to pinned host memory during the forward and back one segment ahead in the
    backward, so GPU memory does not grow with depth. None: only when a pass's checkpoints would take more than a
    fifth of the GPU's memory. Ignored on the CPU."""
    host_kernels: bool | None = None
    """Use the compiled one-pass host kernels of ``lightning_horizon/csrc/host_kernels.cpp`` (built on first use):
    a plain ``torch.optim.AdamW`` steps in one pass (reads the BF16 gradient, writes the BF16 weight copy; matches
    ``AdamW(fused=True)`` to ~1 ulp), accumulated gradients fold into FP32 with their norm in the same pass, and
    uploads pack FP32 -> BF16 with a bounded thread count. None: on for CUDA compute, off on the CPU (where the
    tests compare with PyTorch's own AdamW bit for bit, and a CPU run does not wait for a compiler)."""
    host_threads: int | None = None
    """CPU threads of each host kernel (optimizer, gradient fold, upload packing; they may run at once: on a
    16-core H200 host, sharing the cores beat splitting them). None: ``torch.get_num_threads()``."""
    sparse_experts: bool = True
    """Expert-sparse streaming of MoE layers: the prefetched upload of a layer leaves out its routed experts'
    weights; just before the experts run, only the experts that received tokens are uploaded (those not already in
    the slot), and only their gradients go back to the host (the others' are exactly zero; the host zero-fills them,
    so the optimizer steps every expert as a dense run would). Off: every expert is streamed and sent back."""
    accumulate_grads: bool = False
    """Gradients are summed over several backward passes per step: keep them in FP32 on the host (4 bytes/param).
    Off: they stay in the compute dtype (2 bytes/param for BF16); a second backward before a step switches over."""

    keep_activations: int | None = None
    """Decoder layers at the end of the stack whose forward keeps its autograd graph (activations) on the GPU, so
    their backward runs without recomputing them (whole segments of ``checkpoint_every`` layers). Each keeps its
    weight slot claimed until its backward, so at most (unclaimed slots - 2) layers are kept: give slots with
    ``resident_layers``. 0: every layer is recomputed. None: on CUDA, after the first step, as many as the measured
    unused GPU memory holds (the first step measures one layer's graph; the headroom of ``resident_layers`` stays
    free), with the slots they need, fewer in proportion for a later pass with more tokens than the first; resident
    slots then take what is left. On the CPU None keeps none."""

    compile_layers: bool | None = None
    """Run the decoder layers through ``torch.compile`` (Inductor fuses the norms, rotary embedding, activation and
    residual adds around the matmuls; +18% per 7B layer and +31% per 3B layer on an H200). The slots' layer
    templates share compiled graphs (weights are graph inputs): the first step compiles (~10 s), later steps reuse.
    Layers with routed experts always run eager (their expert upload reads the routing mid-layer), and so do models
    with dropout (the recomputation replays the forward's random masks through PyTorch's own RNG). None: on for CUDA
    compute where Triton and a C compiler are installed, off on the CPU; False: eager PyTorch."""

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CUDA device or 'cpu', got {self.device}")
        self.compute_dtype = as_dtype(self.compute_dtype)
        if self.host_threads is None:
            self.host_threads = torch.get_num_threads()
        for name in ("checkpoint_every", "loss_chunk_tokens", "num_grad_slabs", "host_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_activations is not None and self.keep_activations < 0:
            raise ValueError(f"keep_activations must be >= 0 or None, got {self.keep_activations}")
        if self.resident_layers is not None and self.resident_layers < 0:
            raise ValueError(f"resident_layers must be >= 0 or None, got {self.resident_layers}")
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (double buffering), got {self.num_slots}")
