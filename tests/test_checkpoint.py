"""Sharded checkpoints of `Trainer(strategy="horizon")`: exact resume, ModelCheckpoint, atomicity, corruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_horizon  # noqa: F401
from lightning_horizon import checkpoint as checkpoint_module
from lightning_horizon.checkpoint import CheckpointError, CheckpointReader, HorizonCheckpointIO, is_horizon_checkpoint
from lightning_horizon.checkpoint_callback import HorizonModelCheckpoint, checkpoint_step, find_resume_checkpoint
from lightning_horizon.files import remove_stale_temporaries
from tests.helpers import LMModule, RandomTokens, clone, loader, tiny_model

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
ROOT = Path(__file__).resolve().parents[1]


def fit(model, steps, data, ckpt_path=None, callbacks=(), module_cls=LMModule, accelerator="cpu", **kw):
    module = module_cls(model, total=20)
    trainer = L.Trainer(
        strategy="horizon",
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        precision="32-true",
        gradient_clip_val=1.0,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
        **QUIET,
        **kw,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def assert_same(a, b):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name


def test_resume_is_exact_with_model_checkpoint(tmp_path):
    ref = tiny_model("llama", tied=True)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, save_last=True)
    full, _ = fit(clone(ref), 20, loader(20), callbacks=[cb])  # 10 batches per epoch: step 10 ends epoch 0
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "epoch=0-step=10.ckpt",
        "epoch=0-step=5.ckpt",
        "epoch=1-step=15.ckpt",
        "epoch=1-step=20.ckpt",
        "last.ckpt",
    ]
    ckpt = tmp_path / "epoch=0-step=10.ckpt"
    assert is_horizon_checkpoint(ckpt)
    layout = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert "model/layers.0.safetensors" in layout and "optim/layers.2.safetensors" in layout
    assert "model/lm_head.safetensors" not in layout  # tied: stored once, with the embedding
    meta = json.loads((ckpt / "horizon.json").read_text())
    assert set(meta["files"]) == set(layout) - {"horizon.json"}
    assert meta["model"]["config"]["num_hidden_layers"] == 3

    resumed, trainer = fit(clone(ref), 20, loader(20), ckpt_path=ckpt)
    assert trainer.global_step == 20
    assert resumed.losses == full.losses[10:]
    assert_same(resumed, full)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch (Lightning stores its state_dict in the checkpoint)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served = self.skip = 0

    def __iter__(self):
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        self.served, self.skip = self.skip, 0
        for batch in it:
            self.served += 1
            yield batch

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.skip = state["served"]


def test_resume_mid_epoch_is_exact(tmp_path):
    ref = tiny_model("qwen2")
    data = lambda: ResumableLoader(RandomTokens(8), batch_size=2)  # noqa: E731  (4 batches: step 10 is mid-epoch)
    full, _ = fit(clone(ref), 10, data())
    full_trainer_ckpt = tmp_path / "mid.ckpt"
    _, trainer = fit(clone(ref), 10, data())
    trainer.save_checkpoint(full_trainer_ckpt)
    want, _ = fit(clone(ref), 20, data())
    got, trainer = fit(clone(ref), 20, data(), ckpt_path=full_trainer_ckpt)
    assert full.losses == want.losses[:10]
    assert got.losses == want.losses[10:]
    assert_same(got, want)


def test_top_k_keeps_only_the_latest_and_removes_directories(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, save_last=True)
    fit(tiny_model("qwen2"), 6, loader(8), callbacks=[cb])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    # saving over an existing checkpoint replaces it atomically and leaves no temporary directories
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step4.ckpt"
    _, trainer = fit(tiny_model("qwen2"), 4, loader(8))
    trainer.save_checkpoint(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resume(path, model=None, module_cls=LMModule):
    return fit(model or tiny_model("qwen2"), 6, loader(8), ckpt_path=path, module_cls=module_cls)


def test_corrupted_shard_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path / "c.ckpt")
    shard = path / "model" / "layers.1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"layers\.1\.safetensors is corrupted: crc32"):
        _resume(path)


def test_truncated_shard_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path / "t.ckpt")
    shard = path / "optim" / "layers.0.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"optim/layers\.0\.safetensors is truncated"):
        _resume(path)


def test_incomplete_directory_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path / "i.ckpt")
    (path / "horizon.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete horizon checkpoint"):
        _resume(path)


def test_different_architecture_is_refused(saved):
    with pytest.raises(
        CheckpointError, match="different model architecture.*intermediate|different model architecture"
    ):
        _resume(saved, model=tiny_model("qwen2", intermediate_size=48))
    with pytest.raises(CheckpointError, match="different model architecture"):
        _resume(saved, model=tiny_model("qwen2", layers=4))


def test_different_optimizer_is_refused(saved):
    class SGDModule(LMModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    class OneGroup(LMModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    with pytest.raises(CheckpointError, match="torch.optim.adamw.AdamW.*torch.optim.sgd.SGD"):
        _resume(saved, module_cls=SGDModule)
    with pytest.raises(CheckpointError, match="param groups of sizes"):
        _resume(saved, module_cls=OneGroup)


def test_checkpoint_io_is_the_default_and_weights_only(tmp_path):
    _, trainer = fit(tiny_model("llama"), 2, loader(4))
    assert isinstance(trainer.strategy.checkpoint_io, HorizonCheckpointIO)
    trainer.save_checkpoint(tmp_path / "w.ckpt", weights_only=True)
    meta = json.loads((tmp_path / "w.ckpt" / "horizon.json").read_text())
    assert "optimizers" not in meta and not (tmp_path / "w.ckpt" / "optim").exists()


_CHILD = textwrap.dedent(
    """
    import sys, time
    import lightning as L
    import lightning_horizon
    from lightning_horizon import checkpoint
    from tests.helpers import LMModule, loader, tiny_model

    path = sys.argv[1]
    module = LMModule(tiny_model("qwen2", layers=6, hidden_size=256, intermediate_size=512), total=20)
    trainer = L.Trainer(strategy="horizon", accelerator="cpu", devices=1, max_steps=3, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader(8))
    trainer.save_checkpoint(path)  # complete: the one that must survive
    print("SAVED", flush=True)
    write = checkpoint.write_safetensors

    def slow_write(*args, **kwargs):  # makes the second save take > 0.5 s, so the kill lands in the middle
        out = write(*args, **kwargs)
        print("SHARD", flush=True)
        time.sleep(0.1)
        return out

    checkpoint.write_safetensors = slow_write
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(module, loader(8))
    trainer.save_checkpoint(path)  # overwrites: killed halfway
    print("DONE", flush=True)
    """
)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, f"child exited early: {lines}"
            lines.append(line.strip())
            if lines.count("SHARD") == 4:  # mid-way through the second save (it writes 2 x 9 shards)
                break
        before = json.loads((path / "horizon.json").read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "DONE" not in lines
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.tmp-")]  # the killed save's leftovers
    assert json.loads((path / "horizon.json").read_text()) == before
    module = LMModule(tiny_model("qwen2", layers=6, hidden_size=256, intermediate_size=512), total=20)
    trainer = L.Trainer(
        strategy="horizon",
        accelerator="cpu",
        devices=1,
        max_steps=5,
        precision="32-true",
        enable_checkpointing=False,
        **QUIET,
    )
    start = time.monotonic()
    trainer.fit(module, loader(8), ckpt_path=path)
    assert trainer.global_step == 5 and len(module.losses) == 2
    assert time.monotonic() - start < 60
    trainer.save_checkpoint(path)  # the next save of that name removes the dead process's temporary directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------- last.ckpt without a second copy (#12)
def _inodes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_ino for p in sorted(path.rglob("*")) if p.is_file()}


def _horizon_checkpoint(dirpath: Path, **kw) -> HorizonModelCheckpoint:
    return HorizonModelCheckpoint(dirpath=dirpath, filename="step-{step}", auto_insert_metric_name=False, **kw)


def test_last_is_a_hard_linked_twin_of_the_checkpoint_just_saved(tmp_path, monkeypatch):
    writes = []
    write = checkpoint_module.write_safetensors
    monkeypatch.setattr(
        checkpoint_module, "write_safetensors", lambda path, *a, **k: writes.append(path) or write(path, *a, **k)
    )
    cb = _horizon_checkpoint(tmp_path, every_n_train_steps=2)
    fit(tiny_model("qwen2"), 6, loader(8), callbacks=[cb])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step-6.ckpt"]
    last, step = tmp_path / "last.ckpt", tmp_path / "step-6.ckpt"
    assert last.is_dir() and not last.is_symlink()
    assert _inodes(last) == _inodes(step)  # the same files: one write per save, half the I/O and the disk
    assert all(p.stat().st_nlink == 2 for p in last.rglob("*") if p.is_file())
    shards_per_save = len([p for p in step.rglob("*.safetensors")])
    assert len(writes) == 3 * shards_per_save  # steps 2, 4, 6: `last` never wrote a shard
    shutil.rmtree(step)  # removing the step checkpoint (the top-k rotation does) leaves `last` whole
    CheckpointReader(last)


def test_resuming_from_the_linked_last_continues_the_rotation(tmp_path):
    ref = tiny_model("qwen2")
    full, _ = fit(clone(ref), 8, loader(4), callbacks=[_horizon_checkpoint(tmp_path / "full", every_n_train_steps=2)])
    fit(clone(ref), 2, loader(4), callbacks=[_horizon_checkpoint(tmp_path, every_n_train_steps=2)])  # the first `last`
    resumed, trainer = fit(
        clone(ref),
        8,
        loader(4),
        ckpt_path=tmp_path / "last.ckpt",
        callbacks=[_horizon_checkpoint(tmp_path, every_n_train_steps=2)],
    )
    assert trainer.global_step == 8 and resumed.losses == full.losses[2:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "full") == ["last.ckpt", "step-8.ckpt"]
    assert _inodes(tmp_path / "last.ckpt") == _inodes(tmp_path / "step-8.ckpt")  # no last-v1, no second copy


def _killed_before_last(dirpath: Path, at: int) -> HorizonModelCheckpoint:
    """Dies between the top-k save and `last` at step ``at``, as a SIGKILL there would leave the directory."""
    cb = _horizon_checkpoint(dirpath, every_n_train_steps=2)
    link = cb._link_checkpoint

    def killed(trainer, filepath, linkpath):
        if trainer.global_step == at:
            raise RuntimeError("killed")
        link(trainer, filepath, linkpath)

    cb._link_checkpoint = killed
    return cb


def test_a_kill_between_the_step_checkpoint_and_last_leaves_no_orphan(tmp_path):
    ref = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="killed"):
        fit(
            clone(ref),
            8,
            loader(8),
            callbacks=[_killed_before_last(tmp_path, at=4)],
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step-4.ckpt"]
    assert checkpoint_step(tmp_path / "last.ckpt") == 2 and checkpoint_step(tmp_path / "step-4.ckpt") == 4
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-4.ckpt"  # the newest complete one, not `last`
    _, trainer = fit(
        clone(ref),
        8,
        loader(8),
        ckpt_path=tmp_path / "step-4.ckpt",
        callbacks=[_horizon_checkpoint(tmp_path, every_n_train_steps=2)],
    )
    assert trainer.global_step == 8
    # Lightning never removes the checkpoint a run resumed from: once `last` is newer, it goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step-8.ckpt"]


def test_resuming_from_an_older_last_removes_the_newer_orphan_once_passed(tmp_path):
    ref = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="killed"):
        fit(
            clone(ref),
            8,
            loader(8),
            callbacks=[_killed_before_last(tmp_path, at=4)],
        )
    unrelated = tmp_path / "notes.ckpt"  # not this callback's name pattern: never touched
    shutil.copytree(tmp_path / "last.ckpt", unrelated)
    _, trainer = fit(
        clone(ref),
        8,
        loader(8),
        ckpt_path=tmp_path / "last.ckpt",
        callbacks=[_horizon_checkpoint(tmp_path, every_n_train_steps=2)],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "notes.ckpt", "step-8.ckpt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_swept_at_start(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".step-6.ckpt.tmp-{dead}-0123abcd", tmp_path / f".last.ckpt.old-{dead}-89abcdef"]
    for path in stale:
        (path / "model").mkdir(parents=True)
        (path / "model" / "layers.0.safetensors").write_bytes(b"x" * 1000)
    stale_file = tmp_path / f".last.ckpt.tmp-{dead}-deadbeef"
    stale_file.write_bytes(b"x")
    alive = tmp_path / f".step-2.ckpt.tmp-{os.getpid()}-0123abcd"  # a save in progress in a live process
    alive.mkdir()
    fit(tiny_model("qwen2"), 2, loader(8), callbacks=[_horizon_checkpoint(tmp_path, every_n_train_steps=2)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["last.ckpt", "step-2.ckpt", alive.name])
    assert remove_stale_temporaries(tmp_path) == []  # this process is alive: its temporary stays
