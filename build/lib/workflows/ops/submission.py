"""What a submitted pipeline needs on the cluster, and whether the cluster can reach it.

A Ray Job runs its driver and workers on the cluster's nodes, in a temporary copy of the working
directory. Each path the config names is therefore sorted before submitting:

| path | cluster on this machine | remote cluster |
|---|---|---|
| `s3://`, `gs://`, any URL, `hf:<hub name>` | as is | as is |
| under a declared shared mount (`--shared-mount`) | absolute | absolute |
| local input (data, model dir, init adapter) | absolute | shipped with the working dir when it is inside it, not ignored, and the total stays under the ship limit; else refused |
| local output (`cluster.work_dir`, `cluster.runs_dir`, `registry.root`) | absolute (relative ones against the working dir, as the stages resolve them) | relative: refused (it would land in the job's temporary copy and vanish); absolute or `~`: the cluster's own path |

`cluster.runs_dir` is never a URI: the driver writes run records there with plain file I/O, so an
`s3://` or `gs://` runs_dir is refused before anything else (only `cluster.work_dir` may be one).

"Absolute" means the job gets the path as this machine resolves it (`--set key=/abs/path` in the
entrypoint), so a relative path does not silently move into the job's temporary directory. The
entrypoint also sets `cluster.address=auto`: the driver joins the cluster it runs in.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workflows.artifacts import is_uri
from workflows.config import PipelineConfig, check_runs_dir, load_config

DEFAULT_SHIP_LIMIT_BYTES = 100 * 2**20
# Never worth uploading; Ray also honours .gitignore and .rayignore in the working dir.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache"]
OUTPUT_KEYS = ("cluster.work_dir", "cluster.runs_dir", "registry.root")
# `validate` and `dag` are dry runs on the cluster's side: do its nodes see the data, which stages
# would run from its work directory.
COMMANDS = ("run", "retrain", "tune", "validate", "dag")


class UnreachableInputError(ValueError):
    """A path in the config that the cluster could not read or keep. Lists every such path."""


@dataclass
class SubmissionPlan:
    """What `submit` sends: the entrypoint, its runtime env, and notes worth telling the user."""

    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)


def shipped_files(working_dir: Path, excludes: Sequence[str]) -> set[Path]:
    """The files Ray will upload for `working_dir`: its own traversal with .gitignore, .rayignore
    and `excludes` applied (Ray 2.60 private helpers; the point is to agree with Ray exactly)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger("loraflow.job_plan.packaging")
    quiet.setLevel(logging.WARNING)
    files: set[Path] = set()

    def collect(p: Path) -> None:
        if p.is_file():
            files.add(p.absolute())

    _dir_travel(working_dir, [_get_excludes(working_dir, list(excludes))], collect,
                include_gitignore=include_gitignore, logger=quiet)
    return files


def _expand(path: str) -> list[Path]:
    """The local files a data path names: a file, every file under a directory, or a glob's matches."""
    if glob.has_magic(path):
        matches = [Path(m) for m in glob.glob(path, recursive=True)]
    else:
        matches = [Path(path)] if Path(path).exists() else []
    files: list[Path] = []
    for m in matches:
        files += [f for f in m.rglob("*") if f.is_file()] if m.is_dir() else [m]
    return [f.absolute() for f in files]


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _input_paths(cfg: PipelineConfig) -> list[tuple[str, str, bool]]:
    """(key, value, is_data) for every input path the config names."""
    found: list[tuple[str, str, bool]] = []
    for key in ("source", "eval_source"):
        value = getattr(cfg.data, key)
        for i, v in enumerate([value] if isinstance(value, str) else value or []):
            found.append((f"data.{key}" + ("" if isinstance(value, str) else f"[{i}]"), v, True))
    # A model name or init adapter is a path only when it exists here; otherwise an alias, hub id or
    # registry reference that the cluster resolves itself.
    for key, value in (("model.name", cfg.model.name), ("train.init_adapter", cfg.train.init_adapter)):
        if value and not is_uri(value) and Path(cfg.resolve_path(value)).exists():
            found.append((key, value, False))
    return found


