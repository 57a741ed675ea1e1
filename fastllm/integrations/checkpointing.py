"""Non-reentrant gradient checkpointing functions for transformers' ``GradientCheckpointingLayer``.

transformers calls ``layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)``; the patch
registry sets that attribute per decoder layer to one of the functions below.

``offload_checkpoint`` also parks the tensors the checkpoint keeps (the layer's inputs: hidden states,
rotary cos/sin) in pinned CPU memory until backward, so a long sequence's per-layer inputs no longer sit
on the GPU. Non-reentrant checkpointing saves its inputs through the autograd saved-tensor hooks that
are active when it is entered, so ``save_on_cpu`` around the call catches exactly those, while the
checkpoint's own inner hooks (innermost wins) still drop everything saved inside the layer.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def nonreentrant_checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint`` with ``use_reentrant=False`` (works with frozen inputs and kwargs)."""
    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offload_checkpoint(function, *args, **kwargs):
    """Non-reentrant checkpoint whose saved inputs live in pinned CPU memory (CUDA inputs only)."""
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    if not on_cuda:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
