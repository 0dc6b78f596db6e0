"""`python -m recipes.dpo` and `python -m recipes.reward`, run for real in a subprocess: the embedded defaults, LoRA
and a reward model from a local model directory, bad input."""

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


def dpo(*overrides: str, run_dir: Path, timeout: float = 300, recipe: str = "dpo") -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", f"recipes.{recipe}", *overrides, f"hydra.run.dir={run_dir}"]
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
        (["trainer.devices=2"], ["recipes.dpo trains on one GPU", "recipes.sft"]),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, overrides, fragments):
    assert_refused(dpo(*FAST, *overrides, run_dir=tmp_path), *fragments, run_dir=tmp_path)


def test_a_bad_record_is_refused_naming_its_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a"}))
    result = dpo(*FAST, f"data.path={data}", run_dir=tmp_path / "run")
    assert_refused(result, f"{data}:2", "expected 'chosen' and 'rejected'", run_dir=tmp_path / "run")


def test_reward_embedded_default_run_and_a_reward_model_from_a_local_causal_lm(tmp_path, hf_dir):  # noqa: F811
    """recipes.reward: the default run's accuracy rises; from a local causal LM directory the export is a
    ...ForSequenceClassification whose Hugging Face pooling gives the rewards the training read."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = dpo("trainer.max_steps=120", "trainer.log_every_n_steps=10", "trainer.val_check_interval=60",
                 "trainer.limit_val_batches=13", "+trainer.enable_progress_bar=false",
                 run_dir=tmp_path / "default", recipe="reward")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # chance is accuracy 0.5 and loss log 2 = 0.693; per-batch training values are noisy (8 pairs), the 100
    # validation pairs are not
    val_accuracy, val_loss = (logged(tmp_path / "default", f"val/{m}") for m in ("accuracy", "loss"))
    assert len(val_loss) == 2 and val_loss[-1] < 0.65 and val_accuracy[-1] > 0.6, (val_loss, val_accuracy)
    assert "train/accuracy: first logged" in (tmp_path / "default" / "reward.log").read_text()

    run_dir = tmp_path / "local"
    result = dpo(*FAST, "trainer.max_steps=3", f"model.path={hf_dir}", "model=qwen2_0_5b", "reward.margin=0.5",
                 run_dir=run_dir, recipe="reward")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "hf_export")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf_export")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    batch = tokenizer(["a short one", "a somewhat longer reply here"], return_tensors="pt", padding=True)
    from lightning_horizon.preference import last_token_scores

    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, last_token_scores(model, dict(batch)))


def test_bad_reward_settings_are_refused(tmp_path):
    result = dpo(*FAST, "+reward.temperature=2", run_dir=tmp_path, recipe="reward")
    assert_refused(result, "reward.temperature", run_dir=tmp_path)


def test_lora_reward_model_trains_its_score_head_and_exports_an_adapter(tmp_path, hf_dir):  # noqa: F811
    """peft=lora on a reward model: PEFT's SEQ_CLS task trains the score head too (modules_to_save), and the adapter
    export loads onto the base classifier with the trained score."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "run"
    result = dpo(*FAST, "trainer.max_steps=3", f"model.path={hf_dir}", "model=qwen2_0_5b", "peft=lora", "peft.r=4",
                 "trainer.precision=bf16-mixed", "optim.lr=1e-2", run_dir=run_dir, recipe="reward")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(run_dir / "hf_export" / "adapter_model.safetensors")
    score = [k for k in saved if "score" in k]
    assert score and any("lora_" in k for k in saved), sorted(saved)[:5]
    base = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    model = peft.PeftModel.from_pretrained(base, run_dir / "hf_export")
    loaded = dict(model.named_parameters())
    key = next(k for k in loaded if "score" in k and "modules_to_save" in k)
    torch.testing.assert_close(loaded[key].float(), saved[score[0]].float())


def test_the_plan_counts_both_rows_of_a_pair(tmp_path):
    """data.batch_size counts pairs; the plan (GPU activations, tokens per step) counts the 2 rows of each."""
    result = dpo("plan=true", "model=qwen2_7b", "hardware=h200", "data.batch_size=4", "data.max_seq_len=1024",
                 run_dir=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 8 x 1024 tokens" in result.stdout and "8192 tokens/step" in result.stdout
