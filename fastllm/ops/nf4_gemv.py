"""Decode-step QLoRA linears: ``x @ W.T + bias + s * (x @ A.T) @ B.T`` for 1 to 64 token rows, W read as 4-bit.

``nf4_gemv`` runs one projection, ``nf4_glu_gemv`` a gated MLP's gate and up with the activation: on CUDA one
Triton launch each, two with K split (``fastllm.kernels.nf4_gemv``: the packed weight dequantized in registers, no
dense copy, the LoRA term in the epilogue), elsewhere the torch fallback (dequant, GEMM, the LoRA term) with the
same roundings: the base output, the rank-r product, its scaling and the sum each rounded to x's dtype, as PEFT
under autocast. No autograd: these serve generation (grad mode off).

On CUDA, decode steps of up to ``DECODE_ROWS`` token rows take it unless switched off (``set_enabled(False)``, or
``FASTLLM_NF4_GEMV=0`` in the environment, read at the first call): one row is level with bitsandbytes' GEMV with
the LoRA terms fused in, a few rows read the weight once for all of them where bitsandbytes dequantizes it
(docs/benchmarks.md). Switched off, one-token steps take bitsandbytes' own GEMV plus the rank-r terms and batched
steps dequant + GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import Switch, pick_backend, triton_available
from .nf4 import no_autocast, stacked_dequant

__all__ = ["DECODE_ROWS", "MAX_ROWS", "decode_rows", "gemv_enabled", "gemv_ok", "nf4_glu_gemv", "nf4_gemv",
           "nf4_group_gemv", "set_decode_rows", "set_enabled"]

MAX_ROWS = 64  # the kernels' largest M (``kernels.nf4_gemv.MAX_ROWS``; not imported: Triton may be absent)
# the most token rows a decode step gives the GEMV: up to 32 its tensor-core path beats dequant + GEMM end to end
# (docs/benchmarks.md); beyond, dequant + GEMM serves the step
DECODE_ROWS = 32

_SWITCH = Switch("FASTLLM_NF4_GEMV", default=True)
_ROWS = [DECODE_ROWS]


def set_enabled(on: bool | None) -> None:
    """Turn the Triton decode GEMV on or off for this process (None: read ``FASTLLM_NF4_GEMV`` again; default on)."""
    _SWITCH.set(on)


def set_decode_rows(rows: int | None) -> None:
    """The most token rows a decode step gives the GEMV, for this process (None: ``DECODE_ROWS``); 1 to
    ``MAX_ROWS``. Benchmarks move it to time larger batches through the GEMV."""
    rows = DECODE_ROWS if rows is None else int(rows)
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"decode rows must be 1 to {MAX_ROWS} (the kernels' largest M), got {rows}")
    _ROWS[0] = rows


def decode_rows() -> int:
    """The most token rows a decode step gives the GEMV (``set_decode_rows``)."""
    return _ROWS[0]


def gemv_switched_on() -> bool:
    """The GEMV's process-wide switch (``set_enabled``), whatever the device."""
    return bool(_SWITCH)


def gemv_enabled(device: torch.device) -> bool:
    """The Triton GEMV serves decode steps on ``device``: CUDA, Triton importable, not switched off."""
    return bool(_SWITCH) and device.type == "cuda" and triton_available()


def gemv_ok(state: tuple, rows: int, max_rows: int = MAX_ROWS) -> bool:
    """The kernels take this weight (``state_args``) for ``rows`` token rows: K a multiple of the blocksize
    and of 32, at most ``max_rows`` rows (decode steps: ``decode_rows()``)."""
    k, bs = state[7][1], state[5]
    return 1 <= rows <= min(max_rows, MAX_ROWS) and k % bs == 0 and k % 32 == 0


_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from ..kernels import nf4_gemv

        _KERNELS = nf4_gemv
    return _KERNELS


def _lora_torch(y: torch.Tensor, lora) -> torch.Tensor:
    """``y + s * xa @ B.T`` with PEFT's roundings (product, scaled product, sum); xa may be ``kernels.lora_xa``'s
    (SPLIT, M, R) fp32 partials (summed, then rounded to y's dtype, as the kernels take them), B any float dtype."""
    xa, b, s = lora
    if xa.dim() == 3:
        xa = xa.sum(0)
    t = xa.to(y.dtype) @ b.to(y.dtype).t()
    if s != 1.0:
        t = t * s
    return y + t


