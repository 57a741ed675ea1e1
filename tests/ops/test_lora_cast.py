"""``ops.lora.cast_adapters``: compute-dtype adapter copies, kept from a checkpointed forward for its recompute."""

import torch

from fastllm.ops import lora


def cast_adapters(params, dtype, cache=None):
    with torch.no_grad():  # as inside the autograd Functions that call it
        return lora.cast_adapters(params, dtype, cache)


def test_cast_matches_the_weights_and_is_fresh_by_default():
    A = torch.nn.Parameter(torch.randn(4, 6))
    B = torch.nn.Parameter(torch.randn(5, 4))
    flat, (a, b) = cast_adapters((A, B), torch.bfloat16)
    assert flat.dtype == torch.bfloat16 and flat.numel() == 44
    torch.testing.assert_close(a, A.detach().bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(b, B.detach().bfloat16(), rtol=0, atol=0)
    assert cast_adapters((A, B), torch.bfloat16)[0] is not flat


def test_a_stored_cast_serves_one_reuse_only():
    A = torch.nn.Parameter(torch.randn(4, 6))
    B = torch.nn.Parameter(torch.randn(5, 4))
    stored, _ = cast_adapters((A, B), torch.bfloat16, "store")   # a checkpointed layer's forward
    assert cast_adapters((A, B), torch.bfloat16, "reuse")[0] is stored  # its recompute: no new cast
    again, (_, b) = cast_adapters((A, B), torch.bfloat16, "reuse")    # taken once: a later one casts afresh
    assert again is not stored
    cast_adapters((A, B), torch.bfloat16, "store")
    assert cast_adapters((A, B), torch.float16, "reuse")[0].dtype == torch.float16  # another dtype: no hit
    cast_adapters((A, B), torch.bfloat16, "store")
    assert cast_adapters((B, A), torch.bfloat16, "reuse")[0].numel() == 44  # another group: its own entry


def test_fused_adamw_updates_weights_without_a_version_bump():
    """Why nothing is cached across optimizer steps: fused AdamW writes in place without moving the version
    counters, so a cache keyed on them would serve stale adapters."""
    p = torch.nn.Parameter(torch.randn(8))
    opt = torch.optim.AdamW([p], fused=True)
    p.grad = torch.randn(8)
    before = (p._version, p.detach().clone())
    opt.step()
    assert p._version == before[0] and not torch.equal(p.detach(), before[1])
