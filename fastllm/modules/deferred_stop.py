"""Generation's stop check read one step late on CUDA, so the host queues the next decode step while the GPU runs
this one.

transformers' sampling loop (``GenerationMixin._sample``) asks after every token whether all sequences are done:
``StopCheck`` reads ``unfinished_sequences.max() == 0`` on the host, which waits for the step to finish. The host
then does its own share of the next step (logits processing, input preparation, the decode graph's input copies)
while the GPU idles: with decode graphs a step's host share is of the order of its device time, so about half the
step is lost. transformers has the remedy, ``DeferredStopCheck`` (the flag copied to pinned memory without waiting
and read on the following step; the one extra step it may run when every sequence stops early is undone before
``generate`` returns: the same tokens, scores and logits), but takes it on MPS only.

``deferred_stop_checks()`` lets it take CUDA too, for calls whose cache is not handed back (no
``return_dict_in_generate``, no cache passed in: the extra step's cache writes go with the cache; where the cache is
returned transformers would have to crop it, which its static layers do not all support, so those calls keep the
per-step check). It swaps transformers' ``DeferredStopCheck`` name in ``transformers.generation.utils`` for a
subclass that only widens ``is_supported``, for the duration of the call (nested and concurrent calls share one
swap). The patched model's ``generate`` (``decode_graphs.static_generate``) runs in it; ``set_deferred_stop(False)``
turns it off. A transformers without ``DeferredStopCheck`` keeps its own loop, logged once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading

logger = logging.getLogger("fastllm")

_ON = [True]
_LOCK = threading.Lock()
_STATE = {"depth": 0, "saved": None}
_STATS = {"deferred": 0, "per step": 0, "unavailable": 0}  # is_supported answers while swapped; calls without it


def set_deferred_stop(on: bool | None) -> None:
    """Read generation's stop check one step late on CUDA (True, None: the default) or every step (False)."""
    _ON[0] = True if on is None else bool(on)


def stats() -> dict:
    """Counts since import: stop checks deferred on CUDA, kept per step, and calls where transformers has none."""
    return dict(_STATS)


def _defers(device) -> bool:
    """The devices the widened check defers on (tests stand the CPU in)."""
    return device.type == "cuda"


@functools.cache
def _widened(base: type) -> type:
    class CudaDeferredStopCheck(base):
        """transformers' ``DeferredStopCheck``, also taken on CUDA where the cache is not returned."""

        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
            if _defers(device) and not is_assistant and not cache_is_returned:
                _STATS["deferred"] += 1
                return True
            _STATS["per step"] += 1
            return base.is_supported(device, cache, cache_is_returned, is_assistant)

    return CudaDeferredStopCheck


@contextlib.contextmanager
def deferred_stop_checks():
    """Within: transformers' sampling loop defers its stop check on CUDA (module docstring). Yields whether it does."""
    utils = importlib.import_module("transformers.generation.utils")
    with _LOCK:
        if _STATE["depth"] == 0:
            base = getattr(utils, "DeferredStopCheck", None)
            if not _ON[0] or base is None or not callable(getattr(base, "is_supported", None)):
                if _ON[0]:
                    _STATS["unavailable"] += 1
                    if _STATS["unavailable"] == 1:
                        logger.warning("fastllm: this transformers has no DeferredStopCheck; generate waits for the "
                                       "GPU after every token")
                swapped = False
            else:
                _STATE["saved"], utils.DeferredStopCheck = base, _widened(base)
                swapped = True
        else:
            swapped = True
        _STATE["depth"] += swapped
    try:
        yield swapped
    finally:
        if swapped:
            with _LOCK:
                _STATE["depth"] -= 1
                if _STATE["depth"] == 0:
                    utils.DeferredStopCheck, _STATE["saved"] = _STATE["saved"], None
