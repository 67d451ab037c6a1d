"""Run tracking: TensorBoard event files for every run, MLflow when asked for.

TensorBoard (`tracking.tensorboard`, default on) gets, under `runs/<id>/tensorboard/`, the scalars of
every logged train step (`train/<key>`), the eval metrics at the final step (`eval/<model>/<metric>`,
`eval/diff/<metric>/<key>`) and the report as text, one entry per section.

MLflow (`pip install 'loraflow[mlflow]'`; on with a `tracking.mlflow` section or `$MLFLOW_TRACKING_URI`):
one MLflow run per loraflow run (found again by its tag `loraflow.run_id`) with the resolved config as
params, the same metrics, and `metrics.json`, `manifest.json`, `report.md` (+ PNGs) and `adapter/` as
artifacts. Each registered version becomes an MLflow model version (found again by its tags, so a retry
never duplicates it) whose source is the adapter logged to the MLflow run of the loraflow run that made
it (an MLflow server refuses a local path as a source); the registry alias is mirrored onto it.

Failures: TensorBoard problems only warn (the run's records are on disk already); MLflow problems raise
`TrackingError`, since the user asked for tracking and a silently stale mirror is worse. Every MLflow
write is idempotent, so calling again repairs what a failure left. Only `MlflowClient` is used, never
the process-global "active run" of MLflow's fluent API, so a caller's own MLflow run is left alone.
"""


from __future__ import annotations

import calendar
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workflows.adapters import AdapterFiles
from workflows.config import ConfigError, PipelineConfig
from workflows.registry.sqlite import Registry
from workflows.storage import read_text

ENV_URI = "MLFLOW_TRACKING_URI"
_PARAM_MAX = 6000  # MLflow's limit on a param value
_TAG_MAX = 5000  # under MLflow's 8000 for a tag value
_BAD_KEY = re.compile(r"[^\w\-. /]")

Log = Callable[[str], None]


class TrackingError(RuntimeError):
    """MLflow could not record a run or mirror the registry; names the tracking URI."""


# ----------------------------------------------------------------------------- what a run logged

def _train_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The train stage's metrics.jsonl records (a path or a store URI); [] when there are none."""
    location = manifest.get("stages", {}).get("train", {}).get("outputs", {}).get("metrics_path")
    text = read_text(location) if location else None
    rows = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric (non-bool) values of a record: what TensorBoard and MLflow take as scalars."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v}


def _step_scalars(rows: list[dict[str, Any]]) -> Iterator[tuple[str, float, int]]:
    for row in rows:
        for key, value in _numbers(row).items():
            if key != "step":
                yield f"train/{key}", value, row["step"]


def _eval_scalars(manifest: dict[str, Any]) -> dict[str, float]:
    """`eval/<model>/<metric>` for base/new/champion and `eval/diff/<metric>/<key>`."""
    metrics = manifest.get("stages", {}).get("evaluate", {}).get("outputs", {}).get("metrics") or {}
    out = {f"eval/{model}/{k}": v for model, m in (metrics.get("models") or {}).items()
           for k, v in _numbers(m).items()}
    out.update({f"eval/diff/{metric}/{k}": v for metric, d in (metrics.get("diff") or {}).items()
                for k, v in _numbers(d).items()})
    return out


