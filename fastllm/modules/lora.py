"""PEFT's ``lora.Linear4bit`` forward through ``fastllm.ops.lora_nf4_linear`` (one autograd Function), and the
multi-projection fusions built on it: a Llama MLP (``fused_lora_mlp``, called by the ``mlp`` patch's forward) and
attention's q/k/v (``fused_lora_qkv``, called by the ``lora_attention`` forward) as one op each, when every
projection involved carries this patch and takes the fused path.

Bound per instance by the patch registry. The fused path takes the common training case: one active
plain-LoRA adapter (no DoRA or other variant, no LoRA bias, no dropout), not merged, adapters enabled,
no per-call ``adapter_names``, eager (compiled regions trace PEFT's own forward, which inductor fuses),
the LoRA branch in the base layer's compute dtype (autocast off or at that dtype). A no-grad CUDA call of 1 to
``ops.nf4_gemv.decode_rows()`` (32 by default) token rows (a decode step) takes ``ops.lora.lora_decode`` instead, one
group of projections at a time: fastllm's NF4 GEMV (``ops.nf4_gemv``) with the rank-r term fused, a gated MLP's
gate/up and activation as one launch; with that GEMV switched off, one row through bnb's 4-bit GEMV plus the rank-r
terms. Anything else runs PEFT's forward unchanged, so multiple adapters, ``disable_adapter()``, merging and mixed
batches keep working.
"""

from __future__ import annotations

import torch
from torch import nn

from .._compat import is_linear4bit
from ..ops.lora import decode_states, lora_decode, lora_decode_glu, lora_nf4_linear
from ..ops.lora_mlp import lora_mlp
from ..ops.lora_qkv import lora_qkv
from ..ops.swiglu import geglu, swiglu
from .checkpointing import in_checkpoint, is_recomputing
from .nf4_linear import decode_rows, goes_to_bnb_gemv, nf4_linear_eligible, prepare_nf4_call

__all__ = ["fused_lora_forward", "fused_lora_mlp", "fused_lora_qkv", "fused_parts", "is_lora_linear4bit",
           "lora_eligible", "stacked_bias"]


def is_lora_linear4bit(module) -> bool:
    """A PEFT LoRA layer wrapping a bitsandbytes ``Linear4bit`` (``peft.tuners.lora.bnb.Linear4bit``)."""
    return (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
            and is_linear4bit(module.get_base_layer()))


def lora_eligible(module) -> str | None:
    """None when the fused path can serve ``module`` (per call it may still defer to PEFT), else why not."""
    if not is_lora_linear4bit(module):
        return "not a PEFT LoRA layer over a bitsandbytes Linear4bit"
    return nf4_linear_eligible(module.get_base_layer())


# The per-call checks below read modules' ``_modules`` / ``_parameters`` / ``__dict__`` directly: every
# ``layer.lora_A`` or ``get_base_layer()`` goes through ``nn.Module.__getattr__`` (Python), ~19 of them per
# projection, and the fused MLP and q/k/v check three projections each per pass (the direct reads are about 3x
# cheaper). Same lookups, same order as ``nn.Module.__getattr__``.

def _base_layer(layer):
    """PEFT's ``get_base_layer()``: follow ``base_layer`` submodules to the innermost one."""
    while True:
        inner = layer._modules.get("base_layer")
        if inner is None:
            return layer
        layer = inner


