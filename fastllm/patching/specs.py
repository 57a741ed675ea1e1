"""The declarative table of patches: which modules each one matches, and what replaces their forward.

A spec never mutates anything itself; ``patching.api`` walks the model and records every change in
the registry. Replacement forwards come from ``fastllm.modules`` and keep the originals' signatures.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._compat import is_linear4bit, pick_backend, triton_available
from ..arch import ARCHS
from ..config import PatchConfig
from ..modules import decoder
from ..modules.decode_graphs import decode_graphs_eligible, make_graphed_forward, new_decode_graphs
from ..modules.lora import fused_lora_forward, is_lora_linear4bit, lora_eligible
from ..modules.mlp import fast_mlp_forward, mlp_attrs, mlp_eligible
from ..modules.rms_norm import fast_rms_norm_forward, rms_norm_attrs, rms_norm_eligible


@dataclass(frozen=True)
class PatchSpec:
    name: str                                          # report name
    option: str                                        # the key of ``resolve``'s on-dict that turns it on
    matches: Callable[[nn.Module], bool]
    eligible: Callable[[nn.Module], str | None]        # reason it cannot apply, or None
    forward: Callable[[PatchConfig, nn.Module], Callable]  # replacement forward for (config, patched model)
    # Extra plain attributes the replacement forward reads, per module: set and reverted with the forward.
    attrs: Callable[[nn.Module], dict[str, object]] | None = None


def _is(role: str) -> Callable[[nn.Module], bool]:
    """Matches a module of ``role`` of any architecture in the table (its class or a subclass)."""
    return lambda m: isinstance(m, tuple(a.cls(role) for a in ARCHS.values()))


def upstream_reason(module: nn.Module, role: str) -> str | None:
    """Fail closed on look-alikes: a subclass that overrides the table class's ``forward`` is not the code the
    replacement was written against."""
    for arch in ARCHS.values():
        cls = arch.cls(role)
        if isinstance(module, cls) and type(module).forward is not cls.forward:
            return (f"{type(module).__name__} overrides {cls.__name__}.forward, which fastllm's replacement was "
                    "written against")
    return None


def _upstream(role: str, check: Callable[[nn.Module], str | None]) -> Callable[[nn.Module], str | None]:
    return lambda m: upstream_reason(m, role) or check(m)


def _optional(module: str, attr: str):
    """A replacement that lives in a module another part of fastllm provides, or None if absent."""
    try:
        return getattr(importlib.import_module(module, __package__), attr)
    except (ImportError, AttributeError):
        return None


def _nf4_forward(_cfg: PatchConfig, _model: nn.Module | None = None):
    return _optional("..modules.nf4_linear", "nf4_linear4bit_forward")


def _nf4_compiled_forward(_cfg: PatchConfig, _model: nn.Module | None = None):
    return _optional("..modules.nf4_linear", "nf4_linear4bit_compiled_forward")


def _nf4_alias(module: nn.Module) -> dict[str, object]:
    """The plain-tensor NF4 arguments the compiled forward reads (traced code never sees Params4bit)."""
    return {"_fastllm_nf4": _optional("..modules.nf4_linear", "NF4Alias")(module)}


def _linear4bits_under(module: nn.Module) -> dict[str, object]:
    """The 4-bit linears a compiled region calls, so its eager wrapper refreshes their NF4 aliases first."""
    return {"_fastllm_nf4_linears": tuple(m for m in module.modules() if is_linear4bit(m))}


def _nf4_eligible(module: nn.Module) -> str | None:
    check = _optional("..modules.nf4_linear", "nf4_linear_eligible")
    return check(module) if check is not None else None


@functools.cache
def _causal_lm_forward(loss, cls: type | None):
    """One replacement function per loss and class, so two models patched alike share the same forward; it shows
    the class's own signature (``generate`` checks its inputs, e.g. Gemma 3's ``pixel_values``, against it)."""
    make = _optional("..modules.causal_lm", "make_causal_lm_forward")
    return make(loss, like=None if cls is None else cls.forward) if make is not None else None


def _loss_forward(cfg: PatchConfig, model: nn.Module | None = None):
    return _causal_lm_forward("cross_entropy" if cfg.loss in (None, True) else cfg.loss,
                              None if model is None else type(model))


def _loss_eligible(module: nn.Module) -> str | None:
    check = _optional("..modules.causal_lm", "causal_lm_eligible")
    return check(module) if check is not None else None


def _compiled(make: Callable) -> Callable[[PatchConfig, nn.Module], Callable]:
    """A compiled-region forward of the model's own regions (compiled once per model, shared by layers)."""
    return lambda cfg, model: make(decoder.compiled_regions(model, cfg.compile_mode))


