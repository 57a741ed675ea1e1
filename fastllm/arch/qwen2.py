"""Qwen2 / Qwen2.5: Llama's maths plus biases on q/k/v (not o); layers listed as ``sliding_attention`` in
``config.layer_types`` pass their window."""

from . import DECODER_LINEARS, Arch

QWEN2 = Arch(
    model_type="qwen2",
    module="transformers.models.qwen2.modeling_qwen2",
    classes={"causal_lm": "Qwen2ForCausalLM", "model": "Qwen2Model", "layer": "Qwen2DecoderLayer",
             "attention": "Qwen2Attention", "mlp": "Qwen2MLP", "rms_norm": "Qwen2RMSNorm"},
    lora_targets=DECODER_LINEARS,
    qkv_bias=True,
    sliding_window="module",
)
