"""A whole QLoRA decoder layer (Llama form: Mistral, Qwen2/3 too) as one autograd Function that recomputes itself
in backward.

With x (B, T, H), M = B*T rows, the seven projections NF4 + LoRA (see ``ops.lora``)::

    forward   n1 = rmsnorm(x) ; q, k, v = qkv(n1) (+ bias) ; [q, k = headnorm(q), headnorm(k)] ; q, k = rope(q, k)
              a  = attention(q, k, v) ; m = x + [norm_pa](o_proj(a))
              n2 = rmsnorm(m) ; y = m + [norm_pf](mlp(n2))            (y returned; only x is kept)
    backward  the forward again, keeping its intermediates (the MLP's down projection skipped), then
              dm  = dy + rmsnorm'(mlp'([norm_pf'](dy)))
              da  = o_proj'([norm_pa'](dm)) ; dq, dk, dv = attention'(da) ; dq, dk = rope'(dq, dk) [; headnorm'(dq, dk)]
              dx  = dm + rmsnorm'(qkv'(dq, dk, dv))                   plus the 14 adapter gradients

This is gradient checkpointing of the layer (only its input is kept between forward and backward) without
an autograd graph inside it. The bracketed steps are the architecture's (``fastllm.arch``): frozen biases ride in the
projections' ``LoRAFrozen.bias``, ``headnorm`` is Qwen3's and Gemma's per-head RMSNorm of q and k over the head dim,
``norm_pa`` / ``norm_pf`` Gemma's norms of attention's and the MLP's outputs (then ``n2``'s norm is its
pre-feed-forward one, and the recompute runs the MLP's down projection: ``norm_pf``'s backward reads its output). Why
no autograd graph: non-reentrant checkpointing re-runs the layer through ~12 autograd nodes with
saved-tensor hooks (~27 per layer per pass) and Python module forwards, and that recompute plus backward
takes about as long on the host as the GPU's own work for the layer, so the GPU waits on the host. Here the
backward calls the same ops' plain forward/backward functions (``qkv_forward``, ``mlp_backward``, ...)
directly; attention's backward alone goes through autograd (one local graph around the attention call, which
picks its kernel as in transformers). Works with ``torch.autograd.grad`` and inputs that need no grad, unlike
reentrant checkpointing: nothing here calls ``backward`` on an outer graph.

The numbers are the per-op fused path's (same functions, same compute-dtype adapter copies); attention is
re-run with grad enabled in backward, as checkpointing's recompute does (SDPA may pick another kernel there).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch

from .lora import LoRAFrozen, adapter_views, cast_adapters, lora_group_backward, lora_group_forward, master_grads
from .lora_mlp import ARG_OF_POSITION as MLP_ARG
from .lora_mlp import POSITION_OF_ARG as MLP_ORDER
from .lora_mlp import mlp_adapters, mlp_backward, mlp_forward
from .lora_qkv import ARG_OF_POSITION as QKV_ARG
from .lora_qkv import POSITION_OF_ARG as QKV_ORDER
from .lora_qkv import qkv_adapters, qkv_backward, qkv_forward
from .nf4 import no_autocast
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rope import rope_rotate, rope_tables

__all__ = ["LayerParts", "LoRADecoderLayerFunction", "lora_decoder_layer", "mlp_tile_rows"]


class LayerParts(NamedTuple):
    """What the layer op needs besides x, cos/sin and the adapter weights (all frozen or plain values)."""

    norm1: tuple              # (weight, eps, offset) of the input RMSNorm (``ops.rms_norm``'s offset: 1 for Gemma)
    norm2: tuple              # (weight, eps, offset) of the post-attention RMSNorm
    qkv: LoRAFrozen
    o: LoRAFrozen
    mlp: LoRAFrozen
    heads: tuple              # (query heads, key/value heads, head dim)
    attend: Callable          # (q, k, v) (B, heads, T, D) -> attention output (B, T, query heads, D)
    use_triton: bool          # RMSNorm / RoPE kernels
    qk_norm: tuple | None = None  # ((weight, eps, offset) of q's, of k's) per-head RMSNorm (Qwen3), or None
    # Gemma's sandwich: ((weight, eps, offset) of the norm of attention's output, of the MLP's output), or None; then
    # norm2 is the pre-feed-forward norm
    sandwich: tuple | None = None


def _groups(adapters):
    """The 14 adapter weights (q, k, v, o, gate, up, down: A then B each) as the three ops' flat orders."""
    aq, bq, ak, bk, av, bv, ao, bo, ag, bg, au, bu, ad, bd = adapters
    return qkv_adapters(aq, bq, ak, bk, av, bv), (ao, bo), mlp_adapters(ag, bg, au, bu, ad, bd)


