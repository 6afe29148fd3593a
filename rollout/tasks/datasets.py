"""Rows of a data file, and the fields a task takes from them.

People arrive with the files their other tools read, so one reader takes them as they are:
veRL's Parquet (DAPO-Math-17k, veRL's GSM8K and MATH preprocessing: a `prompt` list of chat
messages, the answer at `reward_model.ground_truth`), OpenAI-style chat JSONL (`messages`, the
answer in a trailing assistant turn) and plain prompt/answer rows, in JSONL or Parquet.

Which fields hold the prompt and the answer is decided once per file, from its first row, and
every row must then have them: a file that mixes schemas is an error naming the row, never a
silent mix. Every bad row is a one-line ValueError naming the file, the row and the field, since
a typo found at load time costs seconds and one found mid-run costs a cluster's hours.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout.tasks.base import TaskSample

PROMPT_KEYS = ("prompt", "messages", "question", "problem")  # tried in order when task.prompt_key is unset
ANSWER_KEYS = ("answer", "reward_model.ground_truth", "ground_truth", "solution")  # likewise for answer_key
ROLES = ("assistant", "system", "tool", "user")
MISSING: Any = object()  # a field the row does not have (distinct from a null value)


@dataclass(frozen=True)
class Fields:
    """Where a file keeps its prompt and answer (dotted paths allowed)."""

    prompt: str
    answer: str | None  # None: the answer is the trailing assistant turn of the prompt's messages


def load_samples(path: Path, prompt_key: str | None = None, answer_key: str | None = None) -> list[TaskSample]:
    """Every row of a data file as a TaskSample, in file order. Keys left None are found from
    the first row (PROMPT_KEYS, ANSWER_KEYS); an explicit key is used as given."""
    rows = read_rows(path)
    fields = resolve_fields(rows[0], prompt_key, answer_key, f"{path}: row 0")
    samples = [row_sample(row, i, fields, f"{path}: row {i}") for i, row in enumerate(rows)]
    check_unique_ids(samples, path)
    return samples


def read_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl, .json or .parquet file as dicts (Parquet struct and list columns
    arrive as dicts and lists)."""
    if not path.exists():
        raise ValueError(f"math task file {path} does not exist")
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_json(path)
    else:
        raise ValueError(f"math task file {path} must be .jsonl, .json or .parquet, not {path.suffix or 'no suffix'!r}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a JSON {type(row).__name__}, not an object")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file: {err}") from err


def _read_json(path: Path) -> list:
    """JSON Lines; a .json file may instead hold one array of objects (`json.dump(rows)`)."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON array of objects: {err}") from err
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON object: {err}") from err
    return rows


def get_field(row: dict, key: str) -> Any:
    """row[key], else the value at a dotted path ("reward_model.ground_truth"); MISSING if absent.
    An exact column name wins, so a column literally named "a.b" still works."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def has_field(row: dict, key: str) -> bool:
    """Whether the row has a non-null value at key: Parquet fills absent struct fields with null."""
    return get_field(row, key) not in (MISSING, None)


def describe_keys(row: dict, key: str) -> str:
    """What the row offers instead of key: its keys, or those of the deepest dict the dotted
    path reaches ("'reward_model' has ['style']"), for error messages."""
    value, reached = row, []
    for part in key.split(".")[:-1]:
        if not isinstance(value.get(part), dict):
            break
        value, reached = value[part], [*reached, part]
    keys = sorted(value)
    return f"{'.'.join(reached)!r} has {keys}" if reached else f"it has {keys}"


def resolve_fields(row: dict, prompt_key: str | None, answer_key: str | None, where: str) -> Fields:
    """The file's prompt and answer fields, found from its first row where not given."""
    prompt = prompt_key or _first_present(row, PROMPT_KEYS, "prompt", where)
    if answer_key:
        return Fields(prompt, answer_key)
    answer = next((k for k in ANSWER_KEYS if has_field(row, k)), None)
    if answer is None and not isinstance(get_field(row, prompt), (list, tuple)):
        _first_present(row, ANSWER_KEYS, "answer", where)  # raises, naming the candidates
    return Fields(prompt, answer)


def _first_present(row: dict, candidates: tuple[str, ...], what: str, where: str) -> str:
    for key in candidates:
        if has_field(row, key):
            return key
    names = ", ".join(repr(k) for k in candidates)
    raise ValueError(f"{where} has none of the {what} fields {names} (it has {sorted(row)}); set task.{what}_key")


