"""Replacement causal-LM ``forward`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...: one upstream form) that
computes the training loss without the logits.

In training with labels (``self.training``, ``labels`` given, all positions kept) the shifted
next-token loss is computed **inside** the forward from the last hidden states, chunk by chunk
(so FSDP2's root all-gather of ``lm_head.weight`` covers it), and ``logits`` is ``None``. In every
other case (eval, generation, ``logits_to_keep``, no labels) the class's own forward runs
unchanged, so behaviour there is exactly transformers'.

Where the head's weight can be used directly (a plain ``nn.Linear``, tied to the embeddings or
not) the loss runs through ``fastllm.ops``: the fused kernel for cross-entropy, the autograd-per-
chunk op for other per-token losses. Any other head (a PEFT LoRA layer, a ``modules_to_save``
wrapper, a quantized layer) is called as a module on row chunks under non-reentrant activation
checkpointing: the adapter's delta reaches the loss and gets its gradients, and each chunk's logits
are rebuilt in backward instead of kept. (Liger's fused loss reads ``lm_head.weight`` alone and so
drops a LoRA delta on the head: TRL issue #6159.)

The patch registry binds the returned function per instance with ``types.MethodType``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._compat import SUPPORTED_MODEL_TYPES
from ..losses import get_loss
from ..ops.chunked_linear_loss import chunked_linear_loss
from ..ops.linear_cross_entropy import auto_chunk_size, linear_cross_entropy, row_chunks
from .fused_head import fused_head_forward, linear_head_map

IGNORE_INDEX = -100


@functools.cache
def _output_cache_field() -> str:
    """transformers >= 5.2x names the cache output ``cache``; earlier 5.x ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def _plain_linear(module: nn.Module) -> nn.Linear | None:
    """The head itself when its forward is exactly ``nn.Linear.forward`` (weight usable directly)."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and "forward" not in vars(module):
        return module
    return None


def _chunk_map(head: nn.Module, fn: Callable, h_c: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
    return fn(head(h_c).float(), y_c)  # fp32 upcast inside the chunk


def module_chunked_map(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, fn: Callable, *,
                       vocab_size: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """``fn(head(h).float(), y)`` per token (``[N]`` or ``[N, k]``) for ``hidden [N, H]``, ``labels [N]``.

    Runs the head *module* (a PEFT LoRA layer, a ``modules_to_save`` wrapper: its adapter's delta counts and
    gets gradients) on row chunks, each under non-reentrant checkpointing, so only one chunk's logits is alive
    in forward and in backward. A trainable full-size head weight gets one ``[V, H]`` gradient per chunk.
    """
    vocab = vocab_size or getattr(head, "out_features", None) or hidden.shape[-1]
    chunk = chunk_size or auto_chunk_size(hidden.shape[0], hidden.shape[1], vocab, hidden.dtype, hidden.device)
    outs = [checkpoint(_chunk_map, head, fn, hidden[s:e], labels[s:e], use_reentrant=False)
            for s, e in row_chunks(hidden.shape[0], chunk)]
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def module_chunked_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, fn: Callable, *,
                        ignore_index: int = IGNORE_INDEX, num_items_in_batch=None, vocab_size: int | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Mean (or sum / ``num_items_in_batch``) of ``fn(head(h).float(), y)`` over non-ignored tokens
    (``module_chunked_map``'s memory behaviour)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    losses = module_chunked_map(head, hidden, safe, fn, vocab_size=vocab_size, chunk_size=chunk_size)
    total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=total.device)
    else:
        denom = valid.sum().float()
    return total / denom.clamp_min(1)


def _capped(fn: Callable, cap: float | None) -> Callable:
    """``fn`` of the soft-capped logits ``cap * tanh(z / cap)`` (Gemma's ``final_logit_softcapping``), or ``fn``."""
    if not cap:
        return fn
    return lambda z, y: fn(cap * torch.tanh(z / cap), y)


def _head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, loss, num_items,
               vocab_size: int, softcap: float | None = None) -> torch.Tensor:
    """Loss of ``hidden [N, H]`` against ``labels [N]`` through ``head`` (logits soft-capped by ``softcap``), by the
    best path it allows."""
    linear = _plain_linear(head)
    if linear is not None and loss == "cross_entropy":
        return linear_cross_entropy(hidden, linear.weight, labels, bias=linear.bias, ignore_index=IGNORE_INDEX,
                                    num_items_in_batch=num_items, logit_softcap=softcap or None)
    fn = _capped(get_loss(loss), softcap)
    if linear is not None:
        return chunked_linear_loss(hidden, linear.weight, labels, fn, bias=linear.bias, ignore_index=IGNORE_INDEX,
                                   num_items_in_batch=num_items)
    return module_chunked_loss(head, hidden, labels, fn, ignore_index=IGNORE_INDEX, num_items_in_batch=num_items,
                               vocab_size=vocab_size)


