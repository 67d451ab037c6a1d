"""hf: sources as users name them (`hf:<name>[@<revision>][:<config>][#<split>]`): save_to_disk
folders, dataset folders with configs (data files + README `configs:`), `data.streaming`, and
planning without Ray. No network: tests/conftest.py sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.config import config_from_dict
from workflows.models import load_tokenizer
from workflows.prepare.inputs import HfSource, SourceError, input_digest, input_files, parse_hf_spec
from workflows.prepare.read_records import HfStreamDatasource, read_datasets
from workflows.prepare.stage import run_prepare

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"instruction": "question", "output": "answer"}
README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
- config_name: other
  data_files:
  - split: test
    path: other/test.jsonl
---
# A dataset folder in datasets' no-code layout: two configs, no script.
"""


def make_config(source, eval_source=None, **data):
    extra = {"eval_source": str(eval_source)} if eval_source else {}
    return config_from_dict({"model": {"name": "tiny-llama"},
                             "data": {"source": str(source), "format": "instruction", "fields": FIELDS,
                                      "max_seq_len": 1024, "max_reject_fraction": 0.2, **extra, **data}})


def rows(files, columns=None):
    return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]


def rejects(prepared):
    return {(r["source"], r["row"]): r["reason"]
            for r in rows([prepared.root / s for s in prepared.manifest["shards"]["rejects"]])}


