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
