"""A tiny random causal LM saved to disk and synthetic trajectories for learner tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from buffer.trajectory import Trajectory

VOCAB = 48


def save_tiny_llama(path: Path, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def synthetic_trajectories(n_groups: int = 4, group_size: int = 4, seed: int = 0, version: int = 0) -> list[Trajectory]:
    """Groups with different rewards; behaviour log-probs near (not equal to) the model's."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        prompt = rng.integers(1, VOCAB, size=int(rng.integers(3, 7)))
        for i in range(group_size):
            r = int(rng.integers(2, 9))
            out.append(
                Trajectory(
                    traj_id=f"g{g}-{i}",
                    group_id=f"g{g}",
                    group_size=group_size,
                    prompt_ids=prompt,
                    response_ids=rng.integers(1, VOCAB, size=r),
                    behavior_logprobs=np.log(1.0 / VOCAB) + rng.normal(0, 0.05, size=r),
                    token_versions=np.full(r, version),
                    version_start=version,
                    version_end=version,
                    reward=float(rng.random() < 0.5) + 0.1 * i,
                )
            )
    return out


@contextmanager
def in_process_rank(cfg) -> Iterator:
    """One learner rank (world size 1) in the test process. It forms its own process group and
    leaves through DeepSpeed's teardown, which also drops the groups DeepSpeed cached: the next
    in-process rank would otherwise meet a dead one. The environment it set is restored."""
    import deepspeed.comm
    import torch.distributed as dist

    from learner.worker import LearnerWorker

    environ = dict(os.environ)
    worker = LearnerWorker(cfg)
    try:
        yield worker
    finally:
        worker.engine.destroy()
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
