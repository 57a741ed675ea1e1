"""Random-weight QLoRA models of real shapes (Llama 3, Qwen2.5, Qwen3, Mistral, Gemma 2 and 3), built locally (no
downloads), for benchmarks.

The decoder's seven linears become bitsandbytes ``Linear4bit`` (NF4, double quant, bf16 compute), exactly
what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` builds, without writing and
re-reading a 16 GB random checkpoint: the model is created in bf16 on the device, and each linear's weight
is quantized there by ``Params4bit.to(device)``.
"""

from __future__ import annotations

import torch

SHAPES = {
    # Llama-3.2-1B: tied embeddings
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, vocab_size=128256),
    # Llama-3-70B (build it with layerwise=True: 140 GB in bf16)
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False, vocab_size=128256),
    # Llama-3.1-8B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, vocab_size=128256),
    # for CPU smoke runs of the benchmark code
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, vocab_size=512),
    # every in_features a multiple of 64: bitsandbytes' CPU 4-bit path is only right there (CPU references)
    "tiny128": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, vocab_size=512),
    # Qwen2.5-7B: q/k/v biases
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064,
                       rope_theta=1000000.0, rms_norm_eps=1e-6),
    # Qwen2.5-72B (build it with layerwise=True)
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, vocab_size=152064,
                        rope_theta=1000000.0, rms_norm_eps=1e-6),
    # Qwen3-8B: per-head q/k norms, head_dim 128
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # Mistral-7B-v0.3 (no sliding window)
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, vocab_size=32768,
                       rope_theta=1000000.0, sliding_window=None),
    # Gemma-3-4B (text): head_dim 256, 262K tied vocabulary, 5 sliding (window 1024) : 1 global layers
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
                      vocab_size=262208, query_pre_attn_scalar=256, sliding_window=1024, rms_norm_eps=1e-6),
    # Gemma 2 runs its eager attention (the soft-capped logits SDPA cannot compute), as transformers does
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, tie_word_embeddings=True,
                      vocab_size=256000, query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attn_implementation="eager"),
    # CPU smoke shapes of the other architectures
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, vocab_size=512),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                       vocab_size=512),
    "tiny-gemma2": dict(model_type="gemma2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                        vocab_size=512, query_pre_attn_scalar=32, sliding_window=16, attn_logit_softcapping=5.0,
                        final_logit_softcapping=3.0, attn_implementation="eager",
                        layer_types=["sliding_attention", "full_attention"]),
    # Gemma-3-4B as released (Gemma3ForConditionalGeneration): the text decoder above behind a SigLIP-so400m tower
    # (left in bf16 and frozen, as fastllm's loader keeps it); the benchmarks train and generate on text
    "gemma3-4b-vision": dict(model_type="gemma3", mm_tokens_per_image=256, text_config=dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, vocab_size=262208, query_pre_attn_scalar=256, sliding_window=1024, rms_norm_eps=1e-6),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14)),
    "tiny-gemma3-vision": dict(model_type="gemma3", mm_tokens_per_image=4, text_config=dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=512, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8)),
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                        vocab_size=512, query_pre_attn_scalar=32, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
}
_LLAMA3 = dict(rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu")  # the Llama shapes' defaults
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape_config(shape: str):
    """The transformers config of ``shape`` (its ``model_type``, Llama by default)."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type", "llama")
    defaults = _LLAMA3 if model_type == "llama" else {}
    attn = spec.pop("attn_implementation", "sdpa")
    if "text_config" in spec:  # a composite (vision + text) model: the positions belong to its text decoder
        spec["text_config"] = {**spec["text_config"], "max_position_embeddings": 8192}
    else:
        spec["max_position_embeddings"] = 8192
    return AutoConfig.for_model(model_type, **{**defaults, **spec}, attn_implementation=attn)


def lora_targets(model):
    """Every provider's LoRA targets: the table's defaults for the model (the 7 decoder linears; for a
    vision-language model a regex on its language model's, as fastllm's ``get_peft_model`` picks)."""
    from ..arch import arch_of, peft_targets

    return peft_targets(arch_of(model.config.model_type).lora_targets)



def build_qlora_base(shape: str, device: str | torch.device, *, dtype=torch.bfloat16, seed: int = 0,
                     load_in_4bit: bool = True, layerwise: bool = False):
    """A random causal LM of ``shape`` on ``device`` with NF4 double-quant decoder linears (biases kept).

    ``layerwise``: built on the meta device and materialised one decoder layer at a time, each layer's linears
    quantized before the next layer exists, so the whole bf16 model never does (a 70B shape: 140 GB in bf16, ~37
    GB in NF4). Weights come from a generator seeded per layer on ``device``: every rank builds the same bytes.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    device = torch.device(device)
    if layerwise:
        return _build_layerwise(shape, device, dtype, seed)
    with device:
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=dtype)
    if not load_in_4bit:
        return model
    from ..arch import modules_of

    for layer in modules_of(model, "layer"):  # a vision-language model's language model's, not its vision tower's
        _quantize_linears(layer, device, dtype)
    return _finish(model, device)


def _quantize_linears(layer, device: torch.device, dtype) -> None:
    """Replace the decoder layer's linears by bitsandbytes NF4 double-quant ``Linear4bit`` (biases kept)."""
    import bitsandbytes as bnb

    for parent in (layer.self_attn, layer.mlp):
        for name in LINEARS:
            old = getattr(parent, name, None)
            if old is None:
                continue
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4").to(device)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
            new.support_avx512bf16_for_cpu = False  # see fastllm.loader._fix_bnb_cpu
            setattr(parent, name, new)
            del old


def _finish(model, device: torch.device):
    model.is_loaded_in_4bit = True  # what transformers' bnb loader sets; PEFT reads it
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _random_(module, gen: torch.Generator, std: float, norm_offset: float) -> None:
    """RMSNorm weights to their identity (``1 - norm_offset``: 1, or 0 for Gemma's (1 + w)), the rest N(0, std)."""
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if "RMSNorm" in type(m).__name__:
                p.data.fill_(1.0 - norm_offset)
            else:
                p.data.normal_(0.0, std, generator=gen)


def _build_layerwise(shape: str, device: torch.device, dtype, seed: int):
    from transformers import AutoModelForCausalLM

    from ..arch import arch_of

    config = shape_config(shape)
    if config.get_text_config() is not config:
        raise ValueError(f"layerwise=True builds text-only shapes; {shape!r} has a vision tower: build it whole")
    std, offset = getattr(config, "initializer_range", 0.02), arch_of(config.model_type).norm_offset
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for i, layer in enumerate(model.model.layers):
        layer.to_empty(device=device)  # this layer's bf16 weights only
        _random_(layer, torch.Generator(device=device).manual_seed(seed * 100_003 + i), std, offset)
        _quantize_linears(layer, device, dtype)
    inner = model.model
    rest = [m for name, m in inner.named_children() if name not in ("layers", "rotary_emb")]
    if not config.tie_word_embeddings:
        rest.append(model.lm_head)
    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + len(inner.layers))
    for module in rest:
        module.to_empty(device=device)
        _random_(module, gen, std, offset)
    if config.tie_word_embeddings:
        model.tie_weights()
    # RoPE tables are buffers computed from the config, not weights: build the module again on the device
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)
    return _finish(model, device)