def write_jsonl(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def gsm8k(example_data):
    with gzip.open(example_data / "gsm8k" / "train.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in itertools.islice(f, 60)]


@pytest.fixture(scope="module")
def folder(gsm8k, tmp_path_factory):
    """Configs `main` (train: 20 rows, row 7's question empty; test: 10) and `other` (test: 12)."""
    root = tmp_path_factory.mktemp("dataset")
    train = [dict(r) for r in gsm8k[:20]]
    train[6]["question"] = ""
    write_jsonl(root / "main" / "train.jsonl", train)
    write_jsonl(root / "main" / "test.jsonl", gsm8k[20:30])
    write_jsonl(root / "other" / "test.jsonl", gsm8k[30:42])
    (root / "README.md").write_text(README)
    return root


@pytest.fixture(scope="module")
def loaded(ray_session, folder, tmp_path_factory):
    cfg = make_config(f"hf:{folder}:main#train", f"hf:{folder}:other#test")
    return run_prepare(cfg, tmp_path_factory.mktemp("loaded") / "prepared")


# ----------------------------------------------------------------------------- naming (no Ray)

def test_specs_parse_into_name_config_split_and_revision(tmp_path):
    assert parse_hf_spec("hf:openai/gsm8k:main#train") == HfSource("openai/gsm8k", "main", "train")
    assert parse_hf_spec("hf:openai/gsm8k") == HfSource("openai/gsm8k")
    assert parse_hf_spec("hf:org/ds@v1.0:main#test") == HfSource("org/ds", "main", "test", "v1.0")
    assert parse_hf_spec("hf:s3://bucket/saved#train") == HfSource("s3://bucket/saved", None, "train")
    (tmp_path / "odd:name").mkdir()
    assert parse_hf_spec(f"hf:{tmp_path}/odd:name#test") == HfSource(f"{tmp_path}/odd:name", None, "test")
    for bad in ("hf:org/ds:#train", "hf:#train", "hf:org/ds#train[:10]"):
        with pytest.raises(SourceError, match="hf:"):
            parse_hf_spec(bad)


def test_streaming_refuses_file_sources(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SourceError, match="data.streaming"):
        input_files(make_config(tmp_path / "rows.jsonl", streaming=True))


def test_a_hub_dataset_streams_by_its_pinned_commit_and_offline_says_so():
    with pytest.raises(SourceError, match=r"hf:openai/gsm8k:main.*Hub.*OfflineModeIsEnabled"):
        input_files(make_config("hf:openai/gsm8k:main", streaming=True))
    sha = "a" * 40  # a pinned commit needs no Hub to plan: the commit is the content's identity
    cfg = make_config(f"hf:openai/gsm8k@{sha}:main", streaming=True)
    assert input_files(cfg)["train"] == [(f"hf:openai/gsm8k@{sha}:main#train", "hf-stream")]
    assert input_digest(cfg) != input_digest(make_config(f"hf:openai/gsm8k@{'b' * 40}:main", streaming=True))


def test_a_streamed_folder_is_fingerprinted_by_its_split_data_files(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "copy")
    cfg = make_config(f"hf:{copy}:main#train", streaming=True)
    before = input_digest(cfg)
    assert before == input_digest(make_config(f"hf:{folder}:main#train", streaming=True)), "paths do not count"
    (copy / "main" / "train.jsonl").touch()
    with open(copy / "other" / "test.jsonl", "a") as f:  # another config's file
        f.write(json.dumps({"question": "new", "answer": "row"}) + "\n")
    assert input_digest(cfg) == before
    with open(copy / "main" / "train.jsonl", "a") as f:
        f.write(json.dumps({"question": "new", "answer": "row"}) + "\n")
    assert input_digest(cfg) != before


# ----------------------------------------------------------------------------- save_to_disk

def test_save_to_disk_reads_the_named_split_only(ray_session, gsm8k, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(gsm8k[:30]),
                          "test": datasets.Dataset.from_list(gsm8k[30:42])}).save_to_disk(str(saved))
    files = input_files(make_config(f"hf:{saved}#test"))["train"]
    assert files and all(kind == "arrow" and "/test/" in f for f, kind in files)
    (ds,) = read_datasets(files, "train")
    records = ds.take_all()
    assert sorted(r["row"] for r in records) == list(range(1, 13))
    assert sorted(json.loads(r["raw"])["answer"] for r in records) == sorted(r["answer"] for r in gsm8k[30:42])
    assert all("/train/" in f for f, _ in input_files(make_config(f"hf:{saved}"))["train"]), "train by default"
    with pytest.raises(SourceError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        input_files(make_config(f"hf:{saved}#validation"))
    with pytest.raises(SourceError, match="save_to_disk folder, which has no configs"):
        input_files(make_config(f"hf:{saved}:main#test"))


# ----------------------------------------------------------------------------- dataset folders, streaming

def test_a_dataset_folder_reads_each_config_and_split(loaded, folder, gsm8k):
    c = loaded.manifest["counts"]
    assert (c["rows_read"], c["rejected_total"], c["train_rows"], c["eval_rows"]) == (32, 1, 19, 12)
    assert sorted(r["reference"] for r in rows(loaded.eval_files)) == sorted(r["answer"] for r in gsm8k[30:42])
    ((_, row), reason), = rejects(loaded).items()
    assert (row, reason) == (7, "empty_field")
    with pytest.raises(SourceError, match=r"no split 'train' \(splits: \['test'\]\)"):
        input_files(make_config(f"hf:{folder}:other#train"))
    with pytest.raises(SourceError, match=r"BuilderConfig 'nope' not found. Available: \['main', 'other'\]"):
        input_files(make_config(f"hf:{folder}:nope#train"))


def test_a_stream_is_read_by_one_task_that_numbers_its_rows(folder, gsm8k):
    spec = f"hf:{folder}:main#train"
    for max_rows, expected in ((None, 20), (3, 3)):
        (task,) = HfStreamDatasource(spec, "train", max_rows).get_read_tasks(8)
        table = pa.concat_tables(list(task()))
        assert table.column("row").to_pylist() == list(range(1, expected + 1))
        assert set(table.column("source").to_pylist()) == {spec}
        assert [json.loads(r) for r in table.column("raw").to_pylist()][:3] == gsm8k[:3]


def test_streaming_gives_the_same_rows_and_row_numbers(loaded, folder, tmp_path):
    cfg = make_config(f"hf:{folder}:main#train", f"hf:{folder}:other#test", streaming=True)
    streamed = run_prepare(cfg, tmp_path / "prepared")
    assert streamed.manifest["rows_digest"] == loaded.manifest["rows_digest"]
    assert streamed.manifest["counts"] == loaded.manifest["counts"]
    assert rejects(streamed) == {(f"hf:{folder}:main#train", 7): "empty_field"}
    assert streamed.manifest["input_files"] == {"train": [f"hf:{folder}:main#train"],
                                                "eval": [f"hf:{folder}:other#test"]}


def test_streaming_max_rows_reads_only_the_first_rows(ray_session, folder, gsm8k, tmp_path):
    cfg = make_config(f"hf:{folder}:main#train", streaming=True, max_rows=5, eval_fraction=0.0, pack=False)
    prepared = run_prepare(cfg, tmp_path / "prepared")
    c = prepared.manifest["counts"]
    assert (c["rows_read"], c["rejected_total"], c["train_rows"]) == (5, 0, 5)
    tok = load_tokenizer("tiny-llama")
    texts = [tok.decode(r["input_ids"]) for r in rows(prepared.train_files, ["input_ids"])]
    assert sorted(next(i for i, r in enumerate(gsm8k[:20]) if r["question"] in t) for t in texts) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- planning

PLAN = """
import json, sys
from workflows.config import config_from_dict
from workflows.dag import plan
p = plan(config_from_dict(json.loads(sys.argv[1])))
print(json.dumps({"ray": sorted(m for m in sys.modules if m.split(".")[0] == "ray"),
                  "status": p["prepare"].status, "input_data": p["prepare"].components["input_data"]}))
"""


def test_planning_a_streamed_source_starts_no_ray_and_reads_no_rows(folder, tmp_path):
    cache = tmp_path / "hf_datasets_cache"
    config = {"model": {"name": "tiny-llama"},
              "data": {"source": f"hf:{folder}:main#train", "format": "instruction", "fields": FIELDS,
                       "streaming": True},
              "cluster": {"work_dir": str(tmp_path / "work"), "runs_dir": str(tmp_path / "runs")}}
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PLAN, json.dumps(config)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ray"] == [] and result["status"] == "miss"
    assert result["input_data"] == input_digest(config_from_dict(config))
    assert not list(cache.rglob("*.arrow")), "planning prepared (downloaded) the dataset"


def test_preview_of_a_streamed_dataset_reads_the_first_records_of_the_stream(folder, gsm8k):
    import io

    from workflows.preview import preview

    out = io.StringIO()
    items = preview(make_config(f"hf:{folder}:main#train", streaming=True), n=2, out=out)
    assert [i["row"] for i in items] == [1, 2] and items[0]["mode"] == "inputs"
    assert gsm8k[0]["question"][:40] in out.getvalue()
