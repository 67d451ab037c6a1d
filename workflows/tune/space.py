"""A sweep's search space: distributions over config keys, LoRA conveniences, search algorithms.

`tune.search_space` maps a dotted `lora.*` / `train.*` key to a distribution or a plain value:

    {choice: [..]}  {grid: [..]}  {uniform: [lo, hi]}  {loguniform: [lo, hi]}  {randint: [lo, hi]}

Two LoRA conveniences: `lora.alpha_over_r` (a pseudo-key) sets `lora.alpha = ratio x lora.r` in
every trial, so the scale alpha/r stays put while the rank moves; `lora.target_modules` may name a
set (`attention`: the attention projections of any architecture loraflow knows, `all-linear`).

`check_space` refuses, before anything runs, every key or value that cannot make a valid trial
config, naming the key: each candidate value (every choice, both bounds of a range) is applied to
the config and validated, as a trial would be.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from workflows.config import ConfigError, PipelineConfig, apply_overrides, config_from_dict

ALPHA_OVER_R = "lora.alpha_over_r"
# The attention projections of the architectures lora_core knows (Llama/Mistral/Qwen q,k,v,o_proj;
# BERT query/key/value and attention.output.dense; GPT-2 c_attn and attn.c_proj; fused qkv layers).
# A regex: PEFT and lora_core `re.fullmatch` a string target against each module's full name.
ATTENTION = (r".*\.(q_proj|k_proj|v_proj|o_proj|query|key|value|attention\.output\.dense|c_attn|attn\.c_proj"
             r"|out_proj|query_key_value|qkv_proj|Wqkv)")
TARGET_SETS = {"attention": ATTENTION, "all-linear": "all-linear"}
SEARCHABLE = ("lora", "train")  # data.* and model.* would change the prepared data every trial shares
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


def _kind(dist: Any) -> tuple[str, Any]:
    """(kind, arguments) of a search-space entry; a plain value is ("value", value)."""
    if isinstance(dist, dict):
        ((kind, args),) = dist.items()
        return kind, args
    return "value", dist


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_with(config: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The pipeline config with parameters (dotted keys) applied, validated again. Keeps the tune
    section, so the trial's prepare fingerprint (with its validation split) is the sweep's."""
    raw = config.model_dump(mode="json")
    raw = apply_overrides(raw, [f"{k}={_yaml_scalar(v)}" for k, v in params.items()])
    return config_from_dict(raw, origin="tune trial", source_path=config.source_path)


