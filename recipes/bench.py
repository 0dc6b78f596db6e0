"""Benchmark recipe: ``python -m recipes.bench model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 [peers=true]``.

Runs N optimizer steps of the real training path (``Trainer(strategy="horizon")``) on a random-weight model and
synthetic tokens, prints a table (tokens/s, model TFLOP/s = 6NT/step, host bytes/param, GPU peak, and the engine's
step-time breakdown) next to the planner's ceilings for this machine, and writes everything as JSON into the run
directory. With ``peers=true`` the same LightningModule also runs under Lightning's ``deepspeed_stage_3_offload`` and
``FSDPStrategy(cpu_offload=True)`` (both with Hugging Face gradient checkpointing), and the ratios are printed.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_horizon import HorizonStrategy, benchmark, planner
from lightning_horizon.hardware import load_profile
from lightning_horizon.models import ModelConfig, build_hf_config


def _peer_strategies(hf_config):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        layer_cls = type(AutoModelForCausalLM.from_config(hf_config).get_decoder().layers[0])
    return [
        ("lightning+deepspeed_zero3_offload", "deepspeed_stage_3_offload", "deepspeed"),
        (
            "lightning+fsdp_cpu_offload",
            FSDPStrategy(cpu_offload=True, auto_wrap_policy={layer_cls}, activation_checkpointing_policy={layer_cls}),
            "torch",
        ),
    ]


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    hf_config = build_hf_config(model_cfg)
    hardware = load_profile(OmegaConf.to_container(cfg.hardware, resolve=True))
    batch, seq = int(cfg.data.batch_size), int(cfg.data.max_seq_len)
    accumulate = int(cfg.trainer.accumulate_grad_batches)
    common = dict(
        batch_size=batch,
        seq_len=seq,
        steps=int(cfg.steps),
        warmup=int(cfg.warmup),
        precision=cfg.trainer.precision,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
    )
    strategy_args = OmegaConf.to_container(cfg.strategy, resolve=True)
    runs = [
        benchmark.run(
            hf_config,
            strategy=HorizonStrategy(**strategy_args),
            optimizer=cfg.optim.implementation,
            system="horizon",
            **common,
        )
    ]
    if cfg.peers:
        for name, strategy, optimizer in _peer_strategies(hf_config):
            try:
                runs.append(benchmark.run(hf_config, strategy=strategy, optimizer=optimizer, system=name, **common))
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    predicted = planner.plan(
        hf_config,
        hardware,
        batch_size=batch,
        max_seq_len=seq,
        checkpoint_every=int(strategy_args["checkpoint_every"]),
        accumulate_grad_batches=accumulate,
        weight_copy=bool(strategy_args["weight_copy"]),
    )
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": "python -m recipes.bench " + " ".join(sys.argv[1:]),
        "model": model_cfg.name,
        "batch_size": batch,
        "max_seq_len": seq,
        "accumulate_grad_batches": accumulate,
        "ceilings_s": predicted.step_seconds,
        "predicted_bottleneck": predicted.bottleneck,
        "runs": [r.row() | {"losses": r.losses} for r in runs],
    }
    print(format_report(report))
    out = Path(cfg.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"raw results: {out}")


def format_report(report: dict) -> str:
    lines = [
        f"{report['date']}  {report['device']}  {report['command']}",
        f"model {report['model']}, {report['batch_size']} x {report['max_seq_len']} tokens"
        f" x {report['accumulate_grad_batches']} micro-batches per step",
        "ceilings per step (planner): "
        + ", ".join(f"{k} {v:.2f}s" for k, v in report["ceilings_s"].items())
        + f"  -> bound by {report['predicted_bottleneck']}",
        f"{'system':36s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'step s':>7s} {'host B/param':>12s} {'GPU GiB':>8s}",
    ]
    base = report["runs"][0]["tokens_per_s"] if report["runs"] else 1.0
    for r in report["runs"]:
        ratio = f"  (horizon is {base / r['tokens_per_s']:.1f}x)" if r is not report["runs"][0] else ""
        lines.append(
            f"{r['system']:36s} {r['tokens_per_s']:9.0f} {r['model_tflops']:8.1f} {r['step_s']:7.2f}"
            f" {r['host_bytes_per_param']:12.1f} {r['gpu_peak_gib']:8.1f}{ratio}"
        )
    breakdown = report["runs"][0].get("breakdown") or {}
    if breakdown:
        lines.append("horizon per step: " + ", ".join(f"{k} {v:.3g}" for k, v in breakdown.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
