"""Launching a ``@triton.jit`` kernel with less host work than ``kernel[grid](...)``.

Why: a QLoRA step of a small model is bound by host work, and Triton's generic launch path spends about
20 us of Python per call (binding the arguments, building a cache key string from the options, checking
globals, looking up the device and stream) before the launcher's own few microseconds. fastllm launches
a few hundred kernels per step.

``launch(kernel, grid, *args, **constexprs)`` keys the compiled kernel on the traits Triton specialises on,
computed directly: for each tensor its dtype and whether its address is 16-byte aligned; for each int
whether it is 1, whether it is divisible by 16 and whether it fits in 32 bits; constexpr and option values
as they are. That key is at least as fine as Triton's own, so a hit always names the binary Triton would
have chosen. The first call with a new key compiles through ``kernel.warmup`` and launches through
``kernel[grid]`` with the compiled kernel's launcher wrapped to record the call Triton makes; the direct path
is taken for that key only when the call it would make is exactly that one (same launcher, grid, stream,
binary, metadata, no launch hooks, the same arguments). Later calls go straight to the launcher (on Triton
3.6, to its C function: see ``_c_launcher``). A key whose check fails keeps ``kernel[grid]`` (logged once).

The direct path is for the Triton versions whose launch code was read (``_READ_VERSIONS``); any other version,
the Triton interpreter (``TRITON_INTERPRET=1``) and ``FASTLLM_FAST_LAUNCH=0`` (all read at the first launch;
``set_enabled`` switches at run time) take ``kernel[grid]`` for every call. Launch hooks set after a key's first
launch (Triton's ``knobs.runtime.launch_enter_hook``, e.g. Proton) and runtime knobs changed after it are not seen
by the direct path: turn it off for those. Arguments are positional in the kernel's parameter order, constexprs by
keyword (never positionally: the key records a runtime argument's traits, not its value).

Both paths launch on the device of the first tensor argument: Triton launches on the *current* CUDA device, so a
kernel over ``cuda:1`` tensors with device 0 current would fail ("Pointer argument cannot be accessed").
"""

from __future__ import annotations

import logging
import os

import torch

from .._compat import triton_version

__all__ = ["cdiv", "launch", "launch_stats", "next_power_of_2", "set_enabled"]

logger = logging.getLogger("fastllm")

_CACHE: dict = {}   # (id(kernel), device, traits, kwargs) -> (launcher, c launch, function, metadata, tail)
_SLOW: set = set()  # keys whose first-launch check failed: kernel[grid] for good
_STATS = {"fast": 0, "slow": 0, "guarded": 0, "refused": 0}  # launches per path, device switches, failed checks

# Triton versions whose launch code was read (runtime/jit.py ``JITFunction.run``, compiler/compiler.py
# ``CompiledKernel``, backends/nvidia/driver.py ``CudaLauncher``), with how the direct path calls a compiled kernel.
# Both call ``launcher(gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata, enter_hook,
# exit_hook, *every parameter)`` as ``JITFunction.run`` does (constexprs included, options left out); "c": Triton
# 3.6, whose launcher's Python ``__call__`` can be skipped for its C function (``_c_launcher``).
_READ_VERSIONS = {(3, 6): "c", (3, 9): "run"}

_ENABLED: bool | None = None  # read from the environment at the first launch (``set_enabled`` overrides)
_KIND: str | None = None      # _READ_VERSIONS' entry for this Triton, read with _ENABLED
_WARNED = False


def set_enabled(on: bool | None) -> None:
    """Turn the direct path on or off (None: read the environment and Triton's version again at the next launch)."""
    global _ENABLED, _KIND
    _ENABLED = on
    _KIND = _read_kind() if on else None


def _read_kind() -> str | None:
    """How the direct path calls a launcher on this Triton (``_READ_VERSIONS``), or None: a version not read."""
    return _READ_VERSIONS.get(triton_version())


def _enabled() -> bool:
    global _ENABLED, _KIND
    if _ENABLED is None:  # os.environ lookups cost ~2 us each: once, not per launch
        _KIND = _read_kind()
        _ENABLED = (os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
                    and os.environ.get("FASTLLM_FAST_LAUNCH", "1") != "0" and _KIND is not None)
    return _ENABLED


_Tensor = torch.Tensor
_I32 = (-(2 ** 31), 2 ** 31)
_U64 = 2 ** 63  # from here up Triton types an int as u64 (i64 below)
# Module-level names: one global lookup a launch (and tests swap them on a machine without CUDA).
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


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


def _tensor_device(args) -> int:
    """The CUDA device index of the first tensor argument (-1: a CPU tensor, or no tensor)."""
    for a in args:
        if isinstance(a, _Tensor):
            return a.get_device()
    return -1


def _c_launcher(run):
    """(launch, cooperative, pdl) of Triton 3.6's CUDA launcher when the C function can be called directly,
    else None. Triton 3.6's ``CudaLauncher.__call__`` only allocates scratch buffers (none for kernels that ask
    for none) and forwards to ``self.launch(grid, stream, function, cooperative, pdl, global_scratch,
    profile_scratch, *rest)``; skipping it saves a few microseconds of Python a launch. Other Triton
    versions change that signature, so they keep ``run``."""
    if _KIND != "c" or type(run).__name__ != "CudaLauncher":
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
    index = _tensor_device(args)
    if index >= 0 and index != _current_device():  # one C call a launch; a switch only where the devices differ
        _STATS["guarded"] += 1
        with torch.cuda.device(index):
            _launch_on(index, kernel, grid, args, kwargs)
        return
    _launch_on(index, kernel, grid, args, kwargs)


