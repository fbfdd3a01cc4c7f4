"""The one precision resolver: what ``precision = "auto"`` means on this machine, for every pass.

Extraction, the activation store's pass and fine-tuning all call ``resolve_precision``, so a config's
"auto" is one thing per machine: bf16 on CUDA (fp16 where the GPU has no bf16) and on CPUs whose
oneDNN reports native bf16 (AVX-512 BF16 / AMX), fp32 elsewhere. On an AVX2-only CPU bf16 autocast
is emulated and runs ~40x slower than fp32 (measured: 0.18 vs 8 img/s for Lite0), hence fp32 there.
The resolved name (never "auto") is what cache specs record.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively on this CPU (the capability tests patch this)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_has_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> the fastest precision that is native on ``device``; other names pass through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if cuda_has_bf16() else "fp16"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    return _DTYPES.get(resolve_precision(precision, device))


def autocast(precision: str, device: str):
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
