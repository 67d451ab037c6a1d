"""The prepare stage on real data (GSM8K, SGD dialogues, Banking77) and broken-row fixtures."""

from __future__ import annotations

import gzip
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch

from workflows.config import config_from_dict
from workflows.models import load_base, load_tokenizer
from workflows.prepare.formats import IGNORE_INDEX, canonical_example, example_id
from workflows.prepare.inputs import input_digest
from workflows.prepare.stage import PrepareError, run_prepare, summary_rows
from workflows.prepared import PreparedData

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GSM8K_FIELDS = {"instruction": "question", "output": "answer"}


def make_config(source, fmt, model="tiny-llama", **data):
    task = "seq_cls" if fmt == "classification" else "causal_lm"
    return config_from_dict({"model": {"name": model, "task": task},
                             "data": {"source": str(source), "format": fmt, **data}})


def rows(files, columns=None):
    return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]


def trained_runs(labels):
    """Contiguous runs of trained label ids."""
    return [[lab for _, lab in run] for trained, run in
            itertools.groupby(enumerate(labels), key=lambda x: x[1] != IGNORE_INDEX) if trained]


@pytest.fixture(scope="module")
def gsm8k(ray_session, example_data, tmp_path_factory):
    cfg = make_config(example_data / "gsm8k" / "train.jsonl.gz", "instruction", fields=GSM8K_FIELDS,
                      max_rows=200, max_seq_len=1024, eval_fraction=0.2, tokenize_actors=2)
    return cfg, run_prepare(cfg, tmp_path_factory.mktemp("gsm8k") / "prepared")


@pytest.fixture(scope="module")
def sgd(ray_session, example_data, tmp_path_factory):
    cfg = make_config(example_data / "sgd-dialogues" / "messages_train.jsonl.gz", "chat",
                      max_rows=80, max_seq_len=1024, eval_fraction=0.3)
    return cfg, run_prepare(cfg, tmp_path_factory.mktemp("sgd") / "prepared")


@pytest.fixture(scope="module")
def banking(ray_session, example_data, tmp_path_factory):
    cfg = make_config(example_data / "banking77" / "train.csv.gz", "classification", model="tiny-bert",
                      fields={"label": "category"}, max_rows=600, max_seq_len=64, eval_fraction=0.2)
    return cfg, run_prepare(cfg, tmp_path_factory.mktemp("banking") / "prepared")


@pytest.fixture(scope="module")
def broken_chat(ray_session, tmp_path_factory):
    cfg = make_config(FIXTURES / "chat_broken.jsonl", "chat", max_seq_len=64, truncate=False,
                      max_reject_fraction=1.0, eval_fraction=0.0)
    return run_prepare(cfg, tmp_path_factory.mktemp("broken") / "prepared")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


# ----------------------------------------------------------------------------- instruction (GSM8K)

def test_instruction_labels_decode_to_exactly_the_answer_and_eos(gsm8k, tok):
    _, prepared = gsm8k
    evals = rows(prepared.eval_files)
    assert len(evals) > 20
    for row in evals:
        (run,) = trained_runs(row["labels"])
        assert tok.decode(run) == row["reference"] + tok.eos_token
        assert tok.decode(run).count(tok.eos_token) == 1


def test_instruction_prompt_len_is_where_the_answer_starts(gsm8k, tok):
    _, prepared = gsm8k
    for row in rows(prepared.eval_files):
        assert row["labels"][row["prompt_len"]] != IGNORE_INDEX
        assert all(lab == IGNORE_INDEX for lab in row["labels"][: row["prompt_len"]])
        assert tok.decode(row["input_ids"][: row["prompt_len"]]).endswith("<|im_start|>assistant\n")


def test_packing_never_mixes_examples_and_restarts_positions(gsm8k, tok):
    cfg, prepared = gsm8k
    packed = rows(prepared.train_files)
    assert prepared.packed and any(r["num_examples"] > 1 for r in packed)
    for r in packed:
        ids, labels, pos = (np.array(r[k]) for k in ("input_ids", "labels", "position_ids"))
        assert len(ids) == len(labels) == len(pos) <= cfg.data.max_seq_len
        starts = np.flatnonzero(pos == 0)
        assert len(starts) == r["num_examples"] and starts[0] == 0
        assert np.all(np.diff(pos)[np.diff(pos) != 1] < 0), "positions restart only at 0"
        assert np.all(labels[starts] == IGNORE_INDEX), "each example's first label is masked"
        assert np.all((labels == IGNORE_INDEX) | (labels == ids)), "labels are the row's own tokens"
        for a, b in zip(starts, [*starts[1:], len(ids)]):
            runs = trained_runs(labels[a:b].tolist())
            assert len(runs) == 1 and runs[0][-1] == tok.eos_token_id, "one answer per example, ending in EOS"


def test_packed_logits_equal_unpacked_logits(gsm8k):
    _, prepared = gsm8k
    row = next(r for r in rows(prepared.train_files) if r["num_examples"] >= 3)
    model, _ = load_base("tiny-llama")
    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        starts = [*torch.nonzero(pos[0] == 0).flatten().tolist(), ids.shape[1]]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=0)


