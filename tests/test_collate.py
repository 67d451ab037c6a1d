"""Collate functions: the batch layouts of docs/artifacts.md, checked against a real model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workflows.collate import (
    IGNORE_INDEX,
    CausalCollator,
    ClassificationCollator,
    causal_token_nll,
    collator_for,
    label_token_nll,
)

PAD = 0


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _packed_row(examples: list[list[int]]) -> dict[str, list[int]]:
    """One packed row in the prepared schema: first label of each example is -100."""
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        row["input_ids"] += ex
        row["labels"] += [IGNORE_INDEX] + ex[1:]
        row["position_ids"] += list(range(len(ex)))
    row["num_examples"] = len(examples)
    return row


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as Ray Data's numpy batch format gives them: object arrays of int32 arrays."""
    out = {}
    for key in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [np.asarray(r[key], dtype=np.int32) if isinstance(r[key], list) else r[key] for r in rows]
        out[key] = col
    return out


def test_packed_batch_has_positions_and_labels_but_no_attention_mask():
    rows = [_packed_row([[5, 6, 7], [8, 9]]), _packed_row([[10, 11]])]
    batch = CausalCollator(pad_token_id=PAD, packed=True)(_columns(rows))

    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, -100, -100, -100]]
    # Padding restarts the positions, so the model treats it as its own (ignored) example.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_packed_batch_keeps_attention_inside_each_example():
    model = _tiny_llama()
    examples = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    batch = CausalCollator(pad_token_id=PAD, packed=True)(
        _columns([_packed_row(examples), _packed_row(examples[:1])]))

    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[0, start:start + len(ex)], alone, atol=1e-5, rtol=1e-5)
            start += len(ex)
        # The padded second row: its real tokens must not see the padding segment either.
        alone = model(input_ids=torch.tensor([examples[0]]), use_cache=False).logits[0]
        torch.testing.assert_close(packed[1, :4], alone, atol=1e-5, rtol=1e-5)


