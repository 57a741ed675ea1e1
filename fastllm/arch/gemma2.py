"""Gemma 2 (``gemma2``, Gemma2ForCausalLM: 2B/9B/27B): Gemma 3's layer without the q/k norms, its attention logits
soft-capped (``attn_logit_softcapping``, passed on to the attention interface as upstream passes it; transformers
runs Gemma 2 with its eager attention, which applies it) and the final logits too; ``x * (1 + w)`` RMSNorms, four
a layer, GELU-tanh gated MLP, scaled embeddings, ``query_pre_attn_scalar`` scaling, alternating sliding and global
layers (one RoPE table)."""

from . import DECODER_LINEARS, Arch

GEMMA2 = Arch(
    model_type="gemma2",
    module="transformers.models.gemma2.modeling_gemma2",
    classes={"causal_lm": "Gemma2ForCausalLM", "model": "Gemma2Model", "layer": "Gemma2DecoderLayer",
             "attention": "Gemma2Attention", "mlp": "Gemma2MLP", "rms_norm": "Gemma2RMSNorm"},
    lora_targets=DECODER_LINEARS,
    norm_offset=1.0,
    activation="gelu_tanh",
    sliding_window="module",
    sandwich_norms=True,
    embed_scale=True,
    logit_softcap=True,
    attn_softcap=True,
)