def _linear_torch(x, packed, state, bias, lora) -> torch.Tensor:
    w = stacked_dequant((packed,), (state,), x.device, x.dtype, "torch")
    with no_autocast(x):
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        return y if lora is None else _lora_torch(y, lora)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, state: tuple, bias: torch.Tensor | None = None,
             lora: tuple | None = None, backend: str = "auto", config: dict | None = None) -> torch.Tensor:
    """``x @ W.T + bias + s * xa @ B.T`` for W the NF4 weight (``packed`` plain bytes, ``state_args``).

    x: (M, K) in the compute dtype, M <= MAX_ROWS for Triton; bias: (N,) or None; lora: ``(xa (M, r), B (N, r), s)``
    in x's dtype (xa may be a column slice of a wider buffer; or the (SPLIT, M, r) fp32 partials of
    ``kernels.lora_xa``, with B in any float dtype: ``kernels.nf4_gemv.lora_term``) or None; config: the kernel's
    tile overrides (``kernels.nf4_gemv.gemv_config``, for sweeps). Returns (M, N) in x's dtype.
    """
    n = state[7][0]
    if pick_backend(backend, x.device) != "triton":
        return _linear_torch(x, packed, state, bias, lora)
    absmax, code, code2, absmax2, offset, bs, bs2, _ = state
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if lora is not None:
        lora = (lora[0], lora[1].contiguous(), lora[2])
    return _kernels().nf4_gemv_fwd(x, _bytes(packed), (absmax, code, code2, absmax2, offset), n, bs, bs2 or 256,
                                   out, bias, lora, config)


def nf4_group_gemv(x: torch.Tensor, items, backend: str = "auto", config: dict | None = None) -> list | None:
    """Two or three projections of one input, each ``x @ W_i.T + bias_i + s_i * xa_i @ B_i.T`` as ``nf4_gemv``
    computes it, in one launch on CUDA (``kernels.nf4_group_gemv``; two with K split). items: per projection
    ``(packed, state, bias, lora)`` as ``nf4_gemv`` takes them. Returns the outputs (M, N_i), or None where the
    projections cannot share a launch (blocksizes or nesting differ, a bias or LoRA term on some only): then the
    caller runs them one by one."""
    states = [it[1] for it in items]
    if pick_backend(backend, x.device) != "triton":
        return [_linear_torch(x, packed, st, bias, lora) for packed, st, bias, lora in items]
    if not 2 <= len(items) <= 3 or len({(st[5], st[6], st[2] is None) for st in states}) != 1 \
            or len({it[2] is None for it in items}) != 1 or len({it[3] is None for it in items}) != 1:
        return None
    outs = [torch.empty(x.shape[0], st[7][0], dtype=x.dtype, device=x.device) for st in states]
    kernel_items = []
    for packed, st, bias, lora in items:
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        kernel_items.append((_bytes(packed), st[:5], st[7][0], bias, lora))
    from ..kernels.nf4_group_gemv import nf4_group_gemv_fwd

    return nf4_group_gemv_fwd(x, kernel_items, states[0][5], states[0][6] or 256, outs, config)


def nf4_glu_gemv(x: torch.Tensor, gate: tuple, up: tuple, gelu: bool = False, backend: str = "auto",
                 config: dict | None = None) -> torch.Tensor:
    """``act(gate(x)) * up(x)`` (act SiLU, or GELU-tanh with ``gelu``) for a gated MLP's two NF4 projections, each
    ``(packed, state, lora)`` as ``nf4_gemv`` takes them (one shape, blocksize and nesting; a LoRA term on both or
    neither). x: (M, K); returns (M, N) in x's dtype, act(g) rounded before the product as eager rounds it."""
    (pg, sg, lg), (pu, su, lu) = gate, up
    if pick_backend(backend, x.device) != "triton":
        g = _linear_torch(x, pg, sg, None, lg)
        u = _linear_torch(x, pu, su, None, lu)
        return (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u
    if tuple(sg[7]) != tuple(su[7]) or sg[5] != su[5]:
        raise ValueError(f"the fused gate/up GEMV needs one shape and blocksize, got {sg[7]}/{sg[5]} and "
                         f"{su[7]}/{su[5]}")
    n = sg[7][0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    lg = None if lg is None else (lg[0], lg[1].contiguous(), lg[2])
    lu = None if lu is None else (lu[0], lu[1].contiguous(), lu[2])
    return _kernels().nf4_glu_gemv_fwd(x, (_bytes(pg), sg[:5], lg), (_bytes(pu), su[:5], lu), n, sg[5], sg[6] or 256,
                                       out, gelu, config)


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    return packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)  # quant_storage may be bf16 etc.
