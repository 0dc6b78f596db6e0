"""The benchmark core: its random-weight model has the architecture's real parameter count."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from lightning_horizon.benchmark import random_model
from tests.helpers import tiny_config


@pytest.mark.parametrize("tied", [True, False])
def test_random_model_keeps_tied_embeddings_tied(tied):
    config = tiny_config("qwen2", tied=tied)
    model = random_model(config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    want = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert sum(p.numel() for p in model.parameters()) == want  # each Parameter once: tied weights counted once
