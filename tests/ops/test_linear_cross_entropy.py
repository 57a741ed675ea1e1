"""linear_cross_entropy / chunked_linear_loss / linear_log_probs against materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from fastllm.losses import cross_entropy, focal_loss
from fastllm.ops.chunked_linear_loss import chunked_linear_loss, linear_log_probs
from fastllm.ops.linear_cross_entropy import auto_chunk_size, linear_cross_entropy

# Real kernels on a GPU machine; on the CPU, "triton" runs through the interpreter (conftest).
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# dtype -> (rtol, atol) for loss / grads against the fp32-upcast materialised reference
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(n=37, hidden=48, vocab=1001, dtype=torch.float32, bias=False, device=DEV):
    h = torch.randn(n, hidden, device=device).to(dtype).requires_grad_(True)
    W = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(vocab, device=device) * 0.1).to(dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, vocab, (n,), device=device)
    y[torch.randperm(n, device=device)[: n // 4]] = -100
    return h, W, b, y


def _reference(h, W, b, y, reduction="mean", label_smoothing=0.0, z_loss=0.0, logit_softcap=None,
               num_items_in_batch=None):
    z = (h @ W.t() + (b if b is not None else 0)).float()  # transformers: matmul dtype, then upcast
    if logit_softcap:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    per = F.cross_entropy(z, y, reduction="none", ignore_index=-100, label_smoothing=label_smoothing)
    per = per + z_loss * torch.logsumexp(z, -1).square() * (y != -100)
    if num_items_in_batch is not None:
        return per.sum() / num_items_in_batch
    return {"none": per, "sum": per.sum(), "mean": per.sum() / (y != -100).sum()}[reduction]


def _check(out, ref, params, tol):
    rtol, atol = tol
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    g = torch.randn_like(out) if out.dim() else torch.tensor(1.7, device=out.device)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a.float(), b_.float(), rtol=rtol, atol=atol)


OPTIONS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1), dict(z_loss=1e-3),
           dict(logit_softcap=2.0), dict(num_items_in_batch=40),
           dict(label_smoothing=0.2, z_loss=1e-2, logit_softcap=3.0, reduction="sum")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "mean")
def test_matches_materialised(backend, opts):
    h, W, b, y = _inputs(bias=backend == "torch")
    params = [p for p in (h, W, b) if p is not None]
    out = linear_cross_entropy(h, W, y, bias=b, chunk_size=16, backend=backend, **opts)  # 16 does not divide 37
    _check(out, _reference(h, W, b, y, **opts), params, TOL[torch.float32])


@pytest.mark.parametrize("dtype,backend", [(torch.float16, "triton"), (torch.bfloat16, "torch"),
                                           (torch.bfloat16, "triton")])
def test_low_precision(dtype, backend):
    h, W, b, y = _inputs(dtype=dtype)
    out = linear_cross_entropy(h, W, y, chunk_size=8, backend=backend, label_smoothing=0.1)
    _check(out, _reference(h, W, b, y, label_smoothing=0.1), [h, W], TOL[dtype])


def test_weight_grad_off_batched_shape_and_odd_vocab():
    h, W, _, y = _inputs(n=10, hidden=16, vocab=50257)
    W.requires_grad_(False)
    h3, y3 = h.reshape(2, 5, 16), y.reshape(2, 5)
    out = linear_cross_entropy(h3, W, y3, reduction="none", chunk_size=3, backend="triton")
    assert out.shape == (2, 5)
    _check(out, _reference(h, W, None, y, reduction="none").reshape(2, 5), [h], TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_is_zero_with_zero_grads(backend):
    h, W, _, y = _inputs(n=9)
    y[:] = -100
    out = linear_cross_entropy(h, W, y, chunk_size=4, backend=backend)
    gh, gW = torch.autograd.grad(out, [h, W])
    assert out.item() == 0.0
    for g in (gh, gW):
        assert torch.isfinite(g).all() and not g.any()
    assert chunked_linear_loss(h, W, y, focal_loss, chunk_size=4).item() == 0.0


def test_auto_chunk_size():
    assert auto_chunk_size(16384, 4096, 128256, torch.bfloat16, torch.device("cpu")) == 512
    assert auto_chunk_size(10, 48, 1001, torch.float32, torch.device(DEV)) == 10
    h, W, _, y = _inputs()
    torch.testing.assert_close(linear_cross_entropy(h, W, y), _reference(h, W, None, y))


def test_allocatable_bytes_counts_cached_blocks_and_keeps_the_process_cap():
    """What the loss chunks and the dense decode copies are sized against (``_compat.cuda_allocatable``)."""
    from fastllm._compat import allocatable_bytes

    gib = 1 << 30
    # a whole 80 GiB card, 10 GiB allocated of 12 reserved, 60 free: the 2 cached GiB count too
    assert allocatable_bytes(60 * gib, 80 * gib, 1.0, 12 * gib, 10 * gib) == 62 * gib
    # the same card capped at 0.3 (24 GiB): 14 GiB more, whatever the device has free
    assert allocatable_bytes(60 * gib, 80 * gib, 0.3, 12 * gib, 10 * gib) == int(0.3 * 80 * gib) - 10 * gib
    # another process holds most of the card: its free memory bounds us under the cap too
    assert allocatable_bytes(1 * gib, 80 * gib, 0.3, 12 * gib, 10 * gib) == 3 * gib
    # reserved past a cap set afterwards: only the cached blocks, never a negative count
    assert allocatable_bytes(50 * gib, 80 * gib, 0.1, 12 * gib, 10 * gib) == 2 * gib


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_through_chunked_linear_loss(reduction):
    h, W, b, y = _inputs(bias=True)
    out = chunked_linear_loss(h, W, y, focal_loss, bias=b, reduction=reduction, chunk_size=10)
    per = focal_loss((h @ W.t() + b).float(), y)
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / (y != -100).sum()}[reduction]
    _check(out, ref, [h, W, b], TOL[torch.float32])


def test_chunked_linear_loss_cross_entropy_and_num_items():
    h, W, _, y = _inputs()
    out = chunked_linear_loss(h, W, y, cross_entropy, num_items_in_batch=50, chunk_size=7)
    _check(out, _reference(h, W, None, y, num_items_in_batch=50), [h, W], TOL[torch.float32])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_log_probs(temperature):
    h, W, _, _ = _inputs(n=12, vocab=501)
    ids = torch.randint(0, 501, (3, 4), device=DEV)
    h3 = h.reshape(3, 4, 48)
    logp, ent = linear_log_probs(h3, W, ids, temperature=temperature, chunk_size=5, return_entropy=True)
    ref_lp = torch.log_softmax((h3 @ W.t()).float() / temperature, -1)
    ref = ref_lp.gather(-1, ids[..., None])[..., 0]
    ref_ent = -(ref_lp.exp() * ref_lp).sum(-1)
    torch.testing.assert_close(logp, ref)
    torch.testing.assert_close(ent, ref_ent)
    g1, g2 = torch.randn_like(logp), torch.randn_like(ent)
    got = torch.autograd.grad((logp * g1).sum() + (ent * g2).sum(), [h, W])
    want = torch.autograd.grad((ref * g1).sum() + (ref_ent * g2).sum(), [h, W])
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_)
    only = linear_log_probs(h3, W, ids, temperature=temperature)
    torch.testing.assert_close(only, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("w_grad", [False, True])
def test_gpu_bf16_matches_and_is_lighter(w_grad):
    torch.cuda.empty_cache()
    h, W, _, y = _inputs(n=2048, hidden=1024, vocab=32000, dtype=torch.bfloat16, device="cuda")
    W.requires_grad_(w_grad)
    params = [h, W] if w_grad else [h]
    ref = _reference(h, W, None, y, z_loss=1e-4)
    out = linear_cross_entropy(h, W, y, z_loss=1e-4)
    got, want = torch.autograd.grad(out, params), torch.autograd.grad(ref, params)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a.float(), b_.float(), rtol=2e-2, atol=2e-3)
    del got, want, ref
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(h, W, y).backward()
    logits_bytes = 2048 * 32000 * 4
    assert torch.cuda.max_memory_allocated() - base < logits_bytes / 2


def test_second_backward_is_a_clear_error():
    """The fused loss computes its gradients in forward and scales them in place in backward: one backward per
    forward, and a second one says so (instead of autograd's in-place version error)."""
    h, W, _, y = _inputs()
    loss = linear_cross_entropy(h, W, y, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