def _single_plain_adapter(layer):
    """(name, A, B) of the one active adapter when it is plain LoRA without dropout or bias, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    mods, attrs = layer._modules, layer.__dict__
    lora_A = mods["lora_A"]._modules
    active = [a for a in layer.active_adapters if a in lora_A]  # PEFT skips the others too
    if len(active) != 1:
        return None
    name = active[0]
    if name in attrs.get("lora_variant", {}) or attrs.get("use_dora", {}).get(name, False):
        return None
    lora_B = mods["lora_B"]._modules[name]
    if not isinstance(mods["lora_dropout"]._modules[name], nn.Identity) or lora_B._parameters.get("bias") is not None:
        return None
    return name, lora_A[name]._parameters["weight"], lora_B._parameters["weight"]


def _fusable(layer, x: torch.Tensor, decode: bool = False):
    """(x in the compute dtype, input dtype, bias, base layer, adapter name, A, B) when the fused path serves
    ``layer(x)``, else None (PEFT's forward must run). ``decode``: the caller serves a decode step itself
    (``lora_decode``); without it such a call is refused here."""
    base = _base_layer(layer)
    if not decode and goes_to_bnb_gemv(x, base._parameters.get("weight")):
        return None  # a decode step: the group's decode op or PEFT's forward (bnb's GEMV) serves it
    adapter = None if torch.compiler.is_compiling() else _single_plain_adapter(layer)
    if adapter is None:
        return None
    prepared = prepare_nf4_call(base, x)
    if prepared is None:
        return None
    xc, inp_dtype, bias = prepared
    if torch.is_autocast_enabled(xc.device.type):
        if torch.get_autocast_dtype(xc.device.type) != xc.dtype:
            return None  # PEFT would run the adapter in the autocast dtype
    elif not torch.is_grad_enabled() and adapter[1].dtype != xc.dtype:
        # Inference without autocast: PEFT runs the adapter in its own dtype (fp32 masters) and rounds once; the
        # fused ops would round it to the compute dtype, and generation's logits would drift from eager's. (In
        # training the fused ops' compute-dtype adapter is the trade, as under autocast.)
        return None
    return xc, inp_dtype, bias, base, *adapter


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``lora.Linear4bit.forward`` replacement: ``base(x) + scaling * lora_B(lora_A(x))`` in one op."""
    if args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    decode = _decode_step(self, x)
    fusable = _fusable(self, x, decode)
    if fusable is None:
        return type(self).forward(self, x)
    xc, inp_dtype, bias, base, name, A, B = fusable
    weight = base._parameters["weight"]
    if decode:
        states = decode_states((weight,), decode)
        if states is not None:
            return lora_decode(xc, ((weight, A, B, self.scaling[name]),), states, (bias,))[0].to(inp_dtype)
        if decode == 1:
            return type(self).forward(self, x)  # bnb's GEMV through PEFT
    return lora_nf4_linear(xc, weight, A, B, self.scaling[name], bias, cast_cache=_cast_cache()).to(inp_dtype)


def _cast_cache() -> str | None:
    """The adapters' compute-dtype copies made in a checkpointed forward serve that layer's recompute."""
    if is_recomputing():
        return "reuse"
    return "store" if in_checkpoint() and torch.is_grad_enabled() else None


def _patched(layer) -> bool:
    """``layer`` has the lora patch bound (so the user asked for the fused path on it)."""
    return getattr(layer.__dict__.get("forward"), "__func__", None) is fused_lora_forward


def fused_parts(projs, x: torch.Tensor, decode: bool = False, biases: list | None = None) -> list | None:
    """``(weight, A, B, scale)`` of each projection when all carry the lora patch and can take the fused path
    on ``x`` with no cast; None otherwise (then the caller runs them one by one, each still fused on its own where
    it can be). ``decode``: for ``lora_decode`` (a decode step). A projection with a bias is refused unless the
    caller passes ``biases``, a list that receives each projection's bias (None where it has none); a bias that
    trains is refused either way (the group ops give it no gradient)."""
    if not all(_patched(p) for p in projs):
        return None
    parts = []
    for p in projs:
        fusable = _fusable(p, x, decode)
        if fusable is None or fusable[0].dtype != x.dtype:
            return None
        bias = fusable[2]
        if bias is not None and (biases is None or bias.requires_grad):
            return None
        if biases is not None:
            biases.append(bias)
        _, _, _, base, name, A, B = fusable
        parts.append((base._parameters["weight"], A, B, p.scaling[name]))
    return parts


def stacked_bias(parts, biases) -> torch.Tensor | None:
    """The projections' biases as one (sum N_i,) vector (zeros where a projection has none), or None without any:
    the bias of the group's stacked output (``ops.lora.lora_group_forward``)."""
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else ref.new_zeros(w.quant_state.shape[0])
                      for (w, *_), b in zip(parts, biases)])


