"""Adapter references resolved on the driver, before anything is fingerprinted or shipped.

A reference is a registry version (`demo:3`), an alias (`demo@champion`), a local adapter folder or
a store URI. An alias moves, so it is resolved to the version it points at and to that version's
content hash: fingerprints hold `demo:3#<sha>`, never `demo@champion`, and a promotion therefore
reruns exactly the stages that depend on the champion. Stages never see a reference: the driver
hands them the adapter's files (`workflows.adapters.AdapterFiles`).

Only the driver opens the registry (it lives on the driver's disk).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workflows.adapters import AdapterFiles
from workflows.artifacts import is_uri
from workflows.config import PipelineConfig
from workflows.registry.base import AdapterVersion, RegistryError, is_ref
from workflows.registry.sqlite import Registry


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter pinned down: `ref` is `name:version` (never an alias), a folder or a URI;
    `location` is where its files are read (a verified registry folder, the folder, the URI)."""

    ref: str
    content_sha256: str
    location: str

    @property
    def token(self) -> str:
        """What fingerprints hold: the reference and its content."""
        return f"{self.ref}#{self.content_sha256[:16]}"

    def files(self) -> AdapterFiles:
        return AdapterFiles.read(self.location, self.ref)


def resolve_adapter(spec: str, registry_root: str | Path) -> ResolvedAdapter:
    """A folder, URI or registry reference (`name:3`, `name@alias`) pinned to its content.

    Registry files are verified (sha256 of every file) on the way. Raises RegistryError naming the
    reference when it resolves to nothing.
    """
    path = Path(spec).expanduser()
    if not is_uri(spec) and path.is_dir():
        files = AdapterFiles.read(path)
        return ResolvedAdapter(str(path.resolve()), files.content_sha256, str(path.resolve()))
    if is_uri(spec):
        files = AdapterFiles.read(spec)
        return ResolvedAdapter(spec, files.content_sha256, spec)
    if not is_ref(spec):
        raise RegistryError(f"{spec!r} is neither an adapter directory nor a registry reference "
                            "(NAME@ALIAS or NAME:VERSION)")
    registry = Registry.existing(registry_root)
    if registry is None:
        raise RegistryError(f"{spec}: there is no registry at {registry_root} (registry.root)")
    return _pinned(registry, registry.get(spec))


def _pinned(registry: Registry, version: AdapterVersion) -> ResolvedAdapter:
    return ResolvedAdapter(version.ref, version.content_sha256, str(registry.resolve(version.ref)))


def champion_for(config: PipelineConfig, train_fingerprint: str | None) -> ResolvedAdapter | None:
    """The adapter the evaluate stage compares against: `registry.name@registry.alias`, or None.

    When the alias holder is the adapter that the train stage `train_fingerprint` produced (an
    earlier run of this very plan promoted it), the comparison that stands is the one made against
    the holder before it, so that holder is returned: a re-run with nothing changed stays a cache
    hit after its own promotion, while any other move of the alias is a change.
    """
    if not config.eval.compare_champion:
        return None
    registry = Registry.existing(config.registry.root)
    if registry is None:
        return None
    name, alias = config.registry.name, config.registry.alias
    holder = registry.alias_version(name, alias)
    if holder is not None and train_fingerprint is not None:
        trained = (registry.get(f"{name}:{holder}").lineage.get("fingerprints") or {}).get("train")
        if trained == train_fingerprint:
            moves = [m for m in registry.history(name, alias) if m.to_version == holder]
            holder = moves[-1].from_version if moves else None
    if holder is None:
        return None
    return _pinned(registry, registry.get(f"{name}:{holder}"))


def champion_files(config: PipelineConfig) -> AdapterFiles | None:
    """The current champion's files, for a comparison outside the DAG (`loraflow evaluate --adapter`)."""
    champion = champion_for(config, None)
    return champion.files() if champion else None


__all__ = ["ResolvedAdapter", "champion_files", "champion_for", "resolve_adapter"]
