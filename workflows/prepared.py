"""The prepare stage's output as the train and evaluate stages read it (docs/artifacts.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows import storage
from workflows.artifacts import SUCCESS, UserError


class PreparedDataError(UserError, ValueError):
    """The prepared dataset cannot feed this config (names the manifest field or the split)."""


@dataclass
class PreparedData:
    """A committed prepare directory: `root` holds train/, eval/, rejects/, manifest.json.

    `root` is a local path, or the URI of the output in an object store work directory: the
    shard lists are then URIs too, which Ray Data reads from the store on any node.
    """

    root: Path | str
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = str(root) if storage.is_uri(root) else Path(root)
        if not storage.exists(storage.join(root, SUCCESS)):
            raise FileNotFoundError(f"{root} is not a complete prepare output (no _SUCCESS marker); "
                                    "re-run `loraflow prepare`")
        return cls(root, storage.read_json(storage.join(root, "manifest.json")))

    def _files(self, split: str) -> list[str]:
        return [storage.join(self.root, rel) for rel in self.manifest["shards"][split]]

    @property
    def train_files(self) -> list[str]:
        return self._files("train")

    @property
    def eval_files(self) -> list[str]:
        return self._files("eval")

    @property
    def validation_files(self) -> list[str]:
        """The validation split a sweep carves out of the train rows; empty for a plain run's data."""
        return self._files("validation") if "validation" in self.manifest["shards"] else []

    def for_trials(self) -> PreparedData:
        """The view a tune trial gets: train, and the validation split in the place of eval, so that
        no eval row reaches a trial (its periodic eval scores validation rows)."""
        if not self.validation_files:
            raise PreparedDataError(f"{storage.join(self.root, 'manifest.json')}: manifest field 'shards' has no "
                                    "validation split; prepare with a tune section (tune.validation_fraction)")
        shards = {**self.manifest["shards"], "eval": self.manifest["shards"]["validation"]}
        return PreparedData(self.root, {**self.manifest, "shards": shards, "eval_split": "validation"})

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def packed(self) -> bool:
        return self.manifest["packed"]
