"""Dense copies of the frozen 4-bit weights for the length of a ``generate`` call (opt-in: ``set_enabled(True)`` or
``FASTLLM_DENSE_DECODE=1``).

A decode step of a QLoRA model reads every base weight once. Through bitsandbytes' 4-bit GEMV (one row) or a
dequant into the workspace + GEMM (batches) that read runs far below the memory bandwidth (docs/benchmarks.md). With
this switched on, the first no-grad dequant of each weight group inside a ``generate`` call (``scope``) writes a
compute-dtype copy that the rest of the call reuses: every later step, one row or many, is one cuBLAS GEMM over
2 bytes a weight, no dequant. The copies are dropped when the call returns (with the decode graphs that captured
them), so training never sees the memory: the trade is the dense weights' size (8B: ~15 GB) during generation, for
speed. A weight group whose copy would not fit (what an allocation can get, within the process's memory cap, less
``MARGIN``) keeps the 4-bit path; that is counted in ``stats`` and logged once.

Keys are the packed weights' addresses, which cannot be reused by another tensor while the call runs: the weights
are alive for the whole call.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch

from .._compat import Switch, cuda_allocatable

logger = logging.getLogger(__name__)

MARGIN = 1 << 30  # bytes left free on the device after a copy
_SWITCH = Switch("FASTLLM_DENSE_DECODE")
_DEPTH = 0  # nesting of ``scope``
_CACHE: dict[tuple, torch.Tensor] = {}
_EPOCH = 0  # bumped when a copy is made or the copies are dropped (``ops.nf4.workspace_epoch`` adds it)
stats: Counter = Counter()


def enabled() -> bool:
    return bool(_SWITCH)


def set_enabled(on: bool | None) -> None:
    """``True`` / ``False``, or ``None`` for the environment's choice (``FASTLLM_DENSE_DECODE=1``: on)."""
    _SWITCH.set(on)


def active() -> bool:
    """Inside a ``scope`` with the switch on: no-grad dequants are served from (and fill) the dense copies."""
    return _DEPTH > 0


def epoch() -> int:
    return _EPOCH


def buffers() -> tuple:
    return tuple(_CACHE.values())


def _drop() -> None:
    global _EPOCH
    if _CACHE:
        _CACHE.clear()
        _EPOCH += 1


@contextlib.contextmanager
def scope():
    """The length of one ``generate`` call: yields whether dense copies are in use; drops them on exit."""
    global _DEPTH
    if not enabled():
        yield False
        return
    _DEPTH += 1
    try:
        yield True
    finally:
        _DEPTH -= 1
        if _DEPTH == 0:
            _drop()


def _room(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    return cuda_allocatable(device) - nbytes >= MARGIN


def lookup(weights, shape: tuple, device: torch.device, dtype: torch.dtype, fill):
    """The dense ``[W_1; W_2; ..]`` of ``shape`` for the packed ``weights`` (made once a scope by ``fill(out)``),
    or None: not in a scope, grad mode on (training dequantizes as before), or no room for the copy."""
    if not _DEPTH or torch.is_grad_enabled():
        return None
    key = (tuple(w.data_ptr() for w in weights), shape, device, dtype)
    dense = _CACHE.get(key)
    if dense is not None:
        return dense
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if not _room(nbytes, device):
        if not stats["no room"]:
            logger.warning("fastllm: dense decode copies stop at %d weight groups: no room for %.1f MB more on %s; "
                           "the rest keep the 4-bit path", len(_CACHE), nbytes / 2**20, device)
        stats["no room"] += 1
        return None
    global _EPOCH
    dense = _CACHE[key] = fill(torch.empty(shape, dtype=dtype, device=device))
    _EPOCH += 1
    stats["copies"] += 1
    return dense
