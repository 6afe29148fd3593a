import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest
from pydantic import Field

from configtypes import ConfigError, build, derive, load, section, to_dict


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
        (["inner.mode=fast"], r"inner.mode must be 'sync' or 'async', got 'fast'"),
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


@section("demo")
class Section:
    rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    count: int | None = None
    _derived: tuple[str, ...] = field(default=(), repr=False, compare=False)


def test_a_section_is_a_dataclass_checked_on_every_construction():
    s = Section(rate=0.25)
    assert dataclasses.fields(s)[0].name == "rate" and dataclasses.asdict(s)["rate"] == 0.25
    with pytest.raises(ConfigError, match=r"^demo.rate must be in \(0, 1\], got 2$"):
        dataclasses.replace(s, rate=2)
    with pytest.raises(ConfigError, match=r"^unknown key 'demo.rat'; did you mean 'rate'\?$"):
        Section(rat=1)
    with pytest.raises(ConfigError, match=r"^outer.rate must be in \(0, 1\], got 0$"):
        build(Section, {"rate": 0}, where="outer")


def test_derived_values_are_filled_checked_and_written_unset():
    s = derive(Section(), "count", 3, "source.count", "why")
    assert s.count == 3 and to_dict(s) == {"rate": 0.5, "count": None}
    assert derive(s, "count", 4, "source.count", "why").count == 4  # derived before: derived again
    assert derive(Section(count=3), "count", 3, "source.count", "why") == Section(count=3)
    with pytest.raises(ConfigError, match=r"^demo.count \(2\) must equal source.count \(3\): why; leave it unset$"):
        derive(Section(count=2), "count", 3, "source.count", "why")
