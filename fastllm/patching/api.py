"""``patch`` / ``unpatch`` / ``is_patched`` / ``eager``: the public face of the registry."""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from .._compat import SUPPORTED_MODEL_TYPES
from ..arch import modules_of
from ..config import PatchConfig
from ..modules.auto_checkpoint import AutoCheckpoint, static_storages
from ..modules.checkpointing import nonreentrant_checkpoint, offload_checkpoint
from ..modules.decode_graphs import decode_graphs_of, forget_on_unpatch, static_generate
from ..modules.layer import fused_layer_checkpoint, fused_layer_offload
from . import hub_kernels, registry
from .registry import ModelState
from .report import PatchReport, logger
from .specs import SPECS, backend_of, resolve
from .trl_routing import acquire_routing


def find_base(model: nn.Module) -> nn.Module:
    """The transformers model of the architecture table inside ``model`` (itself, or under PEFT / other wrappers).

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
                         f"({type(base).__name__}); load a checkpoint of one of these architectures")
    return base


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _intermediate_size(base: nn.Module) -> int:
    """The MLP width of ``base``'s text model (0 when its config does not say)."""
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "intermediate_size", 0) or 0)


def _apply_checkpointing(base: nn.Module, mode, state: ModelState, fused_layer: bool = False,
                         budget_gib: float | None = None) -> None:
    """Make the decoder layers' checkpointing non-reentrant (``mode`` None/True), offloading, or per-layer
    ``"auto"`` (``modules.auto_checkpoint``); with ``fused_layer``, eligible calls run the layer as one
    self-recomputing op."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    # the table's decoder layers only: another tower's (Gemma 3's vision encoder) keeps transformers' own
    layers = [m for m in modules_of(base, "layer") if isinstance(m, GradientCheckpointingLayer)]
    if mode is None:
        layers = [m for m in layers if m.gradient_checkpointing]
    if not layers:
        return
    recompute = fused_layer_checkpoint if fused_layer else nonreentrant_checkpoint
    if mode == "offload":
        fns = [fused_layer_offload if fused_layer else offload_checkpoint] * len(layers)
    elif mode == "auto":
        auto = AutoCheckpoint(len(layers), recompute, None if budget_gib is None else budget_gib * 2**30,
                              static_storages(base), row_elements=3 * _intermediate_size(base))
        fns = [auto.layer_function(i) for i in range(len(layers))]
        state.report.live["gradient_checkpointing"] = auto
    else:
        fns = [recompute] * len(layers)
    for layer, fn in zip(layers, fns):
        if mode in (True, "offload", "auto"):
            state.set_attr(layer, "gradient_checkpointing", True, "gradient_checkpointing")
        state.set_attr(layer, "_gradient_checkpointing_func", fn, "gradient_checkpointing")
    state.report.add("gradient_checkpointing", len(layers))
    kind = {"offload": "offload", "auto": "auto: keep / recompute / offload per layer"}.get(mode, "non-reentrant")
    state.report.backends["gradient_checkpointing"] = kind + (", fused QLoRA layers" if fused_layer else "")
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
        _follow_checkpointing(state)
        if not state.replaced():
            return state.report
    device = _device_of(base)
    on, why_off = resolve(config, device)  # raises on a bad combination before anything is undone
    if state is not None:
        unpatch(base)
    state = ModelState(config=config, report=PatchReport(disabled=why_off))
    registry.set_state(base, state)
    restore_kernels = hub_kernels.suspend(base)  # before patching: re-kernelizing would drop our forwards
    if restore_kernels is not None:
        state.finalizers.append(restore_kernels)
        state.report.notes.append("transformers' hub kernels: off while patched (fastllm replaces the same "
                                  "forwards); unpatch turns them back on")
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
        release = acquire_routing()
        if release is not None:
            state.finalizers.append(release)
    if config.gradient_checkpointing is not False:
        _apply_checkpointing(base, config.gradient_checkpointing, state, on.get("fused_layer", False),
                             config.memory_budget)
    if config.max_seq_length is not None:
        inner = getattr(base, "model", base)
        state.hooks.append(inner.register_forward_pre_hook(_seq_guard(config.max_seq_length), with_kwargs=True))
    state.hooks.append(base.register_forward_pre_hook(_integrity_check(base)))
    state.report.log()
    return state.report


def _cause(base: nn.Module, replaced: list[registry.PatchRecord]) -> str:
    """The likeliest reason fastllm's attributes were replaced, for the warning."""
    if hub_kernels.kernelized_since(base):
        return ("transformers' hub kernels were turned on again (use_kernels / set_use_kernels / kernelize), which "
                "re-binds the forwards fastllm patched")
    return "another library or user code re-bound them after patching"


_CHECKPOINT_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")


def _torch_checkpoint(fn: object) -> bool:
    """Is ``fn`` torch's checkpoint as transformers' ``gradient_checkpointing_enable`` sets it (a partial of it)?"""
    import torch.utils.checkpoint

    return getattr(fn, "func", fn) is torch.utils.checkpoint.checkpoint


def _follow_checkpointing(state: ModelState) -> None:
    """transformers' ``gradient_checkpointing_enable`` / ``disable`` after patching (HF Trainer calls it) is the
    user's choice, not a conflict: their flags stay (also after unpatch). Where they put torch's plain checkpoint
    back, fastllm's checkpoint function is set again (recorded over theirs, so unpatch gives theirs back); any
    other function (transformers' offload, user code) is kept as they set it."""
    replaced = [rec for rec in state.records if rec.attr in _CHECKPOINT_ATTRS and not registry.holds(rec)]
    if not replaced:
        return
    gone = {id(rec) for rec in replaced}
    state.records[:] = [rec for rec in state.records if id(rec) not in gone]
    for rec in replaced:
        if rec.attr == "_gradient_checkpointing_func" and _torch_checkpoint(vars(rec.owner).get(rec.attr)):
            state.set_attr(rec.owner, rec.attr, rec.value, rec.spec)


def verify(model: nn.Module) -> bool:
    """True when every patch fastllm recorded on ``model`` is still in place.

    A model whose patches something else replaced is never left half-patched: it is unpatched (what is still
    fastllm's is reverted, the rest kept as that code set it), with one warning naming the attributes and the
    cause, and ``fastllm.patch(model)`` patches it again.
    """
    base = find_base(model)
    state = registry.get_state(base)
    if state is None:
        return False
    _follow_checkpointing(state)
    replaced = state.replaced()
    if not replaced:
        return True
    names = sorted({f"{type(rec.owner).__name__}.{rec.attr}" for rec in replaced})
    gone = {id(rec) for rec in replaced}
    state.records[:] = [rec for rec in state.records if id(rec) not in gone]  # theirs now: unpatch leaves them
    logger.warning("fastllm: %d patched attribute(s) were replaced after patching (%s): %s. The model is unpatched "
                   "and runs as eager transformers; call fastllm.patch(model) to patch it again",
                   len(replaced), ", ".join(names[:6]), _cause(base, replaced))
    unpatch(base)
    return False


def _integrity_check(base: nn.Module):
    """Forward pre-hook: ``verify`` before a training forward and after a train/eval switch (the moments other
    code replaces forwards); a no-grad forward in the same mode (a decode step) skips it."""
    last = [None]

    def check(module, args):
        if torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() or module.training is not last[0]:
            last[0] = module.training
            verify(base)
        return None

    return check


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
    """True when ``model`` is patched and every patch is still in place (see ``verify``)."""
    return registry.get_state(find_base(model)) is not None and verify(model)


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
