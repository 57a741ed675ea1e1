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


def test_the_cast_kernel_path_equals_torch_cat():
    """With Triton (the interpreter here, CUDA in use) adapters whose dtype differs from the compute dtype go
    through ``kernels.cast_cat`` in one launch; same buffer as ``torch.cat`` of the casts (fp16 exactly; bf16 within
    the interpreter's one-ulp truncation). A non-contiguous weight, or one dtype throughout, keeps ``torch.cat``."""
    import pytest

    from fastllm._compat import triton_usable

    if not triton_usable():
        pytest.skip("needs Triton (a GPU or TRITON_INTERPRET=1)")
    ws = (torch.randn(16, 96), torch.randn(160, 16), torch.randn(3, 7).to(torch.bfloat16), torch.randn(5, 16))
    for dtype, tol in ((torch.float16, 0), (torch.bfloat16, 2 ** -7)):
        with torch.no_grad():
            got, views = lora.cast_adapters(ws, dtype, backend="triton")
            want, _ = lora.cast_adapters(ws, dtype, backend="torch")
        torch.testing.assert_close(got, want, rtol=tol, atol=0)
        assert [v.shape for v in views] == [w.shape for w in ws]
    odd = (torch.randn(7, 4).t(), torch.randn(3))
    with torch.no_grad():
        flat, (t, _) = lora.cast_adapters(odd, torch.bfloat16, backend="triton")
    assert torch.equal(t, odd[0].bfloat16())
