"""Where the registry lives: one rule for every command (`run`, `predict`, `generate`, `registry ...`):
a flag or `--set registry.root`, then `$LORAFLOW_REGISTRY`, then the config's `registry.root`, then
the default. Each answer says where it came from, so an error can name it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REGISTRY_ENV = "LORAFLOW_REGISTRY"
DEFAULT_REGISTRY_ROOT = "~/.cache/loraflow/registry"


def registry_root(flag: str | None = None, configured: str | None = None, flag_name: str = "--root",
                  config_origin: str = "registry.root in the config") -> tuple[str, str]:
    """The registry root of any command and where it came from: a flag (or --set), then
    $LORAFLOW_REGISTRY, then the config's `registry.root`, then the default."""
    if flag:
        return flag, flag_name
    if os.environ.get(REGISTRY_ENV):
        return os.environ[REGISTRY_ENV], f"${REGISTRY_ENV}"
    if configured:
        return configured, config_origin
    return DEFAULT_REGISTRY_ROOT, f"the default registry.root ({DEFAULT_REGISTRY_ROOT})"


def resolve_registry_root(raw: dict[str, Any], overrides: list[str] | None, path: Path) -> str:
    """Set `registry.root` in `raw` by `registry_root`'s rule; returns where it came from."""
    section = raw.get("registry")
    if section is not None and not isinstance(section, dict):
        return f"registry.root in {path}"  # validation names the bad section
    given = (section or {}).get("root")
    from_set = "registry.root" in {item.split("=", 1)[0].strip() for item in overrides or []}
    root, origin = registry_root(given if from_set else None, given, flag_name="--set registry.root",
                                 config_origin=f"registry.root in {path}")
    raw["registry"] = {**(section or {}), "root": root}
    return origin
