"""`python -m recipes.sft`, run for real in a subprocess: short runs, multirun, the planner gate and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lightning_horizon.data import build_default_tokenizer
from lightning_horizon.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: a few steps of short rows, quiet progress bar.
FAST = ["trainer.max_steps=3", "data.max_seq_len=64", "data.batch_size=2", "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1", "+trainer.enable_model_summary=false"]  # fmt: skip
OUTPUTS = ("checkpoints", "csv", "tensorboard", "hf_export")


def sft(
    *overrides: str, run_dir: Path | None = None, timeout: float = 120, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "recipes.sft", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)}


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
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, eos_token_id=[0]).save_pretrained(path)
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
    # generation stops at the end of a reply (ChatML's <|im_end|>) or at the EOS
    assert model.config.eos_token_id == tokenizer.eos_token_id is not None
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    assert model.generation_config.eos_token_id == stops
    # the log: useful (Lightning's messages, the loss, the engine's effective settings, once) and quiet
    log = (tmp_path / "sft.log").read_text()
    for expected in ("weight_copy=False", "`Trainer.fit` stopped", "first logged"):
        assert expected in log, log
    assert log.count("horizon engine: ") == 1
    engine = json.loads((tmp_path / "engine.json").read_text())  # every automatic setting as decided for this run
    assert engine["weight_copy"] is False and engine["device"] == "cpu" and engine["compute_dtype"] == "float32"
    assert engine["checkpoint_every"] == 1 and engine["resident_layers"] == 0 and engine["compile_layers"] is False
    output = result.stdout + result.stderr
    for noise in ("litlogger", "LeafSpec", "_pytree", "FLOPs", "Total estimated model params size"):
        assert noise not in output, noise
    assert output.count("truncated") == 2  # training and validation data, each said once


def test_exported_tokenizer_gives_the_training_ids(tmp_path, hf_dir):
    # the default tokenizer (tiny, a qwen2 model) and a model's own (model.path), on every bundled document
    from recipes.sft import training_tokenizer
    from tests.test_tokenizer import assert_same_ids_on_every_bundled_document

    for name, overrides in (("default", []), ("model_path", [f"model.path={hf_dir}", "model=qwen2_0_5b"])):
        run_dir = tmp_path / name
        result = sft(*FAST, "trainer.max_steps=1", *overrides, run_dir=run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model))
        exported = AutoTokenizer.from_pretrained(run_dir / "hf_export")
        hf_config = AutoConfig.from_pretrained(run_dir / "hf_export")
        assert_same_ids_on_every_bundled_document(training_tokenizer(model_cfg, hf_config), exported)


def test_local_data_file_and_local_model_dir(tmp_path, hf_dir, data_file):
    data = tmp_path / "data.jsonl"
    data.write_text(data_file.read_text() + "{not json\n")
    run_dir = tmp_path / "run"
    overrides = [f"data.path={data}", "data.skip_bad_rows=true", f"model.path={hf_dir}", "model=qwen2_0_5b"]
    result = sft(*FAST, *overrides, run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf_export")
    assert exported.config.hidden_size == 32 and exported.config.num_hidden_layers == 2  # the checkpoint's shape
    assert len(losses(run_dir)) == 3
    # the source model's generation settings survive, with the end of a reply added to its stop tokens
    generation = exported.generation_config
    assert generation.top_p == 0.8 and generation.temperature == 0.7 and generation.eos_token_id == [0, 2]
    assert (result.stdout + result.stderr).count("skipped 1 bad row") == 1  # said once
    assert "skipped 1 bad row" in (run_dir / "sft.log").read_text()
    assert "eval mode" not in result.stdout + result.stderr  # a loaded model trains in train mode


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


def test_several_gpus_are_planned(tmp_path):
    result = sft("plan=true", "model=qwen2_72b", "hardware=h200", "trainer.devices=8", "+trainer.num_nodes=2",
                 run_dir=tmp_path / "plan")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 GPU(s) per node x 2 node(s)" in result.stdout and "Host memory per node" in result.stdout
    result = sft(*FAST, "trainer.devices=0", run_dir=tmp_path / "run")
    assert_refused(result, "trainer.devices must be a positive integer", run_dir=tmp_path / "run")


def _masters(run_dir: Path) -> dict[str, torch.Tensor]:
    from lightning_horizon.checkpoint import load_sharded

    state = load_sharded(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return {k: state[k] for k in state}


def test_two_processes_train_as_one_with_the_global_batch(tmp_path):
    """``trainer.devices=2`` on the CPU (Lightning's launcher, Hydra's run directory shared): each process reads its
    half of every global batch; the masters equal 1 process with twice the rows (1e-5), and rank 0 alone exports.
    The same with the node's collectives on the devices: ``strategy.sharded_streaming=true
    strategy.grad_reduce=device`` from the command line."""
    common = [*FAST, "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5"]
    two = sft(*common, "data.batch_size=2", "trainer.devices=2", run_dir=tmp_path / "two", timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    sharded = ["strategy.sharded_streaming=true", "strategy.grad_reduce=device"]
    two_sharded = sft(
        *common, "data.batch_size=2", "trainer.devices=2", *sharded, run_dir=tmp_path / "sharded", timeout=300
    )
    assert two_sharded.returncode == 0, two_sharded.stderr[-3000:]
    one = sft(*common, "data.batch_size=4", run_dir=tmp_path / "one", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    b = _masters(tmp_path / "one")
    for run in ("two", "sharded"):
        a = _masters(tmp_path / run)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in b) <= 1e-5, run
        assert losses(tmp_path / run) == pytest.approx(losses(tmp_path / "one"), rel=1e-4), run
        assert (tmp_path / run / "hf_export" / "model.safetensors").exists()


@pytest.mark.parametrize("pretrained", [False, True], ids=["random-init", "model-path"])
def test_two_nodes_with_a_sharded_node_store_train_as_one_and_export_from_the_checkpoint(tmp_path, hf_dir, pretrained):
    """``+trainer.num_nodes=2 strategy.node_store=sharded`` on two simulated nodes (two launches with ``NODE_RANK``,
    one Hydra run directory: a shared file system): the masters equal 1 process with twice the rows (1e-5), and the
    Hugging Face export, written from the last checkpoint (each node holds only its layers), holds them in BF16. From
    ``model.path`` each node reads only its own layers. With LoRA it is refused before anything is written."""
    import socket

    common = [*FAST, "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5"]
    if pretrained:
        common.append(f"model.path={hf_dir}")
    sharded = ["strategy.node_store=sharded", "strategy.sharded_streaming=true", "strategy.grad_reduce=device"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "nodes"
    args = [sys.executable, "-m", "recipes.sft", *common, "data.batch_size=2", "+trainer.num_nodes=2", *sharded,
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**ENV, "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for node in (0, 1)
    ]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    if pretrained:  # the 2 layers: one read on each node
        for node in (0, 1):
            assert f"node {node} of 2: read 1 of 2 layers of {hf_dir}" in logs[node], logs[node][-3000:]
    one = sft(*common, "data.batch_size=4", run_dir=tmp_path / "one", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _masters(run_dir), _masters(tmp_path / "one")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in b) <= 1e-5
    exported = Qwen2ForCausalLM.from_pretrained(run_dir / "hf_export", dtype=torch.float32).state_dict()
    assert exported.keys() <= {k.removeprefix("model.") for k in a}
    for name, value in exported.items():  # (the LightningModule holds the model as `model`)
        assert torch.equal(value, a[f"model.{name}"].to(torch.bfloat16).float()), name
    lora = sft(*FAST, "+trainer.num_nodes=2", *sharded, "peft=lora", run_dir=tmp_path / "lora")
    assert_refused(lora, "strategy.node_store=sharded", "peft", run_dir=tmp_path / "lora")


def test_plan_that_does_not_fit_is_refused_before_allocating(tmp_path):
    start = time.perf_counter()
    result = sft("model=qwen2_72b", "hardware=rtx4090", run_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert_refused(result, "does not fit", "Suggestion", "Host memory", run_dir=tmp_path)
    assert elapsed < 30  # a few seconds of imports; building the 72B model would take minutes (and 290 GB)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 2**20  # KiB: no child ever used 4 GiB


@pytest.mark.parametrize(
    "case",
    [
        "missing_file", "malformed_line", "non_utf8", "empty", "unknown_key", "negative_lr", "zero_batch",
        "no_chat_template", "longer_than_positions", "missing_model_dir", "empty_model_dir", "corrupted_weights",
        "no_tokenizer", "foreign_export_dir", "used_run_dir",
    ],
)  # fmt: skip
def test_bad_inputs_are_refused_with_a_clear_message(case, tmp_path, hf_dir):
    run_dir = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "Say hi.", "response": "hi"})
    model_dir = tmp_path / "model"
    if case in ("corrupted_weights", "no_tokenizer"):
        shutil.copytree(hf_dir, model_dir)
    if case == "non_utf8":
        data.write_bytes(f"{good}\n".encode() + b'{"prompt": "caf\xe9", "response": "x"}\n')
        overrides, expected = [f"data.path={data}"], ["error: ", f"{data}:2: not valid UTF-8"]
    elif case == "longer_than_positions":
        overrides = ["data.max_seq_len=4096"]
        expected = ["error: ", "data.max_seq_len=4096", "max_position_embeddings=2048", "rope_scaling"]
    elif case == "missing_model_dir":
        overrides, expected = [f"model.path={model_dir}"], ["error: ", f"{model_dir}: no such directory"]
    elif case == "empty_model_dir":
        model_dir.mkdir()
        overrides, expected = [f"model.path={model_dir}"], ["error: ", f"{model_dir} is an empty directory"]
    elif case == "corrupted_weights":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        overrides, expected = [f"model.path={model_dir}"], ["error: ", f"cannot read the safetensors file {weights}"]
    elif case == "no_tokenizer":
        for item in model_dir.glob("tokenizer*"):
            item.unlink()
        (model_dir / "chat_template.jinja").unlink()
        overrides, expected = [f"model.path={model_dir}"], ["error: ", f"{model_dir}: the directory holds no tokenizer"]
    elif case == "foreign_export_dir":
        (run_dir / "hf_export").mkdir(parents=True)
        (run_dir / "hf_export" / "notes.txt").write_text("mine")
        overrides, expected = [], ["error: ", "hf_export exists and is not an earlier Hugging Face export"]
    elif case == "used_run_dir":
        (run_dir / "checkpoints" / "last.ckpt").mkdir(parents=True)
        overrides, expected = [], ["error: ", f"run directory {run_dir} already holds a run", "resume=auto"]
    elif case == "missing_file":
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
    planted = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    result = sft(*FAST, *overrides, run_dir=run_dir)
    assert result.returncode == 2
    assert_refused(result, *expected)
    assert {p.name for p in run_dir.iterdir()} - planted <= {".hydra", "sft.log"}  # nothing written, nothing lost
    if planted:
        assert "nothing was changed" in result.stderr or "Move it away" in result.stderr


def test_unknown_override_is_refused_by_hydra(tmp_path):
    result = sft("strategy.checkpoint_evry=4", run_dir=tmp_path)
    assert result.returncode != 0 and "checkpoint_evry" in result.stderr


def test_strategy_group_is_the_engine_config():
    """``strategy.*`` validates straight into an EngineConfig (one declaration); a run field is refused with the
    Trainer argument that sets it."""
    from lightning_horizon.config_groups import engine_config
    from lightning_horizon.engine import EngineConfig

    assert engine_config({"checkpoint_every": 2}) == EngineConfig(checkpoint_every=2)
    with pytest.raises(ValueError, match="strategy.num_slots must be >= 2"):
        engine_config({"num_slots": 1})
    with pytest.raises(ValueError, match=r"strategy.compute_dtype .*trainer.precision"):
        engine_config({"compute_dtype": "bf16"})


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


def _progress(output: str) -> list[tuple[int, int]]:
    """(done, total) of each rendering of the training progress bar."""
    return [(int(a), int(b)) for a, b in re.findall(r"Epoch \d+\s+\S*\s*(\d+)/(\d+) ", output)]


def test_resume_auto_continues_from_the_last_checkpoint(tmp_path):
    first = sft(*FAST, "trainer.max_steps=4", "trainer.val_check_interval=2", run_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-4.ckpt"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".hf_export.tmp-{dead.pid}-0123abcd"  # an export killed midway
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    second = sft(*FAST, "trainer.max_steps=6", "trainer.val_check_interval=2", "resume=auto", run_dir=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "Restored all states from the checkpoint" in log, log[-3000:]
    assert "last.ckpt" in log
    assert not stale.exists()
    # metrics.csv holds the whole run once: the resumed run appended its two steps (and its validation)
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(6))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [1, 3, 5]
    assert all(done <= total for done, total in _progress(second.stdout)) and _progress(second.stdout)[-1] == (6, 6)
    assert "exists and is not empty" not in log  # a resumed run's checkpoint directory is expected to be
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["last.ckpt", "step-6.ckpt"]
    inodes = [{p.relative_to(checkpoints / n).as_posix(): p.stat().st_ino for p in (checkpoints / n).rglob("*")
               if p.is_file()} for n in names]  # fmt: skip
    assert inodes[0] == inodes[1]  # last.ckpt: hard links to step-6.ckpt's files, not a second copy


def test_resume_auto_finds_the_run_of_this_config_without_a_run_dir(tmp_path):
    first = sft(*FAST, "trainer.max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/*/*/checkpoints")]
    other = sft(*FAST, "trainer.max_steps=2", "data.max_seq_len=48", "hydra.run.dir=outputs/x/other", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]  # another config: never resumed by the next command
    time.sleep(1.1)  # a new timestamped Hydra directory
    second = sft(*FAST, "trainer.max_steps=4", "resume=auto", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"continuing run {run_dir}" in second.stdout and "resuming from" in second.stdout
    assert len(losses(run_dir)) == 4 and "continuing run" in (run_dir / "sft.log").read_text()
    assert len(losses(tmp_path / "outputs" / "x" / "other")) == 2


def _default_sigint() -> None:
    """In the child: Ctrl-C's default disposition. A test run started in the background of a non-interactive shell
    (``cmd &``) ignores SIGINT, and an ignored signal stays ignored across exec: the recipe would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_prints_the_command_that_resumes(tmp_path):
    overrides = [*FAST, "trainer.max_steps=400", "trainer.val_check_interval=2", "data.batch_size=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipes.sft", *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120

        def saved_past_step_4() -> bool:  # step-4.ckpt itself may already be rotated away by a later one
            steps = [p.stem.removeprefix("step-") for p in (tmp_path / "checkpoints").glob("step-*.ckpt")]
            return any(s.isdigit() and int(s) >= 4 for s in steps)

        while not saved_past_step_4():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err, (out[-3000:], err[-3000:])
    output = out + err
    match = re.search(r"Resume with:\n\s+python -m recipes\.sft (.+)", output)
    assert match, output[-3000:]
    command = shlex.split(match.group(1))
    assert command[-2:] == ["resume=auto", f"hydra.run.dir={tmp_path}"] and "trainer.max_steps=400" in command
    step = len(losses(tmp_path))
    command[command.index("trainer.max_steps=400")] = f"trainer.max_steps={step + 2}"
    resumed = sft(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr


def test_progress_bar_total_counts_the_batches_a_resumed_run_already_did():
    from types import SimpleNamespace

    from recipes.runs import StepBoundProgressBar

    bar = StepBoundProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(ready=21))
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=40, global_step=21, accumulate_grad_batches=1,
                                   num_training_batches=248, fit_loop=SimpleNamespace(
                                       epoch_loop=SimpleNamespace(batch_progress=progress)))  # fmt: skip
    assert bar.total_train_batches == 40  # Lightning's: 19, and the bar showed 40/19
    bar._trainer.num_training_batches = 30  # the epoch ends first
    assert bar.total_train_batches == 30


