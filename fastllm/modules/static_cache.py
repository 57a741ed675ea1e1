"""transformers' static KV caches as decode graphs see them (``modules.decode_graphs``): which cache a call passes,
the addresses a captured step bakes in, the host-side lengths a replay must advance, and the one upstream update a
capture cannot record (a full sliding window's roll)."""

from __future__ import annotations

import contextlib

import torch

CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.2x / earlier 5.x


def static_cache_of(kwargs: dict):
    """The cache passed (under either name) when it is a static one (compileable, not dynamic), else None."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache if getattr(cache, "is_compileable", False) and hasattr(cache, "layers") else None
    return None


def cache_addresses(cache) -> tuple | None:
    """The data pointer, shape and dtype of every tensor the cache's layers hold, or None while a layer is not
    allocated yet (static layers allocate at their first update, which must not happen inside a capture)."""
    out = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True):
            return None
        out.extend((t.data_ptr(), t.shape, t.dtype) for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return tuple(out)


def host_counters(cache) -> list:
    """The cache layers whose update branches on a host-side length (transformers' sliding-window static layers keep
    ``cumulative_length_int``: index_copy while the window fills, a roll once it is full; ``get_seq_length`` and the
    masks read it too). A replay runs no Python, so ``DecodeGraphs`` advances these itself, and the keys carry
    whether each window is full (which branch a graph captured)."""
    return [layer for layer in cache.layers if isinstance(getattr(layer, "cumulative_length_int", None), int)]


def _static_window_update():
    """transformers' ``StaticSlidingWindowLayer.update`` (None where that class is absent)."""
    try:
        from transformers.cache_utils import StaticSlidingWindowLayer
    except ImportError:
        return None
    return StaticSlidingWindowLayer.update


def rolled_update(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """``StaticSlidingWindowLayer.update`` for one token into a full window, as upstream computes it (roll the
    window left by one, write the new key/value at the last slot, copy back into the static tensors), with the last
    slot indexed by a slice: upstream indexes it with ``torch.tensor([-1], device=...)``, a host-to-device copy that a
    CUDA graph capture refuses. Any other call is upstream's. Keys, values: (batch, kv_heads, window, head_dim)."""
    if key_states.shape[-2] != 1 or layer.cumulative_length_int < layer.max_cache_len:
        return type(layer).update(layer, key_states, value_states, *args, **kwargs)
    layer.cumulative_length_int += 1
    for cached, new in ((layer.keys, key_states), (layer.values, value_states)):
        rolled = cached.roll(-1, dims=-2)
        rolled[:, :, -1:] = new
        cached.copy_(rolled)
    return layer.keys, layer.values


@contextlib.contextmanager
def device_side_rolls(cache):
    """For a capture: the cache's full sliding windows (transformers' own static layer class, whose update is
    ``_static_window_update()``) update through ``rolled_update`` (an instance attribute, removed afterwards)."""
    upstream = _static_window_update()
    full = [layer for layer in host_counters(cache) if upstream is not None
            and getattr(type(layer), "update", None) is upstream and "update" not in vars(layer)
            and layer.cumulative_length_int >= layer.max_cache_len]
    for layer in full:
        layer.update = rolled_update.__get__(layer)
    try:
        yield
    finally:
        for layer in full:
            del layer.update
