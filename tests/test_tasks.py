import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vespo.tasks.registry import TaskConfig, TaskSample, make_task, render_prompt, score


def test_arithmetic_task_is_reproducible_and_scored_exactly():
    task = make_task(TaskConfig(name="arithmetic", train_size=5, eval_size=3))
    train, again = task.samples("train"), task.samples("train")
    assert train == again and len(train) == 5 and len(task.samples("eval")) == 3
    assert train[0].id != task.samples("eval")[0].id
    s = train[0]
    a, b = (int(x) for x in s.prompt.rstrip("=").split("+"))
    assert task.reward(f"{a + b}<eos>", s) == 1.0 and task.reward(f"{a + b + 1}", s) == 0.0
    assert render_prompt(s, tokenizer=None) == s.prompt  # raw text, no chat template


def write_rows(tmp_path, rows, kind):
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_math_task_reads_rows_and_verifies_answers(tmp_path, kind):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(10)]
    rows[3]["answer"] = "\\frac{1}{2}"
    task = make_task(TaskConfig(name="math", path=write_rows(tmp_path, rows, kind), eval_fraction=0.2))
    train, held_out = task.samples("train"), task.samples("eval")
    assert len(train) == 8 and len(held_out) == 2 and held_out[-1].prompt == "What is 9 + 9?"
    assert task.reward("The answer is $\\boxed{4}$.", train[2]) == 1.0
    assert task.reward("It is 5", train[2]) == 0.0
    assert task.reward("so the result is 0.5", train[3]) == 1.0  # symbolic, not string, comparison


class FakeChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )


def test_chat_rendering_with_system_prompt():
    s = TaskSample("1", "2+2?", "4")
    assert render_prompt(s, FakeChatTokenizer(), "Be brief.") == "<system>Be brief.<user>2+2?<assistant>"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q", "answer": "1"}], r"row 0 has no 'prompt' field \(it has \['answer', 'question'\]\)"),
        ([{"prompt": "q", "answer": "1"}, {"prompt": ["not", "text"], "answer": "1"}], r"row 1 field 'prompt' must be"),
        ([{"prompt": "q", "answer": ""}], r"row 0 field 'answer' must be non-empty text"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        make_task(TaskConfig(name="math", path=write_rows(tmp_path, rows, "jsonl")))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        TaskConfig(name="chess")
    with pytest.raises(ValueError, match="the math task needs task.path"):
        TaskConfig(name="math")
    with pytest.raises(ValueError, match="cannot load reward_fn 'nowhere.mod:f'"):
        make_task(TaskConfig(reward_fn="nowhere.mod:f"))


def test_user_reward_by_import_path_and_bad_rewards_are_marked():
    task = make_task(TaskConfig(reward_fn="math:copysign", train_size=2))  # copysign(response, answer) raises on str
    s = task.samples("train")[0]
    bad = score(task, "12", s)
    assert bad.value == 0.0 and "reward raised TypeError" in bad.error
    nan_task = make_task(TaskConfig(train_size=2))
    nan_task.reward = lambda response, sample: math.nan
    assert score(nan_task, "1", s).error == "reward returned nan"
    good = score(make_task(TaskConfig(train_size=2)), "0", s)
    assert good.error is None
