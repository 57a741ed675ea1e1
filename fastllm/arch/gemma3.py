"""Gemma 3 (text: ``gemma3_text``, Gemma3ForCausalLM, e.g. 270M/1B): ``x * (1 + w)`` RMSNorms computed in fp32, four
per layer (after attention and around the MLP too), a GELU-tanh gated MLP, per-head q/k norms, scaled embeddings
(inside transformers' embedding module), ``query_pre_attn_scalar`` attention scaling (the module's ``scaling``),
sliding and global layers with their own RoPE tables (the model passes each layer its own).

The 4B, 12B and 27B checkpoints are ``gemma3``: Gemma3ForConditionalGeneration, the same text decoder
(``model.language_model``) behind a SigLIP vision tower whose image features replace the image tokens' embeddings
(with a bidirectional mask over each image's tokens). fastllm fine-tunes the language model: LoRA on its linears
only, the vision tower and projector left in 16-bit and frozen; images still pass through (``pixel_values``,
``token_type_ids``). Its forward applies no final-logit soft-cap."""

import dataclasses

from . import DECODER_LINEARS, Arch

GEMMA3 = Arch(
    model_type="gemma3_text",
    module="transformers.models.gemma3.modeling_gemma3",
    classes={"causal_lm": "Gemma3ForCausalLM", "model": "Gemma3TextModel", "layer": "Gemma3DecoderLayer",
             "attention": "Gemma3Attention", "mlp": "Gemma3MLP", "rms_norm": "Gemma3RMSNorm"},
    lora_targets=DECODER_LINEARS,
    qk_norm=True,
    norm_offset=1.0,
    activation="gelu_tanh",
    sliding_window="module",
    sandwich_norms=True,
    embed_scale=True,
    logit_softcap=True,
)

# the same decoder behind a vision tower: only what the causal LM, its LoRA targets and its loading change
GEMMA3_VISION = dataclasses.replace(
    GEMMA3,
    model_type="gemma3",
    classes={**GEMMA3.classes, "causal_lm": "Gemma3ForConditionalGeneration"},
    # the language model's linears only (the vision tower's attention names its projections q/k/v_proj too)
    lora_targets=r".*\.language_model\..*\.(" + "|".join(DECODER_LINEARS) + ")",
    logit_softcap=False,
    keep_16bit=("model.vision_tower", "model.multi_modal_projector"),
)
