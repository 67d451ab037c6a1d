"""What a device runs natively, decided in one place for the loader and the trainer: the base's
dtype (`model.dtype: auto`), whether bf16 is native (`train.precision: auto`), the attention kernel.
No Ray, no transformers; torch is imported inside the functions.
"""

from __future__ import annotations

import importlib.util


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """`auto` → "bfloat16" where bf16 matmuls are native (a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX, where they run about 2x faster than fp32); on a GPU without bf16 (T4,
    V100) "float16"; else "float32" (other CPUs emulate bf16, slower than fp32). Resolved where the
    model is loaded (each worker, for its own device)."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.device(device).type == "cuda":
        return "bfloat16" if native_bf16(device) else "float16"
    return "bfloat16" if native_bf16(device) else "float32"


def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` does bf16 matmuls natively: a CUDA GPU of compute capability 8.0+ (not
    emulated bf16, which torch's bf16 check counts unless told not to: T4 and V100 emulate it,
    slower than fp16), or a CPU with AVX512-BF16 or AMX. Shared by `resolve_dtype` (the base's
    dtype) and the trainer's `precision: auto` (its autocast dtype)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in native)


def attention_implementation(device: str, packed: bool) -> str:
    """The attention kernel a training worker asks for: FlashAttention-2 for packed rows on a CUDA
    device where `flash_attn` is installed (its variable-length path keeps each example to itself
    at full speed; SDPA's per-example mask falls back to a slow masked kernel), else SDPA."""
    import torch

    if packed and torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
