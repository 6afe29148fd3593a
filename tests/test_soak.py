"""The soak run (bench/soak.py) as a test: long, so marked slow and left out of CI
(`pytest -m slow tests/test_soak.py`; VESPO_SOAK_MINUTES shortens it)."""

from __future__ import annotations

import os

import pytest

from bench.soak import soak


@pytest.mark.slow
def test_soak_with_engine_kills_loses_and_duplicates_nothing():
    minutes = float(os.environ.get("VESPO_SOAK_MINUTES", "30"))
    report = soak(minutes, kill_every_s=min(240.0, minutes * 60 / 4))
    assert report.kills >= 3 and report.engine_restarts == report.kills
    assert report.lost_groups == 0 and report.duplicated_groups == 0
    assert report.throughput_retained > 0.3
