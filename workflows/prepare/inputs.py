"""Which files a config reads, and a digest of their content: no Ray, no torch.

The DAG fingerprints the prepare stage with `input_digest`, and `loraflow retrain` compares it with
the champion's lineage to exit early, so this module stays cheap to import.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

import pyarrow.fs as pafs

from workflows.artifacts import canonical_json, is_uri, sha256_file_cached
from workflows.config import PipelineConfig

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")

class SourceError(ValueError):
    """A data source that cannot be read at all (missing path, unknown format)."""


def uncompressed_name(path: str) -> str:
    """`path` lower-cased without a compression suffix: `rows.tsv.bz2` -> `rows.tsv`."""
    name = path.lower()
    for ext in COMPRESSION_SUFFIXES:
        name = name.removesuffix(ext)
    return name


def _reader_for(path: str, reader: str) -> str:
    if reader != "auto":
        return reader
    kind = _EXTENSIONS.get(Path(uncompressed_name(path)).suffix)
    if kind is None:
        raise SourceError(f"{path}: cannot tell the format from the extension; set data.reader "
                          f"(one of jsonl, csv, parquet, hf)")
    return kind


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in Path(path).parts[-1:])


def _expand_local(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file() and _visible(str(p))]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise SourceError(f"data source {spec!r}: no such file, directory or glob match")
    return files


def _expand_remote(spec: str) -> list[str]:
    fs, root = pafs.FileSystem.from_uri(spec)
    info = fs.get_file_info(root)
    scheme = spec.split("://", 1)[0]
    if info.type == pafs.FileType.File:
        return [spec]
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"data source {spec!r} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File and _visible(i.path))


def _expand_hf(spec: str) -> list[str]:
    """`hf:<save_to_disk dir or hub name>[#split]` -> the dataset's Arrow files (streamed, never
    materialised). A DatasetDict uses split `train` unless `#split` names another."""
    import datasets  # a second to import: only for hf: sources

    target, _, split = spec.removeprefix("hf:").partition("#")
    if Path(target).expanduser().is_dir():
        ds = datasets.load_from_disk(str(Path(target).expanduser()))
    else:
        ds = datasets.load_dataset(target)
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise SourceError(f"{spec}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise SourceError(f"{spec}: the dataset has no Arrow files on disk to stream from")
    return files


def expand_sources(specs: str | list[str], reader: str) -> list[tuple[str, str]]:
    """Resolved sources -> sorted `(file, reader kind)` pairs. Sources must already be resolved
    (`PipelineConfig.resolve_path`); `hf:` and `reader: hf` go through `datasets`."""
    files: list[tuple[str, str]] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        if spec.startswith("hf:") or reader == "hf":
            files += [(f, "arrow") for f in _expand_hf(spec if spec.startswith("hf:") else f"hf:{spec}")]
        elif is_uri(spec):
            files += [(f, _reader_for(f, reader)) for f in _expand_remote(spec)]
        else:
            files += [(f, _reader_for(f, reader)) for f in _expand_local(spec)]
    return sorted(set(files))


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes: local files through the cross-process cache keyed by path, size,
    mtime and inode (read once while unchanged); URIs streamed through any pyarrow filesystem."""
    if not is_uri(path):
        return sha256_file_cached(path)
    h = hashlib.sha256()
    fs, root = pafs.FileSystem.from_uri(path)
    with fs.open_input_stream(root) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the datasource


def input_files(config: PipelineConfig) -> dict[str, list[tuple[str, str]]]:
    """`{"train": [(file, reader)], "eval": [...]}` with every source resolved and expanded."""
    data = config.data

    def resolve(spec: str | list[str] | None) -> list[str]:
        specs = [] if spec is None else [spec] if isinstance(spec, str) else spec
        return [config.resolve_path(s) for s in specs]

    files = {"train": expand_sources(resolve(data.source), data.reader), "eval": []}
    if data.eval_source is not None:
        files["eval"] = expand_sources(resolve(data.eval_source), data.reader)
    return files


def input_digest(config: PipelineConfig) -> str:
    """sha256 over the *content* of every input file (streamed), with its role and reader.

    Paths and mtimes are left out: renaming or touching a file does not invalidate the stage,
    changing one byte does. Order is the sorted path order, which is also the read order.
    """
    parts = [(origin, kind, file_digest(path)) for origin, entries in input_files(config).items()
             for path, kind in entries]
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()
