"""Compiled regions of a decoder layer of the architecture table: attention (with RoPE), the MLP and the RMSNorms.

Why the sub-modules and not ``LlamaDecoderLayer.forward``: transformers' ``GradientCheckpointingLayer``
wraps the class's ``forward`` when the class is created; an instance ``forward`` would bypass that
wrapper and silently turn gradient checkpointing off. So the decoder layer stays transformers' own
(checkpointing, residual adds, FSDP hooks) and its sub-modules' forwards run compiled regions:

    input_layernorm           rms_norm_region(weight, x, eps)
    self_attn                 attention_region(attn, x, cos, sin, mask, interface, dropout)
                              with a cache: qkv_region -> cache.update (eager) -> attend_region
    post_attention_layernorm  rms_norm_region
    mlp                       mlp_region(mlp, x)

Each region is a plain function of tensors (and the sub-module whose projections it calls), compiled
**once per model** and shared by all layers: with dynamo's default inlining of built-in nn.Modules,
parameters are graph inputs, not constants, so layer 2 reuses layer 1's graph. Transformers' runtime
kwargs (cache objects, output flags, loss kwargs) stay outside: the cache update runs eagerly between two
regions, and a call asking for something the regions do not do (attention weights, flash-attention
kwargs) runs the class's own forward for that call. The sequence dim is marked dynamic (``maybe_mark_dynamic``)
so new lengths reuse the graph; length 1 (decode) gets its own specialised graph.

The 4-bit projections inside the regions run through ``fastllm.ops.nf4``'s custom op: the patch layer
binds ``nf4_linear4bit_compiled_forward`` on every eligible ``Linear4bit`` when compile is on, which reads
plain-tensor NF4 arguments (never bitsandbytes' ``Params4bit`` or a cached ``bnb()`` probe: those graph-broke
on torch 2.11). Each region's eager wrapper refreshes those arguments just before the region runs, after any
FSDP2 all-gather. LoRA adapters (PEFT) trace as plain modules.

The norm and SwiGLU maths inside the regions is transformers' own; inductor fuses it (the eager
``rms_norm``/``mlp`` patches' hand-written kernels would be opaque calls inside the graph).

Decode steps (one token, grad mode off, CUDA) are host-bound: there the RMSNorms run as the eager Triton op (a
region call's guards and wrappers cost more than the kernel; counted in ``compile_report``'s ``eager_calls``), and
the 4-bit linears inside the graphs call bitsandbytes' own GEMV op directly (``ops.nf4.nf4_linear_args``). With
``decode_graphs`` (auto-on for CUDA) those steps run once for the capture and are replayed as a CUDA graph after.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import time
import weakref
from collections import Counter

import torch

from ..arch import arch_of_module
from ..ops.decode_attention import grouped_decode_eager, grouped_decode_fits, grouped_decode_sdpa
from ..ops.rms_norm import rms_norm
from ..ops.rope import rope
from .checkpointing import in_checkpoint
from .lora import fused_lora_qkv
from .nf4_linear import refresh_nf4_aliases
from .rms_norm import rms_norm_eligible

# Attention kwargs that change what attention computes: a call carrying any of them (non-None) runs
# the class's own forward. Everything else transformers threads through (position_ids, use_cache,
# num_items_in_batch, ...) is unused by SDPA/eager attention.
_EAGER_ONLY_KWARGS = ("is_causal", "softcap", "sliding_window", "position_bias", "s_aux", "cu_seq_lens_q",
                      "cu_seq_lens_k", "max_length_q", "max_length_k")
COMPILED_ATTENTION = ("sdpa", "eager")


# ---- the regions: functions of tensors (and the sub-module whose projections they call) ----------------

def rms_norm_region(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm maths: fp32 statistics, output in weight's dtype promotion."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def mlp_region(mlp, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``; the projections stay module calls (LoRA, NF4)."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_region(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Projections, the per-head q/k RMSNorms where the architecture has them (Qwen3), and RoPE:
    x (B, T, H) -> q (B, nh, T, D), k, v (B, nkv, T, D).

    Eagerly (the ``lora`` patch's attention forward), q/k/v run as one fused op (``ops.lora_qkv``) when all
    three carry the lora patch, and RoPE as one op (``ops.rope``).
    """
    shape = (*x.shape[:-1], -1, attn.head_dim)
    norms = qk_norms(attn)
    if torch.compiler.is_compiling():  # inductor fuses transformers' RoPE maths itself
        q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)  # (B, T, nh, D), (B, T, nkv, D)
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v
    fused = fused_lora_qkv(attn, x)
    q, k, v = fused if fused is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    if fused is not None and torch.is_grad_enabled() and not in_checkpoint():
        # v is a column block of the fused op's (M, Nq + Nk + Nv) output; attention may save it for backward as
        # it is, which would keep q's and k's columns alive too until backward (each layer's, without
        # checkpointing). Inside fastllm's checkpoint the saved tensors are dropped anyway: no copy there.
        v = v.contiguous()
    q, k = q.view(shape), k.view(shape)
    if norms is not None:  # the modules themselves (each carries the rms_norm patch where it applies)
        q, k = norms[0](q), norms[1](k)
    # Eagerly, RoPE of q and k is one op (one Triton launch on CUDA) in the projections' layout.
    q, k = rope(q, k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.view(shape).transpose(1, 2)


def qk_norms(attn):
    """(q_norm, k_norm) of an attention whose architecture normalises q and k per head, else None.
    ``attention_eligible`` has checked that the modules are there exactly when the table entry lists them; a plain
    ``_modules`` test traces in the compiled regions."""
    mods = attn._modules
    return (mods["q_norm"], mods["k_norm"]) if "q_norm" in mods else None


def window_of(attn) -> int | None:
    """The ``sliding_window`` the architecture's attention forward passes to the interface (see ``Arch``); read
    outside the compiled regions (they take it as an argument)."""
    arch = arch_of_module(attn, "attention")
    if arch is None or arch.sliding_window is None:
        return None
    if arch.sliding_window == "config":
        return getattr(attn.config, "sliding_window", None)
    return attn.sliding_window


def attend_kwargs(attn) -> dict:
    """What the architecture's attention forward passes to the interface besides the scaling: its
    ``sliding_window`` (``window_of``) and, where the table says so, its ``softcap`` (Gemma 2)."""
    extra = {"sliding_window": window_of(attn)}
    arch = arch_of_module(attn, "attention")
    if arch is not None and arch.attn_softcap:
        extra["softcap"] = attn.attn_logit_softcapping
    return extra


_GROUPED_DECODE = [True]  # one-token steps with grouped K/V take ``grouped_decode_sdpa`` (``set_grouped_decode``)


def set_grouped_decode(on: bool | None) -> None:
    """One-token attention steps with grouped K/V heads run ``ops.decode_attention.grouped_decode_sdpa`` (True, None:
    the default) or transformers' SDPA function as given (False: for benchmarks)."""
    _GROUPED_DECODE[0] = True if on is None else bool(on)


def grouped_decode() -> bool:
    """One-token attention steps with grouped K/V heads take the grouped form (``set_grouped_decode``)."""
    return _GROUPED_DECODE[0]


@functools.cache
def _sdpa_function():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@functools.cache
def _eager_function(module: str):
    return importlib.import_module(module).eager_attention_forward


def _grouped_kind(attn, interface) -> str | None:
    """"sdpa" when ``interface`` is transformers' own SDPA attention, "eager" when it is the architecture's own eager
    maths (``attention_interface``; the table's architectures share its two forms, with and without a soft-cap),
    else None (a user's function registered under another name)."""
    impl = attn.config._attn_implementation
    if impl == "sdpa":
        return "sdpa" if interface is _sdpa_function() else None
    arch = arch_of_module(attn, "attention") if impl == "eager" else None
    return "eager" if arch is not None and interface is _eager_function(arch.module) else None


def attend_region(attn, q, k, v, mask, interface, dropout: float, extra: dict) -> torch.Tensor:
    """Attention through transformers' interface (SDPA or eager maths), then o_proj: -> (B, T, H).
    ``extra``: ``attend_kwargs(attn)``, passed on as the architecture's forward passes them. A one-token step
    with grouped K/V heads runs ``grouped_decode_sdpa`` (through SDPA) or ``grouped_decode_eager`` (the eager maths,
    soft-cap included): the same sums, no repeated cache copy."""
    kind = _grouped_kind(attn, interface) if _GROUPED_DECODE[0] and dropout == 0.0 else None
    if kind == "sdpa" and "softcap" not in extra and grouped_decode_fits(q, k, mask):
        out = grouped_decode_sdpa(q, k, v, mask, attn.scaling)
    elif kind == "eager" and grouped_decode_fits(q, k, mask) and (mask is None or mask.is_floating_point()):
        out = grouped_decode_eager(q, k, v, mask, attn.scaling, extra.get("softcap"))
    else:
        out, _ = interface(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling, **extra)
    out = out.reshape(*out.shape[:2], -1).contiguous()  # (B, T, nh * D)
    return attn.o_proj(out)


def attention_region(attn, x, cos, sin, mask, interface, dropout: float, extra: dict) -> torch.Tensor:
    """The whole attention block without a cache (training, no-cache inference): one graph."""
    q, k, v = qkv_region(attn, x, cos, sin)
    return attend_region(attn, q, k, v, mask, interface, dropout, extra)


# ---- compiling, once per model ------------------------------------------------------------------------

@dataclasses.dataclass
class CompileStats:
    """Graphs the compiled regions produced (one backend call each) and the time spent producing them."""

    graphs: Counter = dataclasses.field(default_factory=Counter)     # region -> graphs compiled
    seconds: float = 0.0                                               # in the backend (forward graphs)
    eager_calls: Counter = dataclasses.field(default_factory=Counter)  # region -> calls that ran eagerly
    # dynamo's process-wide counters when these regions were made, so reports show what came after
    breaks_before: int = dataclasses.field(default_factory=lambda: _dynamo_breaks())

    @property
    def total_graphs(self) -> int:
        return sum(self.graphs.values())

    @property
    def recompiles(self) -> int:
        """Graphs beyond the first of each region (new shapes regimes, grad mode, train/eval)."""
        return sum(max(0, n - 1) for n in self.graphs.values())


def _dynamo_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _counting_backend(stats: CompileStats, region: str, mode: str):
    """Inductor (with ``mode``'s options), counting every graph it compiles for ``region``."""
    inner = torch._TorchCompileInductorWrapper(None if mode == "default" else mode, None, None)

    def backend(gm, example_inputs):
        t0 = time.perf_counter()
        try:
            return inner(gm, example_inputs)
        finally:
            stats.graphs[region] += 1
            stats.seconds += time.perf_counter() - t0

    return backend


@dataclasses.dataclass
class CompiledRegions:
    """The compiled callables of one model, shared by all its layers."""

    mode: str
    stats: CompileStats
    rms_norm: object
    mlp: object
    qkv: object
    attend: object
    attention: object


_REGIONS = {"rms_norm": rms_norm_region, "mlp": mlp_region, "qkv": qkv_region, "attend": attend_region,
            "attention": attention_region}
# Per model (weakly keyed): re-patching the same model (``with eager(model)``, a changed config) reuses
# the compiled callables and their dynamo cache entries instead of compiling everything again.
_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_regions(model: torch.nn.Module, mode: str = "default") -> CompiledRegions:
    """The compiled regions of ``model`` (created on first use; nothing compiles until a call)."""
    regions = _BY_MODEL.get(model)
    if regions is None or regions.mode != mode:
        stats = regions.stats if regions is not None else CompileStats()
        fns = {name: torch.compile(fn, backend=_counting_backend(stats, name, mode), dynamic=None)
               for name, fn in _REGIONS.items()}
        regions = CompiledRegions(mode=mode, stats=stats, **fns)
        _BY_MODEL[model] = regions
    return regions


def regions_of(model: torch.nn.Module) -> CompiledRegions | None:
    """The compiled regions ``model`` already has, or None (never creates them)."""
    return _BY_MODEL.get(model)


def _no_grad_view(x: torch.Tensor) -> torch.Tensor:
    """Without grad mode ``requires_grad`` means nothing, but dynamo guards on it: drop it (a free view)
    so an input made to require grad (checkpointing's embedding hook) shares the no-grad graph."""
    return x if torch.is_grad_enabled() or not x.requires_grad else x.detach()


def _seq_dynamic(*tensors_and_dims) -> None:
    """Mark sequence dims dynamic so each new length reuses the graph (length 1 stays specialised)."""
    for t, dim in tensors_and_dims:
        if isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def _refresh_nf4(module) -> None:
    """Re-read the packed 4-bit weights the region's linears read (eager: traced code cannot check them)."""
    linears = module.__dict__.get("_fastllm_nf4_linears")
    if linears:
        refresh_nf4_aliases(linears)


# ---- replacement forwards (same signatures as transformers'); made per model ---------------------------

def _decode_step(x: torch.Tensor) -> bool:
    """One token on CUDA with grad mode off: generation's decode step."""
    return not torch.is_grad_enabled() and x.is_cuda and x.numel() == x.shape[-1]


def make_rms_norm_forward(regions: CompiledRegions):
    def compiled_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if regions.mode != "eager" and _decode_step(hidden_states):
            # A decode step is host-bound and one norm is one small kernel: a compiled region's call (dynamo's
            # guards and wrappers) costs several times the Triton op's launch there. Same maths, no graph.
            regions.stats.eager_calls["rms_norm (decode)"] += 1
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        x = _no_grad_view(hidden_states)
        _seq_dynamic((x, x.dim() - 2))
        return regions.rms_norm(self.weight, x, self.variance_epsilon)

    compiled_rms_norm_forward._fastllm_compiled = "rms_norm"
    return compiled_rms_norm_forward


def make_mlp_forward(regions: CompiledRegions):
    def compiled_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _no_grad_view(x)
        _seq_dynamic((x, x.dim() - 2))
        _refresh_nf4(self)
        return regions.mlp(self, x)

    compiled_mlp_forward._fastllm_compiled = "mlp"
    return compiled_mlp_forward


def attention_interface(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = attn.config._attn_implementation
    if impl == "eager":  # the architecture's own eager maths (its module's ``eager_attention_forward``)
        arch = arch_of_module(attn, "attention")
        return importlib.import_module(arch.module).eager_attention_forward if arch else None
    return ALL_ATTENTION_FUNCTIONS[impl] if impl in COMPILED_ATTENTION else None


def needs_eager(attn, kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    return any(kwargs.get(k) is not None for k in _EAGER_ONLY_KWARGS)


def make_attention_forward(regions: CompiledRegions):
    compiled = regions.mode != "eager"

    def compiled_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                                   attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        if cache is None:  # transformers < 5.2x names it past_key_values
            cache = kwargs.pop("past_key_values", None)
        interface = attention_interface(self)
        if interface is None or position_embeddings is None or needs_eager(self, kwargs):
            regions.stats.eager_calls["attention"] += 1
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        cos, sin = position_embeddings
        dropout = self.attention_dropout if self.training else 0.0
        mask, hidden_states = attention_mask, _no_grad_view(hidden_states)
        if compiled:  # dynamo's marks and the traced linears' aliases: nothing to do for the eager regions
            _seq_dynamic((hidden_states, 1), (cos, 1), (sin, 1), (mask, 2), (mask, 3))
            _refresh_nf4(self)
        if cache is None:
            out = regions.attention(self, hidden_states, cos, sin, mask, interface, dropout, attend_kwargs(self))
            return out, None
        q, k, v = regions.qkv(self, hidden_states, cos, sin)
        # The cache is a Python object that mutates: its update stays out of the compiled code.
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        if compiled:
            _seq_dynamic((k, 2), (v, 2))
        return regions.attend(self, q, k, v, mask, interface, dropout, attend_kwargs(self)), None

    compiled_attention_forward._fastllm_compiled = "attention"
    return compiled_attention_forward


def eager_regions() -> CompiledRegions:
    """The same regions as plain (uncompiled) functions: the eager attention forward of the ``lora`` patch,
    which keeps transformers' attention maths but lets q/k/v run as one fused QLoRA op."""
    return CompiledRegions(mode="eager", stats=CompileStats(), **_REGIONS)


def attention_eligible(module) -> str | None:
    """Why ``module`` (an attention of the table) cannot run fastllm's attention forward (compiled, or eager for
    the lora patch), or None when it can. Its submodules must be the ones its table entry describes: a q/k norm
    the entry does not list would be skipped, one it lists must be there."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config", "layer_idx"):
        if not hasattr(module, name):
            return f"no {name}"
    arch = arch_of_module(module, "attention")
    if arch is None:
        return f"{type(module).__name__} is not an attention class of fastllm's architecture table"
    has_norms = [n for n in ("q_norm", "k_norm") if n in module._modules]
    if arch.qk_norm and len(has_norms) != 2:
        return f"{arch.model_type} attention without its q_norm/k_norm modules"
    if not arch.qk_norm and has_norms:
        return f"{', '.join(has_norms)} on a {arch.model_type} attention, whose table entry has no q/k norm"
    if arch.sliding_window == "module" and not hasattr(module, "sliding_window"):
        return f"{arch.model_type} attention without its sliding_window attribute"
    if getattr(module, "attn_logit_softcapping", None) is not None and not arch.attn_softcap:
        return "attention logit soft-capping, which the table entry does not list (it would not be passed on)"
    impl = getattr(module.config, "_attn_implementation", None)
    if impl not in COMPILED_ATTENTION:
        return f"attn_implementation {impl!r} is not one fastllm's attention forward runs (only {COMPILED_ATTENTION})"
    return None


def compiled_rms_norm_eligible(module) -> str | None:
    """The compiled region computes the Llama form (``x * w``) and reads ``variance_epsilon``."""
    if not isinstance(getattr(module, "variance_epsilon", None), float):
        return "no float variance_epsilon (the compiled region computes the Llama form x * w only)"
    return rms_norm_eligible(module)


def compiled_mlp_eligible(module) -> str | None:
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(module, name):
            return f"no {name}"
    return None


__all__ = ["CompileStats", "CompiledRegions", "attention_eligible", "compiled_mlp_eligible", "compiled_regions",
           "compiled_rms_norm_eligible", "eager_regions", "make_attention_forward", "make_mlp_forward",
           "make_rms_norm_forward", "regions_of"]
