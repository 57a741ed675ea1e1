"""NF4 dequantization and the frozen NF4 linear (QLoRA base layer), with torch fallbacks.

``dequantize_nf4(packed, quant_state)`` returns ``W`` of ``quant_state.shape`` (N, K) equal to
``bitsandbytes.functional.dequantize_4bit``; see ``fastllm.kernels.nf4`` for the maths.

``nf4_linear(x, weight)`` with ``W = dequant(weight)`` of shape (N, K)::

    forward   y  = x @ W.T + b                       x: (..., K) -> y: (..., N)
    backward  dx = dy @ W      (W dequantized again)  db = sum over rows of dy

Only the **packed** 4-bit weight is saved for backward; the base weight is frozen, so there is no
weight gradient. The dense ``W`` lives in one reusable workspace per (device, dtype), grown to the
largest weight seen, so no dense copy outlives the op and no per-call allocation happens. Work is
stream-ordered: one op finishes reading the workspace before the next dequant overwrites it on the
same stream (do not share these ops across concurrent streams).

The torch fallback decodes in bitsandbytes' order (fp32 products, the ``+ offset`` separately rounded),
so on the CPU it is bit-equal to bitsandbytes where bitsandbytes is right. Note that bitsandbytes
0.50's native CPU ``dequantize_4bit`` (taken for even in_features) restarts the quantization blocks at
every row: it is wrong whenever in_features is not a multiple of the blocksize (most blocksizes other
than 64 on real shapes); ours follows the flat block layout that ``quantize_4bit`` wrote.

Under ``torch.compile`` the same maths runs through the custom ops ``fastllm::nf4_dequantize`` and
``fastllm::nf4_linear`` (with fake implementations and a registered autograd formula), so dynamo
traces through them without a graph break. Compiled code should call them through ``NF4Args`` (plain
tensors and ints, built eagerly by ``nf4_args``) and ``nf4_linear_args``: then the traced code never
touches bitsandbytes' ``Params4bit`` (a ``__torch_function__`` subclass) or its ``QuantState`` object.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .._compat import pick_backend, records_graph
from . import dense_decode

__all__ = ["NF4Args", "NF4LinearFunction", "dequantize_nf4", "nf4_args", "nf4_linear", "nf4_linear_args",
           "plain_tensor"]


# ---- quant-state plumbing --------------------------------------------------------------------

def state_args(quant_state) -> tuple:
    """Flatten a bnb QuantState to the custom ops' arguments (tensors stay on their device).

    Returns (absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape).
    """
    qs = quant_state
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"dequantize_nf4 handles NF4 only, got quant_type={qs.quant_type!r}")
    if qs.nested:
        offset = qs.offset
        if not isinstance(offset, torch.Tensor):  # states rebuilt by hand may carry a float
            offset = torch.tensor(float(offset), dtype=torch.float32, device=qs.absmax.device)
        # bnb's offset is a 0-dim fp32 tensor: passed as it is (a reshape and a cast here were two dispatched
        # ops per call, tens of microseconds of host time, three calls per linear per step).
        offset = offset if offset.dtype == torch.float32 else offset.float()
        return (qs.absmax, qs.code, qs.state2.code, qs.state2.absmax, offset,
                int(qs.blocksize), int(qs.state2.blocksize), list(qs.shape))
    return (qs.absmax, qs.code, None, None, None, int(qs.blocksize), 0, list(qs.shape))


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` alias of ``t`` (same storage, no copy).

    bnb's ``Params4bit`` overrides ``__torch_function__``, so every ``.dtype``, ``.data_ptr()`` or ``.t()`` on it
    runs Python (1.2 against 0.05 us for ``.dtype`` on a dev CPU; a Triton launch reads several per tensor
    argument, checkpointing's pack hooks more). Hot paths take this alias once per call instead.
    """
    # Only subclasses that keep real storage (Params4bit: __torch_function__ only). A wrapper subclass with its
    # own __torch_dispatch__ (FSDP2's NF4Param) has no storage of its own and serves its packed bytes through
    # overrides (data_ptr), so it stays as it is.
    if type(t) is torch.Tensor or type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
        return t
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


