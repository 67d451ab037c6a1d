"""`loraflow tune` end to end on a tiny model: ONE sweep, killed once and resumed, asserted many ways.

Each Tune trial is a real Ray Train run whose start-up (a trial actor, a Train controller, its worker
and helper actors, Ray Data) costs far more than its steps, so the sweep is kept to what the proofs
need and a single module-scoped run (`sweep`) carries every assertion. Three trials, one at a time
(a grid over the learning rate, so their order is fixed), 4 steps each, a validation every 2 steps,
ASHA with grace 1 validation and reduction factor 2 (rungs at steps 2 and 4). The driver is
SIGKILLed once the first trial has finished and Tune has recorded it; the same command then
continues the sweep. ASHA's rungs live in the driver (a resumed Tuner starts with empty ones), so
the stop is shown after the resume: the second trial (a good learning rate) sets the rung at step 2,
the third (a learning rate too small to move the loss) arrives behind it and is stopped there.

Two of its learning rates then run again with synchronous halving (`sync_sweep`): both trials
wait, paused, at step 2 until both got there, and only the better goes on, resumed from its
checkpoint at the rung. A trial's ranks sharing the validation rows is shown without a sweep
(`test_two_ranks_share_the_validation_rows_and_agree_with_one`): two gloo ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from workflows.tune.space import ATTENTION

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
from make_demo_data import make_row  # noqa: E402

TRIALS, BUDGET = 3, 4
LRS = [2e-3, 5e-3, 1e-6]  # in the grid's (and the trials') order: finishes, finishes, lags
SYNC_LRS = LRS[1:]  # the synchronous sweep's grid: the better goes on, the other stops at the rung
# The module's one sweep (two driver runs, four Ray Train runs' start-ups, evaluate) is set up
# inside the first test; on a loaded 2-core machine it can take several minutes.
pytestmark = [pytest.mark.timeout(900), pytest.mark.train_group]


def write_sweep(root: Path) -> Path:
    import random

    rng = random.Random(4)
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(make_row(rng)) + "\n" for _ in range(120))
    cfg = {
        "model": {"name": "tiny-llama"},
        # unpacked train rows, so that the test can compare them with eval rows one by one
        "data": {"source": "rows.jsonl", "format": "instruction", "max_seq_len": 128, "eval_fraction": 0.1,
                 "pack": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"num_workers": 1, "batch_size": 4, "lr": 5e-3, "max_steps": BUDGET, "eval_every": 2,
                  "log_every": 2, "checkpoint_every": 2},
        "eval": {"batch_size": 8},
        "registry": {"root": str(root / "registry"), "name": "tuned", "gate": {"metric": "loss"}},
        "cluster": {"work_dir": str(root / "work"), "runs_dir": str(root / "runs")},
        "tune": {"search": "grid", "metric": "eval_loss", "validation_fraction": 0.15,
                 "search_space": {"train.lr": {"grid": LRS}, "lora.target_modules": "attention",
                                  "lora.alpha_over_r": 2},
                 # one trial at a time: on 2 cores a second trial's start-up only slows the first
                 "grace_period": 1, "reduction_factor": 2, "max_concurrent": 1},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _argv(cfg: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "workflows.cli", "tune", str(cfg), "--json", "--address", address]


def _first_recorded_trial(work: Path) -> str | None:
    """The id of a trial whose Ray Train run has finished AND whose end Tune has saved in its
    experiment state (what a restore reads), else None."""
    finished = {p.parents[1].name.removeprefix("trial-") for p in (work / "tune" / "trials").glob("trial-*/final/metrics.json")}
    for state in (work / "tune").glob("tune-*/experiment_state-*.json"):
        text = state.read_text()
        for trial_id in finished:
            records = [r for r in json.loads(text)["trial_data"] if trial_id in r[0]]
            if records and json.loads(records[0][0]).get("status") == "TERMINATED":
                return trial_id
    return None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_address):
    root = tmp_path_factory.mktemp("tune")
    cfg = write_sweep(root)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second
    first = subprocess.Popen(_argv(cfg, ray_address), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    deadline, killed_after = time.time() + 540, None
    while time.time() < deadline and first.poll() is None:
        killed_after = _first_recorded_trial(root / "work")
        if killed_after:
            os.killpg(first.pid, signal.SIGKILL)  # the driver dies mid-sweep, as on a lost terminal
            break
        time.sleep(0.5)
    _, first_err = first.communicate(timeout=60)
    assert killed_after, f"no trial finished before the driver ended: {first_err[-3000:]}"
    result_files = sorted((root / "work" / "tune").glob(f"tune-*/*{killed_after}*/result.json"))
    kept = result_files[0].read_bytes()
    second = subprocess.run(_argv(cfg, ray_address), cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    return {"root": root, "manifest": json.loads(second.stdout), "first_err": first_err, "second_err": second.stderr,
            "killed_after": killed_after, "kept": kept, "result_file": result_files[0]}


@pytest.fixture(scope="module")
def sync_sweep(sweep, ray_address):
    """Two of the module's learning rates (same work directory: prepare is cached) with synchronous
    halving by 2: three Ray Train runs (two to the rung, one resumed), the fewest that show a pause,
    a decision and a resume. A restored sync sweep is shown at the scheduler (tests/test_tune_space.py):
    killing this one too cost the suite about three minutes."""
    space = {"train.lr": {"grid": SYNC_LRS}, "lora.target_modules": "attention", "lora.alpha_over_r": 2}
    argv = _argv(Path(sweep["root"]) / "pipeline.yaml", ray_address) + [
        "--set", "tune.halving=sync", "--set", f"tune.search_space={json.dumps(space)}"]
    done = subprocess.run(argv, cwd=sweep["root"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads(done.stdout)
    ids = {t["trial_id"] for t in manifest["tune"]["trials"]}
    results = {}  # trial id -> Tune's results, in the order Tune recorded them
    for f in (sweep["root"] / "work" / "tune").glob("tune-*/*/result.json"):
        for trial_id in (i for i in ids if i in f.parent.name):
            results[trial_id] = [json.loads(line) for line in f.read_text().splitlines()]
    return {"manifest": manifest, "err": done.stderr, "results": results}


def test_synchronous_halving_waits_for_every_trial_at_the_rung_then_resumes_only_the_best(sync_sweep):
    trials = sorted(sync_sweep["manifest"]["tune"]["trials"], key=lambda r: r["trial_id"])  # creation order
    results = sync_sweep["results"]
    assert [r["params"]["train.lr"] for r in trials] == SYNC_LRS and set(results) == {r["trial_id"] for r in trials}
    at_rung = {r["trial_id"]: dict(map(tuple, r["history"]))[2] for r in trials}
    winner = min(at_rung, key=at_rung.get)  # the best validation loss at the rung, step 2
    for r in trials:  # ceil(2 / 2) = 1 goes on; the other stops AT the rung, not before, not after
        assert (r["finished"], r["steps"]) == ((True, BUDGET) if r["trial_id"] == winner else (False, 2)), r
    # Synchronous: the winner's first result past the rung comes after every trial's rung result
    rung_time = max(next(x["timestamp"] for x in res if x["step"] == 2) for res in results.values())
    assert next(x["timestamp"] for x in results[winner] if x["step"] > 2) >= rung_time
    # One trial at a time (tune.max_concurrent 1; a paused trial holds no slot): each trial's first
    # result came after the previous one's, which paused at the rung
    firsts = [results[r["trial_id"]][0]["timestamp"] for r in trials]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
    lines = [line for line in sync_sweep["err"].splitlines() if line.startswith("[tune] trial ")]
    assert sum("stopped early by synchronous halving at step 2/4" in line for line in lines) == 1, lines
    assert "synchronous halving at steps [2]" in sync_sweep["err"]


def test_a_killed_sweep_resumes_and_its_finished_trials_are_not_run_again(sweep):
    t = sweep["manifest"]["tune"]
    assert t["resumed"] is True and "[tune] resuming sweep" in sweep["second_err"]
    assert len(t["trials"]) == TRIALS and all(r["error"] is None for r in t["trials"])
    assert sweep["result_file"].read_bytes() == sweep["kept"]  # Tune appended nothing: not run again
    assert "[tune] trial" not in "".join(line for line in sweep["second_err"].splitlines()
                                          if sweep["killed_after"] in line)


def test_asha_stops_a_lagging_trial_before_its_budget(sweep):
    trials = sweep["manifest"]["tune"]["trials"]
    stopped = [r for r in trials if r["stopped_early"]]
    assert stopped and all(r["steps"] < r["budget"] == BUDGET for r in stopped)
    for r in stopped:  # each lagged, at the step it was stopped, behind a trial that got that far
        at = dict(map(tuple, r["history"]))[r["steps"]]
        others = [dict(map(tuple, o["history"])).get(r["steps"]) for o in trials if o is not r]
        assert any(v is not None and v < at for v in others), (r, others)
    assert any(r["finished"] and r["steps"] == BUDGET for r in trials)


def test_the_trial_chosen_is_the_best_on_validation_and_is_scored_once_on_eval(sweep):
    m, t = sweep["manifest"], sweep["manifest"]["tune"]
    finished = [r for r in t["trials"] if r["finished"]]
    assert len({r["metric"] for r in finished}) >= 2  # a choice between finished trials that differ
    best = min(finished, key=lambda r: r["metric"])
    assert t["metric"] == "validation_loss" and t["best_params"] == best["params"] and best["best"]
    assert m["stages"]["train"]["status"] == "hit"  # the best trial's run, committed
    assert m["stages"]["evaluate"]["status"] == "ran" and m["stages"]["register"]["outputs"]["version"] == 1
    adapter = json.loads((Path(m["stages"]["train"]["outputs"]["adapter"]) / "adapter_config.json").read_text())
    target = {"attention": ATTENTION, "all-linear": "all-linear"}[best["params"]["lora.target_modules"]]
    # the named set resolved to what lora_core matches; alpha tied to the rank
    assert adapter["target_modules"] == target and adapter["lora_alpha"] == 2 * adapter["r"]
    assert m["stages"]["evaluate"]["outputs"]["metrics"]["rows"] == m["stages"]["prepare"]["outputs"]["counts"]["eval_rows"]
    result = json.loads((Path(m["stages"]["train"]["outputs"]["dir"]) / "result.json").read_text())["metrics"]
    assert result["validation_loss"] == pytest.approx(best["metric"])
    assert result["eval_loss_initial"] is None  # a trial makes no initial eval pass (only validations)


def _ids(folder: Path) -> set[str]:
    return {i for f in folder.glob("*.parquet") for i in pq.read_table(f, columns=["example_id"]).column(0).to_pylist()}


def test_no_eval_row_reaches_a_trial(sweep, sync_sweep):
    m = sweep["manifest"]
    prepared = Path(m["stages"]["prepare"]["outputs"]["dir"])
    eval_ids, validation_ids = _ids(prepared / "eval"), _ids(prepared / "validation")
    assert eval_ids and validation_ids and not eval_ids & validation_ids
    digest = hashlib.sha256("\n".join(sorted(validation_ids)).encode()).hexdigest()
    runs = sorted((sweep["root"] / "work" / "tune" / "trials").glob("trial-*/metrics.jsonl"))
    assert len(runs) == TRIALS + len(SYNC_LRS)  # both sweeps' trials
    for run in runs:  # what every trial scored, at every validation: the validation rows, each once
        scored = [json.loads(line) for line in run.read_text().splitlines() if "validation_ids_sha256" in line]
        assert scored and {r["validation_ids_sha256"] for r in scored} == {digest}, run
        assert {r["validation_rows"] for r in scored} == {len(validation_ids)}
        # one pass over them per validation: the loop's eval loss is the validator's, not a pass of its own
        assert all(r["eval_loss"] == r["validation_loss"] for r in scored), run
    eval_tokens = {tuple(x) for f in (prepared / "eval").glob("*.parquet")
                   for x in pq.read_table(f, columns=["input_ids"]).column(0).to_pylist()}
    train_tokens = [tuple(x) for f in (prepared / "train").glob("*.parquet")
                    for x in pq.read_table(f, columns=["input_ids"]).column(0).to_pylist()]
    assert train_tokens and not eval_tokens & set(train_tokens)


_RANK = """
import json, os, pickle, sys
import torch.distributed as dist
from workflows.models import load_base
from workflows.tune import validation