def trial_config(config: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The config a trial with `params` (as Tune samples them) trains with."""
    params = dict(params)
    ratio = params.pop(ALPHA_OVER_R, None)
    targets = params.get("lora.target_modules")
    if isinstance(targets, str) and targets in TARGET_SETS:
        params["lora.target_modules"] = TARGET_SETS[targets]
    cfg = config_with(config, params)
    if ratio is not None:
        cfg = config_with(cfg, {"lora.alpha": float(ratio) * cfg.lora.r})
    return cfg


def _candidates(key: str, kind: str, args: Any) -> list[Any]:
    """The values to check of one entry (every listed value, both ends of a range); raises on
    malformed arguments."""
    where = f"tune.search_space.{key}"
    if kind == "value":
        return [args]
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return list(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
    lo, hi = args
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint needs integers [low, high) , got {args!r}")
        return [lo, hi - 1]
    return [lo, hi]


def check_space(config: PipelineConfig) -> None:
    """Refuse a search space (or tune setting) that cannot run, naming the key; nothing runs here."""
    tc = config.tune
    assert tc is not None
    if not tc.search_space:
        raise ConfigError("tune.search_space: empty; name at least one key to search, e.g. train.lr")
    for key, dist in tc.search_space.items():
        kind, args = _kind(dist)
        where = f"tune.search_space.{key}"
        if key != ALPHA_OVER_R and key.split(".")[0] not in SEARCHABLE:
            raise ConfigError(f"{where}: only lora.* and train.* keys (and {ALPHA_OVER_R}) can be searched; "
                              "data.* and model.* change the prepared data every trial shares: run one sweep "
                              "per data or model setting")
        if tc.search == "grid" and kind not in ("grid", "choice", "value"):
            raise ConfigError(f"{where}: search: grid needs {{grid: [..]}} or {{choice: [..]}} values, got {kind}")
        if tc.search != "grid" and kind == "grid":
            raise ConfigError(f"{where}: {{grid: [..]}} needs tune.search: grid (got {tc.search}); "
                              "use {choice: [..]} to sample")
        for value in _candidates(key, kind, args):
            if key == ALPHA_OVER_R:
                if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                    raise ConfigError(f"{where}: the ratio lora.alpha / lora.r must be a positive number, "
                                      f"got {value!r}")
                continue
            try:
                trial_config(config, {key: value})
            except ConfigError as e:
                detail = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{where}: {value!r} makes an invalid trial config: {detail}") from None
    if config.train.eval_every is None:
        raise ConfigError("train.eval_every: a sweep compares trials on the validation split every "
                          "train.eval_every steps (and ASHA stops trials there); set it, e.g. train.eval_every: 20")
    rung, every = tc.grace_period * config.train.eval_every, config.train.checkpoint_every
    if tc.asha and tc.halving == "sync" and (not every or rung % every):
        raise ConfigError(f"train.checkpoint_every: tune.halving sync pauses each trial at step {rung} "
                          f"(tune.grace_period x train.eval_every, then x reduction_factor) and resumes it from "
                          f"a checkpoint there; set it to {rung} or a divisor of it (got {every})")
    _check_metric(config)
    if tc.search == "tpe":
        optuna_search_class()


def _check_metric(config: PipelineConfig) -> None:
    """The metrics the evaluate stage cannot compute for this config; other names are checked at
    the first validation (the evaluate stage's metrics decide, whatever a task adds)."""
    tc = config.tune
    metric, task = tc.metric, config.model.task
    generated = ("exact_match", "normalized_match")
    if metric in generated and (task != "causal_lm" or config.eval.generation.num_prompts == 0):
        raise ConfigError(f"tune.metric {metric!r} scores generated answers: it needs model.task causal_lm and "
                          f"eval.generation.num_prompts > 0 (the validation rows generated for)")
    if metric in ("accuracy", "macro_f1") and task == "causal_lm":
        raise ConfigError(f"tune.metric {metric!r} is a classification metric; model.task is causal_lm "
                          "(loss, perplexity, token_accuracy, exact_match)")


def optuna_search_class():
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.search: tpe needs Optuna: pip install 'loraflow[tune]'") from None
    return OptunaSearch


def param_space(config: PipelineConfig) -> dict[str, Any]:
    """`tune.search_space` as Ray Tune's param space (choice becomes a grid axis under search: grid)."""
    from ray import tune

    tc = config.tune
    space: dict[str, Any] = {}
    for key, dist in tc.search_space.items():
        kind, args = _kind(dist)
        if kind == "value":
            space[key] = args
        elif kind == "grid" or (kind == "choice" and tc.search == "grid"):
            space[key] = tune.grid_search(args)
        else:
            space[key] = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform,
                          "randint": tune.randint}[kind](*([args] if kind == "choice" else args))
    return space


def search_algorithm(config: PipelineConfig, concurrency: int, slots: Any = None):
    """Ray Tune's searcher for `tune.search`, running at most `concurrency` trials at once: random and
    grid by Tune's variant generator (seeded), tpe by Optuna's TPE sampler through `OptunaSearch`
    (the Tuner hands both the metric and mode). With `slots` (synchronous halving's, which pauses
    trials) a trial is created only into a free slot instead (`workflows.tune.halving`)."""
    tc = config.tune
    if slots is not None:
        from workflows.tune.halving import GatedSearch, GatedVariants

        if tc.search == "tpe":
            return GatedSearch(optuna_search_class()(seed=tc.seed), slots)
        return GatedVariants(slots, random_state=tc.seed)
    if tc.search == "tpe":
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(optuna_search_class()(seed=tc.seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrency)


def num_samples(config: PipelineConfig) -> int:
    """Tune's `num_samples`: the grid once, else `tune.num_trials` samples."""
    return 1 if config.tune.search == "grid" else config.tune.num_trials


def num_trials(config: PipelineConfig) -> int:
    """How many trials the sweep runs: the grid's size, else `tune.num_trials`."""
    if config.tune.search != "grid":
        return config.tune.num_trials
    return math.prod(len(args) for kind, args in map(_kind, config.tune.search_space.values()) if kind != "value")
