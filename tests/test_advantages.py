import pytest
import torch

from learner.advantages import group_advantages


def test_group_relative_and_std_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    groups = [7, 7, 7, 7, 3, 3]
    adv = group_advantages(rewards, groups)
    first = rewards[:4]
    expected_first = (first - first.mean()) / (first.std() + 1e-6)
    torch.testing.assert_close(adv[:4], expected_first)
    torch.testing.assert_close(adv[4:], torch.tensor([-1.0, 1.0]) / (torch.tensor([2.0, 4.0]).std() + 1e-6))
    assert adv.dtype == torch.float32 and adv.shape == (6,)


def test_without_std_is_centred_reward():
    adv = group_advantages([1.0, 3.0, 5.0, 5.0], ["a", "a", "b", "b"], normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_interleaved_groups_and_tensor_ids():
    adv = group_advantages(torch.tensor([1.0, 10.0, 3.0, 30.0]), torch.tensor([0, 1, 0, 1]), normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, -10.0, 1.0, 10.0]))


def test_uniform_group_and_singleton_have_zero_advantage():
    adv = group_advantages([1.0, 1.0, 1.0, 0.7], ["g", "g", "g", "solo"])
    assert torch.equal(adv, torch.zeros(4))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 group ids for 2 rewards"):
        group_advantages([1.0, 2.0], [0, 0, 1])


def test_rloo_subtracts_the_mean_of_the_other_responses():
    from learner.advantages import advantages

    rewards, groups = [1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 7.0], ["a", "a", "a", "a", "b", "b", "c"]
    adv = advantages("rloo", rewards, groups)
    # response 0: 1 - mean(0, 0, 0) = 1; the others: 0 - mean(1, 0, 0) = -1/3; a singleton: 0
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, -2.0, 2.0, 0.0]))
    assert not torch.allclose(adv, advantages("grpo", rewards, groups))


def test_the_config_chooses_the_estimator_and_refuses_an_unknown_one():
    from configtypes import ConfigError
    from learner.advantages import advantages
    from vespo.config import run_config

    assert run_config.load(None, ["learner.advantage=rloo"]).learner.advantage == "rloo"
    with pytest.raises(ConfigError, match="learner.advantage"):
        run_config.load(None, ["learner.advantage=ppo"])
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        advantages("ppo", [1.0], ["a"])
