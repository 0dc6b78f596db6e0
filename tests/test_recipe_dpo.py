"""`python -m recipes.dpo`, run for real in a subprocess: the embedded default, LoRA from a local model, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_recipe import ENV, FAST, ROOT, assert_refused, hf_dir  # noqa: F401  (hf_dir is a fixture)

METRICS = ("train/loss", "train/reward_margin", "train/reward_accuracy")


def dpo(*overrides: str, run_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "recipes.dpo", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def logged(run_dir: Path, metric: str) -> list[float]:
    import csv

    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r[metric]) for r in csv.DictReader(f) if r.get(metric)]


def test_embedded_default_run_raises_the_reward_margin(tmp_path):
    """The default run (tiny model, bundled pairs) for 80 steps: the margin and accuracy rise, the loss falls."""
    result = dpo("trainer.max_steps=80", "trainer.log_every_n_steps=10", "trainer.val_check_interval=40", "+trainer.enable_progress_bar=false",
                 run_dir=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    margin, accuracy, loss = (
        logged(tmp_path, m) for m in ("train/reward_margin", "train/reward_accuracy", "train/loss")
    )
    assert len(margin) == 8
    assert sum(margin[-3:]) / 3 > sum(margin[:3]) / 3 + 0.1, margin
    assert sum(accuracy[-3:]) / 3 > 0.6, accuracy
    assert sum(loss[-3:]) / 3 < 0.66, loss
    log = (tmp_path / "dpo.log").read_text()
    assert "reference log-probabilities of 1000 train pairs" in log and "train/reward_margin: first logged" in log
    assert logged(tmp_path, "val/reward_accuracy")  # validation pairs are scored against their own reference
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_export")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_lora_dpo_from_a_local_model_and_conversation_pairs(tmp_path, hf_dir):  # noqa: F811
    """peft=lora on a local model directory with whole-conversation pairs; IPO; the adapter export loads in PEFT."""
    peft = pytest.importorskip("peft")
    data = tmp_path / "pairs.jsonl"
    rows = []
    for i in range(24):
        ask = [{"role": "user", "content": f"Add {i} and {i + 1}."}]
        rows.append({"chosen": [*ask, {"role": "assistant", "content": str(2 * i + 1)}],
                     "rejected": [*ask, {"role": "assistant", "content": str(2 * i + 3)}]})  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    result = dpo(*FAST, "trainer.max_steps=4", f"data.path={data}", f"model.path={hf_dir}", "model=qwen2_0_5b",
                 "peft=lora", "peft.r=4", "dpo.loss=ipo", "trainer.precision=bf16-mixed", run_dir=run_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(logged(run_dir, "train/loss")) == 4
    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    model = peft.PeftModel.from_pretrained(base, run_dir / "hf_export")
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed, "the adapters did not train"


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["dpo.loss=kto"], ["dpo.loss must be one of sigmoid, ipo, sigmoid_norm"]),
        (["+dpo.gamma=1"], ["dpo.gamma"]),
        (["data.pack=true"], ["data.pack must be false for preference pairs"]),
        (["dpo.label_smoothing=0.2", "dpo.loss=ipo"], ["label_smoothing applies to the sigmoid losses"]),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, overrides, fragments):
    assert_refused(dpo(*FAST, *overrides, run_dir=tmp_path), *fragments, run_dir=tmp_path)


def test_a_bad_record_is_refused_naming_its_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a"}))
    result = dpo(*FAST, f"data.path={data}", run_dir=tmp_path / "run")
    assert_refused(result, f"{data}:2", "expected 'chosen' and 'rejected'", run_dir=tmp_path / "run")
