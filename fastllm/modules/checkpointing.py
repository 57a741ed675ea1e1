"""Non-reentrant gradient checkpointing functions for transformers' ``GradientCheckpointingLayer``.

transformers calls ``layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)``; the patch
registry sets that attribute per decoder layer to one of the functions below.

``offload_checkpoint`` also parks the tensors the checkpoint keeps (the layer's positional inputs: the hidden
states) in pinned CPU memory until backward (``Offloader``), so a long sequence's per-layer inputs no longer sit on
the GPU. Non-reentrant checkpointing (and the fused layer op) saves its inputs through the autograd saved-tensor
hooks that are active when it is entered, so hooks around the call catch exactly those, while the checkpoint's own
inner hooks (innermost wins) still drop everything saved inside the layer. ``torch.autograd.graph.save_on_cpu``
copies device-to-host synchronously, which makes the host wait for the GPU at every layer, and a QLoRA step lives on
that overlap: here the copies are asynchronous, on a side stream, and backward prefetches. Safety: the source's block
is recorded on the side stream (not reused before the copy has read it), the main stream waits on an event before it
reads a fetched copy, and pinned blocks are not recycled before their copies end (the caching host allocator
records the streams).
"""

from __future__ import annotations

import threading
import weakref

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


class _Parked:
    """One saved CUDA tensor in pinned host memory: its device-to-host copy ran on the side stream (``copied``), a
    prefetch back may have started (``fetched``). ``prev`` (a weak reference) is the tensor parked before it in the
    same forward pass: backward unpacks in reverse order, so unpacking this one starts the previous one's fetch."""

    __slots__ = ("__weakref__", "device", "host", "copied", "fetched", "prev")

    def __init__(self, t: torch.Tensor, stream, prev) -> None:
        self.device, self.prev, self.fetched = t.device, prev, None
        main = torch.cuda.current_stream(t.device)
        stream.wait_stream(main)  # t is written by work already queued on the main stream
        with torch.cuda.stream(stream), torch.no_grad():
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
        t.record_stream(stream)  # t's block is not reused before the copy has read it
        self.copied = torch.cuda.Event()
        self.copied.record(stream)

    def prefetch(self, stream) -> None:
        if self.fetched is not None:
            return
        with torch.cuda.stream(stream):  # allocated from the side stream's pool, handed to the main one on use
            stream.wait_event(self.copied)
            dev = self.host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self.fetched = (dev, done)

    def take(self, stream) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        if self.fetched is None:  # not prefetched: copy on the main stream now
            main.wait_event(self.copied)
            return self.host.to(self.device, non_blocking=True)
        dev, done = self.fetched
        self.fetched = None  # a second backward through the graph (retain_graph) fetches again
        main.wait_event(done)
        dev.record_stream(main)
        return dev


class Offloader:
    """Saved-tensor hooks that park CUDA activations in pinned host memory until backward.

    The device-to-host copies run on a side stream (the main stream only records an event), so they overlap the
    next layer's compute; in backward, unpacking one layer's tensor starts the previous layer's host-to-device copy on
    the side stream, so it overlaps this layer's recompute and backward. ``new_pass()`` starts a new chain (the first
    layer of a forward pass). CPU tensors and parameters are kept as they are.
    """

    def __init__(self) -> None:
        self._streams: dict = {}
        self._last = None  # weak reference to the last parked tensor of this pass

    def _stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def new_pass(self) -> None:
        self._last = None

    def pack(self, t: torch.Tensor):
        if not t.is_cuda or isinstance(t, torch.nn.Parameter):
            return t
        parked = _Parked(t, self._stream(t.device), self._last)
        self._last = weakref.ref(parked)
        return parked

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        stream = self._stream(packed.device)
        prev = packed.prev() if packed.prev is not None else None
        out = packed.take(stream)
        if prev is not None:
            prev.prefetch(stream)
        return out

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


OFFLOADER = Offloader()


def offload_checkpoint(function, *args, **kwargs):
    """Non-reentrant checkpoint whose saved inputs live in pinned CPU memory (CUDA inputs only)."""
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    if not on_cuda:
        return nonreentrant_checkpoint(function, *args, **kwargs)
    with OFFLOADER.hooks():
        return nonreentrant_checkpoint(function, *args, **kwargs)
