"""`loraflow`: the command line. It only parses, calls and prints; the work lives in the stages.

Exit codes a scheduler can act on: 0 success (or "no change" for retrain), 1 a stage failed,
2 a bad config or bad arguments (nothing ran), 3 promotion refused by the gate (retrain --strict),
4 another run holds the lock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_GATE, EXIT_LOCKED = 0, 1, 2, 3, 4
DEFAULT_REGISTRY = os.environ.get("LORAFLOW_REGISTRY", "~/.cache/loraflow/registry")

EPILOG = textwrap.dedent("""\
    examples:
      loraflow init my.yaml                       write a commented starter config
      loraflow validate my.yaml                   check a config without running anything
      loraflow dag my.yaml                        show each stage's cache status (dry run)
      loraflow run configs/demo.yaml              run prepare -> train -> evaluate -> register
      loraflow run my.yaml --set train.lr=1e-4    override any key
      loraflow run my.yaml --from train           force a rerun from a stage
      loraflow registry list                      adapters, versions and aliases
      loraflow generate --model smollm2-135m --adapter demo@champion "Extract ..."
    """)


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


def _reserve_stdout_for_json() -> None:
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

def _load(args) -> Any:
    from workflows.config import load_config

    cfg = load_config(args.config, overrides=getattr(args, "set", None))
    if getattr(args, "address", None):
        cfg.cluster.address = args.address
    return cfg


def cmd_validate(args) -> int:
    cfg = _load(args)
    sources = cfg.data.source if isinstance(cfg.data.source, list) else [cfg.data.source]
    missing = [s for s in sources if "://" not in s and not s.startswith("hf:") and not any(ch in s for ch in "*?[")
               and not Path(cfg.resolve_path(s)).exists()]
    if missing:
        print(f"config {args.config}: data.source not found: {', '.join(cfg.resolve_path(m) for m in missing)}",
              file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: ok (model {cfg.model.name}, format {cfg.data.format}, "
          f"{cfg.train.num_workers} worker(s))")
    return EXIT_OK


def cmd_init(args) -> int:
    from workflows.cli.starter import STARTER_CONFIG

    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"{path} exists; pass --force to overwrite", file=sys.stderr)
        return EXIT_CONFIG
    path.write_text(STARTER_CONFIG)
    print(f"wrote {path}: edit data.source and data.format, then `loraflow run {path}`")
    return EXIT_OK


def cmd_dag(args) -> int:
    from workflows.dag import plan

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
        keys = [k for k in ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "macro_f1") if k in m]
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


def cmd_run(args, until: str | None = None) -> int:
    from workflows.pipeline import run_pipeline

    cfg = _load(args)
    # Ray Data's progress bars on a terminal; off in logs, where they re-print every second.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if sys.stderr.isatty() else "1")
    manifest = run_pipeline(cfg, force_from=getattr(args, "from_stage", None), until=until)
    if args.json:
        _emit_json(manifest)
    else:
        print()
        print_table(_summary(manifest), header=("stage", "result"))
    return EXIT_OK


def cmd_stage(stage: str):
    def run(args) -> int:
        if stage == "evaluate" and args.adapter:
            return cmd_evaluate_adapter(args)
        return cmd_run(args, until=stage)
    return run


def cmd_evaluate_adapter(args) -> int:
    from workflows.pipeline import evaluate_adapter

    out = evaluate_adapter(_load(args), args.adapter)
    if args.json:
        _emit_json(out)
        return EXIT_OK
    models = out["metrics"].get("models", {})
    keys = [k for k in ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "macro_f1")
            if any(k in m for m in models.values())]
    print_table([(name, *(_fmt(m.get(k, "")) for k in keys)) for name, m in models.items()],
                header=("model", *keys))
    print(f"per-example results and metrics.json: {out['dir']}")
    return EXIT_OK


def cmd_retrain(args) -> int:
    from workflows.retrain import retrain

    out = retrain(_load(args), warm_start=args.warm_start, wait=args.wait)
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
    from workflows.config import ConfigError
    from workflows.tune import tune_then_run

    cfg = _load(args)
    if cfg.tune is None:
        raise ConfigError(f"config {args.config} has no `tune:` section (search_space, num_trials, ...)")
    manifest = tune_then_run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        _emit_json(manifest)
        return EXIT_OK
    trials = manifest["tune"]["trials"]
    keys = list(trials[0]) if trials else []
    print_table([tuple(_fmt(t[k]) for k in keys) for t in trials], header=tuple(keys))
    print(f"\nbest: {manifest['tune']['best_params']} ({cfg.tune.metric}={_fmt(manifest['tune']['best_metric'])})")
    print_table(_summary(manifest), header=("stage", "result"))
    return EXIT_OK


# --- registry, generate, predict ------------------------------------------------------------------

def cmd_registry(args) -> int:
    from workflows.registry.base import Ref
    from workflows.registry.sqlite import Registry

    reg = Registry(args.root)
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


def _adapter_path(ref: str | None, root: str) -> str | None:
    if ref is None or Path(ref).expanduser().exists():
        return ref
    from workflows.registry.sqlite import Registry

    return str(Registry(root).resolve(ref))


def cmd_generate(args) -> int:
    from workflows.evaluate.generation import generate

    adapter = _adapter_path(args.adapter, args.root)
    for prompt in args.prompt:
        generate(args.model, adapter, [prompt], max_new_tokens=args.max_new_tokens,
                 on_token=lambda text: print(text, end="", flush=True))
        print()
    return EXIT_OK


def cmd_predict(args) -> int:
    from workflows.evaluate.generation import predict

    adapter = _adapter_path(args.adapter, args.root)
    results = predict(args.model, adapter, args.text)
    if args.json:
        _emit_json(results)
    else:
        print_table([(r["label"], f"{r['score']:.3f}", r["text"]) for r in results], header=("label", "p", "text"))
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------------------

def _config_args(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("config", help="pipeline YAML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description="Distributed LoRA fine-tuning as a Ray workflow.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, func, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("run", "run the whole DAG: prepare -> train -> evaluate -> register (cached stages are skipped)",
            cmd_run, "loraflow run configs/demo.yaml --set train.lr=1e-4")
    _config_args(p)
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="force a rerun from this stage")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto' inside a Ray Job)")
    for stage, help_ in (("prepare", "read, validate, tokenize, pack and shard the data"),
                         ("train", "prepare (cached) then LoRA-train with Ray Train DDP"),
                         ("evaluate", "... then evaluate base, new adapter and champion"),
                         ("register", "... then register the adapter and apply the promotion gate")):
        p = add(stage, help_, cmd_stage(stage), f"loraflow {stage} configs/demo.yaml")
        _config_args(p)
        if stage == "evaluate":
            p.add_argument("--adapter", metavar="PATH|NAME@ALIAS",
                           help="evaluate this adapter (a folder or a registry reference) instead of the DAG's")
        p.add_argument("--from", dest="from_stage", metavar="STAGE", help="force a rerun from this stage")
        p.add_argument("--address", help="join an existing Ray cluster")
    p = add("retrain", "scheduled retraining: exit quickly when the data did not change, else run the DAG "
            "and promote only through the gate", cmd_retrain, "loraflow retrain configs/demo.yaml --warm-start")
    _config_args(p)
    p.add_argument("--address", help="join an existing Ray cluster")
    p.add_argument("--warm-start", action="store_true", help="start training from the current champion adapter")
    p.add_argument("--wait", action="store_true", help="wait for a concurrent retrain instead of exiting")
    p.add_argument("--strict", action="store_true", help="exit 3 when the gate keeps the champion")
    p = add("tune", "Ray Tune sweep over the `tune:` section's search space (ASHA on eval loss); the best "
            "trial goes on through evaluate and register", cmd_tune, "loraflow tune configs/tune.yaml")
    _config_args(p)
    p.add_argument("--address", help="join an existing Ray cluster")
    p = add("dag", "print the stage graph with each stage's cache status, without running anything",
            cmd_dag, "loraflow dag configs/demo.yaml")
    _config_args(p)
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="show what --from STAGE would rerun")
    p = add("validate", "check a config file (keys, types, data paths) without running anything",
            cmd_validate, "loraflow validate configs/demo.yaml")
    _config_args(p, json_flag=False)
    p = add("init", "write a commented starter config", cmd_init, "loraflow init pipeline.yaml")
    p.add_argument("path", nargs="?", default="pipeline.yaml")
    p.add_argument("--force", action="store_true")

    p = add("registry", "list, show, promote, roll back, export or delete registered adapters", cmd_registry,
            "loraflow registry promote demo:2 --alias champion")
    p.add_argument("action", choices=["list", "show", "promote", "rollback", "export", "delete"])
    p.add_argument("ref", nargs="?", help="name (list, rollback), name:version or name@alias")
    p.add_argument("--root", default=DEFAULT_REGISTRY, help="registry root (registry.root)")
    p.add_argument("--name", help="list: only this name")
    p.add_argument("--metric", default="loss", help="list: the metric column to show")
    p.add_argument("--alias", default="champion")
    p.add_argument("--reason")
    p.add_argument("--out", help="export: destination folder")
    p.add_argument("--json", action="store_true")

    p = add("generate", "generate text with a base model and an optional adapter (chat template applied)",
            cmd_generate, 'loraflow generate --model smollm2-135m --adapter demo@champion "Extract ..."')
    p.add_argument("prompt", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", help="adapter folder or registry reference (name@alias, name:3)")
    p.add_argument("--root", default=DEFAULT_REGISTRY, help="registry root (default $LORAFLOW_REGISTRY or ~/.cache/loraflow/registry)")
    p.add_argument("--max-new-tokens", type=int, default=128)

    p = add("predict", "classify texts with a classification adapter", cmd_predict,
            'loraflow predict --model minilm-l6 --adapter banking@champion "my card was declined"')
    p.add_argument("text", nargs="+")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--adapter", required=True, help="adapter folder or registry reference")
    p.add_argument("--root", default=DEFAULT_REGISTRY, help="registry root (default $LORAFLOW_REGISTRY or ~/.cache/loraflow/registry)")
    p.add_argument("--json", action="store_true")
    _add_optional_commands(sub, add)
    return parser


def _add_optional_commands(sub, add) -> None:
    """Commands whose modules register their own arguments (jobs, retrain, tune)."""
    try:
        from workflows.ops import jobs
    except ImportError:
        return
    p = add("submit", "submit a loraflow command (`run CONFIG` by default) to a Ray cluster as a Ray Job",
            jobs.cmd_submit,
            "loraflow submit configs/demo.yaml --address http://127.0.0.1:8265")
    jobs.add_submit_arguments(p)
    p = add("jobs", "status, logs or stop of a submitted Ray Job", jobs.cmd_jobs,
            "loraflow jobs logs raysubmit_123 --address http://127.0.0.1:8265")
    jobs.add_jobs_arguments(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from workflows import __version__

        print(__version__)
        return EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    from workflows.config import ConfigError
    from workflows.dag import LockHeldError
    from workflows.registry.base import RegistryError

    if getattr(args, "json", False):
        _reserve_stdout_for_json()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except LockHeldError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a stage failed: keep the traceback for the log, end with one clear line
        import traceback

        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
