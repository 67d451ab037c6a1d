"""Adapter directories in PEFT's format, written atomically and read strictly.

    adapter_config.json          PEFT's LoraConfig keys (json, indent 2, sorted keys)
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight (r, in), .lora_B.weight
                                 (out, r), [.lora_B.bias], [<path>.base_layer.bias], [<saved module>.*];
                                 metadata {"format": "pt"}
    loraflow.json                sha256 of the weights file, base identity, library version, extras

`peft.PeftModel.from_pretrained(base, dir)` loads these directories; `load_adapter` loads them and
PEFT's own (without loraflow.json). Only safetensors is read: a pickle is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .inject import adapter_entries, apply_lora, lora_state, remove_lora, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LINEAGE_NAME = "loraflow.json"
PREFIX = "base_model.model."
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_RESERVED_LINEAGE_KEYS = {"weights_file", "weights_sha256", "base_model", "library", "library_version"}


class AdapterLoadError(ValueError):
    """An adapter directory that does not fit the model or is damaged; the message names the file."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes, under PEFT's keys (`base_model.model.` + module path)."""
    return {PREFIX + saved: t.detach() for _, saved, t in adapter_entries(model)}


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_identity: dict | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter of `model` (or of `model.module` under DDP) to `directory`, atomically:
    everything goes to a temp dir beside it that is renamed into place, so a reader sees the old
    directory or the complete new one. `base_identity` (e.g. {"name", "sha256", "quant"}) and
    `extra` (lineage: tokenizer hash, data digest, metrics, ...) go into loraflow.json."""
    model = unwrap(model)
    config = lora_state(model).config
    tensors = {k: t.to("cpu").contiguous().clone() for k, t in adapter_state_dict(model).items()}
    if not any(k.endswith(".lora_A.weight") for k in tensors):
        raise ValueError("adapter has no lora_A weights; refusing to write an empty adapter")
    clash = _RESERVED_LINEAGE_KEYS & set(extra or {})
    if clash:
        raise ValueError(f"save_adapter extra uses reserved loraflow.json keys: {sorted(clash)}")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_config = config.to_peft_dict()
        if config.task_type is None:  # PEFT records the class when there is no task type
            peft_config["auto_mapping"] = {"base_model_class": type(model).__name__,
                                           "parent_library": type(model).__module__}
        _write_json(tmp / CONFIG_NAME, peft_config)
        _write_json(tmp / LINEAGE_NAME, {
            "weights_file": WEIGHTS_NAME, "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
            "base_model": base_identity, "library": "loraflow", "library_version": _library_version(),
            **(extra or {})})
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Apply the adapter saved in `directory` to the base `model` (in place) and load its weights.

    Verifies loraflow.json's sha256 when present, then requires the file's keys to be exactly the
    adapter's keys with matching shapes; any mismatch raises AdapterLoadError naming the key and the
    file, and leaves `model` as it was. `trainable=False` freezes the adapter (inference).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        pickle = " (only adapter_model.bin, a pickle: re-save it with safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise AdapterLoadError(f"{weights_path}: missing{pickle}")
    verify_checksum(directory)
    try:
        apply_lora(model, config)
    except ValueError as e:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: adapter does not fit this "
                               f"{type(model).__name__}: {e}") from None
    try:
        _load_weights(model, weights_path)
    except BaseException:
        remove_lora(model)
        raise
    if not trainable:
        for _, _, tensor in adapter_entries(model):
            tensor.requires_grad_(False)
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        loaded = load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {PREFIX + saved: t for _, saved, t in adapter_entries(model)}
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    if missing:
        raise AdapterLoadError(f"{path}: missing key {missing[0]}" + _more(missing))
    if unexpected:
        raise AdapterLoadError(f"{path}: unexpected key {unexpected[0]}" + _more(unexpected))
    for key, tensor in expected.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise AdapterLoadError(f"{path}: key {key} has shape {tuple(loaded[key].shape)}, "
                                   f"the model expects {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(loaded[key])


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: missing (not an adapter directory)") from None
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: invalid JSON ({e})") from None
    try:
        return LoraConfig.from_peft_dict(data, source=str(path))
    except ValueError as e:
        raise AdapterLoadError(str(e)) from None


def verify_checksum(directory: str | os.PathLike) -> None:
    """Compare the weights file with loraflow.json's sha256 (no loraflow.json: PEFT-written, skip)."""
    lineage_path = Path(directory) / LINEAGE_NAME
    if not lineage_path.is_file():
        return
    lineage = json.loads(lineage_path.read_text())
    weights = Path(directory) / lineage.get("weights_file", WEIGHTS_NAME)
    actual = sha256_file(weights)
    if actual != lineage.get("weights_sha256"):
        raise AdapterLoadError(f"{weights}: sha256 {actual} does not match {lineage_path} "
                               f"({lineage.get('weights_sha256')}): the file is damaged or was replaced")


def check_servable(directory: str | os.PathLike, max_lora_rank: int = 16) -> tuple[bool, list[str]]:
    """Would vLLM (`--enable-lora --max-lora-rank N`, default 16) accept this adapter?

    Returns (ok, reasons it would not). vLLM's rules (LORA_ANCHORS.md 5.5): r, lora_alpha and
    target_modules present; modules_to_save null; no DoRA; r <= max_lora_rank, itself one of
    1, 8, 16, 32, 64, 128, 256, 320, 512; only lora_A/lora_B tensors in the weights file.
    """
    if max_lora_rank not in VLLM_RANKS:
        raise ValueError(f"max_lora_rank must be one of vLLM's values {VLLM_RANKS}, got {max_lora_rank}")
    directory = Path(directory)
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return False, [f"{directory / CONFIG_NAME}: unreadable ({e})"]
    reasons = [f"{CONFIG_NAME}: missing required key {k!r}" for k in ("r", "lora_alpha", "target_modules")
               if data.get(k) in (None, [], "")]
    if data.get("peft_type") != "LORA":
        reasons.append(f"{CONFIG_NAME}: peft_type is {data.get('peft_type')!r}, not 'LORA'")
    if data.get("modules_to_save"):
        reasons.append(f"modules_to_save={data['modules_to_save']!r}: vLLM only supports modules_to_save=None")
    if data.get("use_dora"):
        reasons.append("use_dora=true: vLLM does not support DoRA")
    r = data.get("r")
    if isinstance(r, int) and r > max_lora_rank:
        fits = [v for v in VLLM_RANKS if v >= r]
        hint = f"serve with --max-lora-rank {fits[0]}" if fits else f"vLLM's largest is {VLLM_RANKS[-1]}"
        reasons.append(f"r={r} is greater than max_lora_rank {max_lora_rank} ({hint})")
    try:
        with safe_open(directory / WEIGHTS_NAME, "pt") as f:
            keys = list(f.keys())
    except Exception as e:
        return False, reasons + [f"{directory / WEIGHTS_NAME}: unreadable ({e})"]
    lora_suffixes = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
    others = [k for k in keys if not (k.startswith(PREFIX) and k.endswith(lora_suffixes))]
    if others:
        reasons.append(f"{WEIGHTS_NAME}: non-LoRA tensor {others[0]} (vLLM accepts only lora_A/lora_B "
                       f"weights)" + _more(others))
    return not reasons, reasons


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing `target` is moved aside first and deleted after."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _library_version() -> str:
    try:
        return metadata.version("loraflow")
    except metadata.PackageNotFoundError:
        return "unknown"