class NF4Args(NamedTuple):
    """One NF4 weight as the custom ops take it: plain tensors and ints only (no bnb objects).

    A NamedTuple because dynamo traces it natively on every torch version we support: its tensors become
    graph inputs and its ints guarded constants, so layers of equal shapes share one graph.
    """

    packed: torch.Tensor           # packed 4-bit codes (a plain tensor, never the Params4bit itself)
    absmax: torch.Tensor           # (nblocks,) fp32, or uint8 codes under double quant
    code: torch.Tensor             # (16,) NF4 code book
    code2: torch.Tensor | None     # double quant: (256,) code book of absmax
    absmax2: torch.Tensor | None   # double quant: (nblocks / blocksize2,) fp32
    offset: torch.Tensor | None    # double quant: () or (1,) fp32
    blocksize: int
    blocksize2: int
    shape: tuple[int, int]         # (N, K) of the dense weight


def nf4_args(packed: torch.Tensor, quant_state) -> NF4Args:
    """``NF4Args`` for ``packed`` bytes and their bnb ``QuantState`` (run eagerly, outside compiled code)."""
    absmax, code, code2, absmax2, offset, bs, bs2, shape = state_args(quant_state)
    _bnb_gemm_op()  # looked up here, eagerly: traced code only reads the cached op (``_traced_decode``)
    return NF4Args(packed, absmax, code, code2, absmax2, offset, bs, bs2, tuple(shape))


def _absmax_torch(absmax, code2, absmax2, offset, blocksize2) -> torch.Tensor:
    """Per-block fp32 absmax (nblocks,), undoing double quant as two rounded fp32 ops like bnb."""
    if code2 is None:
        return absmax.float()
    nb = absmax.numel()
    a2 = absmax2.float().repeat_interleave(blocksize2)[:nb]  # (nblocks,)
    return code2[absmax.long()] * a2 + offset  # mul then add, separately rounded: bit-equal to bnb


