"""``patch`` / ``unpatch`` / ``is_patched`` / ``eager``: the public face of the registry."""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from .._compat import SUPPORTED_MODEL_TYPES
from ..config import PatchConfig
from ..integrations.checkpointing import nonreentrant_checkpoint, offload_checkpoint
from ..integrations.trl import route_fused_lm_head
from ..modules.decode_graphs import decode_graphs_of, forget_on_unpatch, static_generate
from ..modules.layer import fused_layer_checkpoint
from . import registry
from .registry import ModelState
from .report import PatchReport, logger
from .specs import SPECS, backend_of, resolve


def find_base(model: nn.Module) -> nn.Module:
    """The transformers Llama model inside ``model`` (itself, or under PEFT / other wrappers).

    Raises a ValueError naming the supported ``model_type``s for anything else.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"fastllm patches torch.nn.Module models, got {type(model).__name__}")
    base = None
    if hasattr(model, "get_base_model"):
        base = model.get_base_model()
    if not isinstance(base, PreTrainedModel):
        base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if base is None:
        raise ValueError(f"{type(model).__name__} is not a transformers model; fastllm supports model_type "
                         f"{SUPPORTED_MODEL_TYPES}")
    model_type = getattr(base.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"fastllm supports model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
                         f"({type(base).__name__}); load a Llama-architecture checkpoint")
    return base


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _apply_checkpointing(base: nn.Module, mode, state: ModelState, fused_layer: bool = False) -> None:
    """Make the decoder layers' checkpointing non-reentrant (``mode`` None/True) or offloading; with
    ``fused_layer`` (not offloading), eligible calls run the layer as one self-recomputing op."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if mode is None:
        layers = [m for m in layers if m.gradient_checkpointing]
    if not layers:
        return
    fused_layer = fused_layer and mode != "offload"
    fn = offload_checkpoint if mode == "offload" else fused_layer_checkpoint if fused_layer else nonreentrant_checkpoint
    for layer in layers:
        if mode in (True, "offload"):
            state.set_attr(layer, "gradient_checkpointing", True, "gradient_checkpointing")
        state.set_attr(layer, "_gradient_checkpointing_func", fn, "gradient_checkpointing")
    state.report.add("gradient_checkpointing", len(layers))
    state.report.backends["gradient_checkpointing"] = ("offload" if mode == "offload" else
                                                       "non-reentrant, fused QLoRA layers" if fused_layer else
                                                       "non-reentrant")
    if mode == "offload" and _device_of(base).type != "cuda":
        state.report.notes.append("gradient_checkpointing='offload' is a no-op for CPU tensors")


def _use_static_cache(base: nn.Module, state: ModelState) -> None:
    """Point ``generate`` at a static KV cache (what decode graphs replay over) where the call leaves the cache to
    transformers, recorded like any patch; unpatching also drops the model's graphs."""
    state.set_attr(base, "generate", types.MethodType(static_generate, base), "decode_graphs")
    state.report.live["decode_graphs"] = decode_graphs_of(base)
    state.hooks.append(forget_on_unpatch(base))


def _seq_guard(max_len: int):
    """Forward pre-hook on LlamaModel: over-long input raises instead of silently running past RoPE range.

    Packed / padding-free batches put several sequences in one row with restarting ``position_ids``; their
    length is the largest position, not the row width.
    """

    def check(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None or x.dim() < 2:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if getattr(cache, "is_compileable", False) and getattr(cache, "layers", None):
            capacity = cache.get_max_length()
            if isinstance(capacity, int) and 0 < capacity <= max_len:
                return None  # a static cache this size cannot run past the limit: no per-step read (a device sync)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        n = past + x.shape[1]
        pos = kwargs.get("position_ids")
        if n > max_len and pos is not None and pos.numel():
            # Only a row wider than the limit needs its positions read (a device sync on CUDA).
            n = int(pos.max()) + 1
        if n > max_len:
            raise ValueError(f"sequence length {n} exceeds max_seq_length={max_len}; truncate the inputs or "
                             f"load with FastLlama.from_pretrained(..., max_seq_length={n}) or more")
        return None

    return check


def patch(model: nn.Module, config: PatchConfig | None = None) -> PatchReport:
    """Patch ``model`` in place (per instance) and return the report. Patching twice equals once."""
    config = config if config is not None else PatchConfig()
    if not isinstance(config, PatchConfig):
        raise TypeError(f"config must be a fastllm.PatchConfig, got {type(config).__name__}")
    base = find_base(model)
    state = registry.get_state(base)
    if state is not None and state.config == config:
        return state.report
    device = _device_of(base)
    on, why_off = resolve(config, device)  # raises on a bad combination before anything is undone
    if state is not None:
        unpatch(base)
    state = ModelState(config=config, report=PatchReport(disabled=why_off))
    registry.set_state(base, state)
    specs = [s for s in SPECS if on.get(s.option)]
    forwards = {s.name: s.forward(config, base) for s in specs}
    for name, module in base.named_modules():
        for spec in specs:
            if not spec.matches(module):
                continue
            reason = spec.eligible(module)
            if reason is not None:
                state.report.skip(spec.name, name or type(module).__name__, reason)
                continue
            for attr, value in (spec.attrs(module) if spec.attrs is not None else {}).items():
                state.set_attr(module, attr, value, spec.name)
            state.set_attr(module, "forward", types.MethodType(forwards[spec.name], module), spec.name)
            state.report.add(spec.name)
            state.report.backends[spec.name] = backend_of(spec.name, device)
    if state.report.counts["decode_graphs"]:
        _use_static_cache(base, state)
    if state.report.counts["loss"]:
        # TRL trainers would replace the loss forward with their own head: route that to fastllm instead.
        route_fused_lm_head()
    if config.gradient_checkpointing is not False:
        _apply_checkpointing(base, config.gradient_checkpointing, state, on.get("fused_layer", False))
    if config.max_seq_length is not None:
        inner = getattr(base, "model", base)
        state.hooks.append(inner.register_forward_pre_hook(_seq_guard(config.max_seq_length), with_kwargs=True))
    state.report.log()
    return state.report


def unpatch(model: nn.Module | None = None) -> int:
    """Undo fastllm's patches on ``model`` (or on every patched model); returns how many were reverted."""
    bases = [find_base(model)] if model is not None else registry.patched_models()
    n = 0
    for base in bases:
        state = registry.pop_state(base)
        if state is not None:
            n += state.revert()
    return n


def is_patched(model: nn.Module) -> bool:
    return registry.get_state(find_base(model)) is not None


def patch_config(model: nn.Module) -> PatchConfig | None:
    """The PatchConfig ``model`` is patched with, or None."""
    state = registry.get_state(find_base(model))
    return state.config if state is not None else None


def patch_report(model: nn.Module) -> PatchReport | None:
    state = registry.get_state(find_base(model))
    return state.report if state is not None else None


@contextlib.contextmanager
def eager(model: nn.Module):
    """Run a block on the exact eager transformers model; the same patches come back on exit."""
    config = patch_config(model)
    if config is None:
        yield model
        return
    unpatch(model)
    try:
        yield model
    finally:
        patch(model, config)
        logger.debug("fastllm: re-patched after eager block")
