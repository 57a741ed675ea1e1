"""Qwen3 (dense): Llama's maths plus a per-head RMSNorm of q and k (``q_norm``/``k_norm`` over the head dim, before
RoPE); q/k/v/o biases only if ``config.attention_bias``; per-layer windows as Qwen2."""

from . import DECODER_LINEARS, Arch

QWEN3 = Arch(
    model_type="qwen3",
    module="transformers.models.qwen3.modeling_qwen3",
    classes={"causal_lm": "Qwen3ForCausalLM", "model": "Qwen3Model", "layer": "Qwen3DecoderLayer",
             "attention": "Qwen3Attention", "mlp": "Qwen3MLP", "rms_norm": "Qwen3RMSNorm"},
    lora_targets=DECODER_LINEARS,
    qk_norm=True,
    sliding_window="module",
)
