import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout.tasks.math import math_reward
from rollout.tasks.registry import TaskConfig, TaskSample, make_reward, make_task, render_prompt, score


def test_arithmetic_task_is_reproducible_and_scored_exactly():
    cfg = TaskConfig(name="arithmetic", train_size=5, eval_size=3)
    task, reward = make_task(cfg), make_reward(cfg)
    train, again = task.samples("train"), task.samples("train")
    assert train == again and len(train) == 5 and len(task.samples("eval")) == 3
    assert train[0].id != task.samples("eval")[0].id
    s = train[0]
    a, b = (int(x) for x in s.prompt.rstrip("=").split("+"))
    assert reward(f"{a + b}<eos>", s) == 1.0 and reward(f"{a + b + 1}", s) == 0.0
    assert render_prompt(s, tokenizer=None) == s.prompt  # raw text, no chat template


def write_rows(tmp_path, rows, kind, name="rows"):
    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def math_task(tmp_path, rows, kind="jsonl", **kwargs):
    return make_task(TaskConfig(name="math", path=write_rows(tmp_path, rows, kind), eval_fraction=0, **kwargs))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_math_task_reads_rows_and_verifies_answers(tmp_path, kind):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(10)]
    rows[3]["answer"] = "\\frac{1}{2}"
    cfg = TaskConfig(name="math", path=write_rows(tmp_path, rows, kind), eval_fraction=0.2)
    task, reward = make_task(cfg), make_reward(cfg)
    train, held_out = task.samples("train"), task.samples("eval")
    assert len(train) == 8 and len(held_out) == 2 and held_out[-1].prompt == "What is 9 + 9?"
    assert train[2] == TaskSample("2", "What is 2 + 2?", "4", chat=True)  # text becomes the user turn
    assert reward("The answer is $\\boxed{4}$.", train[2]) == 1.0
    assert reward("It is 5", train[2]) == 0.0
    assert reward("so the result is 0.5", train[3]) == 1.0  # symbolic, not string, comparison


