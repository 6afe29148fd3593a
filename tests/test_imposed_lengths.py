"""rollout.imposed_median_tokens: the long-tailed response lengths of a throughput benchmark,
imposed on vLLM one request per sample (min_tokens = max_tokens). The requests are checked
here against a recording stand-in for vLLM's AsyncLLM and SamplingParams (vLLM itself stays
out of this process: the orchestration tests check that they run without it);
bench.async_speedup runs them on the real engine."""

from __future__ import annotations

import asyncio
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from configtypes import ConfigError
from rollout.config import RolloutConfig
from rollout.engine import imposed_lengths
from rollout.vllm_engine import VllmEngine


class RecordingLLM:
    def __init__(self):
        self.requests = []

    async def generate(self, prompt, sampling, request_id, lora_request=None):
        self.requests.append((request_id, sampling))
        k, step = sampling.max_tokens, {5: SimpleNamespace(logprob=-0.1)}
        out = SimpleNamespace(token_ids=[5] * k, logprobs=[step] * k, weight_versions=None, finish_reason="length")
        outputs = [out] * sampling.n
        yield SimpleNamespace(outputs=outputs)


@pytest.fixture(autouse=True)
def sampling_params(monkeypatch):
    """vllm.SamplingParams as a record of its keyword arguments."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    params = types.ModuleType("vllm.sampling_params")
    params.RequestOutputKind = SimpleNamespace(FINAL_ONLY="final_only")
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", params)


def run(cfg: RolloutConfig, n: int):
    engine = VllmEngine(cfg)
    engine.llm = RecordingLLM()
    return engine, asyncio.run(engine.generate([1, 2, 3], n, "engine-0-7-g1"))


def test_each_sample_gets_its_own_request_and_drawn_length():
    cfg = RolloutConfig(max_new_tokens=256, max_model_len=300, imposed_median_tokens=48)
    engine, completions = run(cfg, 8)
    lengths = imposed_lengths(cfg, "engine-0-7-g1", 8)
    assert [len(c.token_ids) for c in completions] == lengths
    assert [(s.n, s.min_tokens, s.max_tokens) for _, s in engine.llm.requests] == [(1, k, k) for k in lengths]
    assert len({rid for rid, _ in engine.llm.requests}) == 8


def test_off_by_default_one_request_of_n_capped_at_max_new_tokens():
    engine, completions = run(RolloutConfig(max_new_tokens=32, max_model_len=64), 8)
    [(_, sampling)] = engine.llm.requests
    assert (sampling.n, sampling.min_tokens, sampling.max_tokens) == (8, 0, 32) and len(completions) == 8


def test_the_lengths_are_long_tailed_and_capped():
    cfg = RolloutConfig(max_new_tokens=256, max_model_len=300, imposed_median_tokens=48, imposed_length_sigma=1.0)
    lengths = np.array([k for i in range(400) for k in imposed_lengths(cfg, f"r{i}", 8)])
    assert 40 <= np.median(lengths) <= 56 and lengths.mean() > np.median(lengths)  # most short, a long tail
    assert lengths.max() == 256 and 0.02 < (lengths == 256).mean() < 0.08 and lengths.min() >= 1
    assert imposed_lengths(cfg, "r1", 8) == imposed_lengths(cfg, "r1", 8) != imposed_lengths(cfg, "r2", 8)


def test_imposed_lengths_need_vllm():
    with pytest.raises(ConfigError, match="rollout.imposed_median_tokens needs rollout.backend vllm"):
        RolloutConfig(backend="transformers", imposed_median_tokens=8)
