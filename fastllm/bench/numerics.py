"""Decode numerics: how far a provider's generation logits are from transformers' eager ones, next to the floor.

Teacher forcing keeps every provider on the same tokens: eager greedy-decodes ``steps`` tokens once (dynamic
cache, the reference); each provider then runs ``generate`` over the same prompt with a logits processor that
forces those tokens, so its decode path (static cache, CUDA graphs, fused ops) runs exactly as a user's call does,
and its raw logits are compared step by step:

    rel_err  = mean_t ||l_t - ref_t||_2 / ||ref_t||_2         (fp32)
    argmax   = mean_t [argmax l_t == argmax ref_t]

The noise floor is transformers' own: eager over a static cache against eager over the dynamic one (different
attention kernels and cache layouts, the same maths). A provider within ~1.3x of the floor adds no error of its
own beyond such kernel differences.

Providers: ``eager``, ``eager+static`` (the floor), ``fastllm`` and ``fastllm:<option>=<value>,...`` (PatchConfig
options, ``true``/``false``/``none``), e.g. ``fastllm:lora=false`` to find which patch moves the logits.
"""

from __future__ import annotations

import torch

from ..config import PatchConfig

_VALUES = {"true": True, "false": False, "none": None}


def provider_config(provider: str) -> PatchConfig | None:
    """None for the eager providers; the PatchConfig a ``fastllm[:k=v,...]`` provider names."""
    name, _, opts = provider.partition(":")
    if name.startswith("eager"):
        return None
    if name != "fastllm":
        raise ValueError(f"unknown numerics provider {provider!r}: eager, eager+static, fastllm[:option=value,...]")
    kw = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        kw[key] = _VALUES.get(value.lower(), value)
    return PatchConfig(gradient_checkpointing=True, **kw)


class _Force:
    """A logits processor that forces ``tokens`` (one per decode step) after a prompt of ``start`` tokens."""

    def __init__(self, tokens: torch.Tensor, start: int):
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def _generate_logits(model, x: torch.Tensor, tokens: torch.Tensor | None, steps: int, static: bool,
                     autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (steps,), logits (steps, V) fp32) of a greedy or teacher-forced generate."""
    from transformers import LogitsProcessorList

    gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True,
               output_logits=True, return_dict_in_generate=True)
    if static:
        gen["cache_implementation"] = "static"
    if tokens is not None:
        gen["logits_processor"] = LogitsProcessorList([_Force(tokens, x.shape[1])])
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else torch.autocast(
        x.device.type, enabled=False)
    with torch.no_grad(), ctx:
        out = model.generate(input_ids=x, **gen)
    logits = torch.stack([lg[0].float() for lg in out.logits])
    return out.sequences[0, x.shape[1]:], logits


def init_lora_b(model, std: float = 0.02, seed: int = 1) -> None:
    """Every LoRA B ~ N(0, std) from a fixed CPU generator (PEFT starts B at zero, where adapters do nothing)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    rel = (logits - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    agree = (logits.argmax(-1) == ref.argmax(-1)).float()
    return {"rel_err": rel.mean().item(), "rel_err_max": rel.max().item(), "argmax_agree": agree.mean().item()}


def teacher_forced(model, providers, *, prompt: int, steps: int, seed: int = 0,
                   autocast: torch.dtype | None = torch.bfloat16) -> dict[str, dict]:
    """Per provider, its logits against eager's over the same forced tokens (see the module docstring)."""
    from ..patching.api import patch, unpatch

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, model.config.get_text_config().vocab_size, (1, prompt), generator=g).to(device)
    model.eval()
    unpatch(model)
    tokens, ref = _generate_logits(model, x, None, steps, False, autocast)
    rows = {}
    for provider in providers:
        cfg = provider_config(provider)
        unpatch(model)
        if cfg is not None:
            patch(model, cfg)
        model.eval()
        _, logits = _generate_logits(model, x, tokens, steps, provider == "eager+static", autocast)
        rows[provider] = compare(logits, ref)
    unpatch(model)
    floor = rows.get("eager+static", {}).get("rel_err")
    for row in rows.values():
        if floor:
            row["vs_floor"] = row["rel_err"] / floor
    return rows