def _dequant_torch(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, out) -> None:
    """Pure-torch NF4 decode into ``out`` (the CPU fallback and the reference maths)."""
    n = out.numel()
    q = packed.reshape(-1).view(torch.uint8)[: (n + 1) // 2]
    scale = _absmax_torch(absmax, code2, absmax2, offset, blocksize2)  # (nblocks,)
    nb = scale.numel()
    idx = torch.stack((q >> 4, q & 15), dim=-1).reshape(-1).long()  # high nibble first
    idx = torch.nn.functional.pad(idx, (0, nb * blocksize - idx.numel()))
    vals = code.float()[idx].view(nb, blocksize) * scale[:, None]  # (nblocks, blocksize) fp32
    out.view(-1).copy_(vals.view(-1)[:n])


_KERNELS = None  # fastllm.kernels.nf4 once imported (an import statement per call is ~0.5 us of host time)


def _nf4_kernels():
    global _KERNELS
    if _KERNELS is None:
        from ..kernels import nf4

        _KERNELS = nf4
    return _KERNELS


def _dequant_into(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, out,
                  backend: str = "auto") -> torch.Tensor:
    if pick_backend(backend, packed.device) == "triton":
        return _nf4_kernels().nf4_dequant_fwd(packed, absmax, code, blocksize, out, code2, absmax2, offset,
                                              blocksize2 or 256)
    _dequant_torch(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, out)
    return out


# ---- workspace -------------------------------------------------------------------------------

_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
# Bumped whenever a buffer is replaced or dropped. A CUDA graph that captured a dequant into a buffer replays into
# that buffer's address: ``workspace_epoch`` tells its owner the buffer it captured may be gone (see decode_graphs).
_EPOCH = 0
# (device, dtype, shape) -> a view into that buffer: hot calls then cost one dict lookup, not a slice and a
# view (two dispatched ops, tens of microseconds of host time, three times per linear per step).
_VIEWS: dict[tuple, torch.Tensor] = {}


def _workspace(device: torch.device, dtype: torch.dtype, shape) -> torch.Tensor:
    """A (shape) view into the one dense-weight buffer of (device, dtype), grown on demand."""
    shape = tuple(shape)
    view = _VIEWS.get((device, dtype, shape))
    if view is not None:
        return view
    numel = 1
    for s in shape:
        numel *= s
    key = (torch.device(device), dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        # Free the old buffer (and every view of it) before taking a larger one.
        global _EPOCH
        _EPOCH += 1
        _WORKSPACES.pop(key, None)
        for k in [k for k in _VIEWS if k[:2] == key]:
            del _VIEWS[k]
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    view = buf[:numel].view(shape)
    _VIEWS[(key[0], dtype, shape)] = view
    return view


def stacked_dequant(weights, states, device: torch.device, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``[W_1; W_2; ..]`` (sum N_i, K): the dense weights of projections sharing one input (q/k/v, gate/up)
    stacked along dim 0 in the workspace, so one GEMM serves them all (inside a ``generate`` call with
    ``ops.dense_decode`` on: its kept copy, made once).

    One Triton launch for two or three weights of one blocksize and nesting (``nf4_dequant_parts``); one
    dequant per weight otherwise, into consecutive rows. weights: packed plain tensors; states: ``state_args``.
    """
    shape = (sum(st[7][0] for st in states), states[0][7][1])
    if dense_decode.active():
        dense = dense_decode.lookup(weights, shape, device, dtype,
                                    lambda out: _stacked_into(weights, states, out, backend))
        if dense is not None:
            return dense
    return _stacked_into(weights, states, _workspace(device, dtype, shape), backend)


def _stacked_into(weights, states, out: torch.Tensor, backend: str) -> torch.Tensor:
    if len(weights) == 1:
        absmax, code, code2, absmax2, offset, bs, bs2, _ = states[0]
        return _dequant_into(weights[0], absmax, code, code2, absmax2, offset, bs, bs2, out, backend)
    k = states[0][7][1]
    rows = [st[7][0] for st in states]
    device = out.device
    same = all(st[7][1] == k and st[5] == states[0][5] and (st[2] is None) == (states[0][2] is None)
               and (st[7][0] * k) % 2 == 0 for st in states)
    if same and 2 <= len(weights) <= 3 and pick_backend(backend, device) == "triton":
        parts = [(w, st[0], st[1], st[2], st[3], st[4], st[7][0] * k) for w, st in zip(weights, states)]
        return _nf4_kernels().nf4_dequant_parts(parts, states[0][5], out, states[0][6] or 256)
    for w, st, part in zip(weights, states, out.split(rows)):
        if st[7][1] != k:
            raise ValueError(f"stacked weights need one in_features, got {[tuple(s[7]) for s in states]}")
        absmax, code, code2, absmax2, offset, bs, bs2, _ = st
        _dequant_into(w, absmax, code, code2, absmax2, offset, bs, bs2, part, backend)
    return out


def clear_workspaces() -> None:
    """Release the cached dense-weight buffers (e.g. before measuring memory). A buffer a live CUDA graph captured
    stays allocated until that graph is dropped (decode graphs hold theirs: ``workspace_buffers``)."""
    global _EPOCH
    _EPOCH += 1
    _VIEWS.clear()
    _WORKSPACES.clear()


def workspace_epoch() -> int:
    """A counter bumped whenever a workspace buffer is replaced (grown) or dropped (``clear_workspaces``), or a dense
    decode copy is made or the copies dropped (``ops.dense_decode``): equal values mean every buffer taken in between
    is still the one in use."""
    return _EPOCH + dense_decode.epoch()


def workspace_buffers() -> tuple:
    """The workspace buffers (and dense decode copies) in use now. A CUDA graph that dequantizes replays its writes
    into the buffers it captured, and one that reads a dense copy reads that copy's address: holding these keeps that
    memory from being freed and handed to another tensor while the graph can replay."""
    return tuple(_WORKSPACES.values()) + dense_decode.buffers()


def no_autocast(t: torch.Tensor):
    """A context that turns autocast off for ``t``'s device, or a no-op one when it is already off (cheaper)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


# ---- shared forward / backward maths ---------------------------------------------------------

def _linear_fwd(x, packed, state: tuple, bias, backend: str) -> torch.Tensor:
    w = stacked_dequant((packed,), (state,), x.device, x.dtype, backend)  # (N, K) in x.dtype
    # Computed in x's dtype, as bnb does after Linear4bit.forward cast x to compute_dtype.
    with no_autocast(x):
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _linear_bwd_input(dy, packed, state: tuple, backend: str) -> torch.Tensor:
    """dy @ W, W dequantized again."""
    w = stacked_dequant((packed,), (state,), dy.device, dy.dtype, backend)  # (N, K)
    with no_autocast(dy):
        return dy @ w  # (..., N) @ (N, K) -> (..., K)


def bias_grad(dy, bias_dtype) -> torch.Tensor:
    return dy.reshape(-1, dy.shape[-1]).sum(0).to(bias_dtype)  # (N,)


# ---- eager autograd Function -----------------------------------------------------------------

class NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W).T + b; saves the packed weight (and quant-state object) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        qs = weight.quant_state
        state, weight = state_args(qs), plain_tensor(weight)
        ctx.save_for_backward(weight)  # packed uint8 (or quant_storage) bytes, never a dense copy
        ctx.quant_state, ctx.backend, ctx.x_dtype = qs, backend, x.dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _linear_fwd(x, weight, state, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _linear_bwd_input(dy, weight, state_args(ctx.quant_state), ctx.backend).to(ctx.x_dtype)
        if ctx.bias_needs_grad:
            db = bias_grad(dy, ctx.bias_dtype)
        return dx, None, db, None


# ---- custom ops (torch.compile) --------------------------------------------------------------
# Registered through ``torch.library.Library`` directly, not the ``torch.library.custom_op`` decorator: the
# decorator wraps every call in Python layers (a dynamo-disable context, an aliasing check, a generated
# autograd Function) that cost about half as much again per call with grad (examples/host_overhead.py), three
# calls per linear per training step. Here a call is the dispatcher, one small Python autograd kernel and the
# implementation.

_LIB = torch.library.Library("fastllm", "FRAGMENT")
_STATE = "Tensor packed, Tensor absmax, Tensor code, Tensor? code2, Tensor? absmax2, Tensor? offset"
_META = "SymInt blocksize, SymInt blocksize2, SymInt[] shape"
_LIB.define(f"nf4_dequantize({_STATE}, {_META}, ScalarType dtype) -> Tensor")
_LIB.define(f"nf4_linear(Tensor x, {_STATE}, Tensor? bias, {_META}) -> Tensor")
_LIB.define(f"nf4_linear_backward(Tensor dy, {_STATE}, {_META}) -> Tensor")


def _dequantize_impl(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    return _dequant_into(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, out)


def _bnb_gemm_op():
    """bitsandbytes' ``gemm_4bit`` op (bnb >= 0.50), or None: looked up once (``torch.ops`` lookups are Python)."""
    global _BNB_GEMM
    if _BNB_GEMM is _UNSET:
        _BNB_GEMM = getattr(getattr(torch.ops, "bitsandbytes", None), "gemm_4bit", None)
    return _BNB_GEMM


_UNSET = object()
_BNB_GEMM = _UNSET


def _goes_to_bnb_gemm(x, packed, code2, blocksize, blocksize2, shape) -> bool:
    """A one-token call on CUDA (a decode step) that bnb's fused 4-bit GEMV takes (``bnb_gemv_ok``)."""
    return x.is_cuda and x.numel() == x.shape[-1] and bnb_gemv_ok(packed, code2, blocksize, blocksize2, shape)


def bnb_gemv_ok(packed, code2, blocksize, blocksize2, shape) -> bool:
    """bnb's fused 4-bit GEMV kernel reads only the packed weight, where dequant + GEMM writes and re-reads a dense
    one. bnb takes it for K a multiple of the blocksize and nested states with a second-level blocksize of 256
    (what ``quantize_4bit`` writes)."""
    return (shape[1] % blocksize == 0 and packed.dtype == torch.uint8 and (code2 is None or blocksize2 == 256)
            and not dense_decode.active() and _bnb_gemm_op() is not None)


def bnb_gemv(x, packed, absmax, code, code2, absmax2, offset, bias, blocksize, shape) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for one token through bnb's own no-grad call (``matmul_4bit``'s
    ``gemm_4bit``): the nested absmax is decoded inside its kernel. x (1, K) -> (1, N); needs ``bnb_gemv_ok``."""
    bias = None if bias is None else bias.to(x.dtype)  # bnb wants the bias in x's dtype (the dequant path casts too)
    if code2 is None:
        return _bnb_gemm_op()(x, packed, list(shape), absmax, blocksize, "nf4", bias=bias)
    return _bnb_gemm_op()(x, packed, list(shape), absmax2, blocksize, "nf4", bias=bias, absmax_8bit=absmax,
                          absmax_code=code2, absmax_offset=offset)


def _linear_impl(x, packed, absmax, code, code2, absmax2, offset, bias, blocksize, blocksize2, shape):
    if _goes_to_bnb_gemm(x, packed, code2, blocksize, blocksize2, shape):
        return bnb_gemv(x, packed, absmax, code, code2, absmax2, offset, bias, blocksize, shape)
    return _linear_fwd(x, packed, (absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape), bias, "auto")


def _linear_bwd_impl(dy, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape):
    return _linear_bwd_input(dy, packed, (absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape),
                             "auto")


def _dequantize_fake(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def _linear_fake(x, packed, absmax, code, code2, absmax2, offset, bias, blocksize, blocksize2, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _linear_bwd_fake(dy, packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape):
    return dy.new_empty((*dy.shape[:-1], shape[1]))


for _name, _impl, _fake in (("nf4_dequantize", _dequantize_impl, _dequantize_fake),
                            ("nf4_linear", _linear_impl, _linear_fake),
                            ("nf4_linear_backward", _linear_bwd_impl, _linear_bwd_fake)):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")  # every device; the impl picks Triton or torch
    torch.library.register_fake(f"fastllm::{_name}", _fake, lib=_LIB)

_nf4_dequantize_op = torch.ops.fastllm.nf4_dequantize.default
_nf4_linear_op = torch.ops.fastllm.nf4_linear.default
_nf4_linear_bwd_op = torch.ops.fastllm.nf4_linear_backward.default


class _NF4LinearOpFunction(torch.autograd.Function):
    """Autograd of ``fastllm::nf4_linear``: dx = dy @ W (the backward op), db = sum(dy); no weight grad."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape):
        with torch._C._AutoDispatchBelowAutograd():
            y = _nf4_linear_op(x, packed, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape)
        ctx.save_for_backward(packed, absmax, code, code2, absmax2, offset)
        ctx.meta = (bs, bs2, shape, x.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, code, code2, absmax2, offset = ctx.saved_tensors
        bs, bs2, shape, x_dtype, bias_dtype = ctx.meta
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _nf4_linear_bwd_op(dy, packed, absmax, code, code2, absmax2, offset, bs, bs2, shape).to(x_dtype)
        if ctx.needs_input_grad[7]:
            db = bias_grad(dy, bias_dtype)
        return dx, None, None, None, None, None, None, db, None, None, None


def _linear_autograd(x, packed, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape):
    if records_graph(x, bias):
        return _NF4LinearOpFunction.apply(x, packed, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape)
    with torch._C._AutoDispatchBelowAutograd():
        return _nf4_linear_op(x, packed, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape)


_LIB.impl("nf4_linear", _linear_autograd, "Autograd")


# ---- public functions ------------------------------------------------------------------------

def dequantize_nf4(packed: torch.Tensor, quant_state, *, out: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Dense ``W`` (quant_state.shape, quant_state.dtype) from bnb NF4 ``packed`` bytes.

    Equals ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``. ``out`` (contiguous,
    that shape, any of bf16/fp16/fp32) is written in place and returned when given; its dtype then
    picks the output precision. backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    absmax, code, code2, absmax2, offset, bs, bs2, shape = state_args(quant_state)
    if torch.compiler.is_compiling():
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        w = _nf4_dequantize_op(packed, absmax, code, code2, absmax2, offset, bs, bs2, shape,
                               quant_state.dtype if out is None else out.dtype)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty(shape, dtype=quant_state.dtype, device=packed.device)
    elif list(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    return _dequant_into(packed, absmax, code, code2, absmax2, offset, bs, bs2, out, backend)


def nf4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *,
               backend: str = "auto") -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` for a bnb ``Params4bit`` weight (quant_state.shape (N, K)).

    x: (..., K) in the compute dtype; returns (..., N) in x.dtype. Differentiable in x and bias only.
    """
    qs = weight.quant_state
    if torch.compiler.is_compiling():
        absmax, code, code2, absmax2, offset, bs, bs2, shape = state_args(qs)
        return _nf4_linear_op(x, weight, absmax, code, code2, absmax2, offset, bias, bs, bs2, shape)
    return NF4LinearFunction.apply(x, weight, bias, backend)


def nf4_linear_args(x: torch.Tensor, args: NF4Args, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` through the ``fastllm::nf4_linear`` custom op, eager or traced.

    x: (..., K) in the compute dtype; returns (..., N) in x.dtype. Differentiable in x and bias only.
    """
    if torch.compiler.is_compiling() and _traced_decode(x, args):
        # A decode step in compiled code: bnb's own op (it has a fake implementation) goes into the graph itself.
        # The compiled call then runs no fastllm Python for it (the custom op's autograd and impl kernels: two
        # Python frames per linear per token, on a host-bound step). Same kernel and numbers as _linear_impl's.
        return bnb_gemv(x, args.packed, args.absmax, args.code, args.code2, args.absmax2, args.offset, bias,
                        args.blocksize, args.shape)
    return _nf4_linear_op(x, args.packed, args.absmax, args.code, args.code2, args.absmax2, args.offset, bias,
                          args.blocksize, args.blocksize2, list(args.shape))


def _traced_decode(x: torch.Tensor, args: NF4Args) -> bool:
    """``_goes_to_bnb_gemm``'s condition, decided while tracing (dynamo guards on grad mode and the static
    one-token shape), with grad mode off: bnb's op has no autograd formula. Reads the op cached by ``nf4_args``."""
    return (_BNB_GEMM is not _UNSET and not torch.is_grad_enabled()
            and _goes_to_bnb_gemm(x, args.packed, args.code2, args.blocksize, args.blocksize2, args.shape))
