"""Architecture facts as data: one frozen ``Arch`` per transformers ``model_type`` (gpt-fast's
``transformer_configs`` is the model). Patch specs, the loader and the error messages read this table; no code path
tests a model type by name. A module is patched only when its class is the table's class for that role or a
subclass that keeps the table class's ``forward`` (the exact upstream function fastllm's replacement was written
against); anything else fails closed, counted in the report with its reason.

Adding an architecture is a new file here plus its entry in ``ARCHS`` once every patch it enables is tested
against that architecture's eager transformers modules.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

ROLES = ("causal_lm", "model", "layer", "attention", "mlp", "rms_norm")
# every linear of a decoder layer, as the architectures of the table name them: their default LoRA targets
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    model_type: str
    module: str                       # the transformers modeling module
    classes: dict                     # role (``ROLES``) -> class name in ``module``
    lora_targets: tuple | str         # default LoRA target modules (every linear of a decoder layer; a regex where
                                      # other towers name their linears alike)
    # Feature flags that change the maths (a patch whose replacement does not implement a flag set here must not
    # be enabled for the architecture):
    qkv_bias: bool = False            # biases on q/k/v projections (Qwen2)
    qk_norm: bool = False             # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    norm_offset: float = 0.0          # RMSNorm scales by (offset + w): 0 for x*w, 1 for Gemma's x*(1+w)
    activation: str = "silu"          # MLP gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    # Where the attention forward reads the window it passes to the attention interface: None (it passes none),
    # "config" (``config.sliding_window``, every layer: Mistral) or "module" (the layer's own ``sliding_window``,
    # None on full-attention layers: Qwen2/3). The mask carries the window for SDPA/eager; the kwarg is passed on
    # as upstream passes it.
    sliding_window: str | None = None
    sandwich_norms: bool = False      # norms after attention and around the MLP too (Gemma: four per layer)
    embed_scale: bool = False         # embeddings scaled by sqrt(hidden) (inside transformers' embedding module)
    logit_softcap: bool = False       # the config may soft-cap the final logits (the chunked loss applies it)
    attn_softcap: bool = False        # the attention passes its ``attn_logit_softcapping`` on (Gemma 2)
    keep_16bit: tuple = ()            # submodule paths load_in_4bit leaves in 16-bit (a vision tower, its projector)

    def cls(self, role: str) -> type:
        """The transformers class of ``role`` (imported on first use: the table itself imports nothing)."""
        return getattr(importlib.import_module(self.module), self.classes[role])


from .gemma2 import GEMMA2  # noqa: E402
from .gemma3 import GEMMA3, GEMMA3_VISION  # noqa: E402
from .llama import LLAMA  # noqa: E402  (the entries import Arch from here)
from .mistral import MISTRAL  # noqa: E402
from .qwen2 import QWEN2  # noqa: E402
from .qwen3 import QWEN3  # noqa: E402

ARCHS: dict[str, Arch] = {a.model_type: a for a in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, GEMMA3_VISION)}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHS)


def arch_of_module(module, role: str) -> Arch | None:
    """The table entry whose ``role`` class ``module`` is an instance of, or None (per-call checks read it: cached by
    class)."""
    return _arch_of_class(type(module), role)


@functools.cache
def _arch_of_class(cls: type, role: str) -> Arch | None:
    return next((a for a in ARCHS.values() if issubclass(cls, a.cls(role))), None)


def arch_of(model_type: str | None) -> Arch:
    """The table entry of ``model_type``; an unsupported one raises naming the supported ones."""
    if model_type not in ARCHS:
        raise ValueError(f"fastllm supports model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    return ARCHS[model_type]


def peft_targets(targets) -> list | str:
    """LoRA target modules in the form peft's ``LoraConfig`` takes: a regex string as it is, names as a list."""
    return targets if isinstance(targets, str) else list(targets)


def modules_of(model, role: str) -> list:
    """``model``'s submodules of its table entry's ``role`` class (its ``config.model_type``'s), in order: e.g. the
    decoder layers, not a vision tower's; [] for a model outside the table."""
    arch = ARCHS.get(getattr(getattr(model, "config", None), "model_type", None))
    return [] if arch is None else [m for m in model.modules() if isinstance(m, arch.cls(role))]
