"""The grouped one-token attention against transformers' own attention functions (SDPA with repeated K/V, and
the eager maths) on odd shapes, with padding masks (bool and additive) and without a mask."""

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward

from fastllm.ops.decode_attention import grouped_decode_eager, grouped_decode_fits, grouped_decode_sdpa


class _Attn(torch.nn.Module):  # what transformers' attention functions read off the module
    def __init__(self, groups, head_dim=None):
        super().__init__()
        self.num_key_value_groups = groups
        self.head_dim = head_dim
        self.training = False


def _inputs(b, nq, kv, s, d, dtype, mask_kind):
    g = torch.Generator().manual_seed(nq * 100 + s)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype) for h, t in ((nq, 1), (kv, s), (kv, s)))
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
    for i in range(b):  # left padding, a different amount per row
        keep[i, ..., : (3 * i) % (s - 1)] = False
    if mask_kind == "bool":
        mask = keep
    elif mask_kind == "additive":
        mask = torch.zeros(b, 1, 1, s, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    else:
        mask = None
    return q, k, v, mask


@pytest.mark.parametrize("b,nq,kv,s,d", [(3, 12, 4, 37, 24), (1, 32, 8, 64, 128), (2, 6, 1, 5, 40)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", None])
def test_grouped_decode_matches_repeated_kv_sdpa_and_eager(b, nq, kv, s, d, mask_kind):
    q, k, v, mask = _inputs(b, nq, kv, s, d, torch.float32, mask_kind)
    scale = d ** -0.5
    assert grouped_decode_fits(q, k, mask)
    got = grouped_decode_sdpa(q, k, v, mask, scale)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, nq // kv), repeat_kv(v, nq // kv),
                                                           attn_mask=mask, scale=scale).transpose(1, 2)
    assert got.shape == (b, 1, nq, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if mask_kind != "bool":  # transformers' eager maths takes additive masks
        eager, _ = eager_attention_forward(_Attn(nq // kv), q, k, v, mask, scaling=scale)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b,nq,kv,s,d", [(3, 12, 4, 37, 24), (2, 16, 8, 64, 32)])
@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_eager_matches_transformers_eager(b, nq, kv, s, d, softcap, dtype):
    """transformers' two eager forms: Llama's (no soft-cap) and Gemma's (soft-cap or None)."""
    q, k, v, mask = _inputs(b, nq, kv, s, d, dtype, "additive")
    scale = d ** -0.5
    got = grouped_decode_eager(q, k, v, mask, scale, softcap)
    want, _ = gemma2_eager(_Attn(nq // kv, d), q, k, v, mask, scaling=scale, softcap=softcap)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    assert got.shape == want.shape == (b, 1, nq, d) and got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    if softcap is None:
        llama, _ = eager_attention_forward(_Attn(nq // kv), q, k, v, mask, scaling=scale)
        torch.testing.assert_close(got, llama, **tol)


def test_grouped_decode_bf16_within_rounding_of_fp32():
    q, k, v, mask = _inputs(2, 12, 4, 33, 64, torch.bfloat16, "bool")
    got = grouped_decode_sdpa(q, k, v, mask, 0.125)
    ref = grouped_decode_sdpa(q.float(), k.float(), v.float(), mask, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_grouped_decode_fits_only_one_token_grouped_heads_and_shared_masks():
    q, k, _, mask = _inputs(2, 12, 4, 9, 16, torch.float32, "bool")
    assert grouped_decode_fits(q, k, mask)
    assert not grouped_decode_fits(torch.randn(2, 12, 3, 16), k, None)  # a prefill
    assert not grouped_decode_fits(q, torch.randn(2, 12, 9, 16), None)  # no grouping (MHA)
    assert not grouped_decode_fits(q, torch.randn(2, 5, 9, 16), None)  # heads not a multiple
    assert not grouped_decode_fits(q, k, mask.expand(2, 12, 1, 9))  # a mask per head