def verl_rows():
    """Rows as veRL's preprocessing (and DAPO-Math-17k) writes them."""
    system = {"role": "system", "content": "Reason step by step."}
    return [
        {
            "data_source": "math_dapo" if i % 2 else "openai/gsm8k",
            "prompt": ([system] if i == 0 else []) + [{"role": "user", "content": f"What is {i} * 3?"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(3 * i), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": 100 + i, "split": "train"},
        }
        for i in range(4)
    ]


def test_verl_parquet_schema(tmp_path):
    path = write_rows(tmp_path, verl_rows(), "parquet")
    assert pa.types.is_struct(pq.read_schema(path).field("reward_model").type)  # a real struct column
    samples = make_task(TaskConfig(name="math", path=path, eval_fraction=0.25)).samples("train")
    first, second = samples[0], samples[1]
    assert first.messages == (
        {"role": "system", "content": "Reason step by step."},
        {"role": "user", "content": "What is 0 * 3?"},
    )
    assert second.messages == ({"role": "user", "content": "What is 1 * 3?"},)
    assert (second.id, second.prompt, second.answer, second.data_source) == ("101", "What is 1 * 3?", "3", "math_dapo")
    assert second.extra_info == {"index": 101, "split": "train"}
    assert make_reward(TaskConfig(name="math", path=path))("so it is \\boxed{3}", second) == 1.0


def test_verl_row_renders_through_a_real_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from vespo.models import ModelError, resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    except ModelError as err:
        pytest.skip(f"no SmolLM2 on this machine: {err}")
    sample = math_task(tmp_path, verl_rows(), "parquet").samples("train")[0]
    assert render_prompt(sample, tokenizer, system_prompt="ignored: the row has its own") == (
        "<|im_start|>system\nReason step by step.<|im_end|>\n"
        "<|im_start|>user\nWhat is 0 * 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_jsonl_answer_from_trailing_assistant_or_answer_field(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (s,) = math_task(tmp_path, [{"messages": chat}]).samples("train")
    assert s.messages == tuple(chat[:2]) and s.answer == "4" and s.prompt == "2+2?"
    (s,) = math_task(tmp_path, [{"messages": chat, "answer": "four"}]).samples("train")
    assert s.messages == tuple(chat[:2]) and s.answer == "four"  # the reply is a demonstration, dropped


def test_dotted_paths_and_exact_names(tmp_path):
    rows = [{"data": {"question": "1+1?"}, "reward_model": {"ground_truth": 2}, "id": "a"}]
    task = math_task(tmp_path, rows, prompt_key="data.question", answer_key="reward_model.ground_truth")
    (s,) = task.samples("train")
    assert (s.id, s.prompt, s.answer) == ("a", "1+1?", "2")  # a number becomes text
    rows = [{"data.question": "literal column", "data": {"question": "nested"}, "answer": 1.5}]
    (s,) = math_task(tmp_path, rows, prompt_key="data.question").samples("train")
    assert (s.prompt, s.answer) == ("literal column", "1.5")  # an exact column name wins


@pytest.mark.parametrize(
    ("row", "prompt", "answer"),
    [
        ({"question": "q", "answer": "#### 1"}, "q", "#### 1"),  # GSM8K
        ({"problem": "p", "solution": "so $\\boxed{2}$"}, "p", "so $\\boxed{2}$"),  # MATH
        ({"prompt": "p", "ground_truth": "3", "solution": "no"}, "p", "3"),
        ({"prompt": [{"role": "user", "content": "u"}], "reward_model": {"ground_truth": "4"}}, "u", "4"),
    ],
)
def test_auto_keys(tmp_path, row, prompt, answer):
    (s,) = math_task(tmp_path, [row]).samples("train")
    assert (s.prompt, s.answer) == (prompt, answer)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (
            [{"text": "q", "answer": "1"}],
            {},
            r"row 0 has none of the prompt fields 'prompt', 'messages', 'question', "
            r"'problem' \(it has \['answer', 'text'\]\); set task.prompt_key",
        ),
        ([{"prompt": "q"}], {}, r"row 0 has none of the answer fields 'answer', 'reward_model.ground_truth'"),
        (
            [{"prompt": "q", "answer": "1"}, {"question": "q", "answer": "1"}],
            {},
            r"rows.jsonl: row 1 has no 'prompt' field \(it has \['answer', 'question'\]\)",
        ),
        (
            [{"prompt": "q", "reward_model": {"style": "rule"}}],
            {"answer_key": "reward_model.ground_truth"},
            r"row 0 has no 'reward_model.ground_truth' field \('reward_model' has \['style'\]\)",
        ),
        (
            [{"prompt": "q", "answer": "1"}, {"prompt": 7, "answer": "1"}],
            {},
            r"rows.jsonl: row 1 field 'prompt' must be non-empty text or a list of chat messages, got 7",
        ),
        ([{"prompt": " ", "answer": "1"}], {}, r"row 0 field 'prompt' must be non-empty text"),
        ([{"prompt": "q", "answer": ""}], {}, r"row 0 field 'answer' must be non-empty text or a number"),
        ([{"prompt": "q", "answer": ["1", "2"]}], {}, r"row 0 field 'answer' must be non-empty text or a number"),
        ([{"prompt": "q", "answer": True}], {}, r"row 0 field 'answer' must be non-empty text or a number, got True"),
        ([{"prompt": [], "answer": "1"}], {}, r"row 0 field 'prompt' must be a non-empty list of chat messages"),
        (
            [{"prompt": ["hi"], "answer": "1"}],
            {},
            r"row 0 field 'prompt' message 0 must be an object with 'role' and 'content', got 'hi'",
        ),
        (
            [{"prompt": [{"role": "human", "content": "x"}], "answer": "1"}],
            {},
            r"row 0 field 'prompt' message 0 has role 'human'; roles are assistant, system, tool, user",
        ),
        (
            [{"prompt": [{"role": "user", "content": ["x"]}], "answer": "1"}],
            {},
            r"row 0 field 'prompt' message 0 content must be text",
        ),
        (
            [{"messages": [user("q"), assistant("a"), assistant("b")]}],
            {},
            r"row 0 field 'messages' ends with two assistant turns",
        ),
        ([{"messages": [assistant("a")]}], {}, r"row 0 field 'messages' has only an assistant turn"),
        (
            [{"messages": [user("q"), assistant("a")]}, {"messages": [user("q")]}],
            {},
            r"row 1 field 'messages' has no trailing assistant turn to take the answer from",
        ),
        ([{"prompt": "q", "answer": "1", "data_source": 3}], {}, r"row 0 field 'data_source' must be text"),
        ([{"prompt": "q", "answer": "1", "extra_info": "x"}], {}, r"row 0 field 'extra_info' must be an object"),
        (
            [{"prompt": "q", "answer": "1", "id": 7}, {"prompt": "q", "answer": "1", "id": 7}],
            {},
            r"rows.jsonl: rows 0 and 1 have the same id '7'; ids must be unique",
        ),
        (
            [{"prompt": "q", "answer": "1", "extra_info": {"index": 1}}, {"prompt": "q", "answer": "1"}],
            {},
            r"rows 0 and 1 have the same id '1'",
        ),  # extra_info.index of one row, the row number of the other
        ([[1, 2]], {}, r"rows.jsonl: row 0 is a JSON list, not an object"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        math_task(tmp_path, rows, **kwargs)


def test_bad_files_are_named(tmp_path):
    for name, text, message in [
        ("empty.jsonl", "\n\n", r"empty.jsonl: no rows"),
        ("broken.jsonl", '{"prompt": "q", "answer": "1"}\n{oops', r"broken.jsonl:2: not a JSON object"),
        ("rows.csv", "prompt,answer\n", r"rows.csv must be .jsonl, .json or .parquet, not '.csv'"),
        ("bad.parquet", "not parquet", r"bad.parquet: not a readable Parquet file"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            make_task(TaskConfig(name="math", path=str(tmp_path / name)))
    with pytest.raises(ValueError, match="does not exist"):
        make_task(TaskConfig(name="math", path=str(tmp_path / "nowhere.jsonl")))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")  # fmt: skip
    with pytest.raises(ValueError, match="empty.parquet: no rows"):
        make_task(TaskConfig(name="math", path=str(tmp_path / "empty.parquet")))


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"question": "q", "answer": 3}]))
    assert make_task(TaskConfig(name="math", path=str(path))).samples("train")[0].answer == "3"


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        # GSM8K: the gold is the text after its last ####, thousands separators dropped
        ("She pays 1234 dollars.\n#### 1234", "16 * 77 = 1232, plus 2 is 1,234.\n#### 1,234", 1.0),
        ("#### 1,234", "#### 1,234", 1.0),
        ("So she has 40 + 2 = 42 eggs.\n#### 42", "42", 1.0),
        ("#### 41", "42", 0.0),
        ("The answer is 7.\n#### 3", "3", 1.0),  # the explicit marker beats math-verify's "the answer is"
        ("#### Step 1: add the apples\n3 + 4 = 7", "7", 1.0),  # a markdown heading is no #### answer
        ("#### 1. Set up\nso 7", "1", 0.0),
        # \boxed{}: the last box counts
        ("We get $\\boxed{42}$.", "42", 1.0),
        ("\\boxed{5} was wrong, it is \\boxed{3}", "3", 1.0),
        ("\\boxed{5} was wrong, it is \\boxed{3}", "5", 0.0),
        ("\\boxed{41}", "42", 0.0),
        # DAPO: an "Answer: x" line
        ("3 and 4 give 7 and then 35.\nAnswer: 42", "42", 1.0),
        ("**Final Answer:** 42", "42", 1.0),
        ("Answer: 41", "42", 0.0),
        ("Answer: \\sqrt{2}", "\\sqrt{2}", 1.0),
        # symbolic comparison
        ("so it is 0.5", "\\frac{1}{2}", 1.0),
        ("$\\frac{1}{2}$", "0.5", 1.0),
        ("\\boxed{\\dfrac{2}{4}}", "0.5", 1.0),
        ("\\boxed{0.6}", "\\frac{1}{2}", 0.0),
        # no marker: math-verify takes the last number, so the final one counts
        ("3 apples plus 4 apples is 7 apples", "7", 1.0),
        ("3 apples plus 4 apples is 7 apples", "3", 0.0),
        ("", "42", 0.0),
        ("anything", "no answer to parse", 0.0),
    ],
)
def test_math_reward(response, answer, expected):
    assert math_reward(response, TaskSample("1", "q", answer)) == expected


