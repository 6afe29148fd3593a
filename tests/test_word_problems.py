import re

import pyarrow.parquet as pq
import pytest

from rollout.tasks import word_problems as wp
from vespo.commands import word_problems as word_problems_cli


def test_the_same_seed_gives_the_same_rows_and_another_seed_others():
    assert wp.rows(50, seed=3) == wp.rows(50, seed=3)
    assert wp.rows(50, seed=3) != wp.rows(50, seed=4)
    assert wp.rows(10, seed=3) == wp.rows(50, seed=3)[:10]  # a prefix does not depend on count


def test_rows_follow_the_verl_schema():
    rows = wp.rows(20, seed=0, split="test")
    for i, row in enumerate(rows):
        assert row["data_source"] == "vespo/word_problems" and row["ability"] == "math"
        assert row["reward_model"]["style"] == "rule"
        assert re.fullmatch(r"-?\d+", row["reward_model"]["ground_truth"])
        assert row["extra_info"]["index"] == i and row["extra_info"]["split"] == "test"
        (turn,) = row["prompt"]
        assert turn["role"] == "user" and "####" in turn["content"]
        assert turn["content"].startswith(row["extra_info"]["question"])
    with_system = wp.rows(2, seed=0, system="You are a helpful assistant.")[0]["prompt"]
    assert [t["role"] for t in with_system] == ["system", "user"]


def test_there_is_a_mix_of_templates():
    kinds = {p.template for p in wp.problems(400, seed=0)}
    assert kinds == {"add_buy", "add_together", "sub_give", "sub_take", "mul_boxes", "div_share",
                     "add_then_sub", "mul_then_add"}  # fmt: skip


# The answer recomputed from the numbers as they appear in the question text.
ARITHMETIC = {
    "add_buy": lambda a, b: a + b,
    "add_together": lambda a, b: a + b,
    "sub_give": lambda a, b: a - b,
    "sub_take": lambda a, b: a - b,
    "mul_boxes": lambda a, b: a * b,
    "div_share": lambda total, friends: total // friends,
    "add_then_sub": lambda a, b, c: a + b - c,
    "mul_then_add": lambda a, b, c: a * b + c,
}


def test_answers_are_the_arithmetic_of_the_numbers_in_the_question():
    for p in wp.problems(300, seed=7):
        numbers = [int(x) for x in re.findall(r"\d+", p.question)]
        assert tuple(numbers) == p.operands, p
        assert p.answer == ARITHMETIC[p.template](*numbers), p
        assert p.answer >= 0
        if p.template == "div_share":
            assert numbers[0] % numbers[1] == 0, p


def test_parquet_round_trip(tmp_path):
    path = wp.write_parquet(tmp_path / "sub" / "wp.parquet", 30, seed=2)
    table = pq.read_table(path)
    assert table.schema.field("reward_model").type.num_fields == 2  # a struct, not a JSON string
    assert table.to_pylist() == wp.rows(30, seed=2)


def test_cli_writes_the_file(tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    word_problems_cli.main([str(out), "--rows", "12", "--seed", "5", "--split", "eval"])
    assert pq.read_table(out).to_pylist() == wp.rows(12, seed=5, split="eval")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("3 + 5 = 8\n#### 8", "8"),
        ("#### 8\nso 3 + 5 = 8, or 9", "8"),  # after '####' wins over the last number
        ("He has 3 + 5 = 8 apples.", "8"),  # no '####': the last number
        ("#### $1,200", "1200"),
        ("#### 12.0", "12"),
        ("I don't know", None),
    ],
)
def test_extract_answer(response, expected):
    assert wp.extract_answer(response) == expected
    assert wp.reward(response, "8") == float(expected == "8")
