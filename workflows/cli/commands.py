"""What each `loraflow` command does: load the config, call the driver or the library, print.

Imports that start Ray or torch stay inside the commands that need them, so `validate`, `dag`,
`registry` and a "no change" `retrain` never pay for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from workflows.artifacts import LockHeldError, is_uri
from workflows.cli.console import captured
from workflows.cli.starter import STARTER_CONFIG
from workflows.config import ConfigError, PipelineConfig, load_config
from workflows.dag import plan
from workflows.ops.jobs import TERMINAL, JobsError, job_logs, job_status, stop_job, submit
from workflows.ops.submission import UnreachableInputError
from workflows.pipeline import evaluate_adapter, new_run_id, run_pipeline
from workflows.registry.base import Ref
from workflows.registry.references import resolve_adapter
from workflows.registry.sqlite import Registry
from workflows.registry_root import registry_root
from workflows.retrain import retrain

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_GATE, EXIT_LOCKED = 0, 1, 2, 3, 4


# --- printing ------------------------------------------------------------------------------------

def print_table(rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None, out=sys.stdout) -> None:
    rows = [tuple("" if c is None else str(c) for c in r) for r in rows]
    if header:
        rows = [header, *rows]
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if header and n == 0:
            print("  ".join("-" * w for w in widths), file=out)


_JSON_OUT = None  # with --json: the real stdout, kept for the one JSON document


def _emit_json(obj: Any) -> None:
    out = _JSON_OUT or sys.stdout
    print(json.dumps(obj, indent=2, sort_keys=True, default=str), file=out, flush=True)


def reserve_stdout_for_json() -> None:
    """Send everything else (progress, Ray worker logs relayed to the driver) to stderr, so stdout
    holds exactly one JSON document a machine can parse."""
    global _JSON_OUT

    sys.stdout.flush()
    _JSON_OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --- config-driven commands ----------------------------------------------------------------------

def _load(args) -> PipelineConfig:
    cfg = load_config(args.config, overrides=getattr(args, "set", None))
    if getattr(args, "address", None):
        cfg.cluster.address = args.address
    return cfg


def cmd_validate(args) -> int:
    cfg = _load(args)
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    missing = [s for s in sources if not is_uri(s) and not s.startswith("hf:") and not any(ch in s for ch in "*?[")
               and not Path(cfg.resolve_path(s)).exists()]
    if missing:
        print(f"config {args.config}: data.source not found: {', '.join(cfg.resolve_path(m) for m in missing)}",
              file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: ok (model {cfg.model.name}, format {cfg.data.format}, "
          f"{cfg.train.num_workers} worker(s))")
    return EXIT_OK


def cmd_init(args) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"{path} exists; pass --force to overwrite", file=sys.stderr)
        return EXIT_CONFIG
    path.write_text(STARTER_CONFIG)
    print(f"wrote {path}: edit data.source and data.format, then `loraflow run {path}`")
    return EXIT_OK


def cmd_preview(args) -> int:
    from workflows.preview import preview  # imports transformers: only for this command

    preview(_load(args), n=args.n, color=args.color)
    return EXIT_OK


def cmd_dag(args) -> int:
    p = plan(_load(args), force_from=args.from_stage)
    # Where each output counts: its URI in the store (for a local work dir, the local path), as in
    # a run manifest; never the local staging copy of an object-store work dir.
    if args.json:
        _emit_json([{"stage": s.name, "fingerprint": s.fingerprint, "status": s.status, "why": s.why,
                     "dir": s.uri} for s in p.stages])
        return EXIT_OK
    print(f"work dir: {p.layout.store.uri} (stage outputs in <stage>/<fingerprint>)")
    print(" -> ".join(s.name for s in p.stages))
    print_table([(s.name, s.status, s.fingerprint, s.why) for s in p.stages],
                header=("stage", "cache", "fingerprint", "why"))
    return EXIT_OK


def _summary(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, st in manifest["stages"].items():
        rows.append((name, f"{st['status']:<4} {st['seconds']:>8.1f} s  {st['outputs'].get('dir', '')}"))
    ev = manifest["stages"].get("evaluate", {}).get("outputs", {}).get("metrics", {})
    for model, m in ev.get("models", {}).items():
        keys = [k for k in ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "macro_f1", "entity_f1") if k in m]
        rows.append((f"eval {model}", ", ".join(f"{k}={_fmt(m[k])}" for k in keys)))
    reg = manifest["stages"].get("register", {}).get("outputs", {})
    if reg:
        d = reg.get("decision") or {}
        rows.append(("registry", f"{reg.get('name')}:{reg.get('version')}  "
                                 f"{'promoted to' if d.get('promote') else 'not promoted to'} "
                                 f"{d.get('alias', 'champion')}: {d.get('reason', '')}"))
    if manifest.get("report"):
        rows.append(("report", manifest["report"]))
    return rows


@contextlib.contextmanager
def _run_console(args, cfg: PipelineConfig) -> Iterator[str]:
    """A run id, and for the block the console captured into `runs/<id>/run.log`: the console
    shows loraflow's own lines, the log everything (`--verbose`: the console too)."""
    run_id = new_run_id()
    run_dir = Path(cfg.cluster.runs_dir).expanduser().resolve() / run_id
    args.run_log = run_dir / "run.log"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # they re-print every second
    kept = True
    try:
        with captured(args.run_log, verbose=args.verbose):
            yield run_id
        kept = (run_dir / "manifest.json").exists()
    except LockHeldError:
        # Another run held the work directory from the start (no manifest: this run never started),
        # or took it over mid-run: then the records of what ran (manifest, report, run.log) stay.
        kept = (run_dir / "manifest.json").exists()
        raise
    finally:
        if not kept:  # no run (retrain found no change, the lease was held): no run directory
            shutil.rmtree(run_dir, ignore_errors=True)
            args.run_log = None


