"""Patch options: one frozen dataclass, validated at construction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

_LOSS_NAMES = ("cross_entropy", "focal")
_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# torch.compile modes that run CUDA graphs: refused with a reason. cudagraph trees reject the NF4 ops' shared
# workspace (a live pool tensor), and with fresh buffers the capture is invalidated inside the checkpointed regions.
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True, init=False)
class PatchConfig:
    """Which fastllm patches to apply to a model of the architecture table.

    ``None`` means "auto": on where it pays on this machine (CUDA), off elsewhere.

    - ``rms_norm``: fused RMSNorm (Triton on CUDA, torch elsewhere).
    - ``mlp``: SwiGLU MLP with a fused ``silu(gate) * up`` (projections stay module calls).
    - ``nf4_linear``: bitsandbytes ``Linear4bit`` forward through fastllm's NF4 dequant + matmul.
    - ``lora``: PEFT's LoRA-over-``Linear4bit`` layers as one fused autograd op (base + adapter);
      auto-on on CUDA (with ``nf4_linear``), opt-in elsewhere; off under ``compile`` (inductor fuses
      PEFT's ops there).
    - ``fused_layer``: under gradient checkpointing, each decoder layer as one op that recomputes itself in
      backward without an autograd graph (``ops.lora_layer``); auto-on with ``lora``, needs ``rms_norm``,
      ``mlp`` and ``lora`` on; a call it cannot take (a KV cache, hooks on sub-modules, ...) is checkpointed
      op by op as before, counted in the report.
    - ``loss``: chunked lm_head + loss that never materialises the logits in training.
      ``True`` / ``"cross_entropy"``, ``"focal"``, or a callable ``(logits_fp32 [n, V], labels [n]) -> [n]``.
    - ``compile``: ``torch.compile`` the decoder layer's regions; opt-in (auto is off: the eager fused QLoRA path
      trains faster than the compiled regions; docs/benchmarks.md).
    - ``compile_mode``: passed to ``torch.compile``: ``"default"`` or ``"max-autotune-no-cudagraphs"``
      (autotuned matmuls). The CUDA-graph modes (``"reduce-overhead"``, ``"max-autotune"``) are refused:
      CUDA-graph capture fails inside the checkpointed regions.
    - ``decode_graphs``: generation's decode steps as CUDA graphs over a static KV cache (the model's ``generate``
      adds ``cache_implementation="static"`` where a call leaves the cache to transformers); auto-on for a CUDA
      model, an error elsewhere.
      A step that cannot be graphed runs eagerly, counted in the report (``modules.decode_graphs``).
    - ``gradient_checkpointing``: ``None`` keeps the model's own setting (made non-reentrant when on),
      ``True`` turns it on, ``"offload"`` also keeps the checkpointed activations in pinned CPU memory
      (GPU only; a logged no-op on the CPU), ``"auto"`` chooses per decoder layer between keeping its activations,
      recomputing it and offloading its input, the fastest mix under ``memory_budget``
      (``modules.auto_checkpoint``), ``False`` leaves checkpointing alone.
    - ``memory_budget``: GiB the training step may use on the device under ``"auto"`` (default: what the device
      can give, less a margin); on the CPU it bounds the decoder layers' kept activations (default: recompute).
    - ``max_seq_length``: when set, inputs longer than this raise a clear error.
    """

    rms_norm: bool = True
    mlp: bool = True
    nf4_linear: bool | None = None
    lora: bool | None = None
    fused_layer: bool | None = None
    loss: bool | str | Callable | None = None
    compile: bool | None = None
    compile_mode: str = "default"
    decode_graphs: bool | None = None
    gradient_checkpointing: bool | str | None = None
    memory_budget: float | None = None
    max_seq_length: int | None = None

    def __init__(self, **kwargs: Any) -> None:
        names = [f.name for f in fields(self)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"PatchConfig got unknown option(s) {unknown}; valid options are: {', '.join(names)}")
        for f in fields(self):
            object.__setattr__(self, f.name, kwargs.get(f.name, f.default))
        self._validate()

    def _validate(self) -> None:
        for name in ("rms_norm", "mlp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PatchConfig.{name} must be True or False, got {getattr(self, name)!r}")
        # `is`, not `in`: 0 == False and 1 == True, but an int is not an answer to an on/off question
        for name in ("nf4_linear", "lora", "fused_layer", "compile", "decode_graphs"):
            if not any(getattr(self, name) is v for v in (None, True, False)):
                raise TypeError(f"PatchConfig.{name} must be None (auto), True or False, got {getattr(self, name)!r}")
        if not (any(self.loss is v for v in (None, True, False)) or (isinstance(self.loss, str) and
                                                                     self.loss in _LOSS_NAMES) or callable(self.loss)):
            raise ValueError(f"PatchConfig.loss must be None, a bool, one of {_LOSS_NAMES} or a callable, "
                             f"got {self.loss!r}")
        if self.compile_mode in _CUDA_GRAPH_MODES:
            raise ValueError(f"PatchConfig.compile_mode={self.compile_mode!r} runs CUDA graphs, which fastllm's "
                             "compiled regions do not support (capture fails inside the checkpointed regions); "
                             "use 'default' or 'max-autotune-no-cudagraphs' (autotuned matmuls, no CUDA graphs)")
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"PatchConfig.compile_mode must be one of {_COMPILE_MODES}, got {self.compile_mode!r}")
        if not (any(self.gradient_checkpointing is v for v in (None, True, False))
                or self.gradient_checkpointing in ("offload", "auto")):
            raise ValueError("PatchConfig.gradient_checkpointing must be None, True, False, 'offload' or 'auto', "
                             f"got {self.gradient_checkpointing!r}")
        b = self.memory_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"PatchConfig.memory_budget must be a positive number of GiB, got {b!r}")
        m = self.max_seq_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):  # bool is an int subclass
            raise ValueError(f"PatchConfig.max_seq_length must be a positive int, got {m!r}")

    def replace(self, **changes: Any) -> PatchConfig:
        """A copy with ``changes`` applied (validated like the constructor)."""
        return PatchConfig(**{**self.asdict(), **changes})

    def asdict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
