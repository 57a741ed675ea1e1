"""Non-reentrant gradient checkpointing functions for transformers' ``GradientCheckpointingLayer``.

transformers calls ``layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)``; the patch
registry sets that attribute per decoder layer to one of the functions below.

``offload_checkpoint`` also parks the tensors the checkpoint keeps (the layer's positional inputs: the hidden
states) in pinned CPU memory until backward, so a long sequence's per-layer inputs no longer sit on the GPU.
Non-reentrant checkpointing saves its positional inputs through the autograd saved-tensor hooks that are active
when it is entered, so hooks around the call catch exactly those, while the checkpoint's own inner hooks
(innermost wins) still drop everything saved inside the layer. The copies are queued on the current stream
(``non_blocking``): ``torch.autograd.graph.save_on_cpu`` copies device-to-host synchronously, which makes the
host wait for the GPU at every layer, and a QLoRA step lives on that overlap. Stream order makes the async copies
safe: the source's memory is only reused by work queued after the copy, the host copy is only read by the
host-to-device copy queued in backward, and the pinned block is not recycled before that copy ends (the caching
host allocator records the stream).
"""

from __future__ import annotations

import threading

import torch
from torch.utils.checkpoint import checkpoint

_STATE = threading.local()


class _Inside:
    """A re-enterable context that counts its depth in a thread-local field. torch enters the recompute context of
    one checkpoint again at every backward through it (``retain_graph``, ``autograd.grad`` twice): a one-shot
    generator context would fail there."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        setattr(_STATE, self.key, getattr(_STATE, self.key, 0) + 1)

    def __exit__(self, *exc) -> None:
        setattr(_STATE, self.key, getattr(_STATE, self.key) - 1)


def _contexts():
    """``checkpoint``'s ``context_fn``: ``in_checkpoint()`` true around the forward and the recompute,
    ``is_recomputing()`` around the recompute."""
    return _Inside("forward"), _Inside("depth")


def in_checkpoint() -> bool:
    """True inside a decoder layer run by one of these checkpoint functions (its forward or its recompute):
    tensors saved for backward there are dropped after the forward and rebuilt in backward."""
    return getattr(_STATE, "forward", 0) > 0 or is_recomputing()


def is_recomputing() -> bool:
    """True while one of these checkpoint functions re-runs a decoder layer's forward in backward.

    That re-run exists only to rebuild the tensors the layer saved for backward; its output is dropped (and
    torch's early stop ends it once the last saved tensor is rebuilt). The fused QLoRA MLP, the layer's last op,
    reads this to skip its down projection there: nothing saved depends on that output.
    """
    return getattr(_STATE, "depth", 0) > 0


def nonreentrant_checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint`` with ``use_reentrant=False`` (works with frozen inputs and kwargs)."""
    kwargs.setdefault("context_fn", _contexts)
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _pack_to_pinned(t: torch.Tensor):
    """A CUDA tensor -> (device, pinned CPU copy), the copy queued on the current stream; others as they are."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.no_grad():  # a copy, not an op autograd should record
        host.copy_(t, non_blocking=True)
    return t.device, host


def _unpack_from_pinned(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


def offload_checkpoint(function, *args, **kwargs):
    """Non-reentrant checkpoint whose saved inputs live in pinned CPU memory (CUDA inputs only)."""
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    if not on_cuda:
        return nonreentrant_checkpoint(function, *args, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(_pack_to_pinned, _unpack_from_pinned):
        return nonreentrant_checkpoint(function, *args, **kwargs)