rank, world, model, store, validator_file, out = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]
scored = []
score = validation._ScorerOnModel.__call__
validation._ScorerOnModel.__call__ = lambda self, batch: scored.extend(map(str, batch["example_id"])) or score(self, batch)
with open(validator_file, "rb") as f:
    validator = pickle.load(f)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
metrics = validator(load_base(model)[0], rank, world)
with open(out, "w") as f:
    json.dump({"scored": scored, "metrics": metrics}, f)
os._exit(0)  # no gloo teardown at exit (tests/lora_core/test_lora_inject.py says why)
"""


def test_two_ranks_share_the_validation_rows_and_agree_with_one(sweep, tmp_path):
    """A trial's ranks score the validation rows between them (rank r every world-th row) and rank 0
    gathers them: as two gloo ranks (a process group like a Train run's), every row scored once, and
    the metrics a single rank computes on all of them."""
    import pickle

    from workflows.config import load_config
    from workflows.models import load_base
    from workflows.prepared import PreparedData
    from workflows.tune.validation import trial_validator

    cfg = load_config(Path(sweep["root"]) / "pipeline.yaml")
    prepared = PreparedData.load(sweep["manifest"]["stages"]["prepare"]["outputs"]["dir"])
    validator = trial_validator(prepared.manifest, prepared.validation_files, cfg.model.name, "loss",
                                cfg.eval.batch_size, cfg.eval.generation)
    (tmp_path / "validator.pkl").write_bytes(pickle.dumps(validator))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), "2", cfg.model.name, str(tmp_path / "store"),
                               str(tmp_path / "validator.pkl"), str(tmp_path / f"rank{r}.json")],
                              cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for r in ranks:
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, err[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    everything = {str(i) for i in validator.rows()["example_id"]}
    assert rank0["scored"] and rank1["scored"] and not set(rank0["scored"]) & set(rank1["scored"])
    assert sorted(rank0["scored"] + rank1["scored"]) == sorted(everything)  # each row once
    assert rank1["metrics"] == {}
    alone = validator(load_base(cfg.model.name)[0])
    assert rank0["metrics"].keys() == alone.keys() and rank0["metrics"]["validation_rows"] == len(everything)
    digest = "validation_ids_sha256"
    assert rank0["metrics"].pop(digest) == alone.pop(digest)
    assert rank0["metrics"] == pytest.approx(alone, rel=1e-5)


def test_each_trial_gets_one_console_line_and_the_report_has_its_table_pictures_and_tensorboard(sweep):
    t = sweep["manifest"]["tune"]
    lines = [line for line in (sweep["first_err"] + sweep["second_err"]).splitlines() if line.startswith("[tune] trial ")]
    for r in t["trials"]:
        mine = [line for line in lines if r["trial_id"] in line]
        assert len(mine) == 1, (r["trial_id"], lines)
        assert ("stopped early by ASHA" in mine[0]) == r["stopped_early"]
    report = Path(t["report"]).read_text()
    assert all(r["trial_id"] in report for r in t["trials"]) and "| stopped early |" in report
    assert "scored once on the eval split" in report
    for picture in t["pictures"]:
        assert Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in t["trials"]:
        assert list((Path(t["tensorboard"]) / r["trial_id"]).glob("events.out.tfevents.*")), r["trial_id"]
