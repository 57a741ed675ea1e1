"""TRL's fused LM-head protocol served by fastllm's loss forward, without the logits.

TRL (>= 1.16) trainers call ``model(..., labels=labels, fused_lm_head=True)`` and read per-token fields of a
``FusedCausalLMOutput`` (their ``add_fused_lm_head`` installs a forward that does it with TRL's own kernel, reading
``lm_head.weight`` alone). On a model carrying fastllm's ``loss`` patch the same call is answered here, through
fastllm's chunked ops: only one chunk of logits is ever alive, and a LoRA (or ``modules_to_save``) head is run as
a module so its delta counts and gets gradients. With ``z = h @ W.T / temperature`` (fp32 inside each chunk) at
every position whose next-token label ``y`` is not -100 (zero elsewhere)::

    log_probs         z[y] - logsumexp(z)                      (gradients)
    entropy           logsumexp(z) - sum_v softmax(z)_v z_v    (gradients)
    log_sum_sq_probs  logsumexp(2 z) - 2 logsumexp(z)          (no gradient)
    mean_logits       mean_v z_v                               (no gradient)
    is_top1           argmax_v z_v == y                        (bool)
    loss              -sum(log_probs) / (num_items_in_batch, or the count of labelled positions, at least 1)

Which fields are computed follows ``outputs`` of TRL's ``add_fused_lm_head`` call (``log_probs`` always), kept per
model by ``set_fused_head`` (``fastllm.patching.trl_routing`` routes TRL's call there).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn

from ..ops.chunked_linear_loss import chunked_linear_map, log_prob_entropy

IGNORE_INDEX = -100
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclasses.dataclass(frozen=True)
class FusedHead:
    """The arguments of TRL's ``add_fused_lm_head`` for one model."""

    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: tuple = ("log_probs",)


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> FusedHead (no attribute on the model)


def set_fused_head(model: nn.Module, head: FusedHead) -> None:
    unknown = set(head.outputs) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fused-head outputs {sorted(unknown)}; known: {FIELDS}")
    if head.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {head.temperature}")
    _HEADS[model] = head


def fused_head_of(model: nn.Module) -> FusedHead:
    return _HEADS.get(model, FusedHead())


def _fields_fn(temperature: float, fields: tuple):
    def fn(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # z (n, V) fp32, ids (n,)
        if temperature != 1.0:
            z = z / temperature
        logp, ent, lse = log_prob_entropy(z, ids, "entropy" in fields)
        cols = [logp] if ent is None else [logp, ent]
        with torch.no_grad():
            zd = z.detach()
            if "log_sum_sq_probs" in fields:
                cols.append(torch.logsumexp(2 * zd, dim=-1) - 2 * lse.detach())
            if "mean_logits" in fields:
                cols.append(zd.mean(-1))
            if "is_top1" in fields:
                cols.append((zd.argmax(-1) == ids).float())
        return torch.stack(cols, dim=-1)

    return fn


def fused_head_forward(model: nn.Module, input_ids, attention_mask, position_ids, inputs_embeds, labels,
                       kwargs: dict, *, head_map):
    """``model(..., labels, fused_lm_head=True)`` of a patched ``LlamaForCausalLM``: a ``FusedCausalLMOutput``.

    ``head_map(head, h [n, H], y [n], fn, vocab_size)`` runs ``fn`` over the head's fp32 logits per chunk (the
    loss patch's module-or-weight dispatch); ``kwargs`` may carry ``shift_labels`` (scored without shifting) and
    ``num_items_in_batch``; the rest goes to the backbone.
    """
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError as e:  # pragma: no cover - trl is a dependency
        raise ImportError("fused_lm_head=True is TRL's protocol: install trl (pip install trl)") from e
    cfg = fused_head_of(model)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    for k in ("return_dict", "use_cache", "logits_to_keep"):
        kwargs.pop(k, None)
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels (or shift_labels) to score")
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
    hidden = out.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    labels = labels.to(hidden.device)
    mask = labels != IGNORE_INDEX
    fields = ("log_probs",) + tuple(f for f in FIELDS[1:] if f in cfg.outputs)
    h = hidden[mask]
    if cfg.cast_lm_head_to_fp32:
        h = h.float()
    per = head_map(model.lm_head, h, labels[mask], _fields_fn(cfg.temperature, fields),
                   model.config.get_text_config().vocab_size,
                   fp32=cfg.cast_lm_head_to_fp32).reshape(-1, len(fields))
    # masked_scatter keeps an all-ignored batch connected to the graph: a differentiable zero, not an error
    full = {f: per.new_zeros(mask.shape).masked_scatter(mask, per[:, i]) for i, f in enumerate(fields)}
    if "is_top1" in full:
        full["is_top1"] = full["is_top1"].bool()
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -full["log_probs"].sum() / denom
    return FusedCausalLMOutput(loss=loss, label_mask=mask, **{f: full.get(f) for f in FIELDS})


def linear_head_map(weight: torch.Tensor, bias, h: torch.Tensor, y: torch.Tensor, fn, *, fp32: bool):
    """``head_map`` for a plain ``nn.Linear`` head: ``chunked_linear_map`` over its weight."""
    if not fp32:
        return chunked_linear_map(h, weight, y, fn, bias=bias)
    with torch.autocast(h.device.type, enabled=False):  # TRL's cast_lm_head_to_fp32: the projection in fp32
        return chunked_linear_map(h.float(), weight.float(), y, fn, bias=None if bias is None else bias.float())