def required(row: dict, key: str, where: str) -> Any:
    value = get_field(row, key)
    if value is MISSING:
        raise ValueError(f"{where} has no {key!r} field ({describe_keys(row, key)})")
    return value


def row_sample(row: dict, index: int, fields: Fields, where: str) -> TaskSample:
    """One row as a TaskSample: a text prompt becomes the user turn, a message list is the
    conversation (less a trailing assistant turn, which is a reference reply, not prompt)."""
    value = required(row, fields.prompt, where)
    if isinstance(value, str):
        prompt, messages, reply = text_field(value, where, fields.prompt), None, None
    elif isinstance(value, (list, tuple)):
        messages, reply = split_reply(chat_messages(value, where, fields.prompt), where, fields.prompt)
        prompt = last_user_turn(messages)
    else:
        raise ValueError(
            f"{where} field {fields.prompt!r} must be non-empty text or a list of chat messages, got {_short(value)}"
        )
    return TaskSample(
        id=row_id(row, index),
        prompt=prompt,
        answer=answer_text(row, fields, reply, where),
        chat=True,
        messages=messages,
        data_source=_data_source(row, where),
        extra_info=_extra_info(row, where),
    )


def text_field(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} field {key!r} must be non-empty text, got {_short(value)}")
    return value


def chat_messages(value: list | tuple, where: str, key: str) -> tuple[dict, ...]:
    """Checked chat messages. Null entries are dropped: Parquet gives every message all the
    fields any message has, and a template would render `"name": None` as a name."""
    if not value:
        raise ValueError(f"{where} field {key!r} must be a non-empty list of chat messages, got []")
    messages = []
    for j, item in enumerate(value):
        at = f"{where} field {key!r} message {j}"
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise ValueError(f"{at} must be an object with 'role' and 'content', got {_short(item)}")
        if item["role"] not in ROLES:
            raise ValueError(f"{at} has role {_short(item['role'])}; roles are {', '.join(ROLES)}")
        if not isinstance(item["content"], str):
            raise ValueError(f"{at} content must be text, got {_short(item['content'])}")
        messages.append({k: v for k, v in item.items() if v is not None})
    return tuple(messages)


def split_reply(messages: tuple[dict, ...], where: str, key: str) -> tuple[tuple[dict, ...], str | None]:
    """The prompt turns and the trailing assistant reply (None if there is none). The engine
    starts a new assistant turn after the prompt, so the prompt must not end with one."""
    reply = None
    if messages[-1]["role"] == "assistant":
        messages, reply = messages[:-1], messages[-1]["content"]
    if not messages:
        raise ValueError(f"{where} field {key!r} has only an assistant turn, no prompt before it")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{where} field {key!r} ends with two assistant turns; the prompt must not end with one")
    return messages, reply


def last_user_turn(messages: tuple[dict, ...]) -> str:
    """The text a conversation's `prompt` holds (shown in logs; rendering uses all of `messages`)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def answer_text(row: dict, fields: Fields, reply: str | None, where: str) -> str:
    """The reference answer as text: numbers (DAPO's integer answers) become strings."""
    if fields.answer is None:
        if reply is None:
            raise ValueError(
                f"{where} field {fields.prompt!r} has no trailing assistant turn to take the answer from, and the file"
                f" has none of the fields {', '.join(map(repr, ANSWER_KEYS))} ({describe_keys(row, fields.prompt)})"
            )
        value, key = reply, fields.prompt
    else:
        value, key = required(row, fields.answer, where), fields.answer
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} field {key!r} must be non-empty text or a number, got {_short(value)}")
    return value


def row_id(row: dict, index: int) -> str:
    """The row's `id`, else veRL's `extra_info.index`, else its row number."""
    for key in ("id", "extra_info.index"):
        if has_field(row, key):
            return str(get_field(row, key))
    return str(index)


def check_unique_ids(samples: list[TaskSample], path: Path) -> None:
    """Ids name samples in the buffer, logs and checkpoints: two rows sharing one would be
    confused there, so it is an error here."""
    seen: dict[str, int] = {}
    for i, sample in enumerate(samples):
        if sample.id in seen:
            first = seen[sample.id]
            raise ValueError(f"{path}: rows {first} and {i} have the same id {sample.id!r}; ids must be unique")
        seen[sample.id] = i


def _data_source(row: dict, where: str) -> str:
    value = row.get("data_source")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where} field 'data_source' must be text, got {_short(value)}")
    return value


def _extra_info(row: dict, where: str) -> dict | None:
    value = row.get("extra_info")
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{where} field 'extra_info' must be an object, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