def cmd_run(args, until: str | None = None) -> int:
    cfg = _load(args)
    with _run_console(args, cfg) as run_id:
        manifest = run_pipeline(cfg, force_from=getattr(args, "from_stage", None), until=until, run_id=run_id)
    if args.json:
        _emit_json(manifest)
    else:
        print()
        print_table(_summary(manifest), header=("stage", "result"))
    return EXIT_OK


def cmd_evaluate_adapter(args) -> int:
    cfg = _load(args)
    with _run_console(args, cfg) as run_id:
        out = evaluate_adapter(cfg, args.adapter, run_id=run_id)
    if args.json:
        _emit_json(out)
        return EXIT_OK
    models = out["metrics"].get("models", {})
    keys = [k for k in ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "macro_f1", "entity_f1")
            if any(k in m for m in models.values())]
    print_table([(name, *(_fmt(m.get(k, "")) for k in keys)) for name, m in models.items()],
                header=("model", *keys))
    print(f"per-example results and metrics.json: {out['dir']}")
    return EXIT_OK


def cmd_retrain(args) -> int:
    cfg = _load(args)
    with _run_console(args, cfg) as run_id:
        out = retrain(cfg, warm_start=args.warm_start, wait=args.wait, run_id=run_id)
    if args.json:
        _emit_json(out.to_dict())
    elif out.status == "no-change":
        print(f"no change: input data digest {out.input_digest[:16]} is what {out.champion_before} was trained on")
    else:
        d = out.decision
        print(f"{out.status}: champion {out.champion_before} -> {out.champion_after} ({d.get('reason', '')})")
        if out.report:
            print(f"report: {out.report}")
    return EXIT_GATE if args.strict and out.status == "kept-champion" else EXIT_OK


def cmd_tune(args) -> int:
    from workflows.tune import tune_then_run  # imports Ray: only for this command

    cfg = _load(args)
    if cfg.tune is None:
        raise ConfigError(f"config {args.config} has no `tune:` section (search_space, num_trials, ...)")
    with _run_console(args, cfg) as run_id:
        manifest = tune_then_run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True), run_id=run_id)
    if args.json:
        _emit_json(manifest)
        return EXIT_OK
    t = manifest["tune"]
    keys = list(cfg.tune.search_space)
    print_table([(r["trial_id"] + (" *" if r["best"] else ""), *(_fmt(r["params"].get(k)) for k in keys),
                  _fmt(r["metric"]), f"{r['steps']}/{r['budget']}", "yes" if r["stopped_early"] else "no")
                 for r in t["trials"]], header=("trial", *keys, t["metric"], "steps", "stopped early"))
    print(f"\nchosen (*): {t['best_params']} ({t['metric']}={_fmt(t['best_metric'])} on the validation split); "
          f"report: {t['report']}")
    print_table(_summary(manifest), header=("stage", "result"))
    return EXIT_OK


# --- registry, generate, predict ------------------------------------------------------------------

