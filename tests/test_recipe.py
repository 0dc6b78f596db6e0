"""`python -m recipes.sft`, run for real in a subprocess: short runs, multirun, the planner gate and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from lightning_horizon.data import build_default_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: a few steps of short rows, quiet progress bar.
FAST = ["trainer.max_steps=3", "data.max_seq_len=64", "data.batch_size=2", "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1", "+trainer.enable_model_summary=false"]  # fmt: skip
OUTPUTS = ("checkpoints", "csv", "tensorboard", "hf_export")


def sft(*overrides: str, run_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "recipes.sft", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]


def assert_refused(result: subprocess.CompletedProcess, *fragments: str, run_dir: Path | None = None) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]
    if run_dir is not None:
        assert not any((run_dir / name).exists() for name in OUTPUTS), sorted(p.name for p in run_dir.iterdir())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A local Hugging Face directory: a tiny random Qwen2 model and the default tokenizer (with its chat template)."""
    path = tmp_path_factory.mktemp("hf_model")
    tokenizer = build_default_tokenizer()
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"Add {i} and {i + 1}.", "response": str(2 * i + 1)} for i in range(40)]
    rows += [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}] * 10
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_short_run_trains_logs_and_exports(tmp_path):
    result = sft(*FAST, "trainer.max_steps=6", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first logged" in result.stdout and str(tmp_path) in result.stdout
    got = losses(tmp_path)
    assert len(got) == 6 and got[-1] < got[0]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # a file or a directory, per checkpoint format
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_export")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf_export")
    assert model.config.vocab_size == len(tokenizer) and model.config.use_cache
    batch = tokenizer("user\nWrite 'cat' in capital letters.", return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()
    assert not any(p.name.startswith(".hf_export") for p in tmp_path.iterdir())  # no temporary export left


def test_local_data_file_and_local_model_dir(tmp_path, hf_dir, data_file):
    result = sft(*FAST, f"data.path={data_file}", f"model.path={hf_dir}", "model=qwen2_0_5b", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_export")
    assert exported.config.hidden_size == 32 and exported.config.num_hidden_layers == 2  # the checkpoint's shape
    assert len(losses(tmp_path)) == 3


def test_multirun_writes_one_run_dir_per_point(tmp_path):
    result = sft("-m", "optim.lr=1e-5,3e-5", *FAST, "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for num, lr in ((0, 1e-5), (1, 3e-5)):
        run_dir = tmp_path / str(num)
        assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "hf_export" / "config.json").is_file()
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").optim.lr == pytest.approx(lr)


def test_plan_prints_the_table_and_exits(tmp_path):
    result = sft("plan=true", "model=qwen2_72b", "hardware=h200", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Plan: " in result.stdout and "Host memory" in result.stdout and "predicted step" in result.stdout
    assert not any((tmp_path / name).exists() for name in OUTPUTS)


def test_plan_that_does_not_fit_is_refused_before_allocating(tmp_path):
    start = time.perf_counter()
    result = sft("model=qwen2_72b", "hardware=rtx4090", run_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert_refused(result, "does not fit", "Suggestion", "Host memory", run_dir=tmp_path)
    assert elapsed < 30  # a few seconds of imports; building the 72B model would take minutes (and 290 GB)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 2**20  # KiB: no child ever used 4 GiB


@pytest.mark.parametrize(
    "case",
    ["missing_file", "malformed_line", "empty", "unknown_key", "negative_lr", "zero_batch", "no_chat_template"],
)
def test_bad_inputs_are_refused_with_a_clear_message(case, tmp_path, hf_dir):
    run_dir = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "Say hi.", "response": "hi"})
    if case == "missing_file":
        overrides, expected = [f"data.path={tmp_path}/missing.jsonl"], ["error: ", "missing.jsonl"]
    elif case == "malformed_line":
        data.write_text(f"{good}\n{{not json\n{good}\n")
        overrides, expected = [f"data.path={data}"], ["error: ", f"{data}:2", "malformed JSON"]
    elif case == "empty":
        data.write_text("")
        overrides, expected = [f"data.path={data}"], ["error: ", str(data)]
    elif case == "unknown_key":
        overrides, expected = ["+optim.learning_rate=1e-4"], ["error: ", "optim.learning_rate"]
    elif case == "negative_lr":
        overrides, expected = ["optim.lr=-1e-4"], ["error: ", "optim.lr"]
    elif case == "zero_batch":
        overrides, expected = ["data.batch_size=0"], ["error: ", "data.batch_size"]
    else:
        no_template = tmp_path / "no_template"
        no_template.mkdir()
        for item in hf_dir.iterdir():
            if item.name != "chat_template.jinja":
                (no_template / item.name).write_bytes(item.read_bytes())
        config = json.loads((no_template / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (no_template / "tokenizer_config.json").write_text(json.dumps(config))
        overrides, expected = [f"model.path={no_template}"], ["error: ", "chat template"]
    result = sft(*FAST, *overrides, run_dir=run_dir)
    assert result.returncode == 2
    assert_refused(result, *expected, run_dir=run_dir)


def test_unknown_override_is_refused_by_hydra(tmp_path):
    result = sft("strategy.checkpoint_evry=4", run_dir=tmp_path)
    assert result.returncode != 0 and "checkpoint_evry" in result.stderr


def test_strategy_group_mirrors_horizon_strategy():
    import dataclasses
    import inspect

    from lightning_horizon import HorizonStrategy
    from recipes.sft import StrategyConfig

    params = inspect.signature(HorizonStrategy.__init__).parameters
    want = {k: p.default for k, p in params.items() if k not in ("self", "accelerator", "precision_plugin")}
    assert {f.name: f.default for f in dataclasses.fields(StrategyConfig)} == want
    assert OmegaConf.load(ROOT / "conf" / "sft.yaml").strategy == want  # the shipped defaults are the strategy's


def test_lr_schedule_and_parameter_groups():
    from lightning_horizon.lightning_module import OptimConfig, build_optimizer, lr_factor

    factors = [lr_factor(s, warmup_steps=4, max_steps=20, schedule="cosine", min_lr_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))  # fmt: skip
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])  # norms and biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0)


def test_resume_auto_continues_from_the_last_checkpoint(tmp_path):
    first = sft(*FAST, "trainer.max_steps=4", run_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = sft(*FAST, "trainer.max_steps=6", "resume=auto", run_dir=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "Restored all states from the checkpoint" in log, log[-3000:]
    assert "last.ckpt" in log
    # the resumed run trained only the two missing steps
    assert len(losses(tmp_path)) == 2


def test_progress_bar_names_the_epoch_without_a_negative_total():
    from types import SimpleNamespace

    from recipes.sft import StepBoundProgressBar

    bar = StepBoundProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # only max_steps bounds the run
    assert bar._get_train_description(5).strip() == "Epoch 5"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