def _norm(x2, norm: tuple, use_triton: bool):
    weight, eps, offset = norm
    return rms_norm_forward(x2, weight, eps, use_triton, offset)


# Rows of an MLP tile: a layer of more rows runs its MLP (and the norm after it, Gemma's) over row tiles in forward
# and in backward, so no (rows, intermediate) tensor exists for the whole sequence (8B: a 64K-token gate/up output
# is 3.8 GB, a tile's 0.47 GB). The same maths; the adapter gradients are summed over tiles in fp32.
MLP_TILE_ROWS = 8192
_TILE_ROWS: ContextVar[int | None] = ContextVar("fastllm_mlp_tile_rows", default=None)


@contextmanager
def mlp_tile_rows(rows: int):
    """Layer ops called inside use MLP tiles of ``rows`` rows (their backward too: the size is fixed in forward).
    Smaller tiles lower a layer's backward peak (the (rows, 2 x intermediate) buffers) at the cost of dequantizing
    the MLP weights once per tile: ``"auto"`` checkpointing takes them when its leanest plan is over the budget."""
    token = _TILE_ROWS.set(rows)
    try:
        yield
    finally:
        _TILE_ROWS.reset(token)


def _tiles(m: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, m)) for s in range(0, m, rows)]


def _mlp_out(n2, p: LayerParts, casts, shapes, tile: int):
    """The MLP's output (with Gemma's norm after it) for n2 (M, H), tile by tile."""
    y = torch.empty_like(n2)
    for s, e in _tiles(n2.shape[0], tile):
        y_t, _ = mlp_forward(n2[s:e], p.mlp, casts[2][0], shapes[2], views=casts[2][1])
        y[s:e] = y_t if p.sandwich is None else _norm(y_t, p.sandwich[1], p.use_triton)[0]
    return y


def _mlp_grads_tiled(dy2, n2, p: LayerParts, casts, shapes, tile: int):
    """(dn2, fp32 adapter grads in the MLP's flat layout) of ``_mlp_out`` for dy2 (M, H), recomputing the MLP tile
    by tile in backward (its output too where Gemma's norm after it needs it)."""
    dn2, g = torch.empty_like(n2), None
    for s, e in _tiles(n2.shape[0], tile):
        y_t, saved = mlp_forward(n2[s:e], p.mlp, casts[2][0], shapes[2], need_output=p.sandwich is not None,
                                 views=casts[2][1])
        d_t = dy2[s:e]
        if p.sandwich is not None:
            d_t = rms_norm_backward(d_t, _norm(y_t, p.sandwich[1], p.use_triton)[1], p.use_triton)
        saved = list(saved)  # consumed by mlp_backward
        dn2[s:e], g_t = mlp_backward(d_t, n2[s:e], saved, p.mlp, casts[2][0], shapes[2], views=casts[2][1])
        g = g_t.float() if g is None else g.add_(g_t)
    return dn2, g