def cmd_registry(args) -> int:
    reg = Registry(registry_root(args.root)[0])
    action = args.action
    if action != "list" and not args.ref:
        print(f"loraflow registry {action}: a reference is required (name, name:version or name@alias)",
              file=sys.stderr)
        return EXIT_CONFIG
    if action == "list":
        versions = reg.list_versions(args.ref or args.name)
        if args.json:
            _emit_json([{**v.to_dict(), "aliases": sorted(a for a, n in reg.aliases(v.name).items()
                                                          if n == v.version)} for v in versions])
            return EXIT_OK
        aliases = {name: reg.aliases(name) for name in {v.name for v in versions}}
        print_table([(v.ref, ",".join(sorted(a for a, n in aliases[v.name].items() if n == v.version)),
                      "yes" if v.servable else "no", _fmt(v.metrics.get(args.metric, "")), v.created)
                     for v in versions], header=("version", "aliases", "vLLM", args.metric, "created"))
        return EXIT_OK
    if action == "show":
        _emit_json(reg.show(args.ref))
        return EXIT_OK
    if action == "promote":
        ref = Ref.parse(args.ref)
        move = reg.promote(ref.name, reg.get(ref).version, args.alias, reason=args.reason or "manual promotion")
    elif action == "rollback":
        name, _, alias = args.ref.partition("@")  # `demo` or `demo@champion`
        move = reg.rollback(name, alias or args.alias, reason=args.reason or "manual rollback")
    elif action == "export":
        if not args.out:
            print("loraflow registry export: --out DIR is required", file=sys.stderr)
            return EXIT_CONFIG
        print(f"exported {args.ref} to {reg.export(args.ref, args.out)}")
        return EXIT_OK
    else:
        reg.delete(args.ref)
        print(f"deleted {args.ref} (soft: files kept, no longer resolvable)")
        return EXIT_OK
    print(f"{move.name}@{move.alias}: {move.from_version} -> {move.to_version} ({move.reason})")
    return EXIT_OK


@contextlib.contextmanager
def _adapter_dir(spec: str | None, root: str | None) -> Iterator[Path | None]:
    """A local folder holding the adapter `spec` (a folder, a URI or a registry reference)."""
    if spec is None:
        yield None
        return
    resolved = resolve_adapter(spec, *registry_root(root))
    if not is_uri(resolved.location):
        yield Path(resolved.location)
        return
    with resolved.files().materialized() as folder:
        yield folder


def _quiet_libraries(verbose: bool) -> None:
    """transformers' weight-loading report and progress bars stay off the console unless asked, here
    and in a process this one starts (a model cache built on first use: `workflows.models`)."""
    if not verbose:
        from transformers.utils import logging as hf_logging

        os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def cmd_generate(args) -> int:
    from workflows.evaluate.generation import generate  # imports torch: only for this command

    _quiet_libraries(args.verbose)
    with _adapter_dir(args.adapter, args.root) as adapter:
        for prompt in args.prompt:
            generate(args.model, adapter, [prompt], max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
                     on_token=lambda text: print(text, end="", flush=True))
            print()
    return EXIT_OK


def cmd_predict(args) -> int:
    from workflows.evaluate.generation import predict  # imports torch: only for this command

    _quiet_libraries(args.verbose)
    with _adapter_dir(args.adapter, args.root) as adapter:
        results = predict(args.model, adapter, args.text, device=args.device, dtype=args.dtype)
    if args.json:
        _emit_json(results)
    elif results and "entities" in results[0]:  # token classification: one line per entity
        print_table([(str(i + 1), e["label"], f"{e['score']:.3f}", f"{e['start']}:{e['end']}", e["text"])
                     for i, r in enumerate(results) for e in r["entities"]],
                    header=("text #", "label", "p", "span", "entity"))
    else:
        print_table([(r["label"], f"{r['score']:.3f}", r["text"]) for r in results], header=("label", "p", "text"))
    return EXIT_OK


# --- Ray Jobs ----------------------------------------------------------------------------------

def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        outcome = submit(args.config, args.address, overrides=args.overrides, wait=args.wait,
                         working_dir=args.working_dir, env_vars=_parse_env(args.env), pip=args.pip,
                         shared_mounts=args.shared_mounts, command=args.command,
                         ship_limit_bytes=int(args.ship_limit_mb * 2**20), submission_id=args.submission_id)
    except (ConfigError, JobsError, UnreachableInputError) as e:
        print(f"loraflow submit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return outcome.exit_code or 0


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        if args.action == "logs":
            sys.stdout.write(job_logs(args.job_id, args.address, follow=args.follow))
            if not args.follow:
                return 0
            return job_status(args.job_id, args.address).exit_code or 0
        outcome = (job_status if args.action == "status" else stop_job)(args.job_id, args.address)
    except JobsError as e:
        print(f"loraflow jobs: {e}", file=sys.stderr)
        return 2
    code = "" if outcome.exit_code is None else f" (exit code {outcome.exit_code})"
    print(f"{outcome.job_id} {outcome.status}{code}" + (f": {outcome.message}" if outcome.message else ""))
    if args.action == "stop":
        return 0 if outcome.status in TERMINAL else 1
    return outcome.exit_code or 0
