"""The prepare stage: raw data in, tokenized training-ready Parquet shards out, via Ray Data.

Two distributed passes, neither of which brings rows to the driver:

    1. read (numbered raw records, `read_records`)
         -> EncodeExamples        actor pool: validate, render, tokenize, mask, split by content hash
         -> BucketedShardWriter   write tasks on any node: rejects/, and train/eval rows staged in
                                  buckets by a hash of their content id (`shard_writer`)
    2. one task per bucket        dedupe, seeded order, pack, final shards (`finalize`)

The driver plans, adds up the small summaries the tasks return, checks the reject fraction, caps
eval, and writes the manifest. Every file is written by the task that made it, straight to the
stage's output: a temp folder renamed into place for a local work directory, the final prefix of
an object store (committed by `_SUCCESS`, uploaded last). Memory stays flat as the input grows:
a write task holds one bundle, a bucket task one bucket, and the bucket count grows with the input.

Determinism: a row's bucket and its place in the final order are functions of its content (and
`data.seed`) only, so the output is the same whatever the parallelism or the arrival order;
`rows_digest` (order-independent, over row contents) shows it. Only `data.max_rows` (the first N
rows of the input) needs the read in file order.

Layout and manifest keys: docs/artifacts.md.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import ray

from workflows import __version__, storage
from workflows.artifacts import UserError, redact
from workflows.config import PipelineConfig
from workflows.heads import task_of_format
from workflows.models import load_tokenizer, tokenizer_fingerprint
from workflows.prepare.encode import EncodeExamples
from workflows.prepare.finalize import BucketPlan, cap_eval, finalize_bucket, write_empty
from workflows.prepare.formats import ExampleEncoder
from workflows.prepare.inputs import input_digest, input_files, input_size
from workflows.prepare.read_records import read_datasets
from workflows.prepare.shard_writer import BucketedShardWriter, merge_summaries
from workflows.prepare.stats import combine_digests, label_vocabulary, merge_tokens, token_summary
from workflows.prepared import PreparedData
from workflows.token_tags import tag_vocabulary, types_of

BUCKET_INPUT_BYTES = 64 * 2**20  # raw input per bucket: what bounds a bucket task's memory


class PrepareError(UserError, RuntimeError):
    """The data cannot make a usable training set (e.g. too many rejected rows)."""


def task_of(config: PipelineConfig) -> str:
    return task_of_format(config.data.format)


def _check_config(config: PipelineConfig) -> None:
    task = task_of(config)
    if config.model.task != task:
        raise ValueError(f"data.format {config.data.format!r} needs model.task {task!r}, "
                         f"but the config has model.task {config.model.task!r}")
    if config.data.pack and task != "causal_lm":
        raise ValueError("data.pack: true is for causal LM formats; classification rows are never packed")


def _check_reject_fraction(stats: dict[str, Any], max_fraction: float, root: str, keep_at: str) -> None:
    read, rejected = stats["counts"]["rows_read"], stats["counts"].get("reject", 0)
    if read == 0:
        raise PrepareError("the data sources hold no rows")
    if rejected / read <= max_fraction:
        return
    storage.move_dir(storage.join(root, "rejects"), keep_at)  # the stage's output is discarded
    top = sorted(stats["reasons"].items(), key=lambda kv: -kv[1])[:5]
    lines = "\n".join(f"  {reason}: {n} (e.g. {stats['examples'][reason]})" for reason, n in top)
    raise PrepareError(
        f"{rejected} of {read} rows ({rejected / read:.1%}) were rejected, more than data.max_reject_fraction "
        f"= {max_fraction:g}. Top reasons:\n{lines}\nEvery rejected row (source file, row, reason) is in "
        f"{keep_at}/ (Parquet). Fix the data or the field mapping (data.fields), or raise the threshold.")


def _check_input_unchanged(config: PipelineConfig, planned_digest: str | None) -> str:
    """The input's digest after reading; a PrepareError (nothing committed) when it is not the one
    the plan fingerprinted: the rows read may mix old and new data, under the old data's key."""
    digest = input_digest(config)
    if planned_digest is not None and digest != planned_digest:
        raise PrepareError(f"the input data changed while prepare read it (digest {planned_digest[:12]} when the "
                           f"run was planned, {digest[:12]} after reading {config.data.source}); nothing was "
                           "committed: rerun once the data stops changing")
    return digest


def num_buckets(config: PipelineConfig, files: dict[str, list[tuple[str, str]]]) -> int:
    """At least `data.num_shards` (default: the train workers, at least 2), more for large inputs."""
    data = config.data
    least = data.num_shards or max(2, config.train.num_workers)
    return max(least, math.ceil(input_size(files) / BUCKET_INPUT_BYTES))


