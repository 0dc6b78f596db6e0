"""Hardware profiles: what the planner needs to know about a machine (`conf/hardware/*.yaml`).

A named profile (h200, h100, ...) holds fixed numbers: measured ones for the H200 machine of the design brief,
public-spec-based estimates for the others (each file says which). `hardware=auto` reads this machine instead:
GPU memory and name from CUDA, cores from the scheduler affinity, host memory from /proc/meminfo (and the cgroup
limit), link bandwidth from a quick pinned-memory copy; any field set in the `hardware:` block overrides what is
detected (`hardware=auto hardware.host_memory_bytes=...`). On a machine without CUDA the GPU fields are 0 and the
compute runs on the CPU (see `lightning_horizon.planner`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_horizon.models import check_known_keys, to_plain_dict

GiB = 1024**3


@dataclass
class HardwareProfile:
    """One machine, as the planner sees it. Rates are achievable ones (what our kernels reach), not peaks."""

    name: str
    """Profile name (`h200`, ..., or `auto` for this machine)."""
    gpu_memory_bytes: int
    """Memory of the one GPU used; 0 = no GPU, compute runs on the CPU."""
    host_memory_bytes: int
    """Host RAM the run may use (for `auto`: MemAvailable at start, capped by the cgroup limit)."""
    cpu_cores: int
    """CPU cores available to this process."""
    h2d_bytes_per_s: float
    """Host-to-device copy bandwidth from pinned memory; 0 without a GPU."""
    d2h_bytes_per_s: float
    """Device-to-host copy bandwidth into pinned memory; 0 without a GPU."""
    gpu_bf16_tflops: float
    """Achievable BF16 TFLOP/s of the GPU in a decoder layer's forward + backward; 0 without a GPU."""
    cpu_adam_params_per_s: float
    """FP32 AdamW updates per second on the host (torch fused AdamW, all cores)."""
    host_memory_bytes_per_s: float
    """Achievable host memory bandwidth (read + write) with the optimizer and copies running together."""
    cpu_tflops: float = 0.5
    """Achievable FP32 TFLOP/s of the CPU in matmuls: used for the compute term when there is no GPU."""
    gpu_link_bytes_per_s: float = 0.0
    """GPU-to-GPU bandwidth of one GPU, each direction (NVLink), for a plan with several GPUs per node; 0 = none
    known (the plan leaves that term out and says so)."""
    network_bytes_per_s: float = 0.0
    """Network bandwidth of one node, each direction, for a plan with several nodes; 0 = none known (the plan leaves
    that term out and says so)."""

    def __post_init__(self) -> None:
        for key in ("gpu_memory_bytes", "host_memory_bytes", "cpu_cores"):
            value = getattr(self, key)
            if isinstance(value, float) and value.is_integer():
                setattr(self, key, int(value))
            elif not isinstance(getattr(self, key), int):
                raise ValueError(f"hardware.{key} must be an integer, got {value!r}")
        for key in (
            "gpu_memory_bytes", "h2d_bytes_per_s", "d2h_bytes_per_s", "gpu_bf16_tflops", "gpu_link_bytes_per_s",
            "network_bytes_per_s",
        ):  # fmt: skip
            if getattr(self, key) < 0:
                raise ValueError(f"hardware.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("host_memory_bytes", "cpu_cores", "cpu_adam_params_per_s", "host_memory_bytes_per_s", "cpu_tflops"):
            if getattr(self, key) <= 0:
                raise ValueError(f"hardware.{key} must be positive, got {getattr(self, key)}")
        if self.has_gpu:
            for key in ("h2d_bytes_per_s", "d2h_bytes_per_s", "gpu_bf16_tflops"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"hardware.{key} must be positive when gpu_memory_bytes > 0")

    @property
    def has_gpu(self) -> bool:
        """Whether compute runs on a GPU (else on the CPU, with the host as the compute device's memory)."""
        return self.gpu_memory_bytes > 0


def load_profile(cfg: Mapping[str, Any]) -> HardwareProfile:
    """The profile of a `hardware:` block: `name: auto` detects this machine (set fields override the detection)."""
    values = to_plain_dict(cfg, prefix="hardware")
    check_known_keys(HardwareProfile, values, prefix="hardware")
    if values.get("name") == "auto":
        overrides = {k: v for k, v in values.items() if v is not None and k != "name"}
        measure = not {"h2d_bytes_per_s", "d2h_bytes_per_s"} <= overrides.keys()
        return dataclasses.replace(detect_hardware(measure_bandwidth=measure), **overrides)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"hardware {values.get('name')!r}: {', '.join('hardware.' + k for k in missing)} is null")
    return HardwareProfile(**values)


