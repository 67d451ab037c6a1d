"""The pipeline config: one YAML file, validated by pydantic before anything runs.

Every section forbids unknown keys, so a typo (`lerning_rate`) fails at load time naming the key
and the file instead of silently taking a default. Defaults are what a user rarely needs to touch.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lora_core.config import LoraConfig
from workflows.artifacts import UserError, is_uri
from workflows.config_yaml import YAMLError, load_yaml
from workflows.registry_root import DEFAULT_REGISTRY_ROOT, resolve_registry_root

CONFIG_VERSION = 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    # A built-in offline alias (smollm2-135m, minilm-l6, tiny-llama, tiny-gpt2, tiny-bert),
    # an HF model id, or a local directory.
    name: str = "smollm2-135m"
    task: Literal["causal_lm", "seq_cls", "token_cls"] = "causal_lm"
    # Weights dtype of the frozen base; adapters are always kept in fp32. "auto": bfloat16 where
    # the hardware does bf16 matmuls natively (bf16 GPUs; CPUs with AVX512-BF16 or AMX), float16 on
    # GPUs without bf16 (T4, V100), else float32. Unset: "auto" with train.use_gpu, else float32.
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    revision: str | None = None
    # seq_cls encoders: what feeds the head. "default": the model's own (BERT: dense + tanh on the
    # first token); "mean": the mean over the real tokens, what sentence-transformers encoders
    # (all-MiniLM-L6-v2) were trained for. Recorded in the adapter; `predict` and evaluate follow it.
    pooling: Literal["default", "mean"] = "default"

    @model_validator(mode="after")
    def _pooling_is_for_classifiers(self) -> ModelSection:
        if self.pooling != "default" and self.task != "seq_cls":
            raise ValueError(f"model.pooling: {self.pooling!r} feeds a classification head; it needs task: seq_cls "
                             f"(got task: {self.task})")
        return self


class DataSection(Section):
    # A file, glob or directory (local, s3://, gs://), a list of them, or a Hugging Face dataset:
    # `hf:<name or folder>[@<revision>][:<config>][#<split>]` (workflows/prepare/inputs.py).
    source: str | list[str]
    # Optional separate eval source; otherwise `eval_fraction` of `source` by example hash.
    eval_source: str | list[str] | None = None
    reader: Literal["auto", "jsonl", "csv", "parquet", "hf", "conll"] = "auto"
    format: Literal["instruction", "completion", "chat", "text", "classification", "token_classification"]
    # Maps the format's roles to column names, e.g. {instruction: question, output: answer}.
    # Roles: instruction/input/output, prompt/completion, messages, text, label.
    fields: dict[str, str] = Field(default_factory=dict)
    system_prompt: str | None = None
    # `chat` renders prompts with the tokenizer's chat template (when it has one); `plain` uses a
    # fixed "### Instruction / ### Response" layout.
    template: Literal["auto", "chat", "plain"] = "auto"
    max_seq_len: int = Field(512, ge=8)
    truncate: bool = True
    train_on_inputs: bool = False
    pack: bool | None = None  # None: on for causal LM training data, off for classification
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_eval_rows: int | None = Field(None, ge=1)
    dedupe: bool = True
    seed: int = 0
    max_reject_fraction: float = Field(0.01, ge=0.0, le=1.0)
    num_shards: int | None = Field(None, ge=1)  # default: max(2, train.num_workers)
    tokenize_actors: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1)
    max_rows: int | None = Field(None, ge=1)  # read at most this many rows of source, and of eval_source (quick runs)
    # hf: sources only: read the dataset as a stream (datasets' IterableDataset) instead of from its
    # Arrow files, for data sets that do not fit on disk.
    streaming: bool = False
    # token_classification: the tag scheme of the input (converted to IOB2); the entity types or tag
    # names allowed (class ids index this list; a type outside it rejects the row: unknown_tag);
    # label every sub-token of a word (B- turned into I-), not only the first (Hugging Face run_ner).
    tag_scheme: Literal["iob2", "iob1", "bioes"] = "iob2"
    labels: list[str] | None = None
    label_all_tokens: bool = False


_LORA = {f.name: f.default for f in dataclasses.fields(LoraConfig)}  # one source of LoRA defaults


class LoraSection(Section):
    """`lora_core.LoraConfig`'s fields and defaults (PEFT's: r 8, alpha 8, dropout 0), validated."""

    r: int = Field(_LORA["r"], ge=1)
    alpha: float = Field(_LORA["alpha"], gt=0)
    dropout: float = Field(_LORA["dropout"], ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = _LORA["target_modules"]
    exclude_modules: list[str] | str | None = _LORA["exclude_modules"]
    layers_to_transform: list[int] | int | None = _LORA["layers_to_transform"]
    use_rslora: bool = _LORA["use_rslora"]
    lora_bias: bool = _LORA["lora_bias"]
    bias: Literal["none", "lora_only", "all"] = _LORA["bias"]
    modules_to_save: list[str] | None = _LORA["modules_to_save"]
    init: Literal["kaiming", "gaussian"] = _LORA["init"]


class TrainSection(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0)  # fractions let workers share a GPU (with ddp_backend: gloo)
    # The process group: "auto" is NCCL with GPUs, gloo without; "gloo" also works on GPUs (CUDA
    # tensors), which lets several workers share one GPU. Every collective gets device tensors.
    ddp_backend: Literal["auto", "nccl", "gloo"] = "auto"

    @model_validator(mode="after")
    def _shared_gpus_need_gloo(self) -> TrainSection:
        if self.use_gpu and self.gpus_per_worker % 1 and self.ddp_backend != "gloo":
            raise ValueError(f"train.gpus_per_worker: {self.gpus_per_worker} puts several workers on one GPU, which "
                             f"NCCL refuses; set train.ddp_backend: gloo (got {self.ddp_backend!r})")
        return self

    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)  # per worker, per micro-step
    # Rows of the local buffer each epoch reshuffles through (seeded by train.seed and the epoch; the
    # prepare stage already wrote the rows in a seeded random order). 0: no reshuffle.
    shuffle_buffer_rows: int = Field(10_000, ge=0)
    # Batch rows of like length together (less padding); "auto": on for unpacked rows.
    group_by_length: bool | Literal["auto"] = "auto"
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    # Peak lr of the modules trained in full (a classifier head: modules_to_save); None: train.lr. A fresh
    # token classifier with many rare tags needs more than LoRA's lr, or it predicts O everywhere.
    head_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # Mixed precision of the forward/backward (adapters and optimizer state stay fp32). "auto": bf16
    # autocast on GPUs that have bf16, fp16 autocast with a gradient scaler on those that do not
    # (T4, V100), fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # DDP's find_unused_parameters; "auto": on for mixture-of-experts models (an expert that gets no
    # token in a step leaves its trainable parameters without a gradient), off otherwise.
    find_unused_parameters: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    grad_compression: Literal["none", "bf16"] = "none"
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    # Warm start from an existing adapter: a path or a registry reference (name@alias, name:version).
    init_adapter: str | None = None


class GenerationSection(Section):
    num_prompts: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    # exact: whole answer; gsm8k: final number after ####; json: parsed JSON equality.
    match: Literal["exact", "gsm8k", "json"] = "exact"


class EvalSection(Section):
    actors: int = Field(1, ge=1)
    # GPUs per eval actor (fractions share a GPU); None: 1 when train.use_gpu, else 0.
    gpus_per_actor: float | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    compare_base: bool = True
    compare_champion: bool = True
    generation: GenerationSection = Field(default_factory=GenerationSection)
    bootstrap_samples: int = Field(1000, ge=0)


class GateSection(Section):
    metric: str = "loss"
    direction: Literal["min", "max"] = "min"
    min_delta: float = 0.0
    # guard metric -> largest allowed regression (in that metric's own units)
    guards: dict[str, float] = Field(default_factory=dict)


class RegistrySection(Section):
    # One rule for every command (workflows/registry_root.py): flag/--set, $LORAFLOW_REGISTRY, this key, default.
    root: str = DEFAULT_REGISTRY_ROOT
    name: str = "adapter"
    alias: str = "champion"
    gate: GateSection = Field(default_factory=GateSection)
    _root_from: str = PrivateAttr("registry.root")

    @property
    def root_from(self) -> str:
        """Where `root` came from, for error messages (`--set registry.root`, `$LORAFLOW_REGISTRY`, ...)."""
        return self._root_from


class MlflowSection(Section):
    # An MLflow tracking URI (http://..., sqlite:///..., a folder); None: $MLFLOW_TRACKING_URI.
    tracking_uri: str | None = None
    experiment: str = "loraflow"
    registered_model: str | None = None  # the MLflow model the registry is mirrored to; None: registry.name


class TrackingSection(Section):
    tensorboard: bool = True  # event files under runs/<id>/tensorboard
    # MLflow (pip install 'loraflow[mlflow]'): on when this section is given or $MLFLOW_TRACKING_URI is set.
    mlflow: MlflowSection | None = None


class ClusterSection(Section):
    address: str | None = None  # None: local ray.init(); "auto" inside a cluster / Ray Job
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local cluster
    dashboard: bool = True  # a local cluster's dashboard, on 127.0.0.1 (http://127.0.0.1:8265)
    work_dir: str = "work"
    runs_dir: str = "runs"


class TuneSection(Section):
    """`loraflow tune` (workflows/tune/): trials train on the train split less a validation split that
    prepare carves out of it, and are compared on that split only; the eval split scores the chosen
    adapter once, after selection."""

    # Config key -> a distribution {choice: [..]}, {grid: [..]}, {uniform: [lo, hi]},
    # {loguniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded), or a plain value every trial gets.
    # Keys are dotted lora.* / train.* paths; `lora.alpha_over_r` sets lora.alpha = ratio x lora.r;
    # lora.target_modules may name a set: attention or all-linear (workflows/tune/space.py).
    search_space: dict[str, Any]
    search: Literal["random", "grid", "tpe"] = "random"  # tpe: Optuna (pip install 'loraflow[tune]')
    num_trials: int = Field(4, ge=1)  # random and tpe: trials to run; grid: the grid's size wins
    max_concurrent: int | None = Field(None, ge=1)  # None: as many trials as the cluster's CPUs fit
    # Any metric the evaluate stage computes for the task (loss, accuracy, macro_f1, exact_match,
    # ...), on the validation split, every train.eval_every steps; "eval_loss" means loss.
    metric: str = "loss"
    mode: Literal["min", "max"] | None = None  # None: min for loss and perplexity, else max
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # of the train rows, by example hash
    # asha: halving at grace_period x reduction_factor^k validations, async (Ray Tune's ASHA) or sync:
    asha: bool = True  # each trial paused at a rung until all arrive (workflows/tune/halving.py)
    halving: Literal["async", "sync"] = "async"  # sync: train.checkpoint_every must divide the rungs
    grace_period: int = Field(1, ge=1)  # in validations (train.eval_every steps each)
    reduction_factor: int = Field(2, ge=2)
    seed: int = 0

    @field_validator("search_space")
    @classmethod
    def _known_distributions(cls, space: dict[str, Any]) -> dict[str, Any]:
        kinds = {"choice", "uniform", "loguniform", "randint", "grid"}
        for key, dist in space.items():
            if isinstance(dist, dict) and (len(dist) != 1 or next(iter(dist)) not in kinds):
                raise ValueError(f"tune.search_space.{key}: expected one of {sorted(kinds)} or a plain value, "
                                 f"got {dist!r}")
        return space

    @property
    def direction(self) -> str:
        if self.mode is not None:
            return self.mode
        return "min" if self.metric in ("loss", "eval_loss", "perplexity") else "max"


class PipelineConfig(Section):
    version: int = CONFIG_VERSION
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    tune: TuneSection | None = None
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    # Where the file came from: relative data paths resolve against it. Not part of fingerprints.
    source_path: str | None = Field(None, exclude=True)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(f"unsupported config version {v}; this loraflow reads version {CONFIG_VERSION}")
        return v

    @model_validator(mode="after")
    def _base_dtype(self) -> PipelineConfig:
        if self.model.dtype is None:  # a GPU run loads its base in bf16/fp16, never an fp32 copy to autocast
            self.model.dtype = "auto" if self.train.use_gpu else "float32"
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON-able data (what fingerprints hash)."""
        data = getattr(self, name).model_dump(mode="json")
        if name == "model" and data["pooling"] == "default":
            del data["pooling"]  # added later: a config that leaves it alone keeps its fingerprints
        for key, default in _ADDED_LATER.get(name, {}).items():  # the same for these
            if key in data and data[key] == default:
                del data[key]
        if name == "data" and self.tune is not None:
            # prepare carves the validation split only for a sweep: plain runs keep their fingerprints
            data["validation_fraction"] = self.tune.validation_fraction
        return data

    def resolve_path(self, path: str) -> str:
        """A relative local path is taken relative to the config file's folder."""
        if is_uri(path) or path.startswith("hf:"):
            return path
        if Path(path).expanduser().is_absolute():
            return str(Path(path).expanduser())
        base = Path(self.source_path).parent if self.source_path else Path.cwd()
        return str((base / path).resolve())