def _encode_and_stage(config: PipelineConfig, files: dict[str, list[tuple[str, str]]], task: str, root: str,
                      buckets: int) -> list[dict[str, Any]]:
    """Pass 1; returns the write tasks' summaries."""
    data = config.data
    # Files in one datasource per origin; a streamed HF dataset (data.streaming) in its own.
    # `data.max_rows` takes the first N records of each origin (source, eval_source): a limit on the
    # union would leave an eval_source read after the training data without a row.
    parts = []
    for origin, entries in files.items():
        reads = read_datasets(entries, origin, data.max_rows)
        if not reads:  # an origin without files (no eval_source)
            continue
        part = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
        if data.max_rows is not None:  # the first N records: only then does the read order matter
            part.context.execution_options.preserve_order = True
            part = part.limit(data.max_rows)
        parts.append(part)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if data.max_rows is not None:
        ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(EncodeExamples, fn_constructor_args=(config.model.name, data, task, config.model.revision),
                        batch_format="pyarrow", batch_size=data.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=data.tokenize_actors), num_cpus=1)
    writer = BucketedShardWriter(root, task, buckets)
    # No CPU reserved: a cluster's head usually offers none (cluster/kuberay: num-cpus "0"), and the
    # writes are I/O that must not wait behind the encoding actors.
    ds.write_datasink(writer, ray_remote_args={"num_cpus": 0})
    return writer.results


def _finalize(plan: BucketPlan, buckets: int, max_eval_rows: int | None) -> list[dict[str, Any]]:
    """Pass 2, then the eval cap: the first `max_eval_rows` eval rows of the seeded order."""
    task = ray.remote(num_cpus=1)(finalize_bucket)
    results = ray.get([task.remote(plan, b) for b in range(buckets)])
    eval_keys = sorted(k for r in results for k in r["eval_keys"])
    if max_eval_rows is not None and len(eval_keys) > max_eval_rows:
        threshold = eval_keys[max_eval_rows - 1]
        cap = ray.remote(num_cpus=1)(cap_eval)
        capped = {c["bucket"]: c for c in ray.get([cap.remote(plan, r["bucket"], threshold)
                                                    for r in results if r["rows"].get("eval")])}
        for r in results:
            if r["bucket"] in capped:
                r["rows"]["eval"], r["digests"]["eval"] = capped[r["bucket"]]["rows"], capped[r["bucket"]]["digest"]
    return results


