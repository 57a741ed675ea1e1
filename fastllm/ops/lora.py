"""The QLoRA linear in one autograd Function: frozen NF4 base weight plus one LoRA adapter.

With ``W = dequant(weight)`` (N, K), ``A`` (r, K), ``B`` (N, r), scale ``s`` and x (M, K) (leading
dims flattened)::

    forward   xa = x @ A.T                      (M, r)
              y  = x @ W.T + b + s * xa @ B.T   (M, N)   the LoRA term added in place (addmm epilogue)
    backward  g  = dy @ B                       (M, r)
              dx = dy @ W + s * g @ A           (M, K)   W dequantized again, LoRA added in place
              dA = s * g.T @ x                  (r, K)
              dB = s * dy.T @ xa                (N, r)
              db = sum over rows of dy

PEFT's ``lora.Linear4bit`` computes the same with a defensive ``clone`` of the base output, a cast of
``x`` to the adapter's dtype, a separate ``* scaling`` and ``+``: five extra passes over an (M, N)
tensor per call. Here everything runs in x's (compute) dtype, as PEFT does under autocast; the
adapter's own dtype (fp32 master weights) only receives the gradients. Saved for backward: x, the
small ``xa`` (M, r); on ctx: the packed 4-bit weight (never a dense copy) and the cached compute-dtype
adapter copies (``cast_adapters``).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._compat import pick_backend
from .nf4 import bias_grad, bnb_gemv, bnb_gemv_ok, no_autocast, plain_tensor, stacked_dequant, state_args
from .nf4_gemv import decode_rows, gemv_enabled, gemv_ok, nf4_gemv, nf4_glu_gemv, nf4_group_gemv

__all__ = ["LoRAFrozen", "LoRANF4Function", "adapter_views", "cast_adapters", "check_adapter", "decode_states",
           "frozen_parts", "lora_decode", "lora_decode_glu", "lora_group_backward", "lora_group_forward",
           "lora_nf4_linear", "master_grads", "stacked_rows"]


class LoRAFrozen(NamedTuple):
    """What a multi-projection QLoRA op needs besides the adapter weights (which autograd must see as inputs)."""

    weights: tuple          # packed NF4 bytes of each projection, as plain tensors (``plain_tensor``)
    states: tuple           # ``state_args`` of each quant state
    scales: tuple           # LoRA scale of each projection (floats)
    backend: str
    use_triton: bool        # for an elementwise kernel between projections (the MLP's SwiGLU)
    cast_cache: str | None = None  # ``cast_adapters``' cache mode: "store" / "reuse" in checkpointed layers
    exact: bool = False     # inference: the LoRA term rounded as PEFT rounds it (``add_lora_term``)
    bias: torch.Tensor | None = None  # frozen bias of the stacked output (sum N_i,) (Qwen2's q/k/v), or None
    gelu: bool = False      # the MLP's gate activation is GELU-tanh (GeGLU, Gemma), not SiLU


_CASTS = WeakIdKeyDictionary()  # first adapter weight -> (key, flat, views): a forward's cast, kept for its recompute


def cast_adapters(params, dtype: torch.dtype, cache: str | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, tuple]:
    """The adapter weights ``params`` cast to the compute ``dtype`` in one launch: (flat buffer, views).

    One launch into a flat buffer instead of a cast per weight (each a launch on a host-bound step or a graphed
    decode step): on CUDA, when a weight's dtype differs from ``dtype``, ``kernels.cast_cat`` (``torch.cat`` would
    copy weight by weight then); else ``torch.cat``. ``backend="triton"`` takes the kernel anywhere Triton runs
    (the interpreter, for tests).
    ``cache="store"`` (a checkpointed forward) keeps the result for the group's next ``cache="reuse"`` call (that
    layer's recompute in backward), which takes it instead of casting again: the adapters cannot change between
    a layer's forward and its backward. Nothing longer-lived is safe to assume: fused AdamW updates weights in
    place without bumping their version counters. Call without grad mode (inside an autograd Function).
    """
    key = (dtype, *map(id, params))
    if cache == "reuse":
        hit = _CASTS.pop(params[0], None)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    if any(p.dtype != dtype for p in params) and all(type(p) in _PLAIN and p.is_contiguous() for p in params) \
            and pick_backend(backend, flat.device) == "triton":
        # torch.cat copies input by input (a launch each) when the dtypes differ: the cast kernel takes them all
        _cast_cat()(params, flat)
    else:
        torch.cat([p.reshape(-1) for p in params], out=flat)
    views = adapter_views(flat, tuple(p.shape for p in params))
    if cache == "store":
        _CASTS[params[0]] = (key, flat, views)
    return flat, views


_CAST_CAT = None
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # the cast kernel reads data pointers: no tensor subclass (DTensor)
_LORA_ADD = None
_LORA_XA = None
_FUSED_XA = [False]  # decode steps on fastllm's GEMV take xa from kernels.lora_xa (``set_fused_xa``)


def _lora_add():
    global _LORA_ADD
    if _LORA_ADD is None:
        from ..kernels.lora_add import lora_add

        _LORA_ADD = lora_add
    return _LORA_ADD


def set_fused_xa(on: bool | None) -> None:
    """Decode steps on fastllm's GEMV compute xa with ``kernels.lora_xa`` (True: opt-in until it is measured on a
    GPU) or cast the adapters and run a GEMM (False, None: the default)."""
    _FUSED_XA[0] = bool(on)


def fused_xa() -> bool:
    """Decode steps on fastllm's GEMV take their adapters' xa from ``kernels.lora_xa`` (``set_fused_xa``)."""
    return _FUSED_XA[0]


def _lora_xa():
    global _LORA_XA
    if _LORA_XA is None:
        from ..kernels.lora_xa import lora_xa

        _LORA_XA = lora_xa
    return _LORA_XA


def _cast_cat():
    global _CAST_CAT
    if _CAST_CAT is None:
        from ..kernels.cast_cat import cast_cat

        _CAST_CAT = cast_cat
    return _CAST_CAT


_TEMPLATES: dict[tuple, list] = {}  # shapes -> meta tensors of those shapes (no memory), for unflatten


def adapter_views(flat: torch.Tensor, shapes: tuple) -> tuple:
    """Views of ``flat`` shaped as ``shapes``, in order (the inverse of ``cast_adapters``' concatenation).

    One C++ call (``unflatten_dense_tensors``, as DDP uses) instead of a split and a Python ``view`` per
    adapter: this runs about 15 times a decoder layer per step (a third of the call's host time saved).
    """
    templates = _TEMPLATES.get(shapes)  # torch.Size hashes and compares as the tuple it is
    if templates is None:
        templates = _TEMPLATES[shapes] = [torch.empty(s, device="meta") for s in shapes]
    return tuple(torch._C._nn.unflatten_dense_tensors(flat, templates))


def stacked_rows(flat: torch.Tensor, n_rows: int, k: int) -> torch.Tensor:
    """The first ``n_rows`` rows of width ``k`` of ``flat``: adapters A_1 (r_1, K), A_2, .. laid one after another
    at its start (``cast_adapters``' order) read as one stacked (sum r_i, K) matrix, for the shared GEMM."""
    return flat[: n_rows * k].view(n_rows, k)


def add_lora_term(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, s: float, exact: bool,
                  backend: str = "auto") -> torch.Tensor:
    """``y += s * xa @ b.T`` in place. ``exact``: rounded as PEFT under autocast rounds it (the product, the
    scaled product, the sum: three roundings to y's dtype), so inference logits are eager's: with Triton (CUDA)
    one launch (``kernels.lora_add``) instead of three; else one addmm (one rounding, one pass over y), for
    training."""
    if not exact:
        return y.addmm_(xa, b.t(), alpha=s)
    if y.stride(1) == 1 and xa.stride(1) == 1 and pick_backend(backend, y.device) == "triton":
        return _lora_add()(y, xa, b, s)
    t = xa @ b.t()
    if s != 1.0:
        t.mul_(s)
    return y.add_(t)


def lora_group_forward(x2, weights, states, A_stack, Bs, scales, backend: str, bias=None, exact: bool = False):
    """Projections of one input, NF4 base + LoRA each, as one dense GEMM plus the rank-r terms; no autograd.

    x2 (M, K) in the compute dtype; A_stack = [A_1; A_2; ..] (R, K) (R = sum r_i); Bs[i] (N_i, r_i)::

        y  = x2 @ [W_1; W_2; ..].T (+ b)            (M, sum N_i)   one dequant launch, one GEMM
        xa = x2 @ A_stack.T                         (M, R)         one GEMM for every adapter
        y[:, cols_i] += s_i * xa[:, ranks_i] @ B_i.T               in place (addmm epilogue)

    Returns (y, xa). Output i is ``y``'s column block i (a view); with one projection, y itself.
    ``exact``: the rank-r terms rounded as PEFT rounds them (``add_lora_term``), for inference.
    """
    w = stacked_dequant(weights, states, x2.device, x2.dtype, backend)
    with no_autocast(x2):
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x2.dtype))
        xa = x2 @ A_stack.t()
        if len(Bs) == 1:
            add_lora_term(y, xa, Bs[0], scales[0], exact)
            return y, xa
        cols = y.split_with_sizes([b.shape[0] for b in Bs], 1)
        for y_i, xa_i, b, s in zip(cols, xa.split_with_sizes([b.shape[1] for b in Bs], 1), Bs, scales):
            add_lora_term(y_i, xa_i, b, s, exact)
    return y, xa


def lora_group_backward(dys, x2, xa, weights, states, A_stack, Bs, scales, backend: str, gA_stack, gBs, *,
                        need_dx: bool = True, dy_all=None):
    """Gradients of ``lora_group_forward`` for upstream ``dys[i]`` (M, N_i), no autograd.

    Written into ``gA_stack`` (R, K) and ``gBs[i]`` (N_i, r_i) (compute dtype, e.g. views of one flat buffer)::

        G_i^T = s_i * B_i.T @ dy_i.T        (r_i, M), stacked as G^T (R, M)
        dA    = G^T @ x2                    (R, K)    one GEMM for every adapter
        dB_i  = s_i * dy_i.T @ xa_i         (N_i, r_i)
        dx    = sum_i dy_i @ W_i + G @ A_stack        (M, K); one GEMM for the base when ``dy_all``
                                                      (M, sum N_i), the dys' concatenation, is given

    A ``dys[i]`` of None (an unused output) counts as zero. Returns dx, or None when not ``need_dx``.
    """
    ranks = [b.shape[1] for b in Bs]
    with no_autocast(x2):
        gt = x2.new_empty(sum(ranks), x2.shape[0])
        xas = (xa,) if len(Bs) == 1 else xa.split_with_sizes(ranks, 1)
        gts = (gt,) if len(Bs) == 1 else gt.split_with_sizes(ranks)
        for dy, b, s, xa_i, gt_i, gb in zip(dys, Bs, scales, xas, gts, gBs):
            if dy is None:
                gt_i.zero_()
                gb.zero_()
                continue
            torch.mm(b.t(), dy.t(), out=gt_i)
            torch.mm(dy.t(), xa_i, out=gb)
            if s != 1.0:  # lora_alpha == r (scale 1) is common: two launches fewer
                gt_i.mul_(s)
                gb.mul_(s)
        torch.mm(gt, x2, out=gA_stack)
        if not need_dx:
            return None
        w = stacked_dequant(weights, states, x2.device, x2.dtype, backend)
        if dy_all is not None:
            dx = dy_all @ w
        else:
            dx = None
            for dy, w_i in zip(dys, (w,) if len(Bs) == 1 else w.split_with_sizes([b.shape[0] for b in Bs])):
                if dy is not None:
                    dx = dy @ w_i if dx is None else dx.addmm_(dy, w_i)
            if dx is None:
                dx = x2.new_zeros(x2.shape)
        return dx.addmm_(gt.t(), A_stack)


def decode_states(weights, rows: int = 1) -> tuple | None:
    """``(kind, states)`` for a decode step of ``rows`` token rows over the bnb ``Params4bit`` ``weights``, with
    states their ``(packed plain tensor, state_args)``: kind ``"gemv"`` when fastllm's Triton GEMV takes them all
    (``ops.nf4_gemv``), ``"bnb"`` for one row that bnb's 4-bit GEMV takes, else None."""
    states = tuple((plain_tensor(w), state_args(w.quant_state)) for w in weights)
    if gemv_enabled(weights[0].device) and all(gemv_ok(st, rows, decode_rows()) for _, st in states):
        return "gemv", states
    if rows == 1 and all(bnb_gemv_ok(packed, st[2], st[5], st[6], st[7]) for packed, st in states):
        return "bnb", states
    return None


def _decode_xa(x2: torch.Tensor, parts, fused: bool = False) -> tuple:
    """``xa = x @ [A_1; A_2; ..].T`` split per adapter, and the ``B_i`` as the GEMVs take them.

    ``fused`` (fastllm's Triton GEMV serves the group) with ``set_fused_xa(True)``: ``kernels.lora_xa``'s K-split
    fp32 partials in one launch,
    straight from the adapters (rounded to x's dtype as read), and the B_i as they are; the GEMVs' LoRA term sums the
    partials and rounds both. Else one GEMM for every adapter of the group after casting A and B to x's dtype
    (``cast_adapters``: one launch)."""
    n, k = len(parts), x2.shape[-1]
    adapters, bs = [p[1] for p in parts], [p[2] for p in parts]
    if fused and _FUSED_XA[0] and n <= 3 and x2.stride(-1) == 1 \
            and all(type(t) in _PLAIN and t.is_contiguous() for t in adapters + bs):
        part = _lora_xa()(x2, adapters)
        ends = list(itertools.accumulate(a.shape[0] for a in adapters))
        return tuple(part[:, :, e - a.shape[0]:e] for a, e in zip(adapters, ends)), tuple(bs)
    flat, views = cast_adapters(adapters + bs, x2.dtype)  # one launch
    ranks = [a.shape[0] for a in views[:n]]
    # No autocast guard (a context costs ~10 us of host time a call): every operand is already in x's dtype, the
    # one autocast may be set to (the callers' condition), and in-place addmm_ and the GEMVs are never autocast.
    xa = x2 @ stacked_rows(flat, sum(ranks), k).t()
    return ((xa,) if n == 1 else xa.split_with_sizes(ranks, 1)), views[n:]


def lora_decode(x: torch.Tensor, parts, states, biases=None, backend: str = "auto") -> list:
    """A decode step of projections sharing one input: 1 to 64 token rows, no autograd. For each projection i::

        xa  = x @ [A_1; A_2; ..].T              (M, R)     one GEMM (or launch) for every adapter
        y_i = gemv4bit(x, W_i) + b_i + s_i * xa_i @ B_i.T   (M, N_i)

    With ``states`` of kind ``"gemv"`` the group's y_i are one launch of fastllm's NF4 GEMV (``ops.nf4_gemv``: the
    weight dequantized in registers, the rank-r term in its epilogue; ``nf4_group_gemv`` for q/k/v; with
    ``set_fused_xa(True)`` xa its K-split partials straight from the adapters, ``_decode_xa``: three launches a
    group, nothing cast); with
    ``"bnb"`` (one row) bnb's fused 4-bit GEMV, the rank-r term added in place. Either reads only the packed
    weight (dequant + GEMM would write and re-read a dense one), and the whole step is a few ops where PEFT runs
    about seven per projection plus its Python.
    Same numbers as PEFT's forward under autocast up to the base GEMV's summation order (the LoRA term rounded
    as PEFT rounds it).

    x: (..., K) in the compute dtype (autocast off or at that dtype); parts: ``(weight, A, B, scale)`` per
    projection (bnb ``Params4bit`` weights); states: ``decode_states`` of the weights; biases: None or one per
    projection; backend: the GEMV's (``"triton"`` runs it anywhere Triton runs, the interpreter for tests). Returns
    the outputs (..., N_i) in x's dtype.
    """
    kind, states = states
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xas, bs = _decode_xa(x2, parts, kind == "gemv" and pick_backend(backend, x.device) == "triton")
    if kind == "gemv" and len(parts) > 1:  # q/k/v in one launch where they can share it
        ys = nf4_group_gemv(x2, [(packed, st, None if biases is None else biases[i], (xa_i, b, float(p[3])))
                                 for i, (p, (packed, st), b, xa_i) in enumerate(zip(parts, states, bs, xas))],
                            backend)
        if ys is not None:
            return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]
    outs = []
    for i, ((_, _, _, s), (packed, st), b, xa_i) in enumerate(zip(parts, states, bs, xas)):
        bias = None if biases is None else biases[i]
        if kind == "gemv":
            y = nf4_gemv(x2, packed, st, bias, (xa_i, b, float(s)), backend)
        else:
            absmax, code, code2, absmax2, offset, blocksize, _, shape = st
            y = bnb_gemv(x2, packed, absmax, code, code2, absmax2, offset, bias, blocksize, shape)
            add_lora_term(y, xa_i, b, float(s), True)
        outs.append(y.view(*x.shape[:-1], y.shape[-1]))
    return outs


