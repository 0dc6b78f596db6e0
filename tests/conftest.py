"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from lightning_horizon.data.tokenizer import build_default_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The bundled default tokenizer, built offline into a temporary directory."""
    return build_default_tokenizer(str(tmp_path_factory.mktemp("tok")))
