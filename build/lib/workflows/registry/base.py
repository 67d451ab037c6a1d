"""What every registry backend shares: the `AdapterRegistry` interface, its records, the rules for
names and references, and the file hashing that makes stored adapters verifiable.

`workflows.registry` has the embedded SQLite backend and is what callers import.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workflows import __version__
from workflows.adapters import CONFIG_FILE, WEIGHTS_FILE, content_sha256
from workflows.artifacts import UserError, atomic_dir, sha256_file

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
ANY_HOLDER = object()  # `record_decision(expected_holder=ANY_HOLDER)`: move whoever holds the alias


class RegistryError(UserError):
    """A registry operation that cannot be done as asked (bad name, unknown ref, deleted, ...)."""

    exit_code = 2


class RegistryIntegrityError(RegistryError):
    """A registered file is missing, changed or unexpected: the stored adapter cannot be trusted."""


class AliasConflict(RegistryError):
    """The alias holder changed between a decision and the move (another run promoted first)."""


def validate_name(name: str, kind: str = "adapter name") -> str:
    """Names become directory names: letters, digits, `._-`, no separators, no `..`, <= 128 chars."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(
            f"invalid {kind} {name!r}: use letters, digits and '._-' (starting with a letter or digit, "
            f"at most 128 characters, no '/' and no '..')")
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: start with a letter, then letters, digits, '_' or '-' (<= 64 chars)")
    return alias


@dataclass(frozen=True)
class Ref:
    """`name:3` (a version) or `name@champion` (whatever the alias points at)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        if "@" in text:
            name, alias = text.split("@", 1)
            return cls(validate_name(name), alias=validate_alias(alias))
        if ":" in text:
            name, version = text.split(":", 1)
            if not version.isdigit() or int(version) < 1:
                raise RegistryError(f"invalid reference {text!r}: the version after ':' must be 1, 2, 3...")
            return cls(validate_name(name), version=int(version))
        raise RegistryError(f"invalid reference {text!r}: expected NAME:VERSION (e.g. demo:3) or NAME@ALIAS "
                            "(e.g. demo@champion)")

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}:{self.version}"


def is_ref(text: str) -> bool:
    try:
        Ref.parse(text)
    except RegistryError:
        return False
    return True


@dataclass
class Lineage:
    """Where an adapter came from; every field optional so partial lineage can still be recorded."""

    base_model: dict[str, Any] | None = None  # workflows.models.base_identity(...)
    input_digest: str | None = None  # digest of the raw input data content
    prepared_manifest_digest: Any = None  # digest(s) of the prepared rows / manifest
    config: dict[str, Any] | None = None  # the pipeline config as run
    loraflow_version: str = __version__
    parent_adapter: str | None = None  # warm-start adapter (a ref or a path)
    run_id: str | None = None
    fingerprints: dict[str, str] | None = None  # stage name -> fingerprint
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Lineage | dict[str, Any] | None) -> Lineage:
        if value is None or isinstance(value, Lineage):
            return value or cls()
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RegistryError(f"unknown lineage keys {sorted(unknown)}; put extra facts under 'extra'")
        return cls(**value)


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    path: Path
    content_sha256: str
    created: str
    files: dict[str, str]  # relative path -> sha256
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    tags: dict[str, str]
    servable: bool
    servable_reasons: list[str]
    deleted: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path), "ref": self.ref}


@dataclass(frozen=True)
class AliasMove:
    """One recorded alias change. `from_version` is None when the alias was new."""

    name: str
    alias: str
    from_version: int | None
    to_version: int
    action: str  # "promote" | "rollback"
    reason: str
    numbers: dict[str, Any]
    time: str


class AdapterRegistry(abc.ABC):
    """What the stages and the CLI need from a registry backend."""

    @abc.abstractmethod
    def register(self, adapter_dir: str | Path, name: str, metrics: dict[str, Any] | None = None,
                 lineage: Lineage | dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> int:
        """Store a copy of a PEFT adapter directory; return its (possibly pre-existing) version."""

    @abc.abstractmethod
    def get(self, ref: str | Ref) -> AdapterVersion:
        """The version record a reference points at (metadata only; files are not read)."""

    @abc.abstractmethod
    def resolve(self, ref: str | Ref) -> Path:
        """The directory of a live version, after checking every file's sha256."""

    @abc.abstractmethod
    def list_versions(self, name: str | None = None, include_deleted: bool = False) -> list[AdapterVersion]: ...

    @abc.abstractmethod
    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for one adapter name."""

    @abc.abstractmethod
    def history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Alias moves, oldest first."""

    @abc.abstractmethod
    def promote(self, name: str, version: int, alias: str, reason: str,
                numbers: dict[str, Any] | None = None) -> AliasMove: ...

    @abc.abstractmethod
    def rollback(self, name: str, alias: str, reason: str = "rollback") -> AliasMove:
        """Point the alias back at its holder before the last promotion not already rolled back."""

    @abc.abstractmethod
    def record_decision(self, name: str, version: int, alias: str, promote: bool, reason: str,
                        numbers: dict[str, Any], expected_holder: Any = ANY_HOLDER) -> AliasMove | None:
        """Record a gate decision and, when `promote`, move the alias in the same transaction.
        With `expected_holder` (a version or None), raise AliasConflict unless the alias still
        points there: the gate compared against that holder, not against a newer one."""

    @abc.abstractmethod
    def decisions(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """Recorded gate decisions, oldest first."""

    @abc.abstractmethod
    def delete(self, ref: str | Ref) -> None:
        """Soft delete: the version keeps its number and files but no longer resolves."""

    def alias_version(self, name: str, alias: str) -> int | None:
        return self.aliases(name).get(alias)

    def export(self, ref: str | Ref, dest: str | Path) -> Path:
        """Copy a verified version to `dest` (absent or empty) as a plain PEFT adapter folder."""
        src = self.resolve(ref)
        files = self.get(ref).files
        dest = Path(dest).expanduser()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"export destination {dest} exists and is not an empty directory")
        with atomic_dir(dest, replace=True) as tmp:  # replaces at most an empty folder
            for rel in sorted(files):  # copyfile, not copy2: exported files are writable again
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
        return dest

    def show(self, ref: str | Ref) -> dict[str, Any]:
        """Everything known about a version: record, aliases it holds, its alias moves and decisions."""
        v = self.get(ref)
        held = sorted(a for a, n in self.aliases(v.name).items() if n == v.version)
        moves = [dataclasses.asdict(m) for m in self.history(v.name)
                 if v.version in (m.from_version, m.to_version)]
        return {**v.to_dict(), "aliases": held, "alias_history": moves,
                "decisions": self.decisions(v.name, v.version)}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def adapter_content_sha256(adapter_dir: Path) -> str:
    """Identity of an adapter: its config and weights (`workflows.adapters.content_sha256`)."""
    return content_sha256((adapter_dir / CONFIG_FILE).read_bytes(), (adapter_dir / WEIGHTS_FILE).read_bytes())


