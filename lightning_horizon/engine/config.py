"""``EngineConfig``: every setting of the streaming engine, declared once (each field documented under it).

The same names are used everywhere: ``HorizonEngine(model, config)`` or ``HorizonEngine(model, **settings)``,
``HorizonStrategy(config, **settings)``, the recipes' ``strategy.*`` keys (the ``strategy`` config group is built
from this class) and the planner. A field left ``None`` means "decide for me"; :func:`resolve` decides every such
field for a model and a machine in one place, and the engine logs the result once.

Five fields describe the run rather than the engine (``run`` in their metadata): the strategy sets them from the
Trainer (``accelerator``, ``precision``, ``accumulate_grad_batches``, ``gradient_clip_val``, and the module's
``automatic_optimization``), so they are not strategy or recipe settings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

GRAD_POOL_BUFFERS = 4
"""Buffers of the gradient pool when ``EngineConfig.grad_pool_buffers=None`` decides for one."""

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
"""``EngineConfig.optimizer_state_dtype`` names (``torch.int8`` stands for blockwise int8/uint8 codes with FP32 block
scales)."""
STATE_DTYPE_NAMES = {dtype: name for name, dtype in STATE_DTYPES.items()}
"""The name of each ``STATE_DTYPES`` dtype (for messages)."""

FROZEN_DTYPES = ("compute", "fp32")
"""``EngineConfig.frozen_dtype`` names."""

GRAD_REDUCE = ("host", "device")
"""``EngineConfig.grad_reduce`` names."""

NODE_STORES = ("replicated", "sharded")
"""``EngineConfig.node_store`` names."""

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
    """Settings of the streaming engine (see the module docstring)."""

    checkpoint_every: int = 1
    """K: keep every K-th layer's input in the forward; the backward recomputes the K-1 layers in between."""
    num_slots: int = 2
    """GPU weight slots for streamed units (2 = double buffering)."""
    resident_layers: int | None = None
    """Extra GPU slots, one decoder layer each, that keep layers resident between uses: the backward finds the
    layers the forward left, and micro-batches of one step reuse them (uploads and FP32 -> BF16 packing happen once
    per weight version instead of once per pass). None: on CUDA, after the first step, as many as the measured
    unused GPU memory holds (up to every layer) while a fifth of the device, or as much again as the first step's
    working set if that is more, stays free; none on the CPU. 0: none. Set a number (or 0) when later batches can be
    much longer than the first."""
    keep_activations: int | None = None
    """Decoder layers at the end of the stack whose forward keeps its autograd graph (activations) on the GPU, so
    their backward runs without recomputing them (whole segments of ``checkpoint_every`` layers). Each keeps its
    weight slot claimed until its backward, so at most (unclaimed slots - 2) layers are kept: give slots with
    ``resident_layers``. 0: every layer is recomputed. None: on CUDA, after the first step, as many as the measured
    unused GPU memory holds (the first step measures one layer's graph; the headroom of ``resident_layers`` stays
    free), with the slots they need, fewer in proportion for a later pass with more tokens than the first; resident
    slots then take what is left (+11% at 7B 16x2048, +14% at 3B 32x1024 on an H200). None keeps none on the CPU."""
    num_grad_slabs: int = 3
    """Pinned host slabs (one decoder layer each) for gradients in flight to the host when they are accumulated."""
    loss_chunk_tokens: int = 2048
    """Rows of logits the chunked loss computes at once (never batch x sequence x vocabulary)."""
    pin_masters: bool = False
    """Page-lock the FP32 master buffers even when no upload reads them (``cast_on_gpu`` page-locks them anyway)."""
    weight_copy: bool | None = None
    """Keep a copy of the masters in the compute dtype in pinned host memory (+2 bytes/param for BF16), refreshed
    by the optimizer, which uploads read. None: off, since uploads read the FP32 masters themselves with
    ``cast_on_gpu`` (as fast at the Qwen2.5-3B shape, untied, on an H200: 7,691 against 7,718 tokens/s, 2.1 bytes/param
    less host memory); with ``cast_on_gpu=False``, on when compute runs on a GPU and the host footprint with it
    (AdamW state assumed) fits the host memory (:func:`.footprint.weight_copy_fits`, the rule the planner applies
    too). Never on the CPU, where it would cost memory and buy nothing."""
    cast_on_gpu: bool | None = None
    """How a GPU run without ``weight_copy`` uploads a layer. True: the FP32 masters themselves, page-locked, are
    copied to the GPU in chunks and cast there (round to nearest even, the same values the weight copy holds): no
    CPU pass, no host staging and no weight copy, at twice the PCIe bytes of a BF16 upload (PCIe is rarely the
    bound; host-memory traffic is). False: the CPU packs FP32 -> compute dtype into pinned staging buffers on the
    way (4 more bytes of host-memory traffic per parameter and upload, and CPU threads taken from the optimizer:
    6,677 against 7,691 tokens/s at the untied Qwen2.5-3B shape on an H200), and ``weight_copy=None`` keeps the copy
    where it fits. None: True on CUDA. Ignored on the CPU (the layers are used in place) and beside the weight
    copy (uploads read the copy)."""
    offload_checkpoints: bool | None = None
    """Move segment checkpoints to pinned host memory during the forward and back one segment ahead in the
    backward, so GPU memory does not grow with depth. None: per pass, only when its checkpoints would take more than
    a fifth of the GPU's memory. Ignored on the CPU."""
    sparse_experts: bool = True
    """Expert-sparse streaming of MoE layers: the prefetched upload of a layer leaves out its routed experts'
    weights; just before the experts run, only the experts that received tokens are uploaded (those not already in
    the slot), and only their gradients go back to the host (the others' are exactly zero; the host zero-fills them,
    so the optimizer steps every expert as a dense run would). False: every expert is streamed and sent back."""
    compile_layers: bool | None = None
    """Run the decoder layers through ``torch.compile`` (Inductor fuses the norms, rotary embedding, activation and
    residual adds around the matmuls; +18% per 7B layer and +31% per 3B layer on an H200). The slots' layer
    templates share compiled graphs (weights are graph inputs): the first step compiles (~10 s), later steps reuse.
    Layers with routed experts always run eager (their expert upload reads the routing mid-layer), and so do models
    with dropout (the recomputation replays the forward's random masks through PyTorch's own RNG). None: on for CUDA
    compute where Triton and a C compiler are installed, off on the CPU; False: eager PyTorch."""
    host_kernels: bool | None = None
    """Use the compiled one-pass host kernels of ``lightning_horizon/csrc/host_kernels.cpp`` (built on first use):
    a plain ``torch.optim.AdamW`` steps in one pass (reads the BF16 gradient, writes the BF16 weight copy; matches
    ``AdamW(fused=True)`` to ~1 ulp), accumulated gradients fold into FP32 with their norm in the same pass, and
    uploads pack FP32 -> BF16 with a bounded thread count. None: on for CUDA compute where they build, off on the CPU
    (where the tests compare with PyTorch's own AdamW bit for bit, and a CPU run does not wait for a compiler)."""
    host_threads: int | None = None
    """CPU threads of each host kernel (optimizer, gradient fold, upload packing; they may run at once: on a
    16-core H200 host, sharing the cores beat splitting them). None: ``torch.get_num_threads()``."""
    optimizer_state_dtype: str = "fp32"
    """Storage of AdamW's two moments on the host: ``fp32`` (exact, 8 bytes/param), ``bf16`` (4 bytes/param,
    stored with stochastic rounding so small updates survive in expectation) or ``int8`` (2.03 bytes/param: 8-bit
    codes relative to an FP32 scale per block of 256 elements, in the manner of 8-bit Adam; the first moment
    signed with stochastic rounding, the second rounded to nearest and never to zero, so ``m / sqrt(v)`` cannot
    blow up; see ``engine/host_kernels.py`` ``MomentFormat``). Compact moments are decoded, updated in FP32 (the
    parameter's update uses the FP32 values) and stored again by the one-pass AdamW, so only a plain
    ``torch.optim.AdamW`` can use them (other optimizers are refused). With them the update multiplies by
    ``1 / sqrt(1 - beta2^step)`` where torch divides by its square root (one division per element less; the two differ
    by about an ulp). Checkpoints store the moments as they are;
    one saved with another setting resumes converted (a warning when values change)."""

    frozen_dtype: str = "compute"
    """Storage of the parameters that are frozen (``requires_grad=False``) when the engine is built, such as the base
    model under LoRA or a frozen part of a full fine-tune: ``compute`` (default) holds them once, in the compute
    dtype (2 bytes/param for BF16), in pinned host buffers the uploads read directly: no FP32 master, no gradient,
    no optimizer state, no weight copy. The streamed layers compute with exactly these values today too (the
    upload rounds the FP32 master to the compute dtype), so training is unchanged; ``state_dict()``, checkpoints and
    the export show these parameters in the compute dtype. A frozen parameter made trainable later is refused (it
    has no FP32 master to train): ``fp32`` keeps FP32 masters for frozen parameters too (4 bytes/param, plus the
    weight copy's 2), for runs that unfreeze parameters during training. With FP32 compute (``32-true``) both
    settings hold FP32."""

    grad_reduce: str = "host"
    """Where the gradients of a data-parallel node (``devices > 1``) are summed over its processes. ``host``: every
    process brings each layer's whole gradient down (its compute dtype over its own PCIe link) and adds it into the
    node's FP32 buffer under the group's mutex, so host-memory gradient traffic and the adds of one layer grow with
    the number of processes. ``device``: the processes first reduce-scatter each group's gradient in FP32 on the
    devices (NCCL over NVLink on GPUs, gloo on CPUs), and each brings down and adds only its 1/N of the sum (4 bytes
    per element of its shard, disjoint shards, no mutex): host traffic per node stays one model's whatever N is, at
    2x the gradient bytes over NVLink (FP32, so the sum keeps the host path's precision). The embedding's rows are
    always added on the host (each process looks up different rows). Ignored with one process."""
    sharded_streaming: bool = False
    """How the processes of a data-parallel node (``devices > 1``) bring a layer's weights to their GPUs. False:
    every process uploads every layer whole over its own PCIe link (host-memory read traffic grows with the number
    of processes). True: each of the node's N processes uploads only its 1/N of the layer, and the devices
    all-gather the rest (NCCL over NVLink on GPUs, gloo on CPUs) just before the layer runs: host reads and PCIe
    bytes per GPU for the weights fall to 1/N, and every GPU receives (N - 1)/N of the layer from its peers. Every
    process then has to run the same layers in the same order: each pass keeps the smallest number of layers any
    process of the node can keep (``keep_activations``; a kept layer's backward needs no upload). With
    ``sparse_experts`` the routed experts are not sharded: each process uploads the experts its own tokens reach,
    after the gather. Ignored with one process."""
    node_store: str = "replicated"
    """What each node's host store holds when a data-parallel run spans several nodes (``num_nodes > 1``).
    ``replicated``: every node holds and steps the whole model (masters, gradients, optimizer state); only the
    gradients cross the network (an all-reduce per group). ``sharded``: the decoder layers are shared out among the
    nodes (balanced by size): each node's host holds, steps and checkpoints only its layers, so host memory per node
    falls to about 1/num_nodes of the layers' bytes and the largest trainable model grows with the number of nodes.
    Every layer then crosses the network twice per pass: before it runs, each process receives its shard of the
    layer from the process of the same local rank on the layer's node, then the node all-gathers it; its gradient
    shards are reduced to that node only. The embedding, the final norm and the head stay on every node. Needs
    ``sharded_streaming=True`` and ``grad_reduce="device"``; routed experts then stream whole (``sparse_experts`` is
    turned off: a process cannot upload the experts its tokens reach from another node). In the processes of a
    node, the parameters of layers held by other nodes are on the meta device (their values are not in this node's
    memory): read trained weights from a checkpoint (every node writes its layers) or its Hugging Face export. With
    one node both settings are the same."""

    device: str | torch.device | None = field(default=None, metadata={"run": "accelerator"})
    """Compute device; None picks ``cuda`` when available, else ``cpu``. The strategy sets it from the Trainer."""
    compute_dtype: str | torch.dtype | None = field(default=None, metadata={"run": "precision"})
    """Dtype of the streamed weights and activations (masters stay FP32); None: BF16. The strategy sets it from the
    Trainer's ``precision`` (``bf16-mixed``: BF16, ``32-true``: FP32)."""
    accumulate_grads: bool = field(default=False, metadata={"run": "accumulate_grad_batches"})
    """Gradients are summed over several backward passes per step: keep them in FP32 on the host (4 bytes/param).
    Off: they stay in the compute dtype (2 bytes/param for BF16); a second backward before a step switches over.
    The strategy sets it from ``accumulate_grad_batches`` (and when a hook reads ``param.grad``)."""
    track_grad_norm: bool = field(default=False, metadata={"run": "gradient_clip_val"})
    """Record per-parameter gradient norms as gradients land (clipping by norm then needs no pass over the host
    gradients). The strategy sets it from ``gradient_clip_val``."""

    # Pooled gradients (issue #14, item 3): the whole model's gradients are never held when nothing needs them.
    grad_pool_buffers: int | None = None
    """Pinned compute-dtype gradient buffers, each as large as the largest store group, that carry gradients from
    their landing to their optimizer update when every update is scheduled during the backward
    (``updates_in_backward``, no accumulation): the host then holds these few buffers instead of the whole model's
    gradients (2 bytes/param in BF16), and the backward waits for a free buffer when the optimizer lags behind. Four
    keep the copy of one layer, the update of another and a third waiting for it going at once (plus the tied
    lm_head's, which waits for the embedding's). 0: whole-model buffers always; n >= 2: a pool of n. None: a pool of
    ``GRAD_POOL_BUFFERS`` only when the host cannot hold the whole model's gradients
    (:func:`.footprint.grad_pool_needed`): whole buffers let the updates also overlap the next forward, where an
    optimizer-bound step gains (Qwen2.5-3B, 8 x 1024 on an H200: 7,700 tokens/s with whole buffers, 6,508 pooled)."""
    updates_in_backward: bool = field(default=False, metadata={"run": "automatic_optimization"})
    """Each step's optimizer updates start during its backward, group by group, as soon as a group's gradients are
    complete (``HorizonEngine.begin_step`` before the backward, one forward pass per step, nothing reading the
    gradients before ``step``): the gradients may then go through the pool of ``grad_pool_buffers``. A step that
    breaks this makes the engine fall back to whole-model buffers (with a warning). The strategy sets it for
    automatic optimization without clipping, accumulation or hooks that read gradients."""

    @property
    def pooled_grads(self) -> int:
        """Buffers of the gradient pool this configuration uses (0: whole-model compute-dtype gradient buffers, or
        FP32 accumulation)."""
        if not self.updates_in_backward or self.accumulate_grads:
            return 0
        if self.grad_pool_buffers is None:
            raise ValueError("grad_pool_buffers=None is decided by resolve() (the engine) or the planner")
        return self.grad_pool_buffers

    def __post_init__(self) -> None:
        if self.device is not None:
            self.device = torch.device(self.device)
            if self.device.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be a CUDA device or 'cpu', got {self.device}")
        if self.compute_dtype is not None:
            self.compute_dtype = as_dtype(self.compute_dtype)
        if self.grad_reduce not in GRAD_REDUCE:
            raise ValueError(f"grad_reduce must be one of {', '.join(GRAD_REDUCE)}, got {self.grad_reduce!r}")
        if self.node_store not in NODE_STORES:
            raise ValueError(f"node_store must be one of {', '.join(NODE_STORES)}, got {self.node_store!r}")
        for name in ("checkpoint_every", "loss_chunk_tokens", "num_grad_slabs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (double buffering), got {self.num_slots}")
        for name in ("resident_layers", "keep_activations"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None (automatic), got {value!r}")
        if self.optimizer_state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"optimizer_state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.optimizer_state_dtype!r}"
            )
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {self.frozen_dtype!r}")
        pool = self.grad_pool_buffers
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool == 1 or pool < 0):
            raise ValueError(
                f"grad_pool_buffers must be 0 (no pool), an integer >= 2 or None (automatic), got {pool!r}"
            )
        if self.host_threads is not None and self.host_threads < 1:
            raise ValueError(f"host_threads must be >= 1 or None, got {self.host_threads}")

    @property
    def state_dtype(self) -> torch.dtype:
        """``optimizer_state_dtype`` as a torch dtype."""
        return STATE_DTYPES[self.optimizer_state_dtype]

    def frozen_store_dtype(self) -> torch.dtype | None:
        """The dtype frozen parameters are held in, apart from the FP32 masters (None: in the FP32 masters)."""
        compute = as_dtype(self.compute_dtype or torch.bfloat16)
        return compute if self.frozen_dtype == "compute" and compute != torch.float32 else None

    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        """The fields a user sets (the strategy's and the recipes' ``strategy.*``), not the run's."""
        return [f for f in dataclasses.fields(cls) if "run" not in f.metadata]

    @classmethod
    def run_fields(cls) -> dict[str, str]:
        """Run fields and the Trainer argument that sets each."""
        return {f.name: f.metadata["run"] for f in dataclasses.fields(cls) if "run" in f.metadata}

    def summary(self) -> str:
        """``name=value`` of every field, for the log."""
        values = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values.append(f"{f.name}={str(value).removeprefix('torch.') if value is not None else 'auto'}")
        return ", ".join(values)


