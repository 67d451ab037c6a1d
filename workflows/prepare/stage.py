"""The prepare stage: raw data in, tokenized training-ready Parquet shards out, via Ray Data.

One streaming pass does all the per-row work:

    read (numbered raw records, workflows/sources.py)
      -> EncodeExamples   actor pool: validate, render, tokenize, mask, split by content hash
      -> MarkDuplicates   one actor: exact duplicates by content hash
      -> TokenizedShardWriter  routes rows to rejects/ eval/ train/, packs train, summarises

The driver plans, adds up the writers' summaries, checks the reject fraction, and finalises the
splits file by file (label ids, the eval cap, at least `num_shards` shards), then writes the
manifest. Memory stays flat as the input grows: nothing holds more than one write bundle.

Determinism: the datasets run with `preserve_order` and read blocks have fixed sizes, so every
write bundle (and thus every packing window) is the same slice of the same stream on every run;
`rows_digest` (order-independent, over row contents) shows it.

Layout and manifest keys: docs/artifacts.md.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from workflows import __version__
from workflows.artifacts import atomic_write_json, stage_output
from workflows.config import PipelineConfig
from workflows.models import load_tokenizer, tokenizer_fingerprint
from workflows.prepare.encode import EncodeExamples, MarkDuplicates
from workflows.prepare.formats import ExampleEncoder
from workflows.prepare.inputs import input_digest, input_files
from workflows.prepare.read_records import RecordsDatasource
from workflows.prepare.shard_writer import TokenizedShardWriter, finalize_splits
from workflows.prepare.stats import label_vocabulary, merge_summaries, token_summary
from workflows.prepared import PreparedData


class PrepareError(RuntimeError):
    """The data cannot make a usable training set (e.g. too many rejected rows)."""


def task_of(config: PipelineConfig) -> str:
    return "seq_cls" if config.data.format == "classification" else "causal_lm"


def _check_config(config: PipelineConfig) -> None:
    task = task_of(config)
    if config.model.task != task:
        raise ValueError(f"data.format {config.data.format!r} needs model.task {task!r}, "
                         f"but the config has model.task {config.model.task!r}")
    if config.data.pack and task == "seq_cls":
        raise ValueError("data.pack: true is for causal LM formats; classification rows are never packed")


def _ordered(ds: Any) -> Any:
    ds.context.execution_options.preserve_order = True
    return ds


def _check_reject_fraction(stats: dict[str, Any], max_fraction: float, rejects: Path, keep_at: Path) -> None:
    read, rejected = stats["counts"]["rows_read"], stats["counts"].get("reject", 0)
    if read == 0:
        raise PrepareError("the data sources hold no rows")
    if rejected / read <= max_fraction:
        return
    shutil.rmtree(keep_at, ignore_errors=True)
    shutil.move(str(rejects), str(keep_at))  # outside the stage dir, which is discarded on failure
    top = sorted(stats["reasons"].items(), key=lambda kv: -kv[1])[:5]
    lines = "\n".join(f"  {reason}: {n} (e.g. {stats['examples'][reason]})" for reason, n in top)
    raise PrepareError(
        f"{rejected} of {read} rows ({rejected / read:.1%}) were rejected, more than data.max_reject_fraction "
        f"= {max_fraction:g}. Top reasons:\n{lines}\nEvery rejected row (source file, row, reason) is in "
        f"{keep_at}/ (Parquet). Fix the data or the field mapping (data.fields), or raise the threshold.")


def _write_shards(config: PipelineConfig, files: dict[str, list[tuple[str, str]]], task: str, root: Path,
                  packed: bool) -> list[dict[str, Any]]:
    """The one streaming pass; returns the write tasks' summaries (see shard_writer)."""
    data = config.data
    parts = [_ordered(ray.data.read_datasource(RecordsDatasource(entries, origin)))
             for origin, entries in files.items() if entries]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if data.max_rows is not None:
        ds = ds.limit(data.max_rows)
    ds = ds.map_batches(
        EncodeExamples, fn_constructor_args=(config.model.name, config.section("data"), task,
                                             data.eval_source is not None),
        batch_format="pyarrow", batch_size=data.batch_size,
        compute=ray.data.ActorPoolStrategy(size=data.tokenize_actors), num_cpus=1)
    if data.dedupe:
        ds = ds.map_batches(MarkDuplicates, batch_format="pyarrow", batch_size=None,
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    writer = TokenizedShardWriter(root, task, packed, data.max_seq_len)
    # The writes are pinned to the driver's node (the stage directory is local there). A cluster's
    # head usually offers no CPUs (cluster/kuberay: num-cpus "0") and a job's driver runs on the
    # head, so the write tasks must not reserve one: Ray would refuse to schedule them there.
    ds.write_datasink(writer, ray_remote_args={"num_cpus": 0})
    return writer.results


def run_prepare(config: PipelineConfig, out_dir: str | Path) -> PreparedData:
    """Run the stage and commit `out_dir` (temp dir -> `_SUCCESS` -> rename). Uses the running
    Ray instance (or starts a local one). Raises PrepareError when too many rows are rejected;
    the rejects are then kept beside `out_dir` as `<name>.rejects/`."""
    _check_config(config)
    data, task, started = config.data, task_of(config), time.time()
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(config.model.name)
    # Fails here, in the driver, on a template/EOS problem instead of once per row in the actors.
    encoder = ExampleEncoder(tokenizer, data.format, data.max_seq_len, data.template, data.truncate)
    packed = task == "causal_lm" and data.pack is not False
    files = input_files(config)
    digest = input_digest(config)
    with stage_output(out_dir) as tmp:
        results = _write_shards(config, files, task, tmp, packed)
        stats = merge_summaries([r["summary"] for r in results], data.max_seq_len)
        _check_reject_fraction(stats, data.max_reject_fraction, tmp / "rejects",
                               out_dir.parent / f"{out_dir.name}.rejects")
        labels = label_vocabulary(stats["labels"]) if task == "seq_cls" else None
        shards, rows_digest = finalize_splits(tmp, results, task, labels, data.max_eval_rows,
                                              data.num_shards or max(2, config.train.num_workers))
        manifest = {
            "task": task, "format": data.format, "packed": packed, "max_seq_len": data.max_seq_len,
            "model_name": config.model.name, "label_names": labels,
            "template": "chat" if encoder.use_chat_template and data.format in ("instruction", "chat") else "plain",
            "tokenizer": {"name": config.model.name, "fingerprint": tokenizer_fingerprint(tokenizer),
                          "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
                          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
            "input_digest": digest,
            "input_files": {origin: [path for path, _ in entries] for origin, entries in files.items()},
            "rows_digest": rows_digest, "shards": shards,
            "schema": {split: {f.name: str(f.type) for f in pq.read_schema(tmp / shards[split][0])}
                       for split in ("train", "eval")},
            "loraflow_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config.section("data"),
        }
        manifest.update(_counts_and_tokens(stats, tmp, shards, packed, data.max_seq_len))
        manifest["seconds"] = round(time.time() - started, 2)
        atomic_write_json(tmp / "manifest.json", manifest)
    return PreparedData.load(out_dir)


def _counts_and_tokens(stats: dict[str, Any], root: Path, shards: dict[str, list[str]], packed: bool,
                       max_seq_len: int) -> dict[str, Any]:
    rows = {split: sum(pq.read_metadata(root / rel).num_rows for rel in files) for split, files in shards.items()}
    c = stats["counts"]
    counts = {"rows_read": c["rows_read"], "rejected": dict(sorted(stats["reasons"].items())),
              "rejected_total": c.get("reject", 0), "truncated": stats["truncated"],
              "deduplicated": c.get("duplicate", 0), "train_rows": c.get("train", 0),
              "eval_rows": rows["eval"], "eval_capped": c.get("eval", 0) - rows["eval"],
              "train_sequences": rows["train"], "packed_sequences": rows["train"] if packed else 0}
    tokens = {split: token_summary(stats["tokens"][split]) for split in ("train", "eval")}
    total = stats["tokens"]["train"]["total"]
    # Share of a (rows x max_seq_len) layout that is padding: what packing saves.
    tokens["padding_fraction"] = round(1 - total / (rows["train"] * max_seq_len), 4) if rows["train"] else 0.0
    return {"counts": counts, "tokens": tokens}


def summary_rows(prepared: PreparedData) -> list[tuple[str, str]]:
    """(label, value) pairs for the CLI's end-of-stage table."""
    m, c, t = prepared.manifest, prepared.manifest["counts"], prepared.manifest["tokens"]
    rejected = ", ".join(f"{k} {v}" for k, v in c["rejected"].items()) or "none"
    rows = [("output", str(prepared.root)), ("task / format", f"{m['task']} / {m['format']}"),
            ("rows read", f"{c['rows_read']:,}"), ("rejected", f"{c['rejected_total']:,} ({rejected})"),
            ("deduplicated", f"{c['deduplicated']:,}"), ("truncated", f"{c['truncated']:,}"),
            ("train examples", f"{c['train_rows']:,}"), ("eval examples", f"{c['eval_rows']:,}")]
    if m["packed"]:
        rows.append(("packed sequences", f"{c['packed_sequences']:,} (padding {t['padding_fraction']:.1%})"))
    rows += [("train tokens", f"{t['train']['total']:,} (mean {t['train']['mean']}, p95 {t['train']['p95']})"),
             ("shards", f"train {len(m['shards']['train'])}, eval {len(m['shards']['eval'])}"),
             ("rows digest", f"train {m['rows_digest']['train'][:12]}, eval {m['rows_digest']['eval'][:12]}")]
    if m.get("label_names"):
        rows.append(("labels", f"{len(m['label_names'])}"))
    return rows

