"""A multi-turn, tool-using run end to end on the real stack (vLLM engine actor, buffer actor,
DeepSpeed learner, local Ray, wandb offline): reasoning-gym's `products` episodes with the
calculator, on the tiny model warmed up on the episode format, through the same path as
`vespo train deploy/configs/agent_products.yaml`."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_fixtures import EXPECTED_KEYS
from wandb_offline import read_run

from vespo.commands.train import run
from vespo.config import run_config
from vespo.models.tiny import TinyModelConfig
from vespo.models.tiny_agent import TinyAgentConfig, tiny_agent_model

ROOT = Path(__file__).resolve().parents[1]
# a shorter warm-up than `tiny-agent`'s (seconds, not minutes): it already calls the tool often
QUICK = TinyAgentConfig(TinyModelConfig(vocab_size=400, max_digits=3, warmup_steps=300, warmup_batch=32), episodes=1500)


@pytest.fixture(scope="module")
def agent_model() -> str:
    return str(tiny_agent_model(QUICK))


def test_tool_using_episodes_train_end_to_end(tmp_path, agent_model):
    cfg = run_config.load(ROOT / "deploy/configs/agent_products.yaml", [
        f"model={agent_model}", "train.steps=3", "train.groups_per_step=4", "train.eval_every=3",
        "train.eval_prompts=8", "train.max_inflight_groups=8", "rollout.n=4", f"train.output_dir={tmp_path}",
        f"wandb.dir={tmp_path}",
    ])  # fmt: skip
    summary = run(cfg)
    assert summary.steps == 3 and summary.version == 3

    history, logged = read_run(next((tmp_path / "wandb").glob("offline-run-*")))
    keys = set().union(*history)
    assert EXPECTED_KEYS <= keys, EXPECTED_KEYS - keys
    steps = [row for row in history if "reward/mean" in row]
    assert len(steps) == 3
    episode_keys = {"episode/turns_mean", "episode/tool_calls_mean", "episode/tool_errors_mean",
                    "episode/env_time_frac", "episode/latency_s_mean"}  # fmt: skip
    assert all(episode_keys <= set(row) for row in steps)
    # episodes in the trained batches called the calculator and read its result in a later turn
    assert max(row["episode/tool_calls_mean"] for row in steps) > 0
    assert max(row["episode/turns_max"] for row in steps) >= 2
    # the tool's messages sit inside the responses but are not the model's tokens (masked out)
    assert all(row["episode/model_tokens_mean"] < row["response/length_mean"] for row in steps)
    assert logged["task"]["env"] == "reasoning_gym:products" and logged["task"]["tools"] == ["calculator"]
