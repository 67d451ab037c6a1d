"""Token classification on SGD slot spans: loraflow's LoRA run, full fine-tuning of the same encoder,
and PEFT's LoRA (same rank and targets), on the same split. Results: bench/results/ner.md.

    python bench/ner.py loraflow [--validation]     # `loraflow run configs/sgd_slots.yaml`, empty cache
    python bench/ner.py full|peft --prepared DIR    # plain PyTorch loop on loraflow's prepared shards

`--validation`: the train dialogues split again by dialogue id hash (one in five held out), and the
test split never read: what the config's hyperparameters were chosen on. `full` and `peft` train in
one process (2 threads) on the prepare stage's rows (same tokens, same labels, same eval rows) and are
scored with the evaluate stage's own windowed scorer and strict entity F1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def validation_split(out: Path) -> tuple[Path, Path]:
    """(fit, validation) files from the train split only, one train dialogue in five held out."""
    rows = [json.loads(line) for line in gzip.open(ROOT / "data/sgd-slots/train.jsonl.gz", "rt")]
    held = {r["dialogue_id"] for r in rows
            if int(hashlib.sha256(f"validation:{r['dialogue_id']}".encode()).hexdigest()[:8], 16) % 5 == 0}
    paths = out / "fit.jsonl.gz", out / "validation.jsonl.gz"
    for path, keep in zip(paths, (False, True)):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if (r["dialogue_id"] in held) == keep)
    return paths


def run_loraflow(validation: bool, sets: list[str]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ner-bench-"))
    args = [f"cluster.work_dir={tmp}/work", f"cluster.runs_dir={tmp}/runs", f"registry.root={tmp}/registry",
            "cluster.dashboard=false", *sets]
    if validation:
        fit, held = validation_split(tmp)
        args += [f"data.source={fit}", f"data.eval_source={held}"]
    cmd = [sys.executable, "-m", "workflows.cli", "run", str(ROOT / "configs/sgd_slots.yaml")]
    for a in args:
        cmd += ["--set", a]
    start = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.time() - start
    metrics = json.loads(next((tmp / "work/evaluate").glob("*/metrics.json")).read_text())
    prepared = next((tmp / "work/prepare").glob("*/manifest.json")).parent
    return {"mode": "loraflow", "split": "validation" if validation else "test", "wall_s": round(wall, 1),
            "prepared": str(prepared), "new": _pick(metrics["models"]["new"]),
            "base": _pick(metrics["models"].get("base", {})), "load": os.getloadavg()}


def _pick(m: dict) -> dict:
    return {k: m.get(k) for k in ("entity_f1", "entity_precision", "entity_recall", "token_accuracy", "loss")}


def run_plain(mode: str, prepared_dir: str, epochs: float, lr: float, head_lr: float, batch: int) -> dict:
    """Full fine-tuning or PEFT LoRA, one process, AdamW + linear warmup + cosine, like loraflow's loop."""
    import pyarrow.parquet as pq
    import torch

    from workflows.evaluate.entity_metrics import strict_scores
    from workflows.evaluate.scorer import word_predictions
    from workflows.evaluate.token_scoring import token_logits
    from workflows.models import load_base

    torch.set_num_threads(2)
    torch.manual_seed(0)
    manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
    names = manifest["label_names"]
    train = pq.read_table([Path(prepared_dir) / s for s in manifest["shards"]["train"]]).to_pylist()
    evals = pq.read_table([Path(prepared_dir) / s for s in manifest["shards"]["eval"]]).to_pylist()
    model, tok = load_base("minilm-l6", task="token_cls", num_labels=len(names))
    if mode == "peft":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.TOKEN_CLS, r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=["query", "key", "value", "dense"]))
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": head_lr}])
    steps = math.ceil(len(train) * epochs / batch)
    warm = 30
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm)))))
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    model.train()
    step = 0
    while step < steps:
        for idx in torch.randperm(len(train), generator=gen).split(batch):
            rows = [train[i] for i in idx.tolist()]
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), -100)
            for j, r in enumerate(rows):
                ids[j, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
                mask[j, : len(r["input_ids"])] = 1
                labels[j, : len(r["labels"])] = torch.tensor(r["labels"])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 50 == 0:
                print(f"[{mode}] step {step}/{steps} loss {loss.item():.4f}", flush=True)
            if step >= steps:
                break
    train_s = time.time() - start
    model.eval()
    logits, _ = token_logits(model, [(r["input_ids"], r["word_ids"]) for r in evals], manifest["max_seq_len"],
                             tok.pad_token_id, 64)
    gold = [[names[i] for i in r["word_labels"]] for r in evals]
    pred = [[names[i] for i in word_predictions(lg, r["word_ids"], len(r["word_labels"]))]
            for lg, r in zip(logits, evals)]
    scores = strict_scores(gold, pred)
    return {"mode": mode, "prepared": prepared_dir, "steps": steps, "train_s": round(train_s, 1),
            "wall_s": round(time.time() - start, 1), "entity_f1": scores["f1"], "entity_precision": scores["precision"],
            "entity_recall": scores["recall"], "lr": lr, "head_lr": head_lr, "load": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["loraflow", "full", "peft"])
    p.add_argument("--validation", action="store_true", help="fit/validation split of the train dialogues")
    p.add_argument("--set", action="append", default=[], help="config override for the loraflow run")
    p.add_argument("--prepared", help="a loraflow prepare output (full, peft)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--head-lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    if args.mode == "loraflow":
        result = run_loraflow(args.validation, args.set)
    else:
        lr = args.lr or (1e-4 if args.mode == "full" else 3e-3)
        result = run_plain(args.mode, args.prepared, args.epochs, lr, args.head_lr, args.batch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