def _run(x, c, s, p: LayerParts, casts, shapes, keep: bool, tile: int):
    """The layer's forward on x (B, T, H). Returns y, or (with ``keep``) everything backward reads."""
    B, T, H = x.shape
    nq, nkv, d = p.heads
    x2 = x.reshape(B * T, H)
    n1, st1 = _norm(x2, p.norm1, p.use_triton)
    qkv, xa_qkv = qkv_forward(n1, p.qkv, casts[0][0], shapes[0], views=casts[0][1])
    q, k, v = qkv.split_with_sizes([nq * d, nkv * d, nkv * d], 1)
    st_qk = None
    if p.qk_norm is not None:  # per head: rows of the head dim, read in place from qkv's columns
        (q, st_q), (k, st_k) = (_norm(t.view(B * T, -1, d), norm, p.use_triton)
                                for t, norm in zip((q, k), p.qk_norm))
        st_qk = (st_q, st_k)
    # in place: q and k become rotated column blocks of qkv (or of the norms' outputs), no new (M, (nq + nkv) d)
    q, k = rope_rotate(q.view(B, T, nq, d), k.view(B, T, nkv, d), c, s, p.use_triton, inplace=True)
    q4, k4, v4 = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, nkv, d).transpose(1, 2)
    if keep:  # attention's backward comes from autograd on this one call
        q4, k4, v4 = (t.detach().requires_grad_() for t in (q4, k4, v4))
        with torch.enable_grad():
            o4 = p.attend(q4, k4, v4)
        a2 = o4.detach().reshape(B * T, nq * d)
    else:
        a2 = p.attend(q4, k4, v4).reshape(B * T, nq * d)
    a_o, b_o = casts[1][1]
    ao, xa_o = lora_group_forward(a2, p.o.weights, p.o.states, a_o, (b_o,), p.o.scales, p.o.backend, p.o.bias,
                                  exact=p.o.exact)
    st_pa = st_pf = None
    if p.sandwich is not None:
        ao, st_pa = _norm(ao, p.sandwich[0], p.use_triton)
    m2 = x2 + ao
    n2, st2 = _norm(m2, p.norm2, p.use_triton)
    saved_mlp = None
    if B * T > tile:  # over tiles: here in forward; in backward by ``_mlp_grads_tiled``
        if not keep:
            return (m2 + _mlp_out(n2, p, casts, shapes, tile)).view(B, T, H)
    else:
        # the recompute drops the MLP's output, unless the post-feed-forward norm's backward needs it
        y, saved_mlp = mlp_forward(n2, p.mlp, casts[2][0], shapes[2], need_output=not keep or p.sandwich is not None,
                                   views=casts[2][1])
        if p.sandwich is not None:
            y, st_pf = _norm(y, p.sandwich[1], p.use_triton)
        if not keep:
            return (m2 + y).view(B, T, H)
    return dict(st1=st1, n1=n1, xa_qkv=xa_qkv, st_qk=st_qk, q4=q4, k4=k4, v4=v4, o4=o4, a2=a2, xa_o=xa_o, st_pa=st_pa,
                st2=st2, n2=n2, mlp=saved_mlp, st_pf=st_pf)