def run_prepare(config: PipelineConfig, out: str, planned_digest: str | None = None,
                before_commit: Callable[[], None] | None = None) -> PreparedData:
    """Run the stage and commit its output at `out` (a local path or a store URI). Uses the running
    Ray instance. Raises PrepareError when too many rows are rejected (the rejects are then kept
    beside `out` as `<out>.rejects/`), or when the input's digest after reading is not
    `planned_digest`, the one the stage's fingerprint holds (the data changed under the run).
    `before_commit` runs right before the commit (the run lease's check)."""
    _check_config(config)
    data, task, started = config.data, task_of(config), time.time()
    tokenizer = load_tokenizer(config.model.name, revision=config.model.revision)
    # Fails here, in the driver, on a template/EOS problem instead of once per row in the actors.
    encoder = ExampleEncoder(tokenizer, data.format, data.max_seq_len, data.template, data.truncate)
    packed = task == "causal_lm" and data.pack is not False
    files = input_files(config)
    buckets = num_buckets(config, files)
    with storage.committed_dir(out, before_commit) as root:
        summaries = _encode_and_stage(config, files, task, root, buckets)
        digest = _check_input_unchanged(config, planned_digest)
        stats = merge_summaries(summaries)
        _check_reject_fraction(stats, data.max_reject_fraction, root, f"{str(out).rstrip('/')}.rejects")
        labels = (label_vocabulary(stats["labels"]) if task == "seq_cls" else
                  tag_vocabulary(types_of(data.labels or sorted(stats["labels"]))) if task == "token_cls" else None)
        validation = config.section("data").get("validation_fraction", 0.0)  # a sweep's config only
        splits = ("train", "eval", "validation") if validation else ("train", "eval")
        plan = BucketPlan(root, task, packed, data.max_seq_len, data.seed, data.dedupe, labels, data.label_all_tokens,
                          validation)
        results = _finalize(plan, buckets, data.max_eval_rows)
        storage.delete_dir(storage.join(root, "_staging"))
        shards = _shards(root, task, results, splits)
        manifest = {
            "task": task, "format": data.format, "packed": packed, "max_seq_len": data.max_seq_len,
            "model_name": config.model.name, "label_names": labels,
            "template": "chat" if encoder.use_chat_template and data.format in ("instruction", "chat") else "plain",
            "tokenizer": {"name": config.model.name, "fingerprint": tokenizer_fingerprint(tokenizer),
                          "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
                          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
            "input_digest": digest,
            "input_files": {origin: [path for path, _ in entries] for origin, entries in files.items()},
            "rows_digest": {split: combine_digests([r["digests"][split] for r in results if split in r["digests"]
                                                    and r["rows"].get(split)], "|".join(labels or []))
                            for split in splits},
            "shards": shards, "buckets": buckets, "seed": data.seed,
            "schema": {split: storage.parquet_schema(storage.join(root, shards[split][0])) for split in splits},
            "loraflow_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config.section("data"),
        }
        manifest.update(_counts_and_tokens(stats, results, packed, data.max_seq_len))
        if validation:  # carved out of the train rows: train_rows counts what is left
            manifest["counts"]["validation_rows"] = sum(r["rows"].get("validation", 0) for r in results)
        manifest["seconds"] = round(time.time() - started, 2)
        storage.write_json(redact(manifest), storage.join(root, "manifest.json"))
    return PreparedData.load(out)


def _shards(root: str, task: str, results: list[dict[str, Any]], splits: tuple[str, ...]) -> dict[str, list[str]]:
    shards: dict[str, list[str]] = {}
    for split in splits:
        shards[split] = [f"{split}/part-{r['bucket']:05d}.parquet" for r in results if r["rows"].get(split)]
        if not shards[split]:
            shards[split] = [write_empty(root, task, split)]
    fs, rejects = storage.resolve(storage.join(root, "rejects"))
    shards["rejects"] = sorted(f"rejects/{name}" for name in storage.list_files(fs, rejects))
    return shards


def _counts_and_tokens(stats: dict[str, Any], results: list[dict[str, Any]], packed: bool,
                       max_seq_len: int) -> dict[str, Any]:
    c = stats["counts"]
    rows = {split: sum(r["rows"].get(split, 0) for r in results) for split in ("train", "eval")}
    examples = {split: sum(r["examples"].get(split, 0) for r in results) for split in ("train", "eval")}
    counts = {"rows_read": c["rows_read"], "rejected": dict(sorted(stats["reasons"].items())),
              "rejected_total": c.get("reject", 0), "truncated": sum(r["truncated"] for r in results),
              "deduplicated": sum(r["duplicates"] for r in results), "train_rows": examples["train"],
              "eval_rows": rows["eval"], "eval_capped": examples["eval"] - rows["eval"],
              "train_sequences": rows["train"], "packed_sequences": rows["train"] if packed else 0}
    tokens = {split: token_summary(merge_tokens([r["tokens"][split] for r in results if split in r["tokens"]],
                                                max_seq_len)) for split in ("train", "eval")}
    # Share of the packed (rows x max_seq_len) layout that is padding: what packing leaves.
    total = tokens["train"]["total"]
    tokens["padding_fraction"] = round(1 - total / (rows["train"] * max_seq_len), 4) if packed and rows["train"] else None
    return {"counts": counts, "tokens": tokens}


def summary_rows(prepared: PreparedData) -> list[tuple[str, str]]:
    """(label, value) pairs for the CLI's end-of-stage table."""
    m, c, t = prepared.manifest, prepared.manifest["counts"], prepared.manifest["tokens"]
    rejected = ", ".join(f"{k} {v}" for k, v in c["rejected"].items()) or "none"
    rows = [("output", str(prepared.root)), ("task / format", f"{m['task']} / {m['format']}"),
            ("rows read", f"{c['rows_read']:,}"), ("rejected", f"{c['rejected_total']:,} ({rejected})"),
            ("deduplicated", f"{c['deduplicated']:,}"), ("truncated", f"{c['truncated']:,}"),
            ("train examples", f"{c['train_rows']:,}"), ("eval examples", f"{c['eval_rows']:,}")]
    if "validation_rows" in c:
        rows.append(("validation examples", f"{c['validation_rows']:,} (carved from train, for tune)"))
    if m["packed"]:
        rows.append(("packed sequences", f"{c['packed_sequences']:,} (padding {t['padding_fraction']:.1%})"))
    rows += [("train tokens", f"{t['train']['total']:,} (mean {t['train']['mean']}, p95 {t['train']['p95']})"),
             ("shards", f"train {len(m['shards']['train'])}, eval {len(m['shards']['eval'])}"),
             ("rows digest", f"train {m['rows_digest']['train'][:12]}, eval {m['rows_digest']['eval'][:12]}")]
    if m.get("label_names"):
        rows.append(("labels", f"{len(m['label_names'])}"))
    return rows
