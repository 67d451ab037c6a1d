"""Which files a config reads, and a digest of their content: no Ray, no torch.

The DAG fingerprints the prepare stage with `input_digest`, and `loraflow retrain` compares it with
the champion's lineage to exit early, so this module stays cheap to import.

Hugging Face datasets are named `hf:<name>[@<revision>][:<config>][#<split>]`:

    hf:openai/gsm8k:main#train     a Hub dataset, config `main`, split `train`
    hf:data/my_dataset:main#test   a dataset folder (data files + a README.md with `configs:`),
                                   beside the config file or in the working directory
    hf:data/saved#validation       a folder written by `save_to_disk` (no config; `#split` picks
                                   one split of a DatasetDict)

The split defaults to `train`. By default the dataset is loaded (Hub datasets are downloaded and
prepared by `datasets`, once, into its cache) and its Arrow files are read and fingerprinted by
content. With `data.streaming: true` (hf: sources only) a Hub dataset or dataset folder is never
materialised: Ray Data streams it in one read task (`read_records.HfStreamDatasource`), and it is
fingerprinted without reading it: a folder by its split's data files and README.md, a Hub dataset
by the commit the Hub resolves its revision to (which the read then pins). A `save_to_disk` folder
is always read from its Arrow files. Dataset scripts are not supported (`datasets` 4+ refuses them).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from workflows.artifacts import canonical_json, is_uri, sha256_file_cached
from workflows.config import ConfigError, PipelineConfig

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")

class SourceError(ConfigError):
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


# ----------------------------------------------------------------------------- hf: sources

HF_STREAM = "hf-stream"  # the reader kind of a dataset read as a stream (`data.streaming: true`)
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HfSource:
    """A parsed `hf:<name>[@<revision>][:<config>][#<split>]` spec."""

    name: str  # a Hub id (`openai/gsm8k`), a dataset folder, or a `save_to_disk` folder
    config: str | None = None
    split: str | None = None
    revision: str | None = None

    @property
    def local(self) -> bool:
        return Path(self.name).expanduser().is_dir()

    @property
    def saved(self) -> bool:
        """A folder written by `Dataset(Dict).save_to_disk`."""
        root = Path(self.name).expanduser()
        return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()

    @property
    def spec(self) -> str:
        return (f"hf:{self.name}" + (f"@{self.revision}" if self.revision else "")
                + (f":{self.config}" if self.config else "") + (f"#{self.split}" if self.split else ""))


def parse_hf_spec(spec: str) -> HfSource:
    """`hf:openai/gsm8k:main#train` -> HfSource("openai/gsm8k", "main", "train"). The config follows
    the last ':' (a folder that exists keeps its ':'; `s3://` is no config), the revision the last
    '@' of a name that is not an existing path."""
    body = spec.removeprefix("hf:")
    target, _, split = body.rpartition("#") if "#" in body else (body, "", "")
    name, config, revision = target, None, None
    if not Path(target).expanduser().exists():
        head, colon, tail = target.rpartition(":")
        if colon and "/" not in tail:
            if not tail:
                raise SourceError(f"{spec}: empty config after ':' (hf:<name>[:<config>][#<split>])")
            name, config = head, tail
    if "@" in name and not Path(name).expanduser().exists():
        name, _, revision = name.rpartition("@")
    if not name:
        raise SourceError(f"{spec}: no dataset name (hf:<name>[:<config>][#<split>])")
    if split and "[" in split:
        raise SourceError(f"{spec}: split slicing ({split}) is not supported; use data.max_rows")
    return HfSource(name, config, split or None, revision or None)


def _locate(src: HfSource, base: Path) -> HfSource:
    """A relative folder is found beside the config file, then in the working directory; a name that
    is no folder is a Hub id."""
    path = Path(src.name).expanduser()
    for candidate in [path] if path.is_absolute() else [base / path, Path.cwd() / path]:
        if candidate.is_dir():
            return replace(src, name=str(candidate.resolve()))
    return src


def _hf_call(spec: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A `datasets` / `huggingface_hub` call whose failure names the spec."""
    from datasets.exceptions import DatasetsError

    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, RuntimeError, NotImplementedError, DatasetsError) as e:
        raise SourceError(f"{spec}: {type(e).__name__}: {e}") from e


