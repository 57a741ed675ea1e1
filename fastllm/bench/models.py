"""Random-weight Llama-3-shaped QLoRA models built locally (no downloads) for benchmarks.

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
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama3_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       hidden_act="silu", attn_implementation="sdpa")


def build_qlora_base(shape: str, device: str | torch.device, *, dtype=torch.bfloat16, seed: int = 0,
                     load_in_4bit: bool = True):
    """A random LlamaForCausalLM of ``shape`` on ``device`` with NF4 double-quant decoder linears."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    device = torch.device(device)
    with device:
        model = LlamaForCausalLM._from_config(llama3_config(shape), dtype=dtype)
    if not load_in_4bit:
        return model
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                old = getattr(parent, name, None)
                if old is None:
                    continue
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=dtype,
                                        compress_statistics=True, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, compress_statistics=True,
                                               quant_type="nf4").to(device)
                new.support_avx512bf16_for_cpu = False  # see fastllm.loader._fix_bnb_cpu
                setattr(parent, name, new)
                del old
    model.is_loaded_in_4bit = True  # what transformers' bnb loader sets; PEFT reads it
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model