def check_adapter_dir(adapter_dir: Path) -> dict[str, Any]:
    """Refuse anything that is not a PEFT LoRA directory with safetensors weights; return its config."""
    if not adapter_dir.is_dir():
        raise RegistryError(f"adapter directory not found: {adapter_dir}")
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / fname).is_file():
            hint = " (pickled adapter_model.bin is not accepted)" if fname == WEIGHTS_FILE else ""
            raise RegistryError(f"{adapter_dir}: missing {fname}{hint}")
    try:
        cfg = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{adapter_dir / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise RegistryError(f"{adapter_dir / CONFIG_FILE}: peft_type must be 'LORA'")
    return cfg


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under `directory`, keyed by POSIX relative path."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_symlink():
            raise RegistryError(f"{p}: symbolic links are not stored in the registry")
        if p.is_file():
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def verify_files(directory: Path, recorded: dict[str, str], ref: str) -> None:
    """Raise RegistryIntegrityError naming the first missing, changed or unexpected file."""
    if not directory.is_dir():
        raise RegistryIntegrityError(f"{ref}: directory {directory} is missing")
    for rel, sha in recorded.items():
        path = directory / rel
        if not path.is_file():
            raise RegistryIntegrityError(f"{ref}: file {path} is missing")
        if sha256_file(path) != sha:
            raise RegistryIntegrityError(f"{ref}: file {path} was modified (sha256 differs from the recorded one)")
    extra = sorted(set(file_hashes(directory)) - set(recorded))
    if extra:
        raise RegistryIntegrityError(f"{ref}: unexpected file {directory / extra[0]} in a registered version")