def _final_step(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    final = manifest.get("stages", {}).get("train", {}).get("outputs", {}).get("metrics") or {}
    steps = final.get("steps")
    return int(steps) if isinstance(steps, int | float) else max((r["step"] for r in rows), default=0)


def _report_path(manifest: dict[str, Any], run_dir: Path) -> Path | None:
    path = Path(manifest.get("report") or run_dir / "report.md")
    return path if path.is_file() else None


def _report_sections(text: str) -> list[tuple[str, str]]:
    """(slug, markdown) per `## ` section of the report; the header before them is `summary`."""
    sections, title, lines = [], "summary", []
    for line in text.splitlines():
        if line.startswith("## "):
            sections.append((title, "\n".join(lines).strip()))
            title, lines = re.sub(r"[^a-z0-9]+", "_", line[3:].lower()).strip("_"), []
        lines.append(line)
    sections.append((title, "\n".join(lines).strip()))
    return [(t, body) for t, body in sections if body]


# ----------------------------------------------------------------------------- TensorBoard

def write_tensorboard(manifest: dict[str, Any], run_dir: Path) -> Path:
    """Event files under `run_dir/tensorboard`: step scalars, eval scalars, the report as text."""
    from tensorboardX import SummaryWriter

    tb_dir = Path(run_dir) / "tensorboard"
    rows = _train_rows(manifest)
    step = _final_step(manifest, rows)
    writer = SummaryWriter(logdir=str(tb_dir))
    try:
        for tag, value, s in _step_scalars(rows):
            writer.add_scalar(tag, value, s)
        for tag, value in _eval_scalars(manifest).items():
            writer.add_scalar(tag, value, step)
        report = _report_path(manifest, run_dir)
        for slug, body in _report_sections(report.read_text()) if report else []:
            writer.add_text(f"report/{slug}", body, step)
    finally:
        writer.close()
    return tb_dir


# ----------------------------------------------------------------------------- MLflow plumbing

def mlflow_enabled(config: PipelineConfig) -> bool:
    return config.tracking.mlflow is not None or bool(os.environ.get(ENV_URI))


def check_tracking(config: PipelineConfig) -> None:
    """Before any stage runs: MLflow asked for but not installed is a config error (exit 2)."""
    if mlflow_enabled(config):
        _import_mlflow(config)


def _import_mlflow(config: PipelineConfig):
    try:
        import mlflow
    except ImportError as e:
        why = "tracking.mlflow is set" if config.tracking.mlflow is not None else f"${ENV_URI} is set"
        raise ConfigError(f"{why} but MLflow is not installed ({e}): pip install 'loraflow[mlflow]', "
                          f"or remove tracking.mlflow and unset {ENV_URI}") from None
    return mlflow


class _Mlflow:
    """An MlflowClient on the configured URI and experiment; every call's failure names the URI."""

    def __init__(self, config: PipelineConfig):
        mlflow = _import_mlflow(config)
        section = config.tracking.mlflow
        self.uri = (section.tracking_uri if section else None) or os.environ.get(ENV_URI) or mlflow.get_tracking_uri()
        self.experiment = section.experiment if section else "loraflow"
        self.model = (section.registered_model if section else None) or config.registry.name
        self.errors = (mlflow.exceptions.MlflowException, OSError)
        self.client = self.call(mlflow.MlflowClient, tracking_uri=self.uri)
        self.experiment_id = self.call(self._experiment_id)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self.errors as e:
            raise TrackingError(f"MLflow at {self.uri}: {e}") from e

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment)
            except self.errors[0] as e:  # created meanwhile by another run
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {self.experiment!r} at {self.uri} is deleted: restore it "
                                "or set tracking.mlflow.experiment to another name")
        return exp.experiment_id

    def run_for(self, loraflow_run_id: str) -> str:
        """The MLflow run of a loraflow run, found by its tag or created. A created run is marked
        FINISHED at once (it may be an old run's, mirrored for its adapter); `log_mlflow`, the last
        word on the current run, sets its final status."""
        found = self.client.search_runs([self.experiment_id], max_results=1,
                                        filter_string=f"tags.`loraflow.run_id` = '{loraflow_run_id}'")
        if found:
            return found[0].info.run_id
        try:  # run ids start with their UTC start time (pipeline.new_run_id)
            start = calendar.timegm(time.strptime(loraflow_run_id[:15], "%Y%m%d-%H%M%S"))
        except ValueError:
            start = time.time()
        run = self.client.create_run(self.experiment_id, run_name=loraflow_run_id, start_time=int(start * 1000),
                                     tags={"loraflow.run_id": loraflow_run_id})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_adapter(self, run_id: str, local_dir: Path) -> str:
        """Upload the adapter folder once as the run's `adapter/`; return its artifact URI. An upload
        that was cut short (some files missing) is completed, not taken as done."""
        uploaded = {Path(f.path).name: f.file_size for f in self.client.list_artifacts(run_id, "adapter")}
        local = {f.name: f.stat().st_size for f in local_dir.iterdir() if f.is_file()}
        if any(uploaded.get(name) != size for name, size in local.items()):
            self.client.log_artifacts(run_id, str(local_dir), "adapter")
        return self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/adapter"


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(f"{prefix}.{k}" if prefix else str(k), v)
    elif value is not None:
        yield prefix, value