def lora_decode_glu(x: torch.Tensor, parts, states, gelu: bool = False, backend: str = "auto") -> torch.Tensor | None:
    """A gated MLP's ``act(gate(x)) * up(x)`` for a decode step as one GEMV launch (plus the adapters' shared
    ``xa``), or None where the pair cannot take it (then ``lora_decode`` runs gate and up). parts, states, backend:
    as ``lora_decode``'s for (gate, up). Returns (..., N) in x's dtype."""
    kind, states = states
    (pg, sg), (pu, su) = states
    if kind != "gemv" or tuple(sg[7]) != tuple(su[7]) or sg[5] != su[5] or (sg[2] is None) != (su[2] is None):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    (xg, xu), (bg, bu) = _decode_xa(x2, parts, pick_backend(backend, x.device) == "triton")
    h = nf4_glu_gemv(x2, (pg, sg, (xg, bg, float(parts[0][3]))), (pu, su, (xu, bu, float(parts[1][3]))), gelu,
                     backend)
    return h.view(*x.shape[:-1], h.shape[-1])


def master_grads(gflat: torch.Tensor, shapes: tuple, dtypes: tuple, needs: tuple) -> list:
    """The adapter gradients from one flat compute-dtype buffer (``cast_adapters``' layout), cast to the
    adapters' own dtypes in one launch when they share one (fp32 masters): views of one buffer, None where
    not needed."""
    if len(set(dtypes)) == 1:
        views = adapter_views(gflat.to(dtypes[0]), shapes)
    else:
        views = [v.to(d) for v, d in zip(adapter_views(gflat, shapes), dtypes)]
    return [v if need else None for v, need in zip(views, needs)]