def detect_hardware(measure_bandwidth: bool = True) -> HardwareProfile:
    """This machine: GPU 0 (if any), the cores this process may use, usable host RAM, pinned copy bandwidth.

    Rates that cannot be measured quickly (GPU TFLOP/s, AdamW and host-memory throughput) are estimated: from the
    GPU's name when it is a known one (else scaled from the H200 figure by SM count), per core for the CPU.
    """
    cpu_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    host_memory_bytes = _usable_host_memory_bytes()
    # Per-core estimates from the design brief's measurements: fused AdamW 4.4 G params/s on 16 cores and 1.68 on 2;
    # host memory traffic ~130 GB/s on the 16-core machine.
    cpu_adam_params_per_s = min(0.3e9 * cpu_cores + 1.0e9, 8.0e9)
    host_memory_bytes_per_s = min(8.0e9 * cpu_cores + 10.0e9, 300.0e9)
    cpu_tflops = measure_cpu_tflops()
    if not torch.cuda.is_available():
        return HardwareProfile(
            name="auto",
            gpu_memory_bytes=0,
            host_memory_bytes=host_memory_bytes,
            cpu_cores=cpu_cores,
            h2d_bytes_per_s=0.0,
            d2h_bytes_per_s=0.0,
            gpu_bf16_tflops=0.0,
            cpu_adam_params_per_s=cpu_adam_params_per_s,
            host_memory_bytes_per_s=host_memory_bytes_per_s,
            cpu_tflops=cpu_tflops,
        )
    props = torch.cuda.get_device_properties(0)
    h2d, d2h = measure_copy_bandwidth() if measure_bandwidth else (25.0e9, 25.0e9)
    return HardwareProfile(
        name="auto",
        gpu_memory_bytes=int(props.total_memory),
        host_memory_bytes=host_memory_bytes,
        cpu_cores=cpu_cores,
        h2d_bytes_per_s=h2d,
        d2h_bytes_per_s=d2h,
        gpu_bf16_tflops=_estimate_gpu_tflops(props.name, props.multi_processor_count),
        cpu_adam_params_per_s=cpu_adam_params_per_s,
        host_memory_bytes_per_s=host_memory_bytes_per_s,
        cpu_tflops=cpu_tflops,
    )


# Achievable BF16 TFLOP/s in a decoder layer (H200: measured 540; others scaled from it by dense peak).
_KNOWN_GPU_TFLOPS = {"H200": 540.0, "GH200": 540.0, "H100": 500.0, "A100": 200.0, "L40S": 180.0, "4090": 70.0}


def _estimate_gpu_tflops(name: str, sm_count: int) -> float:
    for key, tflops in _KNOWN_GPU_TFLOPS.items():
        if key in name.upper():
            return tflops
    return 540.0 * sm_count / 132  # an H200 has 132 SMs


def _usable_host_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (MemTotal if absent), capped by the cgroup v2/v1 memory limit."""
    meminfo: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                meminfo[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    usable = meminfo.get("MemAvailable") or meminfo.get("MemTotal")
    if usable is None:
        usable = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            usable = min(usable, int(text))
    return int(usable)


def measure_copy_bandwidth(num_bytes: int = 256 * 1024**2, repeats: int = 3) -> tuple[float, float]:
    """Pinned H2D and D2H bandwidth (bytes/s) of GPU 0, best of `repeats` copies of `num_bytes` (~0.1 s).

    The host buffer is page-locked in place and unlocked afterwards (``engine/pinned.py``), not taken from PyTorch's
    caching host allocator, which would keep it for the rest of the process."""
    from lightning_horizon.engine.pinned import pinned_empty, unregister_pinned

    host = pinned_empty(num_bytes, torch.uint8, pin=True)
    device = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    try:
        device.copy_(host, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        rates = []
        for dst, src in ((device, host), (host, device)):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            rates.append(num_bytes / best)
    finally:
        torch.cuda.synchronize()
        unregister_pinned(host)
    del host, device
    torch.cuda.empty_cache()
    return rates[0], rates[1]


def measure_cpu_tflops(size: int = 768, repeats: int = 3) -> float:
    """FP32 matmul TFLOP/s of this CPU with torch's threads, best of `repeats` (tens of milliseconds)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9) / 1e12
