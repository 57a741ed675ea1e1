"""Attention of one query token against a grouped-query KV cache, without repeating K and V.

With grouped-query attention each of ``kv`` key/value heads serves ``g = nq / kv`` query heads. transformers' eager
attention, and its SDPA attention when a mask is given (up to 5.2x), repeat K and V ``g`` times (``repeat_kv``): at
decode that copies the whole cache twice per layer, and attention then reads the ``g``-times larger copy. For one
query token the ``g`` query heads of a group can instead stand in the query-length slot of their key/value head::

    q (B, nq, 1, D) -> (B, kv, g, D);   out = softmax(q k^T * scale + mask) v   -> (B, kv, g, D) -> (B, 1, nq, D)

A mask shared by the heads, (B, 1, 1, S), broadcasts over the ``g`` rows as it did over the heads, so the sums are
the same ones SDPA takes with repeated K/V; no copy, and K/V are read once. ``grouped_decode_eager`` does the same
for transformers' eager attention maths (the architectures' ``eager_attention_forward``, with Gemma's optional logit
soft-cap ``tanh(w / cap) * cap``): scaled scores, soft-cap, additive mask, softmax in fp32 rounded back, times V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_decode_eager", "grouped_decode_fits", "grouped_decode_sdpa"]


def grouped_decode_fits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """q (B, nq, T, D), k (B, kv, S, D): one query token, several query heads a KV head, a mask (if any) shared by
    the heads and the query row."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != 1 or k.shape[1] >= q.shape[1] or q.shape[1] % k.shape[1]:
        return False
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)


def grouped_decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """q (B, nq, 1, D), k/v (B, kv, S, D), mask (B or 1, 1, 1, S) bool or additive -> (B, 1, nq, D), the layout
    transformers' attention interfaces return."""
    b, nq, _, d = q.shape
    kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, nq // kv, d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, 1, nq, v.shape[-1])


def grouped_decode_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                         softcap: float | None = None) -> torch.Tensor:
    """transformers' eager attention maths for one query token without repeating K/V: q (B, nq, 1, D), k/v
    (B, kv, S, D), mask (B or 1, 1, 1, S) additive or None -> (B, 1, nq, D)."""
    b, nq, _, d = q.shape
    kv = k.shape[1]
    w = torch.matmul(q.reshape(b, kv, nq // kv, d), k.transpose(2, 3)) * scale  # (B, kv, g, S)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).reshape(b, 1, nq, v.shape[-1])
