"""The README's table of host bytes/param and largest models per optimizer-state format and mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_horizon import host_formats
from lightning_horizon.engine.footprint import PREFLIGHT_MARGIN_BYTES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_shows_the_current_table():
    assert host_formats.table() in README.read_text(), (
        "README.md's host-format table is stale: paste the output of python -m lightning_horizon.host_formats"
    )


@pytest.mark.parametrize("mode", list(host_formats.MODES))
def test_compact_formats_cost_what_their_moments_save(mode):
    fp32, bf16, int8 = (host_formats.bytes_per_param(s, mode) for s in ("fp32", "bf16", "int8"))
    assert fp32 - bf16 == pytest.approx(4, abs=1e-6)  # two moments, 4 -> 2 bytes each
    assert bf16 - int8 == pytest.approx(2 - 8 / 256, abs=1e-6)  # 2 -> 1 byte each, plus a 4-byte scale per 256


def test_the_largest_model_fits_and_one_percent_more_does_not():
    for host in host_formats.HOSTS.values():
        n = host_formats.largest_model(host, "int8", "clipping")
        assert sum(host_formats.footprint(n, "int8", "clipping").values()) + PREFLIGHT_MARGIN_BYTES <= host
        assert sum(host_formats.footprint(n * 1.01, "int8", "clipping").values()) + PREFLIGHT_MARGIN_BYTES > host