def _head_map(head: nn.Module, h: torch.Tensor, y: torch.Tensor, fn: Callable, vocab_size: int, *,
              fp32: bool = False, softcap: float | None = None) -> torch.Tensor:
    """Per-token ``fn`` of the head's fp32 (soft-capped) logits by the best path the head allows (see
    ``_head_loss``)."""
    fn = _capped(fn, softcap)
    linear = _plain_linear(head)
    if linear is not None:
        return linear_head_map(linear.weight, linear.bias, h, y, fn, fp32=fp32)
    if fp32:
        raise ValueError("cast_lm_head_to_fp32=True with a wrapped lm_head (LoRA, modules_to_save) is not "
                         "supported; pass cast_lm_head_to_fp32=False")
    return module_chunked_map(head, h, y, fn, vocab_size=vocab_size)


def _softcap_of(model) -> float | None:
    """The final-logit soft-cap the class's own forward applies: the config's where the table says it reads one."""
    from ..arch import arch_of_module

    arch = arch_of_module(model, "causal_lm")
    if arch is None or not arch.logit_softcap:
        return None
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None) or None


def _keeps_all(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def make_causal_lm_forward(loss: str | Callable = "cross_entropy", like: Callable | None = None) -> Callable:
    """A causal-LM ``forward`` replacement whose training loss is ``loss``.

    ``loss``: ``"cross_entropy"``, ``"focal"`` or a per-token callable
    ``(logits_fp32 [n, V], labels [n]) -> [n]``; ``like``: the class's own forward, whose signature the
    replacement shows (it passes every argument on). The function carries ``_fastllm_loss = loss``.
    """
    get_loss(loss)  # fail now, at patch time, on an unknown name

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        if kwargs.pop("fused_lm_head", False):  # TRL's protocol (trainers that score per-token log-probs)
            return fused_head_forward(self, input_ids, attention_mask, position_ids, inputs_embeds, labels, kwargs,
                                      head_map=functools.partial(_head_map, softcap=_softcap_of(self)))
        if not (self.training and labels is not None and _keeps_all(logits_to_keep)):
            # The class's own forward (the patch is per instance): eval, generation, logits_to_keep.
            return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                                      use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        # Cache arguments (`cache` / `past_key_values`, by transformers version) travel in kwargs.
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state  # (B, T, H)
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:
            # tokens < n predict n: pad one ignored label at the end and drop the first
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(hidden.device)
        value = _head_loss(self.lm_head, hidden.reshape(-1, hidden.shape[-1]), shift_labels, loss,
                           kwargs.get("num_items_in_batch"), self.config.get_text_config().vocab_size,
                           _softcap_of(self))
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(loss=value, logits=None, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions,
                                     **{_output_cache_field(): getattr(outputs, _output_cache_field(), None)})
        return out if return_dict else out.to_tuple()

    forward._fastllm_loss = loss
    if like is not None:
        forward.__signature__ = inspect.signature(like)
    return forward


def causal_lm_eligible(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the loss forward, or None when it can."""
    from ..arch import arch_of_module

    if arch_of_module(model, "causal_lm") is None:
        return f"{type(model).__name__} is not a causal LM class of fastllm's architecture table"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return "model has no lm_head module"
    return None
