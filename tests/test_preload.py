"""rollout.preload_libs: libiomp5 (and tcmalloc where installed) preloaded into vLLM's engine
process, as vLLM's CPU guide asks; the rollout actor's own environment left as it was."""

from __future__ import annotations

import os

import pytest
import ray
import torch
from rollout_fixtures import load_model, model_dir, reference_logprobs

from configtypes import ConfigError
from rollout.actor import rollout_actor
from rollout.config import RolloutConfig
from rollout.preload import engine_preload, find_libs, ld_preload, loaded_in_children
from rollout.records import PromptItem

IOMP = find_libs(names=("libiomp5.so",))


def test_a_missing_library_is_skipped(tmp_path):
    (tmp_path / "libiomp5.so").write_bytes(b"")
    assert find_libs((str(tmp_path), "/nonexistent")) == [str(tmp_path / "libiomp5.so")]
    assert find_libs(("/nonexistent",)) == []


def test_auto_puts_libraries_in_front_once_and_off_changes_nothing():
    libs = ["/a/libtcmalloc_minimal.so.4", "/b/libiomp5.so"]
    assert ld_preload("off", "/x/libfoo.so", libs) == "/x/libfoo.so"
    assert ld_preload("auto", "", libs) == "/a/libtcmalloc_minimal.so.4:/b/libiomp5.so"
    assert ld_preload("auto", "/x/libfoo.so", libs) == "/a/libtcmalloc_minimal.so.4:/b/libiomp5.so:/x/libfoo.so"
    assert ld_preload("auto", "/c/libiomp5.so", libs) == "/a/libtcmalloc_minimal.so.4:/c/libiomp5.so"
    # a second OpenMP runtime is left out: vLLM refuses libiomp and libgomp together
    assert ld_preload("auto", "/t/libgomp.so.1", libs) == "/a/libtcmalloc_minimal.so.4:/t/libgomp.so.1"


def test_the_block_restores_the_environment(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with engine_preload("auto") as value:
        assert os.environ.get("LD_PRELOAD", "") == value
        os.environ["LD_PRELOAD"] = value + ":/t/libgomp.so.1"  # what vLLM does while configuring
    assert "LD_PRELOAD" not in os.environ
    monkeypatch.setenv("LD_PRELOAD", "/x/libfoo.so")
    with engine_preload("off") as value:
        assert value == "/x/libfoo.so"
    assert os.environ["LD_PRELOAD"] == "/x/libfoo.so"


def test_the_key_is_checked():
    with pytest.raises(ConfigError, match="rollout.preload_libs must be 'auto' or 'off', got 'yes'"):
        RolloutConfig(preload_libs="yes")


@pytest.mark.slow  # CI time: two engine starts; bench.real_model --preload-ab measures what auto gains
@pytest.mark.skipif(not IOMP, reason="libiomp5.so not found (the intel-openmp wheel puts it in the venv)")
def test_the_vllm_engine_process_loads_libiomp5_only_with_auto():
    """Real engines on the tiny model: with auto, libiomp5 is mapped in vLLM's processes and the
    sampled tokens' log-probs still match transformers'; with off, it is not mapped."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    path = model_dir()
    seen = {}
    try:
        for mode in ("auto", "off"):
            cfg = RolloutConfig(model_path=path, n=2, max_new_tokens=16, max_model_len=64, dtype="float32",
                                backend="vllm", preload_libs=mode)  # fmt: skip
            actor = rollout_actor(cfg, None, f"engine-{mode}")
            try:
                assert ray.get(actor.start.remote())["backend"] == "vllm"
                # inside the actor (a lambda travels by value): what its child processes, vLLM's, have mapped
                seen[mode] = ray.get(
                    actor.__ray_call__.remote(
                        lambda _: {"iomp": loaded_in_children("libiomp5"), "own": os.environ.get("LD_PRELOAD", "")}
                    )
                )
                items = [PromptItem(f"g-{i}", p, answer="") for i, p in enumerate(["3+4=", "7+1="])]
                result = ray.get(actor.generate.remote(items))
            finally:
                ray.get(actor.shutdown.remote())
                ray.kill(actor)
            assert not result.errors and len(result.trajectories) == 4
            model = load_model(path)
            for t in result.trajectories:
                ref = reference_logprobs(model, t.prompt_ids, t.response_ids)
                assert (ref - torch.tensor(t.behavior_logprobs)).abs().max().item() < 1e-3
    finally:
        if started:
            ray.shutdown()
    assert seen["auto"]["iomp"] and not seen["off"]["iomp"]
    assert "libiomp5" not in seen["auto"]["own"]  # the actor itself (rewards, the fallback engine) is untouched
