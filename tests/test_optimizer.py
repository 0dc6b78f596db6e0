"""The CPU optimizer's compact state: ``optimizer_state_dtype="bf16"`` keeps AdamW's moments in BF16 on the host,
``"int8"`` in blockwise 8-bit codes with FP32 block scales.

Training with them is close to FP32 state, their checkpoints store the moments as they are and resume exactly, a
checkpoint of another dtype resumes converted (with a warning when values change), and optimizers the one-pass
AdamW cannot step are refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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


STORED = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "int8": (torch.int8, torch.uint8),
}


def stored(trainer) -> set[tuple[torch.dtype, torch.dtype]]:
    return {(s["exp_avg"].dtype, s["exp_avg_sq"].dtype) for s in trainer.optimizers[0].state.values()}


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_compact_state_is_compact_and_trains_close_to_fp32(dtype):
    ref = tiny_model("qwen2")
    exact, _ = fit(clone(ref), 20, "fp32")
    compact, trainer = fit(clone(ref), 20, dtype)
    assert stored(trainer) == {STORED[dtype]}
    if dtype == "int8":  # one FP32 scale per moment and block of 256 elements
        for p, s in trainer.optimizers[0].state.items():
            assert s["exp_avg_scale"].shape == s["exp_avg_sq_scale"].shape == ((p.numel() + 255) // 256,)
    assert all(p.dtype == torch.float32 for p in compact.model.parameters())  # the masters stay FP32
    assert compact.losses[-1] < compact.losses[0] * 0.9  # it learns
    assert compact.losses[-1] == pytest.approx(exact.losses[-1], rel=0.02)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_compact_state_resumes_exactly(tmp_path, dtype):
    ref = tiny_model("qwen2")
    data = lambda: ResumableLoader(RandomTokens(8), batch_size=2)  # noqa: E731  (4 batches: step 6 is mid-epoch)
    _, trainer = fit(clone(ref), 6, dtype, data())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    reader = CheckpointReader(tmp_path / "mid.ckpt")
    saved = {skey: t.dtype for _, skey, t in reader.optimizer_tensors(0) if skey.startswith("exp_avg")}
    want_saved = {"exp_avg": STORED[dtype][0], "exp_avg_sq": STORED[dtype][1]}
    if dtype == "int8":
        want_saved |= {"exp_avg_scale": torch.float32, "exp_avg_sq_scale": torch.float32}
    assert saved == want_saved  # stored in its own dtype: as compact on disk as in memory
    want, _ = fit(clone(ref), 12, dtype, data())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same dtype: no conversion warning
        warnings.filterwarnings("ignore", message=".*(val_dataloader|ckpt_path|ModelCheckpoint|workers|LeafSpec).*")
        got, trainer = fit(clone(ref), 12, dtype, data(), ckpt_path=tmp_path / "mid.ckpt")
    assert got.losses == want.losses[6:]
    for (name, p), q in zip(got.model.named_parameters(), want.model.parameters()):
        assert torch.equal(p, q), name
    assert stored(trainer) == {STORED[dtype]}


@pytest.mark.parametrize(
    "saved,resumed",
    [("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "int8"), ("int8", "fp32"), ("int8", "bf16"), ("bf16", "int8")],
)
def test_a_checkpoint_resumes_with_the_other_state_dtype(tmp_path, saved, resumed):
    ref = tiny_model("qwen2")
    _, trainer = fit(clone(ref), 4, saved)
    trainer.save_checkpoint(tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, trainer = fit(clone(ref), 6, resumed, ckpt_path=tmp_path / "ckpt")
    converted = [w for w in caught if "optimizer state stored as" in str(w.message)]
    assert bool(converted) == (resumed != "fp32")  # rounding says so (once); to FP32 it is exact
    assert stored(trainer) == {STORED[resumed]}
    assert trainer.global_step == 6 and module.losses[-1] < module.losses[0]


def test_int8_state_resumed_in_fp32_is_the_decoded_state(tmp_path):
    """int8 -> FP32 is exact: the resumed FP32 moments are the int8 codes times their block scales."""
    from lightning_horizon.engine.host_kernels import EXP_AVG_FORMAT, EXP_AVG_SQ_FORMAT, dequantize_moment

    ref = tiny_model("qwen2")
    _, trainer = fit(clone(ref), 3, "int8")
    saved = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizers[0].state.items()}
    names = {id(p): n for n, p in trainer.lightning_module.model.named_parameters()}
    trainer.save_checkpoint(tmp_path / "ckpt")
    module, trainer = fit(clone(ref), 3, "fp32", ckpt_path=tmp_path / "ckpt")  # loads, steps nothing more
    by_name = {n: p for n, p in module.model.named_parameters()}
    for pid, s in saved.items():
        state = trainer.optimizers[0].state[by_name[names[pid]]]
        assert state["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in state
        assert torch.equal(state["exp_avg"], dequantize_moment(s["exp_avg"], s["exp_avg_scale"], EXP_AVG_FORMAT))
        want_v = dequantize_moment(s["exp_avg_sq"], s["exp_avg_sq_scale"], EXP_AVG_SQ_FORMAT)
        assert torch.equal(state["exp_avg_sq"], want_v)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True),
    ],
    ids=["sgd", "adam", "amsgrad"],
)
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_compact_state_refuses_what_the_one_pass_adamw_cannot_step(make, dtype):
    model = tiny_model()
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", optimizer_state_dtype=dtype)
    try:
        model(**make_batch(0)).loss.backward()
        with pytest.raises(ValueError, match=f"optimizer_state_dtype={dtype}"):
            engine.step(make(model.parameters()))
    finally:
        engine.close()


def test_unknown_state_dtype_is_refused():
    with pytest.raises(ValueError, match="optimizer_state_dtype must be one of fp32, bf16, int8"):
        HorizonStrategy(optimizer_state_dtype="int4")


def test_a_resumed_state_is_read_not_mapped_from_the_checkpoint(tmp_path):
    """The restored masters and AdamW state live in the process's own memory: no mapping of the checkpoint's files
    stays behind (it would keep a rotated-away checkpoint's disk space, and page the state in from disk later)."""
    ref = tiny_model("qwen2")
    _, trainer = fit(clone(ref), 2, "int8")
    trainer.save_checkpoint(tmp_path / "ckpt")
    _, trainer = fit(clone(ref), 3, "int8", ckpt_path=tmp_path / "ckpt")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    assert str(tmp_path / "ckpt") not in maps.read_text()
    assert trainer.global_step == 3
