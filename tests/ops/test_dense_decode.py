"""``ops.dense_decode``: dense copies of the 4-bit weights for the length of a ``generate`` call. On the CPU: the
copies equal the workspace dequant, are made once a scope and only without grad, are dropped (with an epoch bump)
at the scope's end, count as workspace buffers for graphs, and a copy without room keeps the 4-bit path; a 4-bit
model generates the same tokens with them."""

import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fastllm.ops import dense_decode, nf4  # noqa: E402
from fastllm.ops.nf4 import plain_tensor, stacked_dequant, state_args, workspace_buffers, workspace_epoch  # noqa: E402


def _weights():
    out = []
    for n, seed in ((96, 0), (32, 1), (32, 2)):  # q/k/v-like: one in_features, stacked along dim 0
        w = torch.randn(n, 128, generator=torch.Generator().manual_seed(seed)) * 0.05
        p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64)
        p = p.to("cpu")
        out.append((plain_tensor(p), state_args(p.quant_state)))
    return [w for w, _ in out], [st for _, st in out]


@pytest.fixture
def switched_on():
    dense_decode.set_enabled(True)
    dense_decode.stats.clear()
    yield
    dense_decode.set_enabled(None)


def _stacked(weights, states):
    return stacked_dequant(weights, states, torch.device("cpu"), torch.float32, "torch")


def test_off_by_default_and_outside_a_scope():
    weights, states = _weights()
    assert not dense_decode.enabled()
    with dense_decode.scope() as dense, torch.no_grad():
        assert dense is False and not dense_decode.active()
        w = _stacked(weights, states)
    assert any(w.data_ptr() == b.data_ptr() for b in workspace_buffers())  # the shared workspace


def test_copies_made_once_per_scope_without_grad_and_dropped_after(switched_on, monkeypatch):
    weights, states = _weights()
    want = _stacked(weights, states).clone()  # outside a scope: the workspace
    calls = []
    real = nf4._dequant_into
    monkeypatch.setattr(nf4, "_dequant_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    e0 = workspace_epoch()
    with dense_decode.scope() as dense:
        assert dense and dense_decode.active()
        with torch.no_grad():
            first = _stacked(weights, states)
            n = len(calls)
            again = _stacked(weights, states)
        assert again is first and len(calls) == n == 3  # three weights dequantized once, then reused
        torch.testing.assert_close(first, want, rtol=0, atol=0)
        assert any(first is b for b in workspace_buffers()) and workspace_epoch() > e0
        assert not nf4.bnb_gemv_ok(weights[0], states[0][2], 64, 256, states[0][7])  # one row: the copy's GEMM
        with torch.enable_grad():  # training inside a generate (never in practice): the workspace as before
            assert _stacked(weights, states) is not first
        inner_epoch = workspace_epoch()
    assert not dense_decode.active() and dense_decode.buffers() == () and workspace_epoch() > inner_epoch
    assert dense_decode.stats["copies"] == 1


def test_nested_scopes_keep_copies_until_the_outer_one_ends(switched_on):
    weights, states = _weights()
    with dense_decode.scope(), torch.no_grad():
        with dense_decode.scope():
            first = _stacked(weights, states)
        assert _stacked(weights, states) is first
    assert dense_decode.buffers() == ()


def test_no_room_keeps_the_4bit_path_counted_and_logged_once(switched_on, monkeypatch, caplog):
    weights, states = _weights()
    monkeypatch.setattr(dense_decode, "_room", lambda nbytes, device: False)
    with caplog.at_level(logging.WARNING, logger="fastllm.ops.dense_decode"), dense_decode.scope(), torch.no_grad():
        a = _stacked(weights, states)
        b = _stacked(weights[:1], states[:1])
    assert dense_decode.buffers() == () and dense_decode.stats["no room"] == 2
    assert sum("no room" in r.message for r in caplog.records) == 1
    assert any(a.data_ptr() == w.data_ptr() for w in workspace_buffers()) and b.data_ptr() == a.data_ptr()


def test_a_4bit_model_generates_the_same_tokens_with_dense_copies(tiny_llama_i128_dir, switched_on):
    from fastllm import FastLlama, PatchConfig

    model, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.float32, max_seq_length=256,
                                         patch=PatchConfig(lora=True, nf4_linear=True))
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(3))
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(input_ids=x, **gen)
        with dense_decode.scope():
            out = model.generate(input_ids=x, **gen)
            groups = len(dense_decode.buffers())
    assert groups == 2 * 4  # per layer: q/k/v, o, gate/up, down; made once, reused by every later step
    assert dense_decode.stats["copies"] == groups
    torch.testing.assert_close(out.sequences, ref.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
