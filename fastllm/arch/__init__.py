"""Architecture facts as data: one frozen ``Arch`` per transformers ``model_type`` (gpt-fast's
``transformer_configs`` is the model). Patch specs, the loader and the error messages read this table; no code path
tests a model type by name. A module is patched only when its class is the table's class for that role or a
subclass that keeps the table class's ``forward`` (the exact upstream function fastllm's replacement was written
against); anything else fails closed, counted in the report with its reason.

Adding an architecture is a new file here plus its entry in ``ARCHS`` once every patch it enables is tested
against that architecture's eager transformers modules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

ROLES = ("causal_lm", "model", "layer", "attention", "mlp", "rms_norm")


@dataclass(frozen=True)
class Arch:
    model_type: str
    module: str                       # the transformers modeling module
    classes: dict                     # role (``ROLES``) -> class name in ``module``
    lora_targets: tuple               # default LoRA target modules (every linear of a decoder layer)
    # Feature flags that change the maths (a patch whose replacement does not implement a flag set here must not
    # be enabled for the architecture):
    qkv_bias: bool = False            # biases on q/k/v projections (Qwen2)
    qk_norm: bool = False             # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    norm_offset: float = 0.0          # RMSNorm scales by (offset + w): 0 for x*w, 1 for Gemma's x*(1+w)
    activation: str = "silu"          # MLP gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    sliding_window: bool = False      # some or all layers attend to a window
    embed_scale: bool = False         # embeddings scaled by sqrt(hidden)
    logit_softcap: bool = False       # final logits soft-capped

    def cls(self, role: str) -> type:
        """The transformers class of ``role`` (imported on first use: the table itself imports nothing)."""
        return getattr(importlib.import_module(self.module), self.classes[role])


from .llama import LLAMA  # noqa: E402  (the entries import Arch from here)

ARCHS: dict[str, Arch] = {a.model_type: a for a in (LLAMA,)}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHS)


def arch_of(model_type: str | None) -> Arch:
    """The table entry of ``model_type``; an unsupported one raises naming the supported ones."""
    if model_type not in ARCHS:
        raise ValueError(f"fastllm supports model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    return ARCHS[model_type]