class LoRANF4Function(torch.autograd.Function):
    """``x @ dequant(W).T + b + scale * (x @ A.T) @ B.T`` with gradients for x, A, B and b.

    The packed weight and its quant state ride in ``frozen`` (a one-projection ``LoRAFrozen``): frozen, so
    kept on ctx rather than saved through autograd (no checkpoint pack/unpack hooks per call).
    """

    @staticmethod
    def forward(ctx, x, bias, A, B, frozen: LoRAFrozen):
        with no_autocast(x):  # once here; the helpers' own no_autocast() are then no-ops
            x2 = x.reshape(-1, x.shape[-1])
            # Compute-dtype copies (cached until the adapters change), kept for backward: no cast there.
            flat, (Ac, Bc) = cast_adapters((A, B), x.dtype, frozen.cast_cache)
            y, xa = lora_group_forward(x2, frozen.weights, frozen.states, Ac, (Bc,), frozen.scales,
                                       frozen.backend, bias, frozen.exact)
            ctx.save_for_backward(x2, xa)
            ctx.flat = flat  # cached copies (cast_adapters): on ctx, no checkpoint hooks
            ctx.ab_dtypes, ctx.ab_shapes = (A.dtype, B.dtype), (A.shape, B.shape)
            ctx.frozen, ctx.x_shape = frozen, x.shape
            ctx.bias_dtype = None if bias is None else bias.dtype
            return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa = ctx.saved_tensors
        flat = ctx.flat
        Ac, Bc = adapter_views(flat, ctx.ab_shapes)  # A, B in the compute dtype (x2.dtype)
        f = ctx.frozen
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        gflat = torch.empty_like(flat)
        gA, gB = adapter_views(gflat, ctx.ab_shapes)
        dx = lora_group_backward((dy2,), x2, xa, f.weights, f.states, Ac, (Bc,), f.scales, f.backend, gA, (gB,),
                                 need_dx=ctx.needs_input_grad[0])
        db = bias_grad(dy, ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        dx = None if dx is None else dx.view(ctx.x_shape)
        dA, dB = master_grads(gflat, ctx.ab_shapes, ctx.ab_dtypes, ctx.needs_input_grad[2:4])
        return dx, db, dA, dB, None


def lora_nf4_linear(x: torch.Tensor, weight, A: torch.Tensor, B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None, *, backend: str = "auto",
                    cast_cache: str | None = None) -> torch.Tensor:
    """The QLoRA linear ``x @ dequant(weight).T + bias + scale * (x @ A.T) @ B.T``.

    x: (..., K) in the compute dtype; weight: a bnb NF4 ``Params4bit`` (quant_state.shape (N, K));
    A: (r, K); B: (N, r) (any float dtype, e.g. fp32 masters). Returns (..., N) in x.dtype.
    ``cast_cache``: see ``cast_adapters`` ("store" in a checkpointed forward, "reuse" in its recompute).
    """
    frozen = frozen_parts(((weight, A, B, scale),), ("",), backend, False, cast_cache)
    return LoRANF4Function.apply(x, bias, A, B, frozen)


def check_adapter(A: torch.Tensor, B: torch.Tensor, prefix: str = "") -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{prefix}LoRA weights must be A (r, K) and B (N, r), "
                         f"got {tuple(A.shape)} and {tuple(B.shape)}")


def frozen_parts(parts, names, backend: str, use_triton: bool, cast_cache: str | None = None) -> LoRAFrozen:
    """Check each projection's ``(weight, A, B, scale)`` and gather what gets no gradient."""
    for name, (_, A, B, _) in zip(names, parts):
        check_adapter(A, B, f"{name}: " if name else "")
    states = tuple(state_args(w.quant_state) for w, *_ in parts)
    weights = tuple(plain_tensor(p[0]) for p in parts)
    # Called in the caller's grad mode (outside the autograd Function): without grad it is inference.
    return LoRAFrozen(weights, states, tuple(float(p[3]) for p in parts), backend, use_triton, cast_cache,
                      not torch.is_grad_enabled())
