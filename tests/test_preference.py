"""DPO: per-sequence log-probabilities and the preference losses against plain PyTorch, under the engine and not."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_horizon  # noqa: F401  (registers strategy="horizon")
from lightning_horizon import HorizonEngine
from lightning_horizon.data import DataConfig
from lightning_horizon.data.errors import DataError
from lightning_horizon.data.preference import PreferenceDataModule, encode_pairs, parse_pair
from lightning_horizon.lightning_module import OptimConfig
from lightning_horizon.preference import (
    DPOModule,
    DPOSettings,
    dpo_loss,
    label_token_counts,
    logprobs_from_logits,
    sequence_logprobs,
)
from tests.helpers import VOCAB, clone, make_batch, rel_err, tiny_config, tiny_model


def reference_logps(model, batch):
    """Plain PyTorch: full logits, log-softmax, the label tokens' log-probabilities summed per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    target = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = torch.where(target != -100, logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    return picked.sum(-1)


def reference_dpo(pc, pr, rc, rr, beta):
    """The DPO paper's loss, written out."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("llama", False)])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_engine_sequence_logprobs_and_gradients_match_plain_pytorch(family, tied, chunk):
    """Values and the gradients of an arbitrary weighting of them (what a DPO loss feeds back) equal autograd."""
    base = tiny_model(family, tied=tied, layers=3)
    batch = make_batch(3, batch=4, seq=12)
    weights = torch.tensor([0.7, -1.3, 0.2, 2.0])

    ref = clone(base)
    want = reference_logps(ref, batch)
    (want * weights).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", loss_chunk_tokens=chunk)
    try:
        got = sequence_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        assert got.shape == (4,) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        (got * weights).sum().backward()
        got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        engine.close()
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-5, name


def test_plain_model_path_and_counts():
    model = tiny_model("qwen2", layers=2)
    batch = make_batch(4, batch=3, seq=10)
    got = sequence_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(got, reference_logps(model, batch))
    # make_batch: labels at positions 3..9 (7 scored tokens), row 0's last two are padding (5)
    assert label_token_counts(batch["labels"]).tolist() == [5, 7, 7]
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.full((2, 5), -100)
    assert logprobs_from_logits(logits, labels).tolist() == [0.0, 0.0]


def test_dpo_losses_match_their_definitions():
    torch.manual_seed(0)
    policy, ref = torch.randn(8) * 5, torch.randn(8) * 5
    counts = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10])
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    losses, chosen, rejected = dpo_loss(policy, ref, counts, DPOSettings(beta=0.3))
    torch.testing.assert_close(losses, reference_dpo(pc, pr, rc, rr, 0.3))
    torch.testing.assert_close(chosen, 0.3 * (pc - rc))
    torch.testing.assert_close(rejected, 0.3 * (pr - rr))
    cc, cr = counts.chunk(2)
    avg = (pc / cc - rc / cc) - (pr / cr - rr / cr)
    ipo, _, _ = dpo_loss(policy, ref, counts, DPOSettings(beta=0.3, loss="ipo"))
    torch.testing.assert_close(ipo, (avg - 1 / 0.6) ** 2)
    norm, _, _ = dpo_loss(policy, ref, counts, DPOSettings(beta=0.3, loss="sigmoid_norm", label_smoothing=0.1))
    torch.testing.assert_close(norm, -0.9 * F.logsigmoid(0.3 * avg) - 0.1 * F.logsigmoid(-0.3 * avg))
    with pytest.raises(ValueError, match="dpo.loss must be one of"):
        DPOSettings(loss="kto")
    with pytest.raises(ValueError, match="dpo.beta"):
        DPOSettings(beta=0)


def test_dpo_gradients_under_the_engine_equal_plain_pytorch():
    """The whole DPO loss (chosen and rejected in one pass) through the engine: loss and gradients equal autograd."""
    base = tiny_model("qwen2", tied=True, layers=3)
    batch = make_batch(5, batch=4, seq=12)  # rows 0-1 chosen, rows 2-3 rejected
    reference = torch.tensor([-40.0, -38.0, -45.0, -39.0])
    beta = 0.5

    ref = clone(base)
    lp = reference_logps(ref, batch)
    want = reference_dpo(lp[:2], lp[2:], reference[:2], reference[2:], beta).mean()
    want.backward()

    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", loss_chunk_tokens=7)
    try:
        policy = sequence_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        losses, _, _ = dpo_loss(policy, reference, label_token_counts(batch["labels"]), DPOSettings(beta=beta))
        got = losses.mean()
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            assert rel_err(p.grad, q.grad) < 1e-5, name
    finally:
        engine.close()


def test_accumulated_dpo_gradients_equal_plain_pytorch():
    """Two micro-batches, each DPO loss halved (what accumulate_grad_batches=2 does): the engine's FP32 sum of the
    per-sequence gradients equals autograd's."""
    base = tiny_model("qwen2", tied=True, layers=3)
    batches = [make_batch(5, batch=4, seq=12), make_batch(6, batch=4, seq=12)]
    reference, settings = torch.tensor([-40.0, -38.0, -45.0, -39.0]), DPOSettings(beta=0.5)
    ref = clone(base)
    for b in batches:
        policy = reference_logps(ref, b)
        (dpo_loss(policy, reference, label_token_counts(b["labels"]), settings)[0].mean() / 2).backward()
    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", accumulate_grads=True)
    try:
        for b in batches:
            policy = sequence_logprobs(model, b["input_ids"], b["labels"], b["attention_mask"])
            (dpo_loss(policy, reference, label_token_counts(b["labels"]), settings)[0].mean() / 2).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            assert rel_err(engine.gradient(p), q.grad) < 1e-5, name
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------------- records
def test_preference_record_forms(tokenizer):
    simple = parse_pair({"prompt": "Hi?", "chosen": "Yes", "rejected": "No", "system": "Be brief."}, "f:1")
    assert simple.prompt == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"})
    conversational = parse_pair(
        {
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Yes"}],
            "rejected": [{"role": "assistant", "content": "No"}],
        },
        "f:2",
    )
    whole = parse_pair(
        {
            "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes"}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No"}],
        },
        "f:3",
    )
    assert conversational.prompt == whole.prompt == ({"role": "user", "content": "Hi?"},)
    assert (whole.chosen, whole.rejected) == ("Yes", "No")
    docs = encode_pairs([simple, whole], tokenizer, max_seq_len=64)
    assert len(docs) == 4
    ids, labels = docs.doc(2)  # whole's chosen side: the labels are the reply's tokens (and its end of turn) only
    scored = tokenizer.decode(ids[labels != -100])
    assert scored.startswith("Yes") and "Hi?" not in scored


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"prompt": "Hi", "chosen": "a"}, "expected 'chosen' and 'rejected'"),
        ({"prompt": "Hi", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or a list"),
        (
            {
                "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
            },
            "differ before their last message",
        ),
        (
            {"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
            "exactly one assistant message",
        ),
    ],
)
def test_bad_preference_records_are_refused_with_their_source(raw, message):
    with pytest.raises(DataError, match=message) as err:
        parse_pair(raw, "pairs.jsonl:7")
    assert "pairs.jsonl:7" in str(err.value)


def test_datamodule_batches_chosen_then_rejected(tokenizer):
    dm = PreferenceDataModule(DataConfig(pack=False, batch_size=3, max_seq_len=128), tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["index"].shape == (3,)
    counts = label_token_counts(batch["labels"])
    assert (counts > 0).all()
    loaders = dm.reference_dataloaders()
    assert sum(len(b["index"]) for b in loaders["train"]) == len(dm.train_docs) // 2 == 1000
    assert sum(len(b["index"]) for b in loaders["val"]) == 100
    with pytest.raises(DataError, match="data.pack must be false"):
        PreferenceDataModule(DataConfig(pack=True), tokenizer)


# --------------------------------------------------------------------------------------------------- training
def _dpo_fit(strategy, tmp_path, steps=12, ckpt=None, tokenizer=None, seed=0, save_every=None, accumulate=1):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("qwen2", tied=True, layers=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    model = Qwen2ForCausalLM(config)
    dm = PreferenceDataModule(DataConfig(pack=False, batch_size=4, max_seq_len=128, shuffle=False), tokenizer)
    module = DPOModule(model, DPOSettings(beta=0.5), OptimConfig(lr=3e-3, schedule="constant"), max_steps=steps)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=save_every is not None,
        callbacks=[]
        if save_every is None
        else [ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=save_every, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        accumulate_grad_batches=accumulate,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return trainer, module


@pytest.mark.parametrize("steps,accumulate,tol", [(12, 1, 1e-4), (5, 2, 1e-3)])
def test_dpo_module_under_horizon_equals_auto(tmp_path, tokenizer, steps, accumulate, tol):
    """Same reference log-probabilities and the same weights after the DPO steps (FP32, clipping, with and without
    gradient accumulation). With accumulation the tied embedding is 2.9e-4 apart after the first step already (every
    other tensor: 0): its accumulated gradient agrees to 2e-6 (next test; with SGD the weights agree to 3e-7 after
    that step), but Adam's first update divides each element by its own magnitude, so rounding-level differences in
    elements whose gradient is near Adam's eps become visible update differences."""
    _, auto = _dpo_fit("auto", tmp_path / "a", steps, tokenizer=tokenizer, accumulate=accumulate)
    _, horizon = _dpo_fit("horizon", tmp_path / "h", steps, tokenizer=tokenizer, accumulate=accumulate)
    torch.testing.assert_close(horizon.reference_logps["train"], auto.reference_logps["train"], rtol=1e-5, atol=1e-4)
    want = auto.model.state_dict()
    for name, value in horizon.model.state_dict().items():
        assert rel_err(value, want[name]) < tol, name


def test_resume_keeps_the_reference_of_the_first_run(tmp_path, tokenizer):
    """A checkpoint carries the reference log-probabilities: a resumed run (its model built from another seed, so
    recomputing them would give other values) ends with the weights of an uninterrupted run."""
    _, straight = _dpo_fit("horizon", tmp_path / "s", steps=8, tokenizer=tokenizer, save_every=4)
    ckpt = tmp_path / "s" / "ckpt" / "step=4.ckpt"
    _, resumed = _dpo_fit("horizon", tmp_path / "r", steps=8, ckpt=str(ckpt), tokenizer=tokenizer, seed=1)
    torch.testing.assert_close(resumed.reference_logps["train"], straight.reference_logps["train"])
    want = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_resuming_from_a_checkpoint_without_reference_is_refused(tmp_path, tokenizer):
    module = DPOModule(tiny_model("qwen2", layers=1))
    with pytest.raises(ValueError, match="no DPO reference log-probabilities"):
        module.on_load_checkpoint({"state_dict": {}})


def test_preference_pairs_from_parquet_and_a_hugging_face_dataset(tmp_path, tokenizer):
    """The same readers as SFT data: a Parquet file (rows named in errors) and a ``save_to_disk`` dataset with
    conversational pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightning_horizon.data.records import read_records

    rows = [{"prompt": f"Add {i} and 1.", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    dm = PreferenceDataModule(DataConfig(path=str(tmp_path / "pairs.parquet"), pack=False, batch_size=2), tokenizer)
    dm.setup("fit")
    assert len(dm.train_rows) == 6 and dm.val_docs is None
    pq.write_table(
        pa.Table.from_pylist([*rows, {"prompt": "x", "chosen": None, "rejected": "y"}]), tmp_path / "b.parquet"
    )
    with pytest.raises(DataError, match=r"b.parquet, row 7: field 'chosen'"):
        read_records(str(tmp_path / "b.parquet"), parse=parse_pair)
    datasets = pytest.importorskip("datasets")
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(conversational)}).save_to_disk(str(tmp_path / "hf"))
    dm = PreferenceDataModule(
        DataConfig(path=str(tmp_path / "hf"), pack=False, batch_size=2, val_fraction=0.34), tokenizer
    )
    dm.setup("fit")
    assert len(dm.train_rows) == 4 and len(dm.val_rows) == 2


def test_validate_alone_scores_the_reference_and_starts_at_log_2(tmp_path, tokenizer):
    """``trainer.validate`` without a fit computes the validation pairs' reference itself; before any training the
    policy is the reference, so every reward is 0, the loss is log 2 and the accuracy 0 (no pair strictly ahead)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = tiny_config("qwen2", tied=True, layers=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    module = DPOModule(Qwen2ForCausalLM(config), DPOSettings(beta=0.5))
    dm = PreferenceDataModule(DataConfig(pack=False, batch_size=8, max_seq_len=128), tokenizer)
    trainer = L.Trainer(strategy="horizon", accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=3, default_root_dir=tmp_path)  # fmt: skip
    (metrics,) = trainer.validate(module, datamodule=dm)
    assert set(module.reference_logps) == {"val"} and module.reference_logps["val"].shape == (100, 2)
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["val/reward_margin"] == pytest.approx(0.0, abs=1e-5) and metrics["val/reward_accuracy"] == 0.0