# Keys added after configs were fingerprinted: left at their default, a section hashes as before.
_ADDED_LATER = {"data": {"tag_scheme": "iob2", "labels": None, "label_all_tokens": False},
                "train": {"head_lr": None}}


class ConfigError(UserError, ValueError):
    """A config that cannot run: names the file, the key and the value."""

    exit_code = 2


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see `loraflow init` for every key)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides (values parsed as YAML scalars/lists)."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = load_yaml(value) if value != "" else ""
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline YAML file. Raises ConfigError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(raw).__name__}")
    merged = apply_overrides(raw, overrides)
    origin = resolve_registry_root(merged, overrides, path)
    cfg = config_from_dict(merged, origin=str(path), source_path=str(path.resolve()))
    cfg.registry._root_from = origin
    return cfg


def config_from_dict(raw: dict[str, Any], origin: str = "<dict>", source_path: str | None = None) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None
    cfg.source_path = source_path
    return cfg


def check_runs_dir(config: PipelineConfig) -> None:
    """Run records are plain files: `cluster.runs_dir` is never an object store (checked by run and submit)."""
    if is_uri(config.cluster.runs_dir):
        raise ConfigError(f"cluster.runs_dir {config.cluster.runs_dir!r}: run records are written with plain file "
                          "I/O, so runs_dir must be a path on the cluster, e.g. a shared volume "
                          "(--set cluster.runs_dir=/mnt/shared/loraflow/runs); only cluster.work_dir may be "
                          "s3:// or gs://")
