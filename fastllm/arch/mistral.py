"""Mistral (7B v0.1-v0.3, Ministral-style dense): Llama's maths; attention passes ``config.sliding_window`` (the
mask carries the window for SDPA/eager)."""

from . import DECODER_LINEARS, Arch

MISTRAL = Arch(
    model_type="mistral",
    module="transformers.models.mistral.modeling_mistral",
    classes={"causal_lm": "MistralForCausalLM", "model": "MistralModel", "layer": "MistralDecoderLayer",
             "attention": "MistralAttention", "mlp": "MistralMLP", "rms_norm": "MistralRMSNorm"},
    lora_targets=DECODER_LINEARS,
    sliding_window="config",
)
