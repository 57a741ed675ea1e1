"""Programmatic dependent launch (PDL, sm_90 and newer) for the decode step's kernels.

A decode step is a chain of small kernels, each waiting for the one before: between two launches the GPU drains the
first grid, then schedules the second's programs, a gap of a microsecond or two that a CUDA graph does not remove.
With PDL a kernel launched with ``launch_pdl`` may be scheduled while the kernel before it still runs, once every
program of that one has signalled (``gdc_launch_dependents``); it then waits (``gdc_wait``) until the earlier grid
has finished and its writes are visible, so every read and write of the waiting kernel comes after the earlier
kernel's, as without PDL. What overlaps is the scheduling, not the maths.

``pdl_enter(PDL)`` at the top of a kernel does both: signal, then wait. Kernels take ``PDL`` as a constexpr and are
launched with ``**pdl_options(x)``: ``{"PDL": True, "launch_pdl": True}`` on a CUDA device of compute capability 9
or more with PDL switched on (``set_pdl``; off by default until measured), else ``{"PDL": False}`` (the interpreter
has no grid dependency control). A stream capture (decode graphs) records the launches' programmatic edges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_ON = [False]
_CAPABLE: dict = {}  # device index -> compute capability >= 9
_OFF = {"PDL": False}
_WITH = {"PDL": True, "launch_pdl": True}


def set_pdl(on: bool | None) -> None:
    """Launch the decode kernels with PDL where the GPU has it (None: the default, off)."""
    _ON[0] = bool(on)


def pdl_enabled() -> bool:
    """PDL switched on (``set_pdl``)."""
    return _ON[0]


def pdl_options(x: torch.Tensor) -> dict:
    """The ``PDL`` constexpr and launch option for a kernel over ``x``'s device."""
    if not _ON[0] or not x.is_cuda:
        return _OFF
    index = x.get_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _WITH if _CAPABLE[index] else _OFF


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Let the next PDL kernel be scheduled, then wait for the previous kernel's grid and writes (PDL only)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
