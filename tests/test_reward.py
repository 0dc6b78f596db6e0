"""Score heads (``...ForSequenceClassification``: reward models, value heads) under the engine, against plain HF."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForSequenceClassification, Qwen2ForSequenceClassification

from lightning_horizon import HorizonEngine
from tests.helpers import clone, make_batch, rel_err, tiny_config

CLASSES = {"qwen2": Qwen2ForSequenceClassification, "llama": LlamaForSequenceClassification}


def classifier(family: str, num_labels: int = 1, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = tiny_config(family, layers=3, num_labels=num_labels, pad_token_id=0, **kw)
    return CLASSES[family](config).float()


def padded_batch(seed: int):
    batch = make_batch(seed, batch=3, seq=10)
    ids = batch["input_ids"].clamp(min=1)  # 0 is the pad id: the model pools at each row's last non-pad token
    ids[0, -3:] = 0
    ids[1, -1:] = 0
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("num_labels,labels", [(1, torch.tensor([0.5, -1.0, 2.0])), (3, torch.tensor([2, 0, 1]))])
def test_sequence_classifier_loss_and_gradients_match_hugging_face(family, num_labels, labels):
    """The model's own forward (pooling at the last real token, regression or cross-entropy loss) on the streamed
    decoder and score head: logits, loss and every gradient equal plain autograd."""
    base = classifier(family, num_labels)
    batch = padded_batch(1)
    ref = clone(base)
    want = ref(**batch, labels=labels)
    want.loss.backward()
    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32", checkpoint_every=2)
    try:
        got = model(**batch, labels=labels)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
        got.loss.backward()
        got_grads = grads(model)
    finally:
        engine.close()
    for name, g in grads(ref).items():
        assert rel_err(got_grads[name], g) < 1e-5, name


def test_value_head_on_every_token_matches_hugging_face():
    """A value head: the score layer on each position's final hidden state (``model.model`` then ``model.score``),
    as PPO's critic uses it; values and gradients of a per-token loss equal autograd."""
    base = classifier("qwen2")
    batch = padded_batch(2)
    target = torch.randn(3, 10, 1)

    def values(m):
        return m.score(m.model(**batch).last_hidden_state)

    ref = clone(base)
    want = values(ref)
    ((want - target) ** 2 * batch["attention_mask"][..., None]).mean().backward()
    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        for _ in range(2):  # twice: a second pass streams the same way
            model.zero_grad()
            got = values(model)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            ((got - target) ** 2 * batch["attention_mask"][..., None]).mean().backward()
            got_grads = grads(model)
            for name, g in grads(ref).items():
                assert rel_err(got_grads[name], g) < 1e-5, name
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ RewardModule
def test_last_token_scores_are_hugging_faces_pooled_logits():
    """Each row's score at its last attended token equals the model's own pooling (last non-pad token)."""
    from lightning_horizon.preference import last_token_scores

    model = classifier("llama")
    batch = padded_batch(3)
    torch.testing.assert_close(last_token_scores(model, batch), model(**batch).logits)


def test_bradley_terry_gradients_under_the_engine_equal_hugging_face():
    from lightning_horizon.preference import bradley_terry_loss, last_token_scores

    base = classifier("qwen2")
    batch = padded_batch(4)  # 3 rows: pairs (0, 1) and (1, 2), the chosen rows first
    batch = {k: torch.cat((v[:2], v[1:])) for k, v in batch.items()}
    ref = clone(base)
    r = ref(**batch).logits.squeeze(-1)
    want = bradley_terry_loss(r[:2], r[2:], margin=0.5).mean()
    want.backward()
    model = clone(base)
    engine = HorizonEngine(model, device="cpu", compute_dtype="fp32")
    try:
        s = last_token_scores(model, batch).squeeze(-1)
        got = bradley_terry_loss(s[:2], s[2:], margin=0.5).mean()
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        got_grads = grads(model)
    finally:
        engine.close()
    for name, g in grads(ref).items():
        assert rel_err(got_grads[name], g) < 1e-5, name


def test_reward_module_refuses_what_it_cannot_train():
    from lightning_horizon.preference import RewardModule
    from tests.helpers import tiny_model

    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModule(tiny_model("qwen2"))
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModule(classifier("qwen2", num_labels=2))
    frozen = classifier("qwen2")
    frozen.score.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="score head is frozen"):
        RewardModule(frozen)


def test_reward_module_under_horizon_equals_auto(tmp_path, tokenizer):
    """Bradley-Terry training on the bundled pairs: the weights after 10 steps (FP32, clipping) are auto's."""
    import lightning as L

    from lightning_horizon.data import DataConfig
    from lightning_horizon.data.preference import PreferenceDataModule
    from lightning_horizon.lightning_module import OptimConfig
    from lightning_horizon.preference import RewardModule

    def fit(strategy):
        torch.manual_seed(0)
        config = tiny_config("qwen2", layers=2, vocab_size=len(tokenizer), max_position_embeddings=128, num_labels=1)
        config.pad_token_id = tokenizer.pad_token_id
        module = RewardModule(Qwen2ForSequenceClassification(config), OptimConfig(lr=3e-3, schedule="constant"), 10)
        dm = PreferenceDataModule(DataConfig(pack=False, batch_size=4, max_seq_len=128, shuffle=False), tokenizer)
        L.Trainer(strategy=strategy, accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                  default_root_dir=tmp_path / strategy).fit(module, datamodule=dm)  # fmt: skip
        return module.model.state_dict()

    want, got = fit("auto"), fit("horizon")
    for name, value in got.items():
        assert rel_err(value, want[name]) < 1e-4, name


def test_reward_model_from_a_causal_lm_directory(tmp_path):
    """``load_hf_model(num_labels=1)`` on a causal LM's directory: the decoder's weights are the checkpoint's, its
    lm_head is left out and the score head starts from the initialisation; on a classifier's directory, the score
    is the checkpoint's."""
    from transformers import Qwen2ForCausalLM

    from lightning_horizon.loading import load_hf_model

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(tiny_config("qwen2", layers=2))
    lm.save_pretrained(tmp_path / "lm")
    rm = load_hf_model(tmp_path / "lm", num_labels=1)
    assert type(rm).__name__ == "Qwen2ForSequenceClassification"
    for name, value in lm.model.state_dict().items():
        torch.testing.assert_close(rm.model.state_dict()[name], value, rtol=0, atol=0)
    std = rm.score.weight.std().item()
    assert torch.isfinite(rm.score.weight).all() and 0.5 * 0.02 < std < 2 * 0.02
    rm.save_pretrained(tmp_path / "rm")
    again = load_hf_model(tmp_path / "rm", num_labels=1)
    torch.testing.assert_close(again.score.weight, rm.score.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape mismatch for 'score.weight'"):
        load_hf_model(tmp_path / "rm", num_labels=2)
