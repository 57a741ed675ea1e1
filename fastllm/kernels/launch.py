"""Launching a ``@triton.jit`` kernel with less host work than ``kernel[grid](...)``.

Why: a QLoRA step of a small model is bound by host work, and Triton's generic launch path spends about
20 us of Python per call (binding the arguments, building a cache key string from the options, checking
globals, looking up the device and stream) before the launcher's own few microseconds. fastllm launches
a few hundred kernels per step.

``launch(kernel, grid, *args, **constexprs)`` keys the compiled kernel on the traits Triton specialises on,
computed directly: for each tensor its dtype and whether its address is 16-byte aligned; for each int
whether it is 1, whether it is divisible by 16 and whether it fits in 32 bits; constexpr and option values
as they are. That key is at least as fine as Triton's own, so a hit always names the binary Triton would
have chosen. The first call with a new key goes through ``kernel[grid]`` (which compiles or finds the
binary and launches it); later calls go straight to the compiled kernel's launcher (on Triton 3.6, to its C
function: see ``_c_launcher``).

Under the Triton interpreter (``TRITON_INTERPRET=1``), with ``FASTLLM_FAST_LAUNCH=0`` (both read at the first
launch; ``set_enabled`` switches at run time) or with Triton older than 3.3 (another launcher signature), every
call takes ``kernel[grid]``. Launch hooks (Triton's ``knobs.runtime.launch_enter_hook``, e.g. Proton) and runtime
knobs changed after a kernel's first launch are not seen by the direct path: turn it off for those. Arguments are
positional in the kernel's parameter order, constexprs by keyword (never positionally: the key records a runtime
argument's traits, not its value).
"""

from __future__ import annotations

import os

import torch

__all__ = ["cdiv", "launch", "launch_stats", "next_power_of_2", "set_enabled"]

_CACHE: dict = {}                 # (id(kernel), device, traits) -> (launcher, function, packed metadata)
_STATS = {"fast": 0, "slow": 0}   # launches through each path (tests read it)


_ENABLED: bool | None = None  # read from the environment at the first launch (``set_enabled`` overrides)


def set_enabled(on: bool | None) -> None:
    """Turn the direct path on or off (None: read the environment again at the next launch)."""
    global _ENABLED
    _ENABLED = on


def _triton_at_least(major: int, minor: int) -> bool:
    import triton

    try:
        return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


def _enabled() -> bool:
    global _ENABLED
    if _ENABLED is None:  # os.environ lookups cost ~2 us each: once, not per launch
        # Triton >= 3.3's launcher takes every parameter (constexprs too) after the metadata; older ones take
        # the runtime arguments only, so they keep kernel[grid].
        _ENABLED = (os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
                    and os.environ.get("FASTLLM_FAST_LAUNCH", "1") != "0" and _triton_at_least(3, 3))
    return _ENABLED


_Tensor = torch.Tensor
_I32 = (-(2 ** 31), 2 ** 31)
_U64 = 2 ** 63  # from here up Triton types an int as u64 (i64 below)


def _traits(args) -> tuple:
    """What Triton specialises the runtime arguments on (or finer), flat: per tensor its dtype and address mod
    16; per int whether it is 1, divisible by 16, 32-bit and unsigned 64-bit; other values as they are. Exact
    type checks first (this runs per launch; bool is an int subclass and is told apart by its exact type)."""
    key = []
    for a in args:
        t = type(a)
        if t is _Tensor or (t is not int and t is not bool and isinstance(a, _Tensor)):
            key.append(a.dtype)
            key.append(a.data_ptr() & 15 == 0)
        elif t is int or (t is not bool and isinstance(a, int)):  # int subclasses (numpy ints are not) as ints
            key.append(1 if a == 1 else (a & 15 == 0, _I32[0] <= a < _I32[1], a >= _U64))
        elif t is bool:
            key.append((bool, a))
        elif t is float:
            key.append(float)
        else:
            key.append(a)  # None and other constants: by value
    return tuple(key)


def _c_launcher(run):
    """(launch, cooperative, pdl) of Triton 3.6's CUDA launcher when the C function can be called directly,
    else None. Triton 3.6's ``CudaLauncher.__call__`` only allocates scratch buffers (none for kernels that ask
    for none) and forwards to ``self.launch(grid, stream, function, cooperative, pdl, global_scratch,
    profile_scratch, *rest)``; skipping it saves ~3 us of Python a launch on an H200 host. Other Triton
    versions change that signature, so they keep ``run``."""
    if not _triton_at_least(3, 6) or _triton_at_least(3, 7) or type(run).__name__ != "CudaLauncher":
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    fn = getattr(run, "launch", None)
    if fn is None or not hasattr(run, "launch_cooperative_grid") or not hasattr(run, "launch_pdl"):
        return None
    return fn, run.launch_cooperative_grid, run.launch_pdl


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher once it is known.

    grid: a tuple of 1 to 3 ints; args: the kernel's runtime parameters in order (never a constexpr: those are
    keyed by value and must come by keyword);
    kwargs: the remaining constexpr parameters by name plus launch options (``num_warps``...).
    """
    if not (_ENABLED if _ENABLED is not None else _enabled()):
        kernel[grid](*args, **kwargs)
        return
    device = torch._C._cuda_getDevice()
    key = (id(kernel), device, _traits(args), tuple(kwargs.items()))  # kernels live for the process
    hit = _CACHE.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        _STATS["slow"] += 1
        run = getattr(compiled, "run", None)  # the property that loads the binary (done by the launch above)
        if run is not None:
            # the full argument list in parameter order: positional ones, then keywords (constexprs too; the
            # launcher skips those itself), options left out
            names = [p.name for p in kernel.params][len(args):]
            tail = tuple(kwargs[n] if n in kwargs else kernel.params[len(args) + i].default
                         for i, n in enumerate(names))
            _CACHE[key] = (run, _c_launcher(run), compiled.function, compiled.packed_metadata, tail)
        return
    run, c_launch, function, metadata, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    if c_launch is not None:
        fn, cooperative, pdl = c_launch
        fn(grid[0], g1, g2, stream, function, cooperative, pdl, None, None, metadata, None, None, None,
           *args, *tail)
    else:
        run(grid[0], g1, g2, stream, function, metadata, None, None, None, *args, *tail)
    _STATS["fast"] += 1


def launch_stats() -> dict:
    """Launch counts per path since import: {"fast": n, "slow": n}."""
    return dict(_STATS)


# Host-side grid maths. ``triton.cdiv`` / ``triton.next_power_of_2`` are jit-callable functions: calling them
# from Python goes through Triton's JIT wrapper, ~5 us each, a few per launch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()