def _launch_on(device: int, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``launch`` with ``device`` current (-1: CPU tensors, the interpreter)."""
    if not (_ENABLED if _ENABLED is not None else _enabled()) or device < 0:
        kernel[grid](*args, **kwargs)
        return
    key = (id(kernel), device, _traits(args), tuple(kwargs.items()))  # kernels live for the process
    hit = _CACHE.get(key)
    if hit is None:
        _first_launch(key, kernel, grid, args, kwargs)
        return
    run, c_launch, function, metadata, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = _raw_stream(device)
    if c_launch is not None:
        fn, cooperative, pdl = c_launch
        fn(grid[0], g1, g2, stream, function, cooperative, pdl, None, None, metadata, None, None, None,
           *args, *tail)
    else:
        run(grid[0], g1, g2, stream, function, metadata, None, None, None, *args, *tail)
    _STATS["fast"] += 1


def _first_launch(key: tuple, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """A key's first launch (or a refused key's every launch): through ``kernel[grid]``, checked (module doc)."""
    _STATS["slow"] += 1
    if key in _SLOW:
        kernel[grid](*args, **kwargs)
        return
    compiled = kernel.warmup(*args, grid=grid, **kwargs)  # compiles (or finds) the binary, launches nothing
    compiled = compiled.result() if hasattr(compiled, "result") else compiled  # Triton's async compile: a future
    run = getattr(compiled, "run", None)  # the property that loads the binary onto the current device
    if run is None:
        _refuse(key, kernel, "no launcher on the compiled kernel")
        kernel[grid](*args, **kwargs)
        return
    # the full argument list in parameter order: positional ones, then keywords (constexprs too; the launcher
    # skips those itself), options left out
    names = [p.name for p in kernel.params][len(args):]
    tail = tuple(kwargs[n] if n in kwargs else kernel.params[len(args) + i].default for i, n in enumerate(names))
    entry = (run, _c_launcher(run), compiled.function, compiled.packed_metadata, tail)
    problem = _checked_launch(kernel, grid, args, kwargs, compiled, entry, key[1])
    if problem is None:
        _CACHE[key] = entry
    else:
        _refuse(key, kernel, problem)


def _checked_launch(kernel, grid: tuple, args: tuple, kwargs: dict, compiled, entry: tuple,
                    device: int) -> str | None:
    """Launch once through ``kernel[grid]`` with the launcher the direct path would call (the C function, else the
    compiled kernel's launcher) wrapped to record its call; None when that call is exactly the direct path's, else
    what differs."""
    run, c_launch, function, metadata, tail = entry
    g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    stream = _raw_stream(device)
    if c_launch is not None:
        owner, attr, hooks = run, "launch", 10
        want = (*g, stream, function, c_launch[1], c_launch[2], None, None, metadata, None, None, None, *args, *tail)
    else:
        owner, attr, hooks = compiled, "_run", 6
        want = (*g, stream, function, metadata, None, None, None, *args, *tail)
    real = getattr(owner, attr, None)
    if real is None:
        return f"no {attr} on {type(owner).__name__}"
    calls = []

    def record(*call):
        calls.append(call)
        return real(*call)

    setattr(owner, attr, record)
    try:
        kernel[grid](*args, **kwargs)
    finally:
        setattr(owner, attr, real)
    if len(calls) != 1:
        return f"Triton's launch called the recorded launcher {len(calls)} times"
    got = list(calls[0])
    # (launch_metadata, enter hook, exit hook): Triton passes its knobs' hook chains, empty unless a profiler (Proton)
    # added a hook; an empty chain calls nothing, as None does, and then launch_metadata is read by no one.
    if len(got) > hooks + 2 and _no_hooks(got[hooks + 1]) and _no_hooks(got[hooks + 2]):
        got[hooks:hooks + 3] = (None, None, None)
    if len(got) != len(want):
        return f"launcher called with {len(got)} arguments, the direct path passes {len(want)}"
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if not _same(a, b)]
    return f"launcher arguments {bad} differ" if bad else None


def _no_hooks(hook) -> bool:
    """None, or an empty ``triton.knobs.HookChain`` (its ``calls`` list)."""
    return hook is None or (type(getattr(hook, "calls", None)) is list and not hook.calls)


def _same(a, b) -> bool:
    """The same argument: the same object, or equal values of one exact type (tensors by identity only)."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, _Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value that does not compare is not the same
        return False


def _refuse(key: tuple, kernel, problem: str) -> None:
    global _WARNED
    _SLOW.add(key)
    _STATS["refused"] += 1
    if not _WARNED:
        _WARNED = True
        import triton

        logger.warning("fastllm: the direct launch of %s does not match Triton %s's own (%s); kernels whose check "
                       "fails launch through kernel[grid]", getattr(kernel, "__name__", kernel), triton.__version__,
                       problem)


def launch_stats() -> dict:
    """Counts since import: launches per path ("fast", "slow"), launches that switched device ("guarded"), keys whose
    first-launch check failed ("refused")."""
    return dict(_STATS)


# Host-side grid maths. ``triton.cdiv`` / ``triton.next_power_of_2`` are jit-callable functions: calling them
# from Python goes through Triton's JIT wrapper, ~5 us each, a few per launch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()

