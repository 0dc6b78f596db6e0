"""Benchmark recipe: ``python -m recipes.bench model=qwen2_3b data.batch_size=8 data.max_seq_len=1024 [peers=true]``.

Runs N optimizer steps of the real training path (``Trainer(strategy="horizon")``) on a random-weight model and
synthetic tokens, prints a table (tokens/s, model TFLOP/s = 6NT/step, host bytes/param, GPU peak, and the engine's
step-time breakdown) next to the planner's ceilings for this machine, and writes everything as JSON into the run
directory. With ``peers=true`` the same LightningModule also runs under Lightning's ``deepspeed_stage_3_offload`` and
``FSDPStrategy(cpu_offload=True)`` (both with Hugging Face gradient checkpointing), and the ratios are printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_horizon import EngineConfig, HorizonStrategy, benchmark, planner
from lightning_horizon.config_groups import engine_config
from lightning_horizon.hardware import load_profile
from lightning_horizon.models import ModelConfig, build_hf_config
from recipes import config_dir

SYSTEMS = ("horizon", "deepspeed", "fsdp")
NAMES = {
    "horizon": "horizon",
    "deepspeed": "lightning+deepspeed_zero3_offload",
    "fsdp": "lightning+fsdp_cpu_offload",
}


def _strategy(system: str, hf_config, engine: EngineConfig):
    """The Lightning strategy and optimizer implementation of one system."""
    if system == "horizon":
        return HorizonStrategy(engine), None
    if system == "deepspeed":
        return "deepspeed_stage_3_offload", "deepspeed"
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        layer_cls = type(AutoModelForCausalLM.from_config(hf_config).get_decoder().layers[0])
    policy = {layer_cls}
    return FSDPStrategy(cpu_offload=True, auto_wrap_policy=policy, activation_checkpointing_policy=policy), "torch"


def _run_peer(system: str, out_dir: Path) -> dict | None:
    """Runs one peer in a fresh process (its own memory peak, and no leftovers from the previous system)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("peers=", "system=", "hydra.run.dir="))]
    cmd = [sys.executable, "-m", "recipes.bench", *args, "peers=false", f"system={system}", f"hydra.run.dir={out_dir}"]
    proc = subprocess.run(cmd, check=False)
    result = out_dir / "bench.json"
    if proc.returncode != 0 or not result.exists():
        print(f"{NAMES[system]}: failed (exit code {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(result.read_text())["runs"][0]


@hydra.main(config_path=config_dir(), config_name="bench", version_base="1.3")
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
    engine = engine_config(cfg.strategy)
    predicted = planner.plan(
        hf_config,
        hardware,
        batch_size=batch,
        max_seq_len=seq,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        compute_dtype=planner.precision_dtype(cfg.trainer.precision),
        engine=engine,
    )
    engine = predicted.settings.engine  # weight_copy=null resolved by the engine's rule for this machine, as sft does
    system = str(cfg.system)
    if system not in SYSTEMS:
        raise SystemExit(f"error: system must be one of {', '.join(SYSTEMS)}, got {system!r}")
    if cfg.peers:  # every system in a fresh process of its own: one's memory never counts against the next
        runs = [row for s in SYSTEMS if (row := _run_peer(s, Path(cfg.output_dir) / s)) is not None]
    else:
        strategy, optimizer = _strategy(system, hf_config, engine)
        result = benchmark.run(
            hf_config,
            strategy=strategy,
            optimizer=optimizer or cfg.optim.implementation,
            system=NAMES[system],
            **common,
        )
        runs = [result.row() | {"losses": result.losses}]
        print(f"{NAMES[system]}: {result.tokens_per_s:.0f} tokens/s, {result.model_tflops:.1f} TFLOP/s", flush=True)
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
        "runs": runs,
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
    horizon = [r for r in report["runs"] if r["system"] == "horizon"]
    base = horizon[0]["tokens_per_s"] if horizon else None
    for r in report["runs"]:
        ratio = f"  (horizon is {base / r['tokens_per_s']:.1f}x faster)" if base and r["system"] != "horizon" else ""
        lines.append(
            f"{r['system']:36s} {r['tokens_per_s']:9.0f} {r['model_tflops']:8.1f} {r['step_s']:7.2f}"
            f" {r['host_bytes_per_param']:12.1f} {r['gpu_peak_gib']:8.1f}{ratio}"
        )
    breakdown = (horizon[0].get("breakdown") if horizon else None) or {}
    if breakdown:
        lines.append("horizon per step: " + ", ".join(f"{k} {v:.3g}" for k, v in breakdown.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
