"""Low-overhead launches of fastllm's Triton kernels: ``launch(kernel, grid, *args, **meta)``.

``kernel[grid](*args, **meta)`` re-binds and re-specializes every argument on every call in Triton's Python
launch path: ~20 us of host time per launch on an H200 host, where a QLoRA step of a 1B model launches
~600 of them and is bound by host time, not the GPU. Here the first call of each *specialization* goes
through Triton (it compiles and returns the ``CompiledKernel``); later calls with the same specialization
call that kernel's launcher directly, as torch inductor's generated launchers do.

The specialization key is at least as fine as Triton's own, so a cached kernel is only reused where Triton
would have reused it: a tensor's dtype and whether its address is 16-byte aligned, an int's value being 1,
divisible by 16 and its 32/64-bit range, floats as fp32, ``None`` and bools by value, plus every constexpr
and compile option (``num_warps``, ``enable_fp_fusion``...) by value and the current device.

The direct path needs every kernel parameter given (positionally, then constexprs by name), a CUDA device
and a Triton whose ``CompiledKernel`` exposes ``run``, ``function`` and ``packed_metadata`` (3.x). Anything
else (the interpreter, a missing parameter, a launcher that refuses the arguments) takes Triton's own path:
counted in ``STATS`` and logged once, never silently.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch

logger = logging.getLogger("fastllm")

__all__ = ["STATS", "launch", "specialization_key"]

# direct: launches through a cached kernel; triton: through kernel[grid]; fallback reasons by name.
STATS: Counter = Counter()
_CACHE: dict = {}           # (kernel, key) -> CompiledKernel, or None when the direct path is refused
_WARNED: set = set()
_ENABLED = {"on": os.environ.get("FASTLLM_DIRECT_LAUNCH", "1") != "0"}  # 0: always Triton's path


def _spec(a):
    """What Triton specializes a runtime argument on (or finer)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return int, a == 1, a % 16 == 0, -2**31 <= a < 2**31, 0 <= a < 2**64
    if isinstance(a, float):
        return float
    return type(a), a  # anything else: by value (Triton would make it a constexpr or refuse it)


def specialization_key(args: tuple, meta: dict) -> tuple:
    """The cache key of one launch: each runtime argument's specialization and every keyword by value."""
    return tuple(_spec(a) for a in args), tuple(meta.items())  # a call site passes its keywords in one order


def _full_args(kernel, args: tuple, meta: dict) -> tuple | None:
    """All kernel parameters in signature order (runtime args, then constexprs from ``meta``), or None."""
    names = kernel.arg_names
    if len(args) > len(names):
        return None
    tail = []
    for name in names[len(args):]:
        if name not in meta:
            return None
        tail.append(meta[name])
    return (*args, *tail)


def _refuse(kernel, cache_key, why: str) -> None:
    _CACHE[cache_key] = None
    STATS[f"fallback: {why}"] += 1
    if why not in _WARNED:
        _WARNED.add(why)
        logger.warning("fastllm: Triton kernel %s launches through Triton's own path (%s)",
                       getattr(kernel, "__name__", kernel), why)


_HOOKS: dict = {}  # where this Triton keeps its launch hooks (read on every launch: a profiler may set them)


def _runtime_hooks():
    src = _HOOKS.get("src")
    if src is None:
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            src = knobs.runtime
        else:  # before triton.knobs: class attributes of CompiledKernel
            from triton.compiler.compiler import CompiledKernel as src
        _HOOKS["src"] = src
    return getattr(src, "launch_enter_hook", None), getattr(src, "launch_exit_hook", None)


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, through a cached ``CompiledKernel`` after the first call of each
    specialization (see the module docstring). ``grid``: a tuple of 1-3 ints."""
    first = args[0] if args else None
    # Traced by dynamo (a user's torch.compile over an eager patch): Triton's own call, which dynamo knows.
    if not (_ENABLED["on"] and isinstance(first, torch.Tensor) and first.is_cuda) or torch.compiler.is_compiling():
        STATS["triton"] += 1
        kernel[grid](*args, **meta)
        return
    device = torch.cuda.current_device()
    cache_key = (kernel, device, specialization_key(args, meta))
    compiled = _CACHE.get(cache_key, False)
    if compiled is False:  # first call of this specialization: Triton compiles (or finds) it
        compiled = kernel[grid](*args, **meta)
        STATS["triton"] += 1
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
            _refuse(kernel, cache_key, "this Triton's CompiledKernel has no direct launcher")
        elif _full_args(kernel, args, meta) is None:
            _refuse(kernel, cache_key, "not every kernel parameter was given")
        else:
            _CACHE[cache_key] = compiled
        return
    if compiled is None:
        STATS["triton"] += 1
        kernel[grid](*args, **meta)
        return
    full = _full_args(kernel, args, meta)
    g0, g1, g2 = (*grid, 1, 1)[:3]
    stream = torch._C._cuda_getCurrentRawStream(device)
    enter, leave = _runtime_hooks()
    # launch_metadata only matters to an installed enter hook (a profiler); it costs host time otherwise.
    metadata = compiled.launch_metadata(grid, stream, *full) if enter is not None else None
    try:
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave,
                     *full)
    except TypeError as err:  # the launcher's argument layout differs from what this module expects
        _refuse(kernel, cache_key, f"its launcher refused the arguments ({err})")
        kernel[grid](*args, **meta)
        return
    STATS["direct"] += 1


def enable(on: bool = True) -> None:
    """Turn the direct path on or off (off: every launch goes through ``kernel[grid]``)."""
    _ENABLED["on"] = bool(on)