def test_math_reward_with_a_dapo_row(tmp_path):
    sample = math_task(tmp_path, verl_rows(), "parquet").samples("train")[3]
    assert sample.answer == "9"
    assert math_reward("3 times 3 is 9.\nAnswer: 9", sample) == 1.0
    assert math_reward("3 times 3 is 9.\nAnswer: 6", sample) == 0.0


class FakeChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )


def test_chat_rendering_with_system_prompt():
    s = TaskSample("1", "2+2?", "4")
    assert render_prompt(s, FakeChatTokenizer(), "Be brief.") == "<system>Be brief.<user>2+2?<assistant>"


def test_config_errors():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        TaskConfig(name="chess")
    with pytest.raises(ValueError, match="the math task needs task.path"):
        TaskConfig(name="math")
    with pytest.raises(ValueError, match="cannot load reward_fn 'nowhere.mod:f'"):
        make_reward(TaskConfig(reward_fn="nowhere.mod:f"))


def test_user_reward_by_import_path_and_bad_rewards_are_marked():
    s = make_task(TaskConfig(train_size=2)).samples("train")[0]
    bad = score(make_reward(TaskConfig(reward_fn="math:copysign")), "12", s)  # copysign(response, answer) raises
    assert bad.value == 0.0 and "reward raised TypeError" in bad.error
    assert score(lambda response, sample: math.nan, "1", s).error == "reward returned nan, not finite in float32"
    assert score(make_reward(TaskConfig(train_size=2)), "0", s).error is None


def test_verl_compute_score_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_verl_reward.py").write_text(
        "calls = []\n\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    calls.append((data_source, solution_str, ground_truth, extra_info))\n"
        "    return {'score': float(solution_str.strip() == ground_truth), 'acc': True}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    path = write_rows(data, verl_rows(), "parquet")
    cfg = TaskConfig(name="math", path=path, reward_fn="my_verl_reward:compute_score")
    sample = make_task(cfg).samples("train")[1]
    reward = make_reward(cfg)
    assert score(reward, "3", sample).value == 1.0 and score(reward, "4", sample).value == 0.0
    import my_verl_reward

    assert my_verl_reward.calls[0] == ("math_dapo", "3", "3", {"index": 101, "split": "train"})
