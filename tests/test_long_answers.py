"""The long-answer task (repeated addition) and the divergence budget, on the real stack.

Unit tests pin the task's format, lengths and reward; the end-to-end test trains a tiny model
warmed up on the task (a short warm-up, so it builds in seconds) in async mode with
`buffer.divergence_budget` set: vLLM engine, buffer actor, DeepSpeed learner, weight broadcast.
"""

from __future__ import annotations

import statistics

import pytest
from wandb_offline import read_run

from rollout.tasks import repeated_addition as ra
from rollout.tasks.registry import TaskConfig, make_reward, make_task
from vespo.config import run_config
from vespo.models.tiny import TinyModelConfig, tiny_model


def test_the_working_adds_step_by_step_and_ends_on_the_product():
    p = ra.problem(7, 13)
    assert p.prompt == "7x13:" and p.answer == "91"
    steps = p.working.split()
    assert len(steps) == 13 and steps[0] == "7,13=007" and steps[1] == "7,12=014" and steps[-1] == "7,01=091"
    assert ra.steps(p.working) == 13 and ra.final_answer(p.working) == "91"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("7,13=007 7,12=014 7,01=091", 1.0),  # only the final total is scored
        ("7,01=091 ", 1.0),
        ("7,13=007 7,12=014 7,01=090", 0.0),
        ("7,13=007 7,12=014 7,01=", 0.0),  # cut off before the total
        ("the answer is 91", 0.0),  # not a step
        ("", 0.0),
    ],
)
def test_the_reward_reads_the_last_total(response, expected):
    assert ra.reward(response, "91") == expected


def test_lengths_follow_the_count_over_tens_to_a_hundred_and_more_tokens():
    problems = ra.problems(2000, seed=3)
    counts = [int(p.prompt[2:4]) for p in problems]
    assert min(counts) == ra.MIN_COUNT and max(counts) == ra.MAX_COUNT
    lengths = [len(p.working) for p in problems]  # 9 characters (= tokens for the tiny tokenizer) a step
    assert all(n == 9 * c - 1 for n, c in zip(lengths, counts, strict=True))
    assert 90 < statistics.mean(lengths) < 110
    assert ra.problems(5, seed=1) == ra.problems(5, seed=1) != ra.problems(5, seed=2)


@pytest.mark.parametrize(("number", "count"), [(0, 5), (10, 5), (3, 2), (3, 21)])
def test_out_of_range_problems_are_refused(number, count):
    with pytest.raises(ValueError, match="repeated addition takes"):
        ra.problem(number, count)


def test_the_task_is_chosen_by_name_with_its_reward():
    cfg = TaskConfig(name="repeated_addition", train_size=16, eval_size=4)
    task = make_task(cfg)
    train, held_out = task.samples("train"), task.samples("eval")
    assert len(train) == 16 and len(held_out) == 4 and train[0].prompt != held_out[0].prompt
    sample = train[0]
    number, count = int(sample.prompt[0]), int(sample.prompt[2:4])
    reward, working = make_reward(cfg), ra.problem(number, count).working
    assert reward(working, sample) == 1.0
    assert reward(working[:-3] + f"{int(sample.answer) + 1:03d}", sample) == 0.0


def test_the_tiny_models_tokenizer_keeps_a_step_at_nine_tokens(tmp_path):
    from transformers import AutoTokenizer

    path = tiny_model(TinyModelConfig(task="repeated_addition", warmup_steps=0, corpus_size=200), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    working = ra.problem(7, 13).working
    assert len(tok(working)["input_ids"]) == 9 * 13 - 1  # digits single tokens, no merge across steps


@pytest.mark.slow  # CI time; bench.staleness_sweep --config deploy/configs/long_answers.yaml runs this path per cell
def test_long_answers_train_async_under_a_divergence_budget(tmp_path):
    """The user's path: the long-answer task on a model trained for it, async, with staleness
    capped in nats. The run trains, the learner reports KL by lag, and the cap it sets is logged."""
    from vespo.commands.train import run

    model = tiny_model(TinyModelConfig(task="repeated_addition", warmup_steps=40, corpus_size=400), tmp_path / "m")
    cfg = run_config.load(None, [
        f"model={model}", "task.name=repeated_addition", "train.mode=async", "train.steps=3",
        "train.groups_per_step=2", "train.max_inflight_groups=4", "train.eval_every=0", "rollout.n=4",
        "rollout.max_new_tokens=128", "rollout.max_model_len=160", "buffer.max_staleness=3",
        "buffer.divergence_budget=0.05", f"train.output_dir={tmp_path}/run", f"wandb.dir={tmp_path}",
    ])  # fmt: skip
    summary = run(cfg)
    assert summary.steps == 3
    history, _ = read_run(next((tmp_path / "wandb").glob("offline-run-*")))
    rows = [r for r in history if "reward/mean" in r]
    assert len(rows) == 3
    assert statistics.mean(r["response/length_mean"] for r in rows) > 20  # long answers, not 2-3 tokens
    assert all(any(k.startswith("divergence/kl_lag") for k in r) for r in rows)
    assert all(0 <= r["divergence/staleness_cap"] <= 3 and r["buffer/staleness_cap"] <= 3 for r in rows)