def test_progress_bar_names_the_epoch_without_a_negative_total():
    from types import SimpleNamespace

    from recipes.runs import StepBoundProgressBar

    bar = StepBoundProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # only max_steps bounds the run
    assert bar._get_train_description(5).strip() == "Epoch 5"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


@pytest.mark.slow
def test_compact_optimizer_state_trains_the_default_run_like_fp32(tmp_path):
    """The embedded default run (tiny model, bundled data, 200 steps) with BF16 and with int8 AdamW moments ends
    within 2% of the FP32 state's loss (the mean of the last five logged values; the curves:
    benchmarks/state_dtype_curves.py)."""
    finals = {}
    for dtype in ("fp32", "bf16", "int8"):
        run_dir = tmp_path / dtype
        result = sft(f"strategy.optimizer_state_dtype={dtype}", "trainer.limit_val_batches=1", run_dir=run_dir,
                     timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        logged = losses(run_dir)
        assert len(logged) >= 40 and logged[-1] < logged[0] / 3  # 200 steps, and the loss falls
        finals[dtype] = sum(logged[-5:]) / 5
    assert finals["bf16"] == pytest.approx(finals["fp32"], rel=0.02)
    assert finals["int8"] == pytest.approx(finals["fp32"], rel=0.02)


def _lora_run(tmp_path, hf_dir, data_file, *extra):
    run_dir = tmp_path / "run"
    overrides = [f"data.path={data_file}", f"model.path={hf_dir}", "model=qwen2_0_5b", "peft=lora", "peft.r=4",
                 "trainer.precision=bf16-mixed", "optim.lr=1e-2", "optim.warmup_steps=0"]  # fmt: skip
    result = sft(*FAST, *overrides, *extra, run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def _checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = (run_dir / "checkpoints" / "last.ckpt").resolve()
    return {k: v for f in (ckpt / "model").glob("*.safetensors") for k, v in load_file(f).items()}


def _peft_from_checkpoint(hf_dir: Path, tensors: dict[str, torch.Tensor], r: int = 4):
    """The base of ``hf_dir`` with LoRA adapters set to the checkpoint's masters (a reference built with PEFT)."""
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear"))
    inner = model.base_model.model
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if "lora_" in name:
                p.copy_(tensors[name])
    return model


def test_lora_run_exports_an_adapter_that_peft_loads(tmp_path, hf_dir, data_file):
    """peft=lora: only the adapters train, the base is held (and checkpointed) in BF16, and hf_export/ is PEFT's
    adapter format: PeftModel.from_pretrained on the base gives the adapters the run trained."""
    peft = pytest.importorskip("peft")
    run_dir, result = _lora_run(tmp_path, hf_dir, data_file, "trainer.max_steps=6")
    got = losses(run_dir)
    assert len(got) == 6 and got[-1] < got[0]
    assert "M trained)" in result.stdout
    engine = json.loads((run_dir / "engine.json").read_text())
    assert engine["frozen_dtype"] == "compute" and engine["compute_dtype"] == "bfloat16"
    tensors = _checkpoint_tensors(run_dir)
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    base = {k: v for k, v in tensors.items() if "lora_" not in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert base and all(v.dtype == torch.bfloat16 for v in base.values())  # the frozen base: 2 bytes/param
    source = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).state_dict()
    for k, v in base.items():  # untouched by training
        assert torch.equal(v, source[k.replace(".base_layer", "")]), k

    export = run_dir / "hf_export"
    assert (export / "adapter_config.json").exists() and (export / "adapter_model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(export) is not None
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16), export)
    loaded_lora = {n: p for n, p in loaded.base_model.model.named_parameters() if "lora_" in n}
    assert loaded_lora.keys() == lora.keys()
    for n, p in loaded_lora.items():
        assert torch.equal(p.float(), lora[n]), n
    reference = _peft_from_checkpoint(hf_dir, tensors)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_lora_run_exports_the_merged_model(tmp_path, hf_dir, data_file):
    run_dir, _ = _lora_run(tmp_path, hf_dir, data_file, "peft.export=merged")
    export = run_dir / "hf_export"
    assert not (export / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(export)
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    reference = _peft_from_checkpoint(hf_dir, _checkpoint_tensors(run_dir))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits.float()
        got = merged.to(torch.bfloat16)(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # BF16 weights, merged once (PEFT's own merge)
    assert not torch.equal(merged.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()["model.layers.0.mlp.up_proj.weight"])  # fmt: skip
