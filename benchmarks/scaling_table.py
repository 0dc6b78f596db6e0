"""The scaling model's predictions for several GPUs and nodes (docs/scaling.md), from the planner.

    python benchmarks/scaling_table.py            # the tables of docs/scaling.md (markdown)

Every figure is a prediction of ``lightning_horizon.planner`` (its step-time terms, ``_several_gpus``) on the
``h200`` hardware profile (rates measured on one H200 with a 16-core, 125 GiB host; GPU links and network from public
specs), not a measurement.
"""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from lightning_horizon.hardware import HardwareProfile, load_profile
from lightning_horizon.models import ModelConfig, build_hf_config
from lightning_horizon.planner import Plan, plan
from recipes import config_dir

# step term -> the rate it was divided by (bytes moved = seconds x rate)
_RATES = {
    "h2d upload": "h2d_bytes_per_s",
    "d2h gradients": "d2h_bytes_per_s",
    "gpu links (all-gather, reduce-scatter)": "gpu_link_bytes_per_s",
    "network": "network_bytes_per_s",
    "host memory traffic": "host_memory_bytes_per_s",
}
LAYOUTS = [(1, 1, "sharded"), (2, 1, "sharded"), (4, 1, "sharded"), (8, 1, "sharded"), (8, 2, "sharded"),
           (8, 2, "replicated"), (8, 4, "sharded"), (8, 4, "replicated")]  # fmt: skip


def profile(name: str) -> HardwareProfile:
    return load_profile(OmegaConf.load(f"{config_dir()}/hardware/{name}.yaml"))


def model_config(name: str):
    raw = OmegaConf.load(f"{config_dir()}/model/{name}.yaml")
    return build_hf_config(ModelConfig.from_dict(raw.get("model", raw)))


def moved(p: Plan, term: str) -> float:
    return p.step_seconds.get(term, 0.0) * getattr(p.hardware, _RATES[term])


def table(model: str, batch: int, seq: int, hardware: HardwareProfile, **settings) -> str:
    cfg = model_config(model)
    rows = [
        f"**{model}**, {batch} x {seq} tokens per GPU, clipping, {settings or 'fp32 AdamW state'}, hardware "
        f"`{hardware.name}`",
        "",
        "| GPUs/node x nodes | store | host GB/node | PCIe GB/GPU (up + down) | NVLink GB/GPU | network GB/node "
        "| host-memory GB/node | step s | tokens/s | speed-up | bound | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for n, m, store in LAYOUTS:
        p = plan(cfg, hardware, batch_size=batch, max_seq_len=seq, gradient_clip_val=1.0, devices=n, num_nodes=m,
                 node_store=store, **settings)  # fmt: skip
        base = base or p.tokens_per_s
        rows.append(
            f"| {n} x {m} | {store if m > 1 else '-'} | {p.host_total_bytes / 1e9:,.0f} "
            f"| {(moved(p, 'h2d upload') + moved(p, 'd2h gradients')) / 1e9:.1f} "
            f"| {moved(p, 'gpu links (all-gather, reduce-scatter)') / 1e9:.1f} | {moved(p, 'network') / 1e9:.1f} "
            f"| {moved(p, 'host memory traffic') / 1e9:,.0f} | {p.step_time_s:.2f} | {p.tokens_per_s:,.0f} "
            f"| {p.tokens_per_s / base:.2f}x | {p.bottleneck} | {'yes' if p.fits else 'no'} |"
        )
    return "\n".join(rows)


def main() -> None:
    h200 = profile("h200")
    print(table("qwen2_7b", 16, 2048, h200))
    print()
    print(table("qwen2_72b", 4, 2048, h200))
    print()
    server = dataclasses.replace(
        h200, name="h200, host x4", cpu_adam_params_per_s=4 * h200.cpu_adam_params_per_s,
        host_memory_bytes_per_s=4 * h200.host_memory_bytes_per_s,
    )  # fmt: skip
    print(table("qwen2_72b", 4, 2048, server))
    print()
    x8 = dataclasses.replace(h200, name="h200, 560 GiB host", host_memory_bytes=560 * 2**30)
    print(table("qwen2_72b", 4, 2048, x8, optimizer_state_dtype="int8"))


if __name__ == "__main__":
    main()
