"""Run configs from YAML and command-line overrides ("learner.lr=1e-5"), with errors that name the key.

The one path from untyped input to typed objects: YAML and dotted overrides become nested
mappings, and `build` turns them into config sections (`configtypes.sections`: dataclasses
whose fields carry their ranges, validated by pydantic), reporting unknown keys with the
closest valid name and bad values with their full dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from configtypes.sections import ConfigError, build

T = TypeVar("T")


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        apply_override(data, item)
    return build(cls, data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty one)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set a dotted key from "a.b.c=value"; the value is parsed as YAML ("1e-5", "true", "[1, 2]").
    A null on the way becomes a record, so `learner.lora.rank=16` enables a section left null."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # an optional record left null (learner.lora) takes keys too
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value
