"""The CPU optimizer's compact state: ``optimizer_state_dtype="bf16"`` keeps AdamW's moments in BF16 on the host.

Training with it is close to FP32 state (the moments are rounded stochastically, so small updates survive), its
checkpoints store BF16 moments and resume exactly, a checkpoint of the other dtype resumes converted (with a
warning when values change), and optimizers the one-pass AdamW cannot step are refused.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

import lightning_horizon  # noqa: F401  (registers "horizon")
from lightning_horizon import HorizonEngine, HorizonStrategy
from lightning_horizon.checkpoint import CheckpointReader
from tests.helpers import LMModule, RandomTokens, clone, loader, make_batch, tiny_model
from tests.test_checkpoint import QUIET, ResumableLoader


def fit(model, steps, state_dtype, data=None, ckpt_path=None, **kw):
    module = LMModule(model, total=20)
    trainer = L.Trainer(
        strategy=HorizonStrategy(optimizer_state_dtype=state_dtype),
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        precision="32-true",
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        **QUIET,
        **kw,
    )
    trainer.fit(module, data if data is not None else loader(8), ckpt_path=ckpt_path)
    return module, trainer


def test_bf16_state_is_bf16_and_trains_close_to_fp32():
    ref = tiny_model("qwen2")
    exact, _ = fit(clone(ref), 20, "fp32")
    compact, trainer = fit(clone(ref), 20, "bf16")
    states = trainer.optimizers[0].state.values()
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all(p.dtype == torch.float32 for p in compact.model.parameters())  # the masters stay FP32
    assert compact.losses[-1] < compact.losses[0] * 0.9  # it learns
    assert compact.losses[-1] == pytest.approx(exact.losses[-1], rel=0.02)


def test_bf16_state_resumes_exactly(tmp_path):
    ref = tiny_model("qwen2")
    data = lambda: ResumableLoader(RandomTokens(8), batch_size=2)  # noqa: E731  (4 batches: step 6 is mid-epoch)
    _, trainer = fit(clone(ref), 6, "bf16", data())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    reader = CheckpointReader(tmp_path / "mid.ckpt")
    saved = {skey: t.dtype for _, skey, t in reader.optimizer_tensors(0) if skey.startswith("exp_avg")}
    assert set(saved.values()) == {torch.bfloat16}  # stored in its own dtype: 4 bytes/param on disk too
    want, _ = fit(clone(ref), 12, "bf16", data())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same dtype: no conversion warning
        warnings.filterwarnings("ignore", message=".*(val_dataloader|ckpt_path|ModelCheckpoint|workers|LeafSpec).*")
        got, trainer = fit(clone(ref), 12, "bf16", data(), ckpt_path=tmp_path / "mid.ckpt")
    assert got.losses == want.losses[6:]
    for (name, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        assert torch.equal(p, q), name
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in trainer.optimizers[0].state.values())


@pytest.mark.parametrize("saved,resumed", [("fp32", "bf16"), ("bf16", "fp32")])
def test_a_checkpoint_resumes_with_the_other_state_dtype(tmp_path, saved, resumed):
    ref = tiny_model("qwen2")
    _, trainer = fit(clone(ref), 4, saved)
    trainer.save_checkpoint(tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, trainer = fit(clone(ref), 6, resumed, ckpt_path=tmp_path / "ckpt")
    converted = [w for w in caught if "optimizer state of dtype" in str(w.message)]
    assert bool(converted) == (resumed == "bf16")  # FP32 -> BF16 rounds (said once); BF16 -> FP32 is exact
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[resumed]
    assert all(s["exp_avg_sq"].dtype == dtype for s in trainer.optimizers[0].state.values())
    assert trainer.global_step == 6 and module.losses[-1] < module.losses[0]


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
    ],
    ids=["sgd", "adam", "amsgrad"],
)
def test_compact_state_refuses_what_the_one_pass_adamw_cannot_step(make):
    model = tiny_model()
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", optimizer_state_dtype="bf16")
    try:
        model(**make_batch(0)).loss.backward()
        with pytest.raises(ValueError, match="optimizer_state_dtype=bf16"):
            engine.step(make(model.parameters()))
    finally:
        engine.close()


def test_unknown_state_dtype_is_refused():
    with pytest.raises(ValueError, match="optimizer_state_dtype must be one of fp32, bf16"):
        HorizonStrategy(optimizer_state_dtype="int4")