class LoRADecoderLayerFunction(torch.autograd.Function):
    """y = decoder_layer(x) with gradients for x and the 14 adapter weights (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, cos, sin, parts: LayerParts, *adapters):
        with no_autocast(x):
            groups = _groups(adapters)
            casts = tuple(cast_adapters(g, x.dtype) for g in groups)  # (flat, views) per group
            shapes = tuple(tuple(a.shape for a in g) for g in groups)
            c, s = rope_tables(cos, sin)
            tile = _TILE_ROWS.get() or MLP_TILE_ROWS
            y = _run(x, c, s, parts, casts, shapes, keep=False, tile=tile)
        ctx.save_for_backward(x)
        # frozen or plain values: on ctx (the adapter copies are reused by the recompute, never cast twice)
        ctx.parts, ctx.casts, ctx.shapes, ctx.tables, ctx.tile = parts, casts, shapes, (c, s), tile
        ctx.dtypes = tuple(tuple(a.dtype for a in g) for g in groups)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        p, casts, shapes = ctx.parts, ctx.casts, ctx.shapes
        flats = [c[0] for c in casts]
        B, T, H = x.shape
        nq, nkv, d = p.heads
        with torch.no_grad(), no_autocast(x):
            st = _run(x, *ctx.tables, p, casts, shapes, keep=True, tile=ctx.tile)
            dy2 = dy.reshape(B * T, H).to(x.dtype)
            # st.pop: each intermediate is dropped once its backward has read it (the MLP's are the largest)
            st_pf, st_pa, saved_mlp = st.pop("st_pf"), st.pop("st_pa"), st.pop("mlp")
            if saved_mlp is None:  # a long layer: the MLP over row tiles
                dn2, g_mlp = _mlp_grads_tiled(dy2, st.pop("n2"), p, casts, shapes, ctx.tile)
            else:
                df = dy2 if st_pf is None else rms_norm_backward(dy2, st_pf, p.use_triton)
                saved_mlp = list(saved_mlp)  # consumed by mlp_backward: its buffers go as soon as they are read
                dn2, g_mlp = mlp_backward(df, st.pop("n2"), saved_mlp, p.mlp, flats[2], shapes[2], views=casts[2][1])
                del df
            dm2 = dy2 + rms_norm_backward(dn2, st.pop("st2"), p.use_triton)
            del dn2, saved_mlp
            dao = dm2 if st_pa is None else rms_norm_backward(dm2, st_pa, p.use_triton)
            g_o = torch.empty_like(flats[1])
            a_o, b_o = casts[1][1]
            ga_o, gb_o = adapter_views(g_o, shapes[1])
            da2 = lora_group_backward((dao,), st.pop("a2"), st.pop("xa_o"), p.o.weights, p.o.states, a_o, (b_o,),
                                      p.o.scales, p.o.backend, ga_o, (gb_o,))
            with torch.enable_grad():
                dq4, dk4, dv4 = torch.autograd.grad(st.pop("o4"), (st.pop("q4"), st.pop("k4"), st.pop("v4")),
                                                    da2.view(B, T, nq, d))
            del da2
            dq, dk = rope_rotate(dq4.transpose(1, 2), dk4.transpose(1, 2), *ctx.tables, p.use_triton, backward=True)
            dv = dv4.transpose(1, 2).reshape(B * T, nkv * d)
            del dq4, dk4, dv4
            st_qk = st.pop("st_qk")
            if st_qk is not None:
                dq, dk = (rms_norm_backward(g.reshape(-1, d), st_n, p.use_triton) for g, st_n in zip((dq, dk), st_qk))
            dys = (dq.view(B * T, nq * d), dk.view(B * T, nkv * d), dv)
            need_dx = ctx.needs_input_grad[0]
            dn1, g_qkv = qkv_backward(dys, st["n1"], st["xa_qkv"], p.qkv, flats[0], shapes[0], need_dx,
                                      views=casts[0][1])
            dx = (dm2 + rms_norm_backward(dn1, st["st1"], p.use_triton)).view(B, T, H) if need_dx else None
        needs = ctx.needs_input_grad[4:]
        q_need = [needs[i] for i in QKV_ARG]  # in the ops' flat orders, as their own backward reads them
        m_need = [needs[8 + i] for i in MLP_ARG]
        gq = master_grads(g_qkv, shapes[0], ctx.dtypes[0], q_need)
        go = master_grads(g_o, shapes[1], ctx.dtypes[1], needs[6:8])
        gm = master_grads(g_mlp, shapes[2], ctx.dtypes[2], m_need)
        return (dx, None, None, None, *(gq[i] for i in QKV_ORDER), *go, *(gm[i] for i in MLP_ORDER))


def lora_decoder_layer(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: LayerParts,
                       adapters: tuple) -> torch.Tensor:
    """The decoder layer on x (B, T, H) with RoPE tables cos, sin (B or 1, T, D); ``adapters`` are the 14 LoRA
    weights (A, B of q, k, v, o, gate, up, down) in any float dtype. Returns (B, T, H) in x's dtype."""
    if len(adapters) != 14:
        raise ValueError(f"lora_decoder_layer takes the 14 adapter weights of q, k, v, o, gate, up, down, got "
                         f"{len(adapters)}")
    return LoRADecoderLayerFunction.apply(x, cos, sin, parts, *adapters)