def resolve(config: EngineConfig, decide_weight_copy=None, decide_grad_pool=None) -> EngineConfig:
    """The effective settings on this machine: every ``None`` decided, in one place. ``resident_layers`` and
    ``keep_activations`` stay None on CUDA (they are sized after the first step, from measured memory) and
    ``offload_checkpoints`` stays None (decided per pass); on the CPU they resolve to 0 / False.

    Args:
        config: The settings as given.
        decide_weight_copy: ``decide_weight_copy(on_gpu, grad_pool)`` for ``weight_copy=None`` with
            ``cast_on_gpu=False`` (the engine applies :func:`.footprint.weight_copy_fits` to its own footprint, with
            the pool decided first); without it, on for a GPU.
        decide_grad_pool: ``decide_grad_pool(on_gpu)`` for ``grad_pool_buffers=None`` when the run could use the
            pool (the engine applies :func:`.footprint.grad_pool_needed`); without it, no pool.
    """
    device = config.device
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    pool = config.grad_pool_buffers
    if pool is None:
        could_pool = config.updates_in_backward and not config.accumulate_grads and decide_grad_pool is not None
        pool = GRAD_POOL_BUFFERS if could_pool and decide_grad_pool(cuda) else 0
    weight_copy = config.weight_copy
    if weight_copy is None and config.cast_on_gpu is not False:
        weight_copy = False  # uploads read the FP32 masters (cast_on_gpu)
    elif weight_copy is None:
        pooled = pool if config.updates_in_backward and not config.accumulate_grads else 0
        weight_copy = decide_weight_copy(cuda, pooled) if decide_weight_copy is not None else cuda
    host_kernels = config.host_kernels if config.host_kernels is not None else cuda
    if host_kernels:
        from .host_kernels import host_kernels_available

        host_kernels = host_kernels_available()  # builds the kernels now, not on the first step
    return dataclasses.replace(
        config,
        device=device,
        compute_dtype=config.compute_dtype or torch.bfloat16,
        weight_copy=bool(weight_copy),
        grad_pool_buffers=pool,
        host_kernels=host_kernels,
        host_threads=config.host_threads or torch.get_num_threads(),
        compile_layers=config.compile_layers if config.compile_layers is not None else cuda and can_compile(),
        resident_layers=config.resident_layers if config.resident_layers is not None or cuda else 0,
        keep_activations=config.keep_activations if config.keep_activations is not None or cuda else 0,
        offload_checkpoints=config.offload_checkpoints if cuda else False,
        cast_on_gpu=cuda and not weight_copy and config.cast_on_gpu is not False,
    )


def can_compile() -> bool:
    """Whether ``torch.compile`` can build GPU kernels here (Triton, and the C compiler its launchers need); the
    default then compiles the layers, otherwise they run eager with a note in the log."""
    missing = []
    if importlib.util.find_spec("triton") is None:
        missing.append("triton")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        missing.append("a C compiler")
    if missing:
        log.info("horizon: layers run eager (compile_layers needs %s)", " and ".join(missing))
    return not missing
