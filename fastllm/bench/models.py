"""Random-weight QLoRA models of real shapes (Llama 3, Qwen2.5, Qwen3, Mistral), built locally (no downloads), for
benchmarks.

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
    # CPU smoke shapes of the other architectures
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, vocab_size=512),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                       vocab_size=512),
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
    return AutoConfig.for_model(model_type, **{**defaults, **spec}, max_position_embeddings=8192,
                                attn_implementation="sdpa")



def build_qlora_base(shape: str, device: str | torch.device, *, dtype=torch.bfloat16, seed: int = 0,
                     load_in_4bit: bool = True):
    """A random causal LM of ``shape`` on ``device`` with NF4 double-quant decoder linears (biases kept)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    device = torch.device(device)
    with device:
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=dtype)
    if not load_in_4bit:
        return model
    for layer in model.model.layers:
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
    model.is_loaded_in_4bit = True  # what transformers' bnb loader sets; PEFT reads it
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model
