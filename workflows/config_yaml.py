"""YAML as loraflow reads configs and `--set` values: PyYAML's safe loader, with numbers in exponent
notation read as numbers.

PyYAML follows YAML 1.1, whose floats need a dot: `1e-4` is the *string* "1e-4" there (YAML 1.2,
JSON and Python read a number). A learning rate written `lr: 1e-4` survived that (the config's
validation turns the string into a float), but a search space's `grid: [1e-4, 5e-4]` handed the
trials strings, and `loguniform: [1e-5, 1e-3]` was refused as not numbers.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

YAMLError = yaml.YAMLError


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2's float forms, exponents without a dot included (added to PyYAML's own 1.1 ones).
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """`text` parsed as `yaml.safe_load` would, except that 1e-4 and 5E3 are floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