def test_unpacked_batch_is_right_padded_with_mask_and_padding_labels_ignored_by_position():
    rows = [
        {"input_ids": [5, PAD, 7], "labels": [-100, PAD, 7], "position_ids": [0, 1, 2], "num_examples": 1},
        {"input_ids": [9], "labels": [9], "position_ids": [0], "num_examples": 1},
    ]
    batch = CausalCollator(pad_token_id=PAD, packed=False, pad_to_multiple_of=4)(_columns(rows))

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, PAD, 7, PAD], [9, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    # A pad id inside a row is a real token and keeps its label; only the added padding is ignored.
    assert batch["labels"].tolist() == [[-100, PAD, 7, -100], [9, -100, -100, -100]]


def test_unpacked_padding_does_not_change_the_logits_of_real_tokens():
    model = _tiny_llama()
    short, long = [3, 4, 5], [6, 7, 8, 9, 10, 11]
    rows = [{"input_ids": ids, "labels": ids} for ids in (short, long)]
    batch = CausalCollator(pad_token_id=PAD, packed=False)(_columns(rows))
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(padded[0, :3], alone[0], atol=1e-5, rtol=1e-5)


def test_classification_batch_pads_tokens_and_keeps_one_label_per_row():
    rows = [{"input_ids": [101, 7, 102], "label": 3}, {"input_ids": [101, 102], "label": 0}]
    batch = ClassificationCollator(pad_token_id=PAD)(_columns(rows))

    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [3, 0]
    assert batch["labels"].dtype == torch.int64


def test_rows_with_unequal_column_lengths_are_refused_naming_the_row():
    rows = [{"input_ids": [1, 2], "labels": [1, 2], "example_id": "a"},
            {"input_ids": [1, 2, 3], "labels": [1, 2], "example_id": "b"}]
    with pytest.raises(ValueError, match=r"row 1 of the batch \(example_id 'b'\).*'labels' has 2"):
        CausalCollator(pad_token_id=PAD, packed=False)(_columns(rows))


def test_a_missing_column_is_named():
    with pytest.raises(KeyError, match="position_ids"):
        CausalCollator(pad_token_id=PAD, packed=True)(_columns([{"input_ids": [1], "labels": [1]}]))


@pytest.mark.parametrize(("task", "packed", "split", "expected"), [
    ("causal_lm", True, "train", CausalCollator(PAD, packed=True)),
    ("causal_lm", True, "eval", CausalCollator(PAD, packed=False)),  # eval is never packed
    ("causal_lm", False, "train", CausalCollator(PAD, packed=False)),
    ("seq_cls", False, "train", ClassificationCollator(PAD)),
])
def test_collator_for_reads_the_layout_from_the_manifest(task, packed, split, expected):
    manifest = {"task": task, "packed": packed, "tokenizer": {"pad_token_id": PAD}}
    assert collator_for(manifest, split) == expected


def test_collator_for_refuses_an_unknown_task_naming_the_field():
    with pytest.raises(ValueError, match="'task' is 'translation'"):
        collator_for({"task": "translation", "tokenizer": {"pad_token_id": 0}}, "train")


def test_token_nll_matches_the_models_own_shifted_mean_loss():
    model = _tiny_llama()
    rows = [_packed_row([[3, 4, 5, 6], [7, 8, 9]]), _packed_row([[10, 11, 12]])]
    batch = CausalCollator(pad_token_id=PAD, packed=True)(_columns(rows))
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    nll, mask = causal_token_nll(out.logits, batch["labels"])

    assert nll.shape == mask.shape == (2, batch["input_ids"].shape[1] - 1)
    assert int(mask.sum()) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(nll.sum() / mask.sum(), out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_loss_at_label_positions_in_chunks_equals_the_plain_loss_in_value_and_gradients(packed):
    """The training loss (logits only where a label is scored, fp32 a chunk at a time) against
    `causal_token_nll` over the full logits; chunks of 3 rows so several chunks run."""
    model = _tiny_llama().train()
    rows = [_packed_row([[3, 4, 5, 6, 7], [8, 9, 10]]), _packed_row([[11, 12, 13]])]
    for row in rows:
        row["labels"][:3] = [IGNORE_INDEX] * 3  # a prompt: fewer scored positions in row 0
    if not packed:
        rows = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
    batch = CausalCollator(pad_token_id=PAD, packed=packed, loss_positions=True)(_columns(rows))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_positions", "loss_targets")}
    assert batch["loss_positions"].shape == batch["loss_targets"].shape == (2, 4)

    nll, _ = causal_token_nll(model(**inputs, use_cache=False).logits, batch["labels"])
    plain = nll.sum()
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    kept = model(**inputs, use_cache=False, logits_to_keep=batch["loss_positions"]).logits
    assert kept.shape[:2] == (2, 4)  # no logits where nothing is scored
    chunked = label_token_nll(kept, batch["loss_targets"], chunk_rows=3)
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))

    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_collates_parquet_shards_through_ray_data(ray_session, tmp_path):
    """The real path: list<int32> Parquet columns read by Ray Data, collated per batch."""
    rows = [_packed_row([[5, 6, 7], [8, 9]]), _packed_row([[10, 11]]), _packed_row([[12, 13, 14, 15]])]
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("position_ids", pa.list_(pa.int32())), ("num_examples", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "part-00000.parquet")

    ds = ray_session.data.read_parquet(str(tmp_path))
    from workflows.train.loop import RayCollate  # what the training loop hands Ray Data

    batches = list(ds.iter_torch_batches(batch_size=2, collate_fn=RayCollate(CausalCollator(PAD, packed=True))))

    assert [b["input_ids"].shape for b in batches] == [(2, 5), (1, 4)]
    assert batches[1]["input_ids"].tolist() == [[12, 13, 14, 15]]
    assert batches[0]["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
