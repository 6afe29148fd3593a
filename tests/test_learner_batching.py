import numpy as np
import pytest
import torch
from learner_fixtures import synthetic_trajectories

from learner.batching import collate, micro_batches, trim
from learner.sharding import batch_totals, merge_metrics, shard


def test_collate_aligns_response_fields_with_the_predicted_tokens():
    trajs = synthetic_trajectories(n_groups=2, group_size=2)
    adv = np.array([0.5, -0.5, 1.0, -1.0])
    batch = collate(trajs, adv)
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        cols = batch.response_mask[i].nonzero().squeeze(-1)
        assert cols.tolist() == list(range(p - 1, p - 1 + r))
        # the token predicted at column j is input_ids[j + 1]: the response tokens
        assert batch.input_ids[i, cols + 1].tolist() == t.response_ids.tolist()
        torch.testing.assert_close(batch.behavior_logprobs[i, cols], torch.from_numpy(t.behavior_logprobs))
        assert (batch.advantages[i, cols] == float(adv[i])).all()
        assert batch.attention_mask[i].sum() == p + r
    assert batch_totals(batch) == {"tokens": sum(len(t.response_ids) for t in trajs), "sequences": 4.0}


@pytest.mark.parametrize("budget", [1, 10, 25, 1000])
def test_micro_batches_respect_the_budget_and_cover_every_row_once(budget):
    lengths = [5, 12, 3, 12, 7, 1, 9]
    parts = micro_batches(lengths, budget)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    for p in parts:
        assert len(p) == 1 or max(lengths[i] for i in p) * len(p) <= budget


def test_trim_and_shard():
    batch = collate(synthetic_trajectories(n_groups=3, group_size=2), np.zeros(6))
    shards = shard(batch, 2)
    assert sum(s.num_rows for s in shards) == 6
    small = trim(shards[1].rows([0]))
    assert small.input_ids.shape[1] == int(shards[1].attention_mask[0].sum())


def test_merge_metrics():
    merged = merge_metrics(
        [
            {"actor/loss": 1.0, "x": 2.0, "staleness/oldest_version": 3.0},
            {"actor/loss": 0.5, "x": 4.0, "staleness/oldest_version": 1.0},
        ]
    )
    assert merged == {"actor/loss": 1.5, "x": 3.0, "staleness/oldest_version": 1.0}