@functools.cache
def _eager_attention_forward():
    return decoder.make_attention_forward(decoder.eager_regions())


def _eager_attention(_cfg: PatchConfig, _model: nn.Module | None = None):
    return _eager_attention_forward()


SPECS: tuple[PatchSpec, ...] = (
    PatchSpec("rms_norm", "rms_norm", _is("rms_norm"), _upstream("rms_norm", rms_norm_eligible),
              lambda cfg, m: fast_rms_norm_forward, rms_norm_attrs),
    PatchSpec("mlp", "mlp", _is("mlp"), _upstream("mlp", mlp_eligible), lambda cfg, m: fast_mlp_forward,
              mlp_attrs),
    PatchSpec("nf4_linear", "nf4_linear", is_linear4bit, _nf4_eligible, _nf4_forward),
    PatchSpec("lora", "lora", is_lora_linear4bit, lora_eligible, lambda cfg, m: fused_lora_forward),
    # transformers' attention maths as plain functions, so q/k/v can run as one fused QLoRA op.
    PatchSpec("lora_attention", "lora", _is("attention"), _upstream("attention", decoder.attention_eligible),
              _eager_attention),
    PatchSpec("loss", "loss", _is("causal_lm"), _upstream("causal_lm", _loss_eligible), _loss_forward),
    # torch.compile of the decoder layer's sub-modules (never the layer's forward: transformers wraps
    # that for gradient checkpointing). They supersede the eager rms_norm / mlp patches.
    PatchSpec("compile_attention", "compile", _is("attention"), _upstream("attention", decoder.attention_eligible),
              _compiled(decoder.make_attention_forward), _linear4bits_under),
    PatchSpec("compile_mlp", "compile", _is("mlp"), _upstream("mlp", decoder.compiled_mlp_eligible),
              _compiled(decoder.make_mlp_forward), _linear4bits_under),
    # The 4-bit linears inside those regions, reading plain-tensor NF4 arguments (supersedes nf4_linear).
    PatchSpec("compile_nf4_linear", "compile_nf4_linear", is_linear4bit, _nf4_eligible, _nf4_compiled_forward,
              _nf4_alias),
    PatchSpec("compile_rms_norm", "compile", _is("rms_norm"),
              _upstream("rms_norm", decoder.compiled_rms_norm_eligible),
              _compiled(decoder.make_rms_norm_forward)),
    # generate's one-token steps over a static cache as CUDA graphs (the decoder stack; lm_head stays eager)
    PatchSpec("decode_graphs", "decode_graphs", _is("model"), _upstream("model", decode_graphs_eligible),
              lambda cfg, model: make_graphed_forward(new_decode_graphs(model))),
)


# Why compile stays off unless asked (the measurements are in docs/benchmarks.md, "compile").
_COMPILE_AUTO_OFF = ("auto: off, opt-in with PatchConfig(compile=True): fastllm's eager fused QLoRA path trains faster "
                     "than the compiled regions (inductor cannot fuse across the QLoRA ops' dequant and rank-r terms); "
                     "generation is as fast either way with decode_graphs")


def _resolve_compile(cfg: PatchConfig, on: dict[str, bool], why: dict[str, str]) -> None:
    """compile: opt-in (auto is off: the eager fused path is faster, see ``_COMPILE_AUTO_OFF``). When on, it
    supersedes the eager rms_norm / mlp patches and routes 4-bit linears through the NF4 custom op (traceable
    there)."""
    on["compile"] = bool(cfg.compile)
    if not on["compile"]:
        why["compile"] = "disabled by PatchConfig" if cfg.compile is False else _COMPILE_AUTO_OFF
        return
    for name in ("rms_norm", "mlp"):
        if on[name]:
            on[name] = False
            why[name] = "superseded by compile (inductor fuses the same maths inside the compiled region)"
    # bnb's own Linear4bit forward graph-breaks; the fastllm custom op traces when fed plain tensors.
    on["compile_nf4_linear"] = cfg.nf4_linear is not False and _nf4_compiled_forward(cfg) is not None
    if on["compile_nf4_linear"]:
        on["nf4_linear"] = False
        why["nf4_linear"] = "superseded by compile_nf4_linear (the same NF4 op on plain tensors, traceable)"