class _Planner:
    """Sorts each path of one config (see the module docstring) and collects the rewrites."""

    def __init__(self, cfg: PipelineConfig, working_dir: Path, local_cluster: bool,
                 shared_mounts: Sequence[Path], excludes: Sequence[str], ship_limit_bytes: int):
        self.cfg, self.working_dir, self.local_cluster = cfg, working_dir, local_cluster
        self.shared_mounts, self.excludes, self.ship_limit = shared_mounts, excludes, ship_limit_bytes
        self.rewrites: dict[str, str | list[str]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.shipped_bytes = 0
        self._shipped: set[Path] | None = None

    def shipped(self) -> set[Path]:
        if self._shipped is None:
            self._shipped = shipped_files(self.working_dir, self.excludes)
        return self._shipped

    def _rewrite(self, key: str, value: str) -> None:
        field_, _, index = key.partition("[")
        if index:  # one entry of a list: rewrite the whole list
            current = self.rewrites.get(field_) or list(getattr(self.cfg.data, field_.split(".")[1]))
            current[int(index.rstrip("]"))] = value
            self.rewrites[field_] = current
        else:
            self.rewrites[key] = value

    def input(self, key: str, value: str, is_data: bool) -> None:
        prefix = "hf:" if value.startswith("hf:") else ""
        local = value[len(prefix):]
        if is_uri(local):
            return
        resolved = Path(self.cfg.resolve_path(local))
        files = _expand(str(resolved))
        if prefix and not files:
            return  # a hub dataset name, downloaded on the cluster
        if not files:
            if Path(local).expanduser().is_absolute() and not self.local_cluster:
                self.notes.append(f"{key}: {value} is not on this machine; assuming the cluster has it")
            else:
                self.problems.append(f"{key}: {value} does not exist (resolved to {resolved})")
            return
        if self.local_cluster or _under(resolved, self.shared_mounts):
            self._rewrite(key, prefix + str(resolved))
            return
        self._ship(key, value, prefix, resolved, files, is_data)

    def _ship(self, key: str, value: str, prefix: str, resolved: Path, files: list[Path], is_data: bool) -> None:
        how = ("upload it to s3:// or gs://, put it on a volume every node mounts (--shared-mount DIR), "
               "or move it into the working directory")
        if not is_data:
            self.problems.append(f"{key}: {value} is a local directory the cluster cannot see; {how}")
            return
        if not _under(resolved, [self.working_dir]):
            self.problems.append(f"{key}: {value} is outside the working directory {self.working_dir}; {how}")
            return
        left_out = [f for f in files if f not in self.shipped()]
        if left_out:
            self.problems.append(f"{key}: {left_out[0]} is excluded from the upload (.gitignore, .rayignore or "
                                 f"{self.excludes}); {how}")
            return
        size = sum(f.stat().st_size for f in files)
        self.shipped_bytes += size
        if self.shipped_bytes > self.ship_limit:
            self.problems.append(f"{key}: {value} brings the local data shipped with the working directory to "
                                 f"{self.shipped_bytes / 2**20:.1f} MiB, over the {self.ship_limit / 2**20:.0f} MiB "
                                 f"limit; {how}")
            return
        self.notes.append(f"{key}: {value} ({size / 2**20:.2f} MiB) travels with the working directory")
        config_dir = Path(self.cfg.source_path).parent
        self._rewrite(key, prefix + os.path.relpath(resolved, config_dir))

    def output(self, key: str) -> None:
        section, name = key.split(".")
        value = getattr(getattr(self.cfg, section), name)
        if is_uri(value):
            return
        # The stages resolve output paths against the process's working directory, which for a job
        # is its copy of the working directory: resolve them the same way here.
        resolved = (self.working_dir / Path(value).expanduser()).resolve()
        if self.local_cluster or _under(resolved, self.shared_mounts):
            self._rewrite(key, str(resolved))
        elif value.startswith("~"):
            self.notes.append(f"{key}: {value} is on the disk of the node running the driver; keep it on a "
                              "persistent volume there (a pod's own disk does not survive the pod)")
        elif not Path(value).is_absolute():
            where = {"registry.root": "a persistent disk of the head node, where the driver runs "
                                      "(--set registry.root=/mnt/registry)",
                     "cluster.runs_dir": "a path on the cluster, e.g. a shared volume "
                                         "(--set cluster.runs_dir=/mnt/shared/loraflow/runs)",
                     }.get(key, f"s3://..., gs://... or a path every node sees (--set {key}=/mnt/shared/...)")
            self.problems.append(f"{key}: {value!r} is relative, so on the cluster it would land in the job's "
                                 f"temporary copy of the working directory and be lost; set it to {where}")


def plan_submission(config_path: str | Path, address: str, *, local_cluster: bool, overrides: Sequence[str] = (),
                    working_dir: str | Path | None = None, env_vars: Mapping[str, str] | None = None,
                    pip: Sequence[str] = (), shared_mounts: Sequence[str] = (), command: str = "run",
                    excludes: Sequence[str] = DEFAULT_EXCLUDES,
                    ship_limit_bytes: int = DEFAULT_SHIP_LIMIT_BYTES) -> SubmissionPlan:
    """Validate the config and sort its paths for a job on `address`; `local_cluster` says whether
    every node of that cluster runs on this machine (`jobs.cluster_on_this_machine` asks it).

    Raises ConfigError for an invalid config (an object-store runs_dir included) and
    UnreachableInputError listing every path the cluster could not use. Shared mounts also come
    from $LORAFLOW_SHARED_MOUNTS (os.pathsep list).
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    cfg = load_config(config_path, list(overrides))
    check_runs_dir(cfg)
    config_file = Path(config_path).resolve()
    wd = Path(working_dir or Path.cwd()).resolve()
    if not _under(config_file, [wd]):
        raise UnreachableInputError(f"config {config_path} is outside the working directory {wd}, so the job "
                                    "could not read it; run from the project folder or pass --working-dir")
    mounts = [*shared_mounts, *filter(None, os.environ.get("LORAFLOW_SHARED_MOUNTS", "").split(os.pathsep))]
    planner = _Planner(cfg, wd, local_cluster, [Path(m).expanduser().resolve() for m in mounts],
                       excludes, ship_limit_bytes)
    if not planner.local_cluster and config_file not in planner.shipped():
        planner.problems.append(f"config {config_path} is excluded from the upload (.gitignore, .rayignore "
                                f"or {list(excludes)})")
    for key, value, is_data in _input_paths(cfg):
        planner.input(key, value, is_data)
    for key in OUTPUT_KEYS:
        planner.output(key)
    if planner.problems:
        raise UnreachableInputError(f"{config_path}: the cluster at {address} could not use these paths:\n  "
                                    + "\n  ".join(planner.problems))

    # The driver runs inside the cluster: join it (Ray sets RAY_ADDRESS for a job) rather than start one.
    planner.rewrites["cluster.address"] = "auto"
    # JSON is valid YAML, and it quotes anything odd in a path.
    sets = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in planner.rewrites.items())]
    argv = ["loraflow", command, config_file.relative_to(wd).as_posix()]
    for s in sets:
        argv += ["--set", s]
    runtime_env: dict = {"working_dir": str(wd), "excludes": list(excludes)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = list(pip)
    metadata = {"loraflow_command": command, "loraflow_config": config_file.relative_to(wd).as_posix()}
    return SubmissionPlan(shlex.join(argv), runtime_env, metadata, planner.notes)
