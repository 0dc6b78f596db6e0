"""Loss curves of the embedded default run (tiny model, bundled data, 200 steps) with each optimizer state dtype.

Runs ``python -m recipes.sft strategy.optimizer_state_dtype=<dtype>`` once per dtype (on this machine: the CPU here)
and writes ``curves.csv`` (step, one ``train/loss`` column per dtype) and ``summary.json`` (final losses and their
relative difference to FP32) into ``--out``::

    python benchmarks/state_dtype_curves.py --out benchmarks/raw/2026-12-02/state_dtype [--dtypes fp32 bf16 int8]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, float]:
    """``step -> train/loss`` of a run's ``metrics.csv``."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def run(dtype: str, run_dir: Path, overrides: list[str]) -> dict[int, float]:
    cmd = [sys.executable, "-m", "recipes.sft", f"strategy.optimizer_state_dtype={dtype}", f"hydra.run.dir={run_dir}"]
    subprocess.run([*cmd, *overrides], cwd=ROOT, check=True, capture_output=True, text=True)
    return losses(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("overrides", nargs="*", help="more recipe overrides (e.g. trainer.max_steps=300)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as runs:  # the runs' checkpoints and exports are not kept
        curves = {dtype: run(dtype, Path(runs) / dtype, args.overrides) for dtype in args.dtypes}
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    with (args.out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *args.dtypes])
        writer.writerows([step, *(curves[d][step] for d in args.dtypes)] for step in steps)
    final = {d: curves[d][steps[-1]] for d in args.dtypes}
    summary = {
        "steps": steps[-1] + 1,
        "final_loss": final,
        "relative_to_fp32": {d: final[d] / final["fp32"] - 1 for d in args.dtypes} if "fp32" in final else {},
        "command": " ".join(["python -m recipes.sft", *args.overrides, "strategy.optimizer_state_dtype=<dtype>"]),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
