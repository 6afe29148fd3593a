"""The one config module: typed, range-checked sections (`sections`) and YAML plus dotted
overrides read into them (`loading`), with errors that name the dotted key.

It sits below every layer: rollout, learner and buffer declare their sections with it, and it
imports nothing of the project.
"""

from configtypes.loading import apply_override, load, read_yaml
from configtypes.sections import (
    AtLeast0,
    AtLeast1,
    ConfigError,
    NonEmpty,
    NonNegative,
    Positive,
    build,
    derive,
    describe,
    keys_of,
    section,
    to_dict,
    unknown_key,
)

__all__ = [
    "AtLeast0",
    "AtLeast1",
    "ConfigError",
    "NonEmpty",
    "NonNegative",
    "Positive",
    "apply_override",
    "build",
    "derive",
    "describe",
    "keys_of",
    "load",
    "read_yaml",
    "section",
    "to_dict",
    "unknown_key",
]
