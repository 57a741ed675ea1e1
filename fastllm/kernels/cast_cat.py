"""Several tensors cast and laid one after another in one flat buffer, in one launch::

    out[e_{i-1} : e_i] = src_i.flatten().to(out.dtype)      e_0 = 0, e_i = e_{i-1} + src_i.numel()

Why: a LoRA group's adapters (fp32 masters) are cast to the compute dtype into one buffer every forward and every
decode step (``ops.lora.cast_adapters``). ``torch.cat`` into a buffer of another dtype takes its batched kernel only
when every input already has the output's dtype; otherwise it copies input by input, one launch each (a q/k/v
group: six), which on a CUDA-graphed decode step is six kernels where one does.

Each program owns ``BLOCK`` output elements and takes each from the source whose range holds it (``N_SRC`` masked
loads, at most one of them live per element; a value is selected, never summed, so -0.0 and NaNs keep their bits).
The cast rounds to nearest even, as ``Tensor.to`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

MAX_SOURCES = 8  # sources per launch (pointer arguments); more go in further launches
_BLOCK = 1024


@triton.jit
def _take(val, SRC, start, end, offs):
    """val where offs lies outside [start, end), else SRC[offs - start] (cast to fp32)."""
    live = (offs >= start) & (offs < end)
    return tl.where(live, tl.load(SRC + (offs - start), mask=live, other=0).to(tl.float32), val)


@triton.jit
def _cast_cat_kernel(OUT, S0, S1, S2, S3, S4, S5, S6, S7, E1, E2, E3, E4, E5, E6, E7, TOTAL,
                     N_SRC: tl.constexpr, BLOCK: tl.constexpr):
    """out[offs] from the source whose range [E_{i-1}, E_i) holds offs (E_0 = 0, E_{N_SRC} = TOTAL)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    val = tl.zeros((BLOCK,), dtype=tl.float32)
    val = _take(val, S0, 0, E1, offs)
    if N_SRC > 1:
        val = _take(val, S1, E1, E2, offs)
    if N_SRC > 2:
        val = _take(val, S2, E2, E3, offs)
    if N_SRC > 3:
        val = _take(val, S3, E3, E4, offs)
    if N_SRC > 4:
        val = _take(val, S4, E4, E5, offs)
    if N_SRC > 5:
        val = _take(val, S5, E5, E6, offs)
    if N_SRC > 6:
        val = _take(val, S6, E6, E7, offs)
    if N_SRC > 7:
        val = _take(val, S7, E7, TOTAL, offs)
    tl.store(OUT + offs, val.to(OUT.dtype.element_ty), mask=offs < TOTAL)


def cast_cat(sources, out: torch.Tensor) -> torch.Tensor:
    """Fill the 1-D ``out`` with ``sources`` (contiguous tensors on out's device, any float dtypes, total size
    ``out.numel()``) flattened, cast to out's dtype and concatenated; return ``out``. fp32, fp16 or bf16 each."""
    if sum(s.numel() for s in sources) != out.numel() or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("cast_cat needs a contiguous 1-D out holding exactly the sources' elements")
    start = 0
    for first in range(0, len(sources), MAX_SOURCES):
        chunk = list(sources[first:first + MAX_SOURCES])
        if any(not s.is_contiguous() for s in chunk):
            raise ValueError("cast_cat takes contiguous sources")
        ends, total = [], 0
        for s in chunk:
            total += s.numel()
            ends.append(total)
        if total == 0:
            continue
        part = out[start:start + total]
        ptrs = chunk + [chunk[0]] * (MAX_SOURCES - len(chunk))
        ends = ends[:-1] + [total] * (MAX_SOURCES - len(chunk) + 1)  # E1..E7 (unused ones at the end), TOTAL
        launch(_cast_cat_kernel, (cdiv(total, _BLOCK),), part, *ptrs, *ends, N_SRC=len(chunk), BLOCK=_BLOCK)
        start += total
    return out