def test_counts_add_up_and_shards_cover_the_workers(gsm8k):
    cfg, prepared = gsm8k
    c = prepared.manifest["counts"]
    assert c["rows_read"] == 200
    assert c["train_rows"] + c["eval_rows"] + c["rejected_total"] + c["deduplicated"] + c["eval_capped"] == 200
    assert sum(r["num_examples"] for r in rows(prepared.train_files, ["num_examples"])) == c["train_rows"]
    assert len(prepared.train_files) >= max(2, cfg.train.num_workers)
    assert prepared.manifest["tokens"]["train"]["total"] == sum(
        len(r["input_ids"]) for r in rows(prepared.train_files, ["input_ids"]))


def test_manifest_records_tokenizer_and_input_identity(gsm8k, tok):
    from workflows.models import tokenizer_fingerprint

    cfg, prepared = gsm8k
    m = PreparedData.load(prepared.root).manifest
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert m["tokenizer"]["eos_token_id"] == tok.eos_token_id
    assert m["input_digest"] == input_digest(cfg)
    assert m["schema"]["train"]["input_ids"] == "list<element: int32>"
    assert dict(summary_rows(prepared))["rows read"] == "200"


def test_same_input_and_config_give_the_same_rows(gsm8k, tmp_path):
    cfg, first = gsm8k
    again = run_prepare(cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenize_actors": 1})}),
                        tmp_path / "again")
    assert again.manifest["rows_digest"] == first.manifest["rows_digest"]


