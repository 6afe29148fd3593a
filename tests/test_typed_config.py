from dataclasses import dataclass, field
from typing import Literal

import pytest

from vespo.typed_config import ConfigError, load, to_dict


@dataclass
class Inner:
    lr: float = 1e-6
    stages: tuple[int, int] = (0, 2)
    mode: Literal["sync", "async"] = "async"
    note: str | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ninner:\n  lr: 0.001\n  mode: sync\n")
    cfg = load(Outer, path, ["steps=3", "inner.stages=[1, 3]", "inner.note=hello"])
    assert cfg == Outer(name="demo", steps=3, inner=Inner(lr=0.001, stages=(1, 3), mode="sync", note="hello"))
    assert to_dict(cfg)["inner"]["stages"] == [1, 3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.lrr=1"], r"unknown key 'inner.lrr'; did you mean 'lr'\?"),
        (["stepz=1"], r"unknown key 'stepz'; did you mean 'steps'\?"),
        (["steps=abc"], r"steps: expected an integer, got 'abc'"),
        (["steps=1.5"], r"steps: expected an integer"),
        (["inner.lr=-1"], r"inner: lr must be > 0, got -1.0"),
        (["inner.mode=fast"], r"inner.mode: 'fast' is not one of 'sync', 'async'"),
        (["inner.stages=[1]"], r"inner.stages: expected 2 values, got 1"),
        (["inner=3"], r"inner: expected a mapping, got 3"),
        (["novalue"], r"must look like section.key=value"),
    ],
)
def test_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(Outer, None, overrides)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load(Outer, bad)
