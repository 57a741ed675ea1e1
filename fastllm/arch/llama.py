"""Llama (Llama 2/3, SmolLM2, TinyLlama, ...): the reference architecture every patch was written against."""

from . import DECODER_LINEARS, Arch

LLAMA = Arch(
    model_type="llama",
    module="transformers.models.llama.modeling_llama",
    classes={"causal_lm": "LlamaForCausalLM", "model": "LlamaModel", "layer": "LlamaDecoderLayer",
             "attention": "LlamaAttention", "mlp": "LlamaMLP", "rms_norm": "LlamaRMSNorm"},
    lora_targets=DECODER_LINEARS,
)
