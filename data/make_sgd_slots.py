"""Convert the raw Schema-Guided Dialogue files into slot-span rows for token classification.

Run by a developer, once, from the repository root (nothing in loraflow's code, configs or tests reads
the raw files; they read the committed output):

    python data/make_sgd_slots.py [RAW_DIR] [OUT_DIR]

RAW_DIR defaults to ../shared/data/sgd-dialogues/raw (the nine annotated SGD files, CC BY-SA 4.0),
OUT_DIR to data/sgd-slots. Writes `train.jsonl.gz` and `test.jsonl.gz` (gzip -9 -n: no name or time
stored, so the bytes are reproducible), one row per user or system utterance:

    {"dialogue_id": "1_00000", "turn": 0, "speaker": "USER", "services": ["Restaurants_1"],
     "text": "restaurants | Could you book a table at Nopa?",
     "entities": [{"start": 37, "end": 41, "label": "restaurant_name"}]}

- `text` begins with the domains of the turn's services (the service name without its `_N` suffix,
  lowercased, joined by ", ") and " | ": a slot's type depends on the service, which a dialogue system
  knows. The prefix is never labelled; every span is shifted by its length.
- `entities`: every span of every frame of the turn (SGD `slots`: start, exclusive_end, slot), sorted;
  a span that two frames annotate identically is kept once.
- Split: all nine files pooled, then one dialogue in five to test by sha256 of the dialogue id (a
  whole dialogue stays on one side). SGD's own test files hold services its train files lack, which
  would make typed slot tagging a zero-shot problem.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

TEST_ONE_IN = 5


def is_test(dialogue_id: str) -> bool:
    return int(hashlib.sha256(dialogue_id.encode()).hexdigest()[:8], 16) % TEST_ONE_IN == 0


def domain(service: str) -> str:
    return service.rsplit("_", 1)[0].lower()


def turn_rows(dialogue: dict) -> list[dict]:
    rows = []
    for index, turn in enumerate(dialogue["turns"]):
        services = list(dict.fromkeys(frame["service"] for frame in turn["frames"]))
        prefix = ", ".join(dict.fromkeys(domain(s) for s in services)) + " | "
        utterance = turn["utterance"]
        spans = {(s["start"], s["exclusive_end"], s["slot"]) for frame in turn["frames"] for s in frame["slots"]}
        for start, end, _ in spans:
            if not (0 <= start < end <= len(utterance)):
                raise ValueError(f"{dialogue['dialogue_id']} turn {index}: span {start}:{end} outside the utterance")
        entities = [{"start": start + len(prefix), "end": end + len(prefix), "label": slot}
                    for start, end, slot in sorted(spans)]
        rows.append({"dialogue_id": dialogue["dialogue_id"], "turn": index, "speaker": turn["speaker"],
                     "services": services, "text": prefix + utterance, "entities": entities})
    return rows


def write_gzip_jsonl(rows: list[dict], path: Path) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as f:
        f.write(body)
    tmp.replace(path)


def main(raw_dir: Path, out_dir: Path) -> None:
    files = sorted(raw_dir.glob("*/dialogues_*.json"))
    if not files:
        raise SystemExit(f"no dialogues_*.json under {raw_dir}")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for path in files:
        for dialogue in json.loads(path.read_text()):
            splits["test" if is_test(dialogue["dialogue_id"]) else "train"] += turn_rows(dialogue)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_gzip_jsonl(rows, out_dir / f"{split}.jsonl.gz")
        labels = Counter(e["label"] for r in rows for e in r["entities"])
        print(f"{split}: {len(rows)} utterances, {len({r['dialogue_id'] for r in rows})} dialogues, "
              f"{sum(labels.values())} spans, {len(labels)} slot types")
    print("raw sha256:")
    for path in files:
        print(f"  {path.relative_to(raw_dir)} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    for split in splits:
        out = out_dir / f"{split}.jsonl.gz"
        print(f"  {out.name} {out.stat().st_size} bytes sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent.parent.parent / "shared/data/sgd-dialogues/raw",
         Path(sys.argv[2]) if len(sys.argv) > 2 else here / "sgd-slots")
