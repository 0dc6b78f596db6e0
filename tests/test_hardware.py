"""Hardware profiles: the named files, detection on this machine, validation."""

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_horizon.hardware import HardwareProfile, detect_hardware, load_profile

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
NAMED = ["h100", "h200", "a100_80g", "gh200", "rtx4090"]


def profile(name: str) -> HardwareProfile:
    return load_profile(OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml"))


@pytest.mark.parametrize("name", NAMED)
def test_named_profiles_load(name):
    hw = profile(name)
    assert hw.name == name and hw.has_gpu
    assert isinstance(hw.gpu_memory_bytes, int) and isinstance(hw.host_memory_bytes, int)
    assert 10e9 < hw.gpu_memory_bytes < 200e9
    assert 1e9 < hw.h2d_bytes_per_s < 1e12 and 1e9 < hw.d2h_bytes_per_s < 1e12
    assert 10 < hw.gpu_bf16_tflops < 1000


def test_h200_matches_the_measured_machine():
    hw = profile("h200")
    assert hw.gpu_memory_bytes == 141e9 and hw.host_memory_bytes == 1.5e12
    assert hw.h2d_bytes_per_s == 55e9 and hw.gpu_bf16_tflops == 540 and hw.cpu_adam_params_per_s == 4.4e9


def test_detect_this_machine():
    hw = detect_hardware(measure_bandwidth=False)
    assert hw.cpu_cores == len(os.sched_getaffinity(0))
    assert 0 < hw.host_memory_bytes
    assert hw.cpu_tflops > 0 and hw.cpu_adam_params_per_s > 0
    if not torch.cuda.is_available():
        assert hw.gpu_memory_bytes == 0 and hw.h2d_bytes_per_s == 0 and hw.gpu_bf16_tflops == 0
        assert not hw.has_gpu


def test_auto_with_overrides():
    raw = OmegaConf.load(CONF_DIR / "hardware" / "auto.yaml")
    raw.host_memory_bytes = 12345678900
    raw.cpu_cores = 3
    hw = load_profile(raw)
    assert hw.name == "auto" and hw.host_memory_bytes == 12345678900 and hw.cpu_cores == 3


def test_validation():
    values = dataclasses.asdict(profile("h200"))
    with pytest.raises(ValueError, match="hardware.h2d_bytes_per_s must be positive when gpu_memory_bytes > 0"):
        HardwareProfile(**{**values, "h2d_bytes_per_s": 0})
    with pytest.raises(ValueError, match="hardware.host_memory_bytes must be positive"):
        HardwareProfile(**{**values, "host_memory_bytes": 0})
    with pytest.raises(ValueError, match="hardware.cpu_cores must be an integer"):
        HardwareProfile(**{**values, "cpu_cores": 2.5})
    with pytest.raises(ValueError, match=r"hardware.host_memory_byte \(did you mean hardware.host_memory_bytes\?\)"):
        load_profile({**values, "host_memory_byte": 1})
    with pytest.raises(ValueError, match="hardware.cpu_cores is null"):
        load_profile({**values, "cpu_cores": None})
    cpu_only = HardwareProfile(**{**values, "gpu_memory_bytes": 0, "h2d_bytes_per_s": 0, "gpu_bf16_tflops": 0})
    assert not cpu_only.has_gpu


@pytest.mark.gpu
def test_detect_gpu():
    hw = detect_hardware()
    assert hw.has_gpu and hw.h2d_bytes_per_s > 1e9 and hw.d2h_bytes_per_s > 1e9