def _saved_files(src: HfSource) -> list[str]:
    """A `save_to_disk` folder's Arrow files: only the named split's (default `train`) are loaded."""
    import datasets  # a second to import: only for hf: sources

    if src.config:
        raise SourceError(f"{src.spec}: {src.name} is a save_to_disk folder, which has no configs; "
                          f"drop ':{src.config}'")
    root = Path(src.name).expanduser()
    if (root / "dataset_dict.json").is_file():  # a DatasetDict: one subfolder per split
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        split = src.split or "train"
        if split not in splits:
            raise SourceError(f"{src.spec}: no split {split!r} (splits: {sorted(splits)})")
        ds = _hf_call(src.spec, datasets.load_from_disk, str(root / split))
    else:
        ds = _hf_call(src.spec, datasets.load_from_disk, str(root))
        if src.split and src.split != (ds.split and str(ds.split)):
            raise SourceError(f"{src.spec}: {src.name} holds one dataset (split: {ds.split}), not a "
                              f"DatasetDict; drop '#{src.split}'")
    return _arrow_files(src.spec, ds)


def _arrow_files(spec: str, ds: Any) -> list[str]:
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise SourceError(f"{spec}: the dataset has no Arrow files on disk to stream from")
    return files


def _loaded_files(src: HfSource) -> list[str]:
    """A Hub dataset or a dataset folder, loaded (downloaded and prepared once by `datasets`)."""
    import datasets

    src = replace(src, split=src.split or "train")
    _data_files(src)  # a wrong config or split fails here, before anything is downloaded
    ds = _hf_call(src.spec, datasets.load_dataset, src.name, src.config, split=src.split, revision=src.revision)
    return _arrow_files(src.spec, ds)


def _data_files(src: HfSource) -> dict[str, list[str]] | None:
    """`{split: data files}` of the config as `datasets` resolves them (nothing is downloaded)."""
    import datasets

    builder = _hf_call(src.spec, datasets.load_dataset_builder, src.name, src.config, revision=src.revision)
    files = builder.config.data_files
    if files and src.split not in files:
        raise SourceError(f"{src.spec}: no split {src.split!r} (splits: {sorted(files)})")
    return files


def _stream_files(src: HfSource) -> list[str]:
    """The data files a streamed split reads."""
    if not (files := _data_files(src)):
        raise SourceError(f"{src.spec}: no data files to stream (the dataset defines none)")
    return list(files[src.split])


def _hub_commit(src: HfSource) -> str:
    """The commit sha the Hub resolves `src.revision` (default: main) to: one API call, no data."""
    if src.revision and _COMMIT.fullmatch(src.revision):
        return src.revision
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(src.name, revision=src.revision).sha
    except Exception as e:  # offline, unreachable, no such dataset or revision, gated
        raise SourceError(
            f"{src.spec}: data.streaming reads this dataset from the Hugging Face Hub, and its fingerprint is "
            f"the commit the Hub resolves it to, which needs the Hub ({type(e).__name__}: {e}). Pin a commit "
            f"(hf:{src.name}@<40-hex sha>...) to plan offline, or use a local copy.") from e


def _pinned_stream(src: HfSource) -> str:
    """The canonical spec of a streamed split: its split named and, on the Hub, its commit pinned,
    so the read streams exactly what was fingerprinted."""
    src = replace(src, split=src.split or "train")
    if src.local:
        _stream_files(src)  # checks the config and the split now, not in a read task
        return src.spec
    return replace(src, revision=_hub_commit(src)).spec


def _expand_hf(spec: str, streaming: bool) -> list[tuple[str, str]]:
    """`(file, "arrow")` pairs of the dataset's Arrow files, or, streaming, one `(pinned spec,
    HF_STREAM)`. A save_to_disk folder is read from its Arrow files either way (it is on disk)."""
    src = parse_hf_spec(spec)
    if src.saved:
        return [(f, "arrow") for f in _saved_files(src)]
    if streaming:
        return [(_pinned_stream(src), HF_STREAM)]
    return [(f, "arrow") for f in _loaded_files(src)]


def open_stream(spec: str) -> Any:
    """The `datasets.IterableDataset` of a pinned streaming spec (what `_expand_hf` returned)."""
    import datasets

    src = parse_hf_spec(spec)
    return _hf_call(spec, datasets.load_dataset, src.name, src.config, split=src.split,
                    revision=src.revision, streaming=True)