def test_input_digest_follows_content_not_mtime(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    cfg = make_config(data, "text")
    before = input_digest(cfg)
    data.touch()
    assert input_digest(cfg) == before
    data.write_text('{"text": "b"}\n')
    assert input_digest(cfg) != before


def test_load_refuses_an_incomplete_directory(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        PreparedData.load(tmp_path)


# ----------------------------------------------------------------------------- chat (SGD)

def test_chat_labels_are_exactly_the_assistant_turns(sgd, example_data, tok):
    cfg, prepared = sgd
    by_id = {}
    with gzip.open(example_data / "sgd-dialogues" / "messages_train.jsonl.gz", "rt") as f:
        for line in itertools.islice(f, cfg.data.max_rows):
            ex = canonical_example(json.loads(line), "chat", {})
            by_id[example_id(ex)] = ex["messages"]
    evals = rows(prepared.eval_files)
    assert len(evals) > 10
    for row in evals:
        expected = [m["content"] + tok.eos_token for m in by_id[row["example_id"]] if m["role"] == "assistant"]
        assert [tok.decode(run) for run in trained_runs(row["labels"])] == expected


def test_chat_eval_prompt_ends_where_the_last_assistant_turn_starts(sgd, tok):
    _, prepared = sgd
    for row in rows(prepared.eval_files):
        rest = row["labels"][row["prompt_len"]:]
        assert tok.decode([lab for lab in rest if lab != IGNORE_INDEX]) == row["reference"] + tok.eos_token


# ----------------------------------------------------------------------------- classification (Banking77)

def test_classification_label_ids_follow_the_saved_vocabulary(banking, example_data):
    import csv

    _, prepared = banking
    names = prepared.manifest["label_names"]
    assert names == sorted(names) and len(names) == len(set(names))
    with gzip.open(example_data / "banking77" / "train.csv.gz", "rt", newline="") as f:
        truth = {r["text"]: r["category"] for r in itertools.islice(csv.DictReader(f), 600)}
    evals = rows(prepared.eval_files)
    assert evals and all(names[r["label"]] == truth[r["text"]] for r in evals)
    assert not prepared.packed and set(pq.read_schema(prepared.train_files[0]).names) == {"input_ids", "label"}


def test_classification_rows_are_tokenized_with_special_tokens(banking):
    _, prepared = banking
    tok = load_tokenizer("tiny-bert")
    for r in rows(prepared.eval_files)[:20]:
        assert r["input_ids"][0] == tok.cls_token_id and r["input_ids"][-1] == tok.sep_token_id


def test_hf_dataset_source_with_a_parquet_eval_source_and_an_eval_cap(ray_session, example_data, tmp_path):
    import datasets

    lines = gzip.open(example_data / "gsm8k" / "train.jsonl.gz", "rt").read().splitlines()
    datasets.Dataset.from_list([json.loads(x) for x in lines[:40]]).save_to_disk(str(tmp_path / "hf"))
    datasets.Dataset.from_list([json.loads(x) for x in lines[40:60]]).to_parquet(str(tmp_path / "eval.parquet"))
    cfg = make_config(f"hf:{tmp_path / 'hf'}", "instruction", fields=GSM8K_FIELDS, max_seq_len=1024,
                      eval_source=str(tmp_path / "eval.parquet"), max_eval_rows=15)
    prepared = run_prepare(cfg, tmp_path / "prepared")
    c = prepared.manifest["counts"]
    assert (c["rows_read"], c["train_rows"], c["eval_rows"], c["eval_capped"]) == (60, 40, 15, 5)
    eval_answers = {json.loads(x)["answer"] for x in lines[40:60]}
    assert {r["reference"] for r in rows(prepared.eval_files)} <= eval_answers


# ----------------------------------------------------------------------------- rejects

def test_every_broken_row_is_rejected_with_its_line_and_reason(broken_chat):
    rejects = {r["row"]: r["reason"] for r in rows([broken_chat.root / s for s in broken_chat.manifest["shards"]["rejects"]])}
    assert rejects == {2: "invalid_utf8", 3: "not_json", 4: "not_an_object", 5: "missing_field", 6: "empty_field",
                       7: "wrong_type", 8: "unknown_role", 9: "no_assistant_turn", 10: "too_long"}


def test_broken_file_counts_and_duplicates(broken_chat):
    c = broken_chat.manifest["counts"]
    assert c["rows_read"] == 13  # the blank line is not a record
    assert c["rejected_total"] == 9 and sum(c["rejected"].values()) == 9
    assert c["deduplicated"] == 1  # line 12 repeats line 1 (with a CRLF ending)
    assert c["train_rows"] == 3  # lines 1, 11 (unescaped U+2028 inside a string) and 14


def test_csv_rejects_name_the_line(ray_session, tmp_path):
    cfg = make_config(FIXTURES / "classification_broken.csv", "classification", model="tiny-bert",
                      fields={"label": "category"}, max_reject_fraction=1.0, eval_fraction=0.0)
    prepared = run_prepare(cfg, tmp_path / "prepared")
    rejects = {r["row"]: r["reason"] for r in rows([prepared.root / s for s in prepared.manifest["shards"]["rejects"]])}
    assert rejects == {3: "malformed_csv", 4: "invalid_utf8", 5: "empty_field"}
    assert prepared.manifest["counts"]["train_rows"] == 3
    assert prepared.manifest["label_names"] == ["card_arrival", "lost_card", "transfer"]


def test_too_many_rejects_fail_the_stage_and_keep_the_rejects(ray_session, tmp_path):
    cfg = make_config(FIXTURES / "chat_broken.jsonl", "chat", max_seq_len=64, truncate=False)
    out = tmp_path / "prepared"
    with pytest.raises(PrepareError) as err:
        run_prepare(cfg, out)
    message = str(err.value)
    assert "9 of 13 rows" in message and "max_reject_fraction" in message
    assert "invalid_utf8" in message and "chat_broken.jsonl:2" in message
    kept = tmp_path / "prepared.rejects"
    assert str(kept) in message and len(rows(sorted(kept.glob("*.parquet")))) == 9
    assert not out.exists()


# ----------------------------------------------------------------------------- scale

def _peak_rss_while(fn):
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, peak[0]


def test_100k_rows_stream_without_the_driver_holding_them(ray_session, tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        for i in range(100_000):
            text = " ".join(words[(i * 7 + k) % 8] for k in range(40)) + f" {i}"
            f.write(json.dumps({"text": text}) + "\n")
    cfg = make_config(data, "text", max_seq_len=128, dedupe=False, eval_fraction=0.01, batch_size=1024)
    before = psutil.Process().memory_info().rss
    prepared, peak = _peak_rss_while(lambda: run_prepare(cfg, tmp_path / "prepared"))
    assert prepared.manifest["counts"]["rows_read"] == 100_000
    written = sum(pq.read_metadata(f).num_rows for f in prepared.train_files + prepared.eval_files)
    assert written > 0
    tokens = prepared.manifest["tokens"]["train"]["total"]
    # ids + labels + positions as int32: what the driver would hold if it collected the rows
    assert peak - before < tokens * 12 / 2, f"driver grew {(peak - before) / 2**20:.0f} MiB"


def test_max_rows_reads_the_first_rows_of_the_source_and_of_the_eval_source(ray_session, example_data, tmp_path):
    """A limit on the union of both would leave the eval source, read after the training data, empty."""
    cfg = make_config(example_data / "gsm8k" / "train.jsonl.gz", "instruction", fields=GSM8K_FIELDS, max_rows=30,
                      max_seq_len=1024, eval_source=str(example_data / "gsm8k" / "test.jsonl.gz"))
    counts = run_prepare(cfg, tmp_path / "prepared").manifest["counts"]
    assert counts["rows_read"] == 60 and counts["train_rows"] == 30 and counts["eval_rows"] == 30, counts


def test_data_that_changes_while_prepare_reads_it_fails_the_stage_and_commits_nothing(tmp_path, monkeypatch):
    from workflows.prepare import stage

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    cfg = make_config(data, "text", model="tiny-llama")
    planned = input_digest(cfg)

    def read_while_the_data_changes(*args):
        data.write_text('{"text": "a"}\n{"text": "written during the read"}\n')
        return []

    monkeypatch.setattr(stage, "_encode_and_stage", read_while_the_data_changes)
    out = tmp_path / "prepared"
    with pytest.raises(PrepareError, match="changed while prepare read it"):
        run_prepare(cfg, str(out), planned_digest=planned)
    assert not (out / "_SUCCESS").exists()
