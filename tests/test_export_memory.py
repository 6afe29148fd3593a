"""Weight export streams shard by shard from rank 0: neither the driver nor the rank ever holds
the whole model. Real DeepSpeed ZeRO-3 on two CPU ranks (Ray actors, gloo), a ~400 MB model.

Peak memory is the kernel's high-water mark of the process's resident set: writing "5" to
/proc/self/clear_refs resets VmHWM to the current VmRSS, and VmHWM read after the call is the
peak during it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from learner_fixtures import save_tiny_llama

from learner.config import LearnerConfig
from learner.export import INDEX_FILE, SINGLE_FILE, write_hf_streaming
from learner.group import LearnerGroup
from vespo.models import resolve_model
from weightsync.transport import spec_of

MiB = 1 << 20
SHARD = 16 * MiB
BOUND = 64 * MiB  # about two shards plus slack (allocator, Ray's own buffers)
MIN_MODEL = 300 * MiB
RANK_MMAP_THRESHOLD = 64 << 10

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc/self"
)


def rss_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def peak_growth(fn):
    """(fn's result, how far the resident set rose above its start while fn ran, in bytes).
    Free heap pages are handed back first (malloc_trim), so memory freed by earlier work cannot
    be reused unseen and hide an allocation."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kib()["VmRSS"]
    result = fn()
    return result, (rss_kib()["VmHWM"] - base) * 1024


@pytest.fixture(scope="module")
def ray_cluster():
    # The ranks' allocator maps every block over 64 KiB on its own, from their first allocation
    # on (a fixed M_MMAP_THRESHOLD): a freed block leaves the resident set at once, so a rank's
    # peak is that of its live memory, not of free heap chunks that the model's load left behind
    # and a later call happens to touch again (or to reuse unseen).
    env = {"MALLOC_MMAP_THRESHOLD_": str(RANK_MMAP_THRESHOLD)}
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        namespace="test_export_memory",
        runtime_env={"env_vars": env},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> Path:
    """The tiny model's tokenizer with a ~400 MB fp32 Llama of tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = Path(resolve_model("tiny"))
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    out = tmp_path_factory.mktemp("big") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tiny_cfg["vocab_size"],
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tiny_cfg["pad_token_id"],
        eos_token_id=tiny_cfg["eos_token_id"],
        bos_token_id=None,
        dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for item in tiny.iterdir():
        if item.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(item, out / item.name)
    return out


@pytest.fixture(scope="module")
def group(ray_cluster, big_model_dir):
    cfg = LearnerConfig(model_path=str(big_model_dir), world_size=2, zero_stage=3, micro_batch_tokens=64)
    group = LearnerGroup(cfg)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def measured(group, big_model_dir, tmp_path_factory):
    """One streamed export and, for contrast, the old path's full_state_dict, both measured in
    the driver."""
    out = tmp_path_factory.mktemp("export") / "model"
    _, export_growth = peak_growth(lambda: group.export_model(out, shard_bytes=SHARD))
    weights, full_growth = peak_growth(group.full_state_dict)
    model_bytes = sum(f.stat().st_size for f in big_model_dir.glob("*.safetensors"))
    return SimpleNamespace(
        out=out, export_growth=export_growth, full_growth=full_growth, weights=weights, model_bytes=model_bytes
    )


def test_driver_holds_about_one_shard_not_the_model(measured):
    assert measured.model_bytes > MIN_MODEL
    print(
        f"driver peak growth: export {measured.export_growth / MiB:.1f} MiB, "
        f"full_state_dict {measured.full_growth / MiB:.1f} MiB, model {measured.model_bytes / MiB:.1f} MiB"
    )
    assert measured.export_growth < BOUND
    # the old path (full_state_dict into the driver, then one save) brings the whole model over
    assert measured.full_growth > 0.9 * measured.model_bytes


def test_rank_zero_holds_about_one_shard_not_the_model(group, big_model_dir, tmp_path):
    def measure_on_rank(actor, method, *args):  # peak_growth, self-contained: it runs in the actor
        import ctypes
        import gc
        import os

        def rss_kib():
            with open("/proc/self/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}

        assert os.environ.get("MALLOC_MMAP_THRESHOLD_"), "the rank does not run with the test's allocator setting"
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_kib()["VmRSS"]
        result = getattr(actor, method)(*args)
        growth = (rss_kib()["VmHWM"] - base) * 1024
        del result  # a full state dict is measured, not sent back
        return growth

    rank0, *others = group.workers
    args = (str(tmp_path / "model"), SHARD)
    export_growth, *_ = ray.get(
        [rank0.__ray_call__.remote(measure_on_rank, "export_model", *args)]
        + [w.export_model.remote(*args) for w in others]
    )
    full_growth, *_ = ray.get(
        [rank0.__ray_call__.remote(measure_on_rank, "full_state_dict")] + [w.full_state_dict.remote() for w in others]
    )
    model_bytes = sum(f.stat().st_size for f in big_model_dir.glob("*.safetensors"))
    print(f"rank 0 peak growth: export {export_growth / MiB:.1f} MiB, full_state_dict {full_growth / MiB:.1f} MiB")
    assert export_growth < BOUND
    assert full_growth > 0.9 * model_bytes


def test_export_is_a_sharded_hf_directory_with_identical_tied_weights(measured):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, weights = measured.out, measured.weights
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / SINGLE_FILE).exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as the embedding
    assert set(index["weight_map"]) == set(weights) - {"lm_head.weight"}
    assert index["metadata"]["total_size"] == sum(weights[k].nbytes for k in index["weight_map"])
    biggest = max(v.nbytes for v in weights.values())
    assert all(s.stat().st_size <= max(SHARD, biggest) + MiB for s in shards)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(loaded[name], value), name
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"


def test_write_hf_streaming_shards_an_untied_model_and_replaces_a_previous_export(tmp_path):
    from transformers import AutoModelForCausalLM

    source = Path(save_tiny_llama(tmp_path / "tiny"))
    state = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    assert "lm_head.weight" in state  # untied: both are written
    specs = [spec_of(k, v) for k, v in state.items()]
    out = tmp_path / "out"
    biggest = max(s.nbytes for s in specs)
    files = write_hf_streaming(state.items(), specs, source, out, shard_bytes=biggest // 2)
    assert files[-1].name == INDEX_FILE and len(files) > 2  # a tensor above shard_bytes goes alone
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert (out / "config.json").exists()

    files = write_hf_streaming(state.items(), specs, source, out, shard_bytes=1 << 30)
    assert [f.name for f in files] == [SINGLE_FILE]
    assert sorted(p.name for p in out.glob("model*")) == [SINGLE_FILE]  # stale shards and index gone
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    wrong = [*specs[:-1], spec_of("other", state[specs[-1].name])]
    with pytest.raises(ValueError, match="where the specs have"):
        write_hf_streaming(state.items(), wrong, source, tmp_path / "bad", shard_bytes=1 << 30)
    with pytest.raises(ValueError, match="more tensors"):
        write_hf_streaming(state.items(), specs[:-1], source, tmp_path / "bad", shard_bytes=1 << 30)


def test_the_streamed_export_copies_every_non_weight_file_of_the_source(measured, big_model_dir):
    """A checkpoint's model/ keeps the source's layout: its config, tokenizer and generation
    config, every file but the weights."""
    weights = (".safetensors", ".bin", ".index.json")
    source_files = {p.name for p in big_model_dir.iterdir() if p.is_file() and not p.name.endswith(weights)}
    new_files = {p.name for p in measured.out.iterdir() if not p.name.startswith("model")}
    assert {"config.json", "tokenizer.json"} <= source_files
    assert new_files == source_files