def _decode_step(layer, x: torch.Tensor) -> int:
    """The token rows of a decode step: 1 (to 8) rows on CUDA where a 4-bit GEMV serves the base layer, with grad
    mode off (``lora_decode`` records no graph; with grad mode on, such a call still trains the adapters); else 0."""
    if torch.is_grad_enabled():
        return 0
    return decode_rows(x, _base_layer(layer)._parameters.get("weight"))


def _decode_parts(projs, x: torch.Tensor, rows: int, biases: list | None = None):
    """(parts, states) of ``projs`` for ``lora_decode`` on a decode step of ``rows`` rows, or None."""
    parts = fused_parts(projs, x, decode=True, biases=biases)
    states = None if parts is None else decode_states([p[0] for p in parts], rows)
    return None if states is None else (parts, states)


def _decode_group(projs, x: torch.Tensor, rows: int) -> list | None:
    """The outputs of ``projs`` on ``x`` through ``lora_decode`` when ``x`` is a decode step they can all take
    that way (frozen biases included), else None."""
    biases = []
    found = _decode_parts(projs, x, rows, biases)
    return None if found is None else lora_decode(x, *found, biases)


def fused_lora_mlp(mlp, x: torch.Tensor, gelu: bool = False, output_to_residual: bool = True) -> torch.Tensor | None:
    """``down(act(gate(x)) * up(x))`` as one op (a SwiGLU, or with ``gelu`` GeGLU, MLP under QLoRA with the lora
    patch), or None.

    down_proj's input h has x's dtype, so checking its fused path against x serves all three. In a Llama-form decoder
    layer (``output_to_residual``) the MLP output only feeds the residual add that ends the layer, so while fastllm's
    checkpointing re-runs the layer in backward (where that output is dropped) the down projection is skipped; Gemma's
    output feeds a norm, whose backward needs it. A decode step runs gate/up as one ``lora_decode`` group, the
    activation, then down_proj's."""
    projs = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    rows = _decode_step(projs[0], x)
    if rows:
        found = _decode_parts(projs[:2], x, rows)
        h = lora_decode_glu(x, *found, gelu=gelu) if found is not None and found[1][0] == "gemv" else None
        if h is None and found is not None:
            h = (geglu if gelu else swiglu)(*lora_decode(x, *found))
        if h is not None:
            down = _decode_group(projs[2:], h, rows)
            return down[0] if down is not None else mlp.down_proj(h)
        if rows == 1:
            return None  # PEFT's forward, bnb's GEMV
    parts = fused_parts(projs, x)
    need_output = not (output_to_residual and is_recomputing())
    return None if parts is None else lora_mlp(x, *parts, need_output=need_output, cast_cache=_cast_cache(), gelu=gelu)


def fused_lora_qkv(attn, x: torch.Tensor):
    """(q, k, v) projections of x as one op (attention under QLoRA with the lora patch; frozen q/k/v biases, as
    Qwen2's, added to the stacked output), or None. A decode step runs them as one ``lora_decode`` group."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    rows = _decode_step(projs[0], x)
    if rows:
        out = _decode_group(projs, x, rows)
        if out is not None or rows == 1:
            return None if out is None else tuple(out)
    biases = []
    parts = fused_parts(projs, x, biases=biases)
    if parts is None:
        return None
    return lora_qkv(x, *parts, bias=stacked_bias(parts, biases), cast_cache=_cast_cache())
