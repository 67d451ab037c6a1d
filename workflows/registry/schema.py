"""The SQLite registry's schema (`workflows.registry.sqlite`) and its small helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: versions.dir (the version's folder under adapters/); NULL: <name>/<version>

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, content_sha256 TEXT NOT NULL, created TEXT NOT NULL,
    files TEXT NOT NULL, metrics TEXT NOT NULL, lineage TEXT NOT NULL, tags TEXT NOT NULL,
    servable INTEGER NOT NULL, servable_reasons TEXT NOT NULL, deleted TEXT, dir TEXT,
    PRIMARY KEY (name, version), UNIQUE (name, content_sha256));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated TEXT NOT NULL,
    PRIMARY KEY (name, alias), FOREIGN KEY (name, version) REFERENCES versions (name, version));
CREATE TABLE IF NOT EXISTS alias_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL, from_version INTEGER,
    to_version INTEGER NOT NULL, action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    reason TEXT NOT NULL, numbers TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL, alias TEXT NOT NULL,
    promote INTEGER NOT NULL, reason TEXT NOT NULL, numbers TEXT NOT NULL, time TEXT NOT NULL);
"""


def lora_core_check_servable(adapter_dir: Path) -> tuple[bool, list[str]]:
    from lora_core import check_servable

    ok, reasons = check_servable(adapter_dir)
    return bool(ok), [str(r) for r in reasons]


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