def resolve(cfg: PatchConfig, device: torch.device) -> tuple[dict[str, bool], dict[str, str]]:
    """Turn the config's auto (None) options into on/off for a model on ``device``.

    Returns (on, why_off): ``why_off`` explains every option that ends up off, for the report.
    """
    on: dict[str, bool] = {}
    why: dict[str, str] = {}
    cuda = device.type == "cuda"

    on["rms_norm"], on["mlp"] = cfg.rms_norm, cfg.mlp
    if _nf4_forward(cfg) is None:
        on["nf4_linear"] = False
        if cfg.nf4_linear is not False:
            why["nf4_linear"] = "not available in this build"
    elif cfg.nf4_linear is None:
        on["nf4_linear"] = cuda and triton_available()
        if not on["nf4_linear"]:
            why["nf4_linear"] = "auto: on for CUDA with triton only (bitsandbytes' CPU path is faster there)"
    else:
        on["nf4_linear"] = cfg.nf4_linear
    if cfg.loss is False:
        on["loss"] = False
    elif _loss_forward(cfg.replace(loss=True if cfg.loss is None else cfg.loss)) is None:
        on["loss"] = False
        why["loss"] = "not available in this build"
    else:
        on["loss"] = True
    for name, value in (("rms_norm", cfg.rms_norm), ("mlp", cfg.mlp), ("nf4_linear", cfg.nf4_linear),
                        ("loss", cfg.loss)):
        if value is False:
            why[name] = "disabled by PatchConfig"
    _resolve_compile(cfg, on, why)
    _resolve_decode_graphs(cfg, on, why, device)
    _resolve_lora(cfg, on, why, device)
    _resolve_fused_layer(cfg, on, why)
    return on, why


def _resolve_decode_graphs(cfg: PatchConfig, on: dict[str, bool], why: dict[str, str], device: torch.device) -> None:
    """decode_graphs: auto-on for a CUDA model; asking for it elsewhere is an error (CUDA graphs need CUDA)."""
    if cfg.decode_graphs is True and device.type != "cuda":
        raise ValueError(f"PatchConfig(decode_graphs=True) needs a model on a CUDA device (this one is on {device}); "
                         "leave decode_graphs=None (auto) or set it False")
    on["decode_graphs"] = device.type == "cuda" and cfg.decode_graphs is not False
    if not on["decode_graphs"]:
        why["decode_graphs"] = ("disabled by PatchConfig" if cfg.decode_graphs is False
                                else "auto: on for a CUDA model only (CUDA graphs)")


def _resolve_fused_layer(cfg: PatchConfig, on: dict[str, bool], why: dict[str, str]) -> None:
    """fused_layer: auto-on with lora (its ops are the fused ones); needs the rms_norm and mlp patches too."""
    needs = [name for name in ("lora", "rms_norm", "mlp") if not on[name]]
    if cfg.fused_layer is False:
        on["fused_layer"], why["fused_layer"] = False, "disabled by PatchConfig"
    elif needs:
        on["fused_layer"] = False
        why["fused_layer"] = f"needs the {', '.join(needs)} patch(es) on"
    else:
        on["fused_layer"] = True


def _resolve_lora(cfg: PatchConfig, on: dict[str, bool], why: dict[str, str], device: torch.device) -> None:
    """lora: auto-on on CUDA (faster than PEFT's unfused ops there: fewer launches and host work per projection),
    off on the CPU unless asked (the torch fallbacks gain nothing there); never inside compiled regions."""
    if cfg.lora is False:
        on["lora"], why["lora"] = False, "disabled by PatchConfig"
    elif on["compile"]:
        on["lora"] = False
        why["lora"] = "off under compile (the regions trace PEFT's forward; inductor fuses its extra ops)"
    elif cfg.lora is None and not (device.type == "cuda" and on["nf4_linear"]):
        on["lora"] = False
        why["lora"] = "auto: on CUDA with the nf4_linear patch only; PatchConfig(lora=True) turns it on here"
    else:
        on["lora"] = True


def backend_of(spec: str, device: torch.device) -> str:
    """Which implementation a patch runs on ``device``, for the report."""
    if spec in ("rms_norm", "mlp"):
        return pick_backend("auto", device)
    if spec in ("nf4_linear", "lora", "lora_attention"):
        return "triton" if device.type == "cuda" else "torch"
    if spec == "compile_nf4_linear":  # an opaque custom op inside the inductor graph, not inductor code
        return "custom-op-" + ("triton" if device.type == "cuda" else "torch")
    if spec == "loss":
        return "chunked-" + pick_backend("auto", device)
    if spec.startswith("compile_"):
        return "inductor"
    if spec == "decode_graphs":
        return "cuda-graphs"
    return "torch"