def config_params(config: PipelineConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, JSON-ish values, None left out."""
    params = {}
    for key, value in _flat("", config.model_dump(mode="json")):
        text = value if isinstance(value, str) else json.dumps(value)
        params[_BAD_KEY.sub("_", key)[:250]] = text[:_PARAM_MAX]
    return params


# ----------------------------------------------------------------------------- MLflow: the run

def _log_scalars(ml: _Mlflow, run_id: str, config: PipelineConfig, manifest: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    rows = _train_rows(manifest)
    step = _final_step(manifest, rows)
    metrics = [Metric(k, v, now, s) for k, v, s in _step_scalars(rows)]
    metrics += [Metric(k, v, now, step) for k, v in _eval_scalars(manifest).items()]
    params = [Param(k, v) for k, v in config_params(config).items()]
    tags = [RunTag(f"loraflow.stage.{n}", s.get("status", "")) for n, s in manifest.get("stages", {}).items()]
    tags += [RunTag("loraflow.version", str(manifest.get("loraflow_version"))),
             RunTag("loraflow.config_file", str(manifest.get("config_file")))]
    if manifest.get("error"):
        tags.append(RunTag("loraflow.error", str(manifest["error"])[:_TAG_MAX]))
    for i in range(0, max(len(params), 1), 100):  # MLflow: at most 100 params and 1000 entities a call
        ml.call(ml.client.log_batch, run_id, params=params[i:i + 100], tags=tags if i == 0 else [])
    for i in range(0, len(metrics), 1000):
        ml.call(ml.client.log_batch, run_id, metrics=metrics[i:i + 1000])


def _log_files(ml: _Mlflow, run_id: str, manifest: dict[str, Any], run_dir: Path) -> None:
    stages = manifest.get("stages", {})
    ev = stages.get("evaluate", {}).get("outputs", {}).get("metrics")
    if ev:
        ml.call(ml.client.log_dict, run_id, ev, "metrics.json")
    report = _report_path(manifest, run_dir)
    files = [run_dir / "manifest.json", *([report, *sorted(report.parent.glob("*.png"))] if report else [])]
    for path in files:
        if path.is_file():
            ml.call(ml.client.log_artifact, run_id, str(path))
    adapter = stages.get("train", {}).get("outputs", {}).get("adapter")
    if adapter:
        with AdapterFiles.read(adapter).materialized() as local:
            ml.call(ml.log_adapter, run_id, local)


def log_mlflow(config: PipelineConfig, manifest: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Record a loraflow run as an MLflow run (and mirror its registration); see the module doc."""
    ml = _Mlflow(config)
    run_id = ml.call(ml.run_for, manifest["run_id"])
    _log_scalars(ml, run_id, config, manifest)
    _log_files(ml, run_id, manifest, Path(run_dir))
    out: dict[str, Any] = {"tracking_uri": ml.uri, "experiment_id": ml.experiment_id, "run_id": run_id}
    reg = manifest.get("stages", {}).get("register", {}).get("outputs", {})
    registry = Registry.existing(config.registry.root) if reg.get("version") else None
    if registry is not None:  # idempotent: repairs a mirror an earlier failure or crash left undone
        out["registered_model"] = mirror_registration(config, registry, reg["name"], int(reg["version"]), ml)
    status = "FAILED" if manifest.get("error") else "FINISHED"
    end = int(manifest.get("finished", time.time()) * 1000)
    ml.call(ml.client.set_terminated, run_id, status, end)
    return out


# ----------------------------------------------------------------------------- MLflow: the registry

def _mirror_version(ml: _Mlflow, registry: Registry, ref: str) -> str:
    """The MLflow model version of loraflow `ref` (`name:n`), created once: found by its tags (ref and
    content, so another registry's `name:n` mirrored into the same MLflow model is not taken for it)."""
    av = registry.get(ref)
    query = (f"name='{ml.model}' and tag.`loraflow.ref` = '{ref}' "
             f"and tag.`loraflow.content_sha256` = '{av.content_sha256}'")
    found = ml.client.search_model_versions(query)
    if found:
        return str(min(int(v.version) for v in found))
    run_id = ml.run_for(av.lineage.get("run_id") or f"registry:{ref}")  # the run that made it, if any
    source = ml.log_adapter(run_id, av.path)
    tags = {"loraflow.ref": ref, "loraflow.version": str(av.version), "loraflow.content_sha256": av.content_sha256,
            "loraflow.registry_root": str(registry.root)}
    mv = ml.client.create_model_version(ml.model, source, run_id=run_id, tags=tags,
                                        description=f"loraflow {ref} (registry {registry.root})")
    versions = sorted(int(v.version) for v in ml.client.search_model_versions(query))
    if versions and versions[0] != int(mv.version):  # another writer created it meanwhile: keep theirs
        ml.client.delete_model_version(ml.model, mv.version)
        return str(versions[0])
    return str(mv.version)


def _mirror(ml: _Mlflow, registry: Registry, name: str, version: int | None, alias: str) -> dict[str, Any]:
    try:
        ml.client.create_registered_model(ml.model, tags={"loraflow.registry": name},
                                          description=f"mirror of the loraflow registry {registry.root}, {name}")
    except ml.errors[0] as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    out: dict[str, Any] = {"name": ml.model}
    if version is not None:
        out["version"] = _mirror_version(ml, registry, f"{name}:{version}")
    holder = registry.aliases(name).get(alias)
    current = ml.client.get_registered_model(ml.model).aliases.get(alias)
    target = _mirror_version(ml, registry, f"{name}:{holder}") if holder is not None else None
    if target is None and current is not None:
        ml.client.delete_registered_model_alias(ml.model, alias)
    elif target is not None and str(current) != target:
        ml.client.set_registered_model_alias(ml.model, alias, target)
    out["aliases"] = {alias: target}
    return out


def mirror_registration(config: PipelineConfig, registry: Registry, name: str, version: int | None = None,
                        _ml: _Mlflow | None = None) -> dict[str, Any] | None:
    """Mirror a registered loraflow version and the registry alias (`config.registry.alias`) to MLflow.

    Creates the MLflow registered model (`tracking.mlflow.registered_model`, else `registry.name`) if
    needed and a model version for `name:version` unless one tagged `loraflow.ref=name:version`
    exists; then points the MLflow alias at the version mirroring the registry's current holder
    (mirrored on the spot if it never was), or deletes it when the registry has no holder.
    `version=None` mirrors the alias only (after a `promote` or `rollback` outside a run).
    Returns {"name", "version"?, "aliases": {alias: mlflow version or None}}, or None when MLflow
    tracking is off. Raises TrackingError when MLflow fails; calling again repairs it.
    """
    if _ml is None and not mlflow_enabled(config):
        return None
    ml = _ml or _Mlflow(config)
    return ml.call(_mirror, ml, registry, name, version, config.registry.alias)


# ----------------------------------------------------------------------------- the entry point

def log_run(config: PipelineConfig, manifest: dict[str, Any], run_dir: Path, log: Log | None = None) -> dict[str, Any]:
    """Record a finished or failed run: TensorBoard (a failure only warns) then MLflow (raises).

    Returns what was written, for the manifest: {"tensorboard": dir} or {"tensorboard_error": msg},
    and {"mlflow": {"tracking_uri", "experiment_id", "run_id", "registered_model"?}} when on.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out: dict[str, Any] = {}
    if config.tracking.tensorboard:
        try:
            out["tensorboard"] = str(write_tensorboard(manifest, Path(run_dir)))
        except Exception as e:  # noqa: BLE001 - the run's records are on disk; TensorBoard is a view
            out["tensorboard_error"] = f"{type(e).__name__}: {e}"
            log(f"[tracking] warning: TensorBoard event files not written: {out['tensorboard_error']}")
    if mlflow_enabled(config):
        out["mlflow"] = log_mlflow(config, manifest, Path(run_dir))
        log(f"[tracking] MLflow run {out['mlflow']['run_id']} at {out['mlflow']['tracking_uri']}")
    return out
