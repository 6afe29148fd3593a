"""`vespo train model=tiny-moe learner.routing_replay=rollout`, fully async on the real stack:
the engine records every token's experts (bf16 on CPUs with native bf16, so a few routing
decisions differ from the float32 learner's), the learner replays them, and the dashboard shows
how often the learner would have routed alike and each expert's load on both sides."""

from __future__ import annotations

from wandb_offline import read_run

from vespo.commands.train import run
from vespo.config import run_config

EXPERTS = 8


def test_an_moe_model_trains_async_with_routing_replay(tmp_path):
    cfg = run_config.load(None, [
        "model=tiny-moe", "learner.routing_replay=rollout", "train.mode=async", "train.steps=6",
        "train.groups_per_step=4", "rollout.n=4", "train.eval_every=3", "train.eval_prompts=8",
        f"train.output_dir={tmp_path}", f"wandb.dir={tmp_path}",
    ])  # fmt: skip
    summary = run(cfg)
    assert summary.steps == 6 and summary.version == 6
    history, logged = read_run(next((tmp_path / "wandb").glob("offline-run-*")))
    assert logged["learner"]["routing_replay"] == "rollout"
    steps = [row for row in history if "reward/mean" in row]
    assert len(steps) == 6
    for row in steps:
        assert 0.8 < row["routing/agreement"] <= 1.0  # the engine's experts, nearly always the learner's own
        for side in ("learner", "rollout"):
            shares = [row[f"routing/load_{side}/e{e:03d}"] for e in range(EXPERTS)]
            assert abs(sum(shares) - 1.0) < 1e-4 and max(shares) < 1.0
        assert row["routing/load_tv"] < 0.2