def _stream_digest(spec: str) -> str:
    """A streamed dataset's identity without downloading it: on the Hub, its name, config, split and
    commit sha; a local dataset folder, the content digests of the split's data files and README.md
    (where its `configs:` live)."""
    src = parse_hf_spec(spec)
    if not src.local:
        return canonical_json(["hub", src.name, src.config, src.split, src.revision])
    readme = Path(src.name) / "README.md"
    digests = [file_digest(f) for f in _stream_files(src)] + ([file_digest(str(readme))] if readme.is_file() else [])
    return hashlib.sha256(canonical_json([src.config, src.split, digests]).encode()).hexdigest()


def _stream_size(spec: str) -> int:
    """Bytes of a streamed split's data files as stored (local stat, or the Hub's file sizes)."""
    import fsspec

    total = 0
    for f in _stream_files(parse_hf_spec(spec)):
        fs, path = fsspec.core.url_to_fs(f)
        total += fs.size(path) or 0
    return total


def expand_sources(specs: str | list[str], reader: str, streaming: bool = False) -> list[tuple[str, str]]:
    """Resolved sources -> sorted `(file, reader kind)` pairs. Sources must already be resolved
    (`input_files`); `hf:` and `reader: hf` go through `datasets`, and with `streaming` a Hub dataset
    or dataset folder becomes one `(pinned spec, HF_STREAM)` pair."""
    files: list[tuple[str, str]] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        if spec.startswith("hf:") or reader == "hf":
            files += _expand_hf(spec if spec.startswith("hf:") else f"hf:{spec}", streaming)
        elif streaming:
            raise SourceError(f"data.streaming: true reads hf: sources only, and {spec!r} is a file source; "
                              f"set data.streaming: false (files are read as streams anyway)")
        elif is_uri(spec):
            files += [(f, _reader_for(f, reader)) for f in _expand_remote(spec)]
        else:
            files += [(f, _reader_for(f, reader)) for f in _expand_local(spec)]
    return sorted(set(files))


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """What identifies a file's content, without streaming it through the driver when avoidable.

    Local: its sha256, cached across processes by path, size, mtime and inode (read once while
    unchanged). Object store: the size and the ETag (or checksum) the store keeps for the object,
    from one HEAD request: a new upload changes the ETag, and no byte of data is downloaded. A store
    that reports neither is read and hashed.
    """
    if not is_uri(path):
        return sha256_file_cached(path)
    fs, root = pafs.FileSystem.from_uri(path)
    with fs.open_input_file(root) as f:  # a HEAD request; nothing is read until asked
        meta = {k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in (f.metadata() or {}).items()}
        tag = next((meta[k] for k in ("x-amz-checksum-sha256", "etag", "md5", "crc32c") if meta.get(k)), None)
        if tag:
            return f"{tag.strip(chr(34))}:{f.size()}"
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- what a config reads


def input_files(config: PipelineConfig) -> dict[str, list[tuple[str, str]]]:
    """`{"train": [(file, reader)], "eval": [...]}` with every source resolved and expanded."""
    data = config.data
    base = Path(config.source_path).parent if config.source_path else Path.cwd()

    def resolve_one(spec: str) -> str:
        if spec.startswith("hf:") or data.reader == "hf":
            return _locate(parse_hf_spec(spec if spec.startswith("hf:") else f"hf:{spec}"), base).spec
        return config.resolve_path(spec)

    def resolve(spec: str | list[str] | None) -> list[str]:
        specs = [] if spec is None else [spec] if isinstance(spec, str) else spec
        return [resolve_one(s) for s in specs]

    files = {"train": expand_sources(resolve(data.source), data.reader, data.streaming), "eval": []}
    if data.eval_source is not None:
        files["eval"] = expand_sources(resolve(data.eval_source), data.reader, data.streaming)
    return files


def input_digest(config: PipelineConfig) -> str:
    """sha256 over the content identity of every input file (`file_digest`), with its role and reader;
    a streamed dataset counts by `_stream_digest` (nothing is downloaded).

    Paths and mtimes are left out: renaming or touching a file does not invalidate the stage,
    changing one byte does. Order is the sorted path order.
    """
    parts = [(origin, kind, _stream_digest(path) if kind == HF_STREAM else file_digest(path))
             for origin, entries in input_files(config).items() for path, kind in entries]
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def input_size(files: dict[str, list[tuple[str, str]]]) -> int:
    """Total bytes of the input files (as stored: compressed files count compressed)."""
    total = 0
    for entries in files.values():
        for path, kind in entries:
            if kind == HF_STREAM:
                total += _stream_size(path)
                continue
            fs, root = pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path)
            total += fs.get_file_info(root).size or 0
    return total
