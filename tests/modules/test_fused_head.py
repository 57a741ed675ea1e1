"""TRL's fused LM-head protocol (``model(..., fused_lm_head=True)``) served by fastllm's loss forward, against
the fields computed from transformers' own materialised logits, and TRL's ``add_fused_lm_head`` routing."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig, eager, unpatch
from fastllm.modules.fused_head import FIELDS

trl_utils = pytest.importorskip("trl.trainer.utils")


def _model(path, targets=None):
    model, _ = FastLlama.from_pretrained(path, dtype=torch.float32, patch=PatchConfig(loss=True))
    torch.manual_seed(0)
    kw = {} if targets is None else {"target_modules": targets}
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16, **kw)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so every adapter shows in outputs and gradients
            torch.nn.init.normal_(p, std=0.05)
    return model


def _reference(model, ids, labels, temperature, num_items=None, backward=False):
    """The protocol's fields from the full logits of the unpatched (eager) model, fp32 (and the loss's backward
    run there too: a checkpointed forward must recompute under the same patches)."""
    with eager(model):
        fields, loss = _fields(model(input_ids=ids).logits, labels, temperature, num_items)
        if backward:
            loss.backward()
    return fields, loss


def _fields(logits, labels, temperature, num_items):
    z = logits[:, :-1].float() / temperature
    y = labels[:, 1:]
    mask = y != -100
    safe = torch.where(mask, y, torch.zeros_like(y))
    lse = torch.logsumexp(z, -1)
    fields = {
        "log_probs": z.gather(-1, safe[..., None]).squeeze(-1) - lse,
        "entropy": lse - (torch.softmax(z, -1) * z).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * z, -1) - 2 * lse,
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == safe,
    }
    fields = {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in fields.items()}
    denom = mask.sum().clamp(min=1) if num_items is None else num_items
    return fields, -fields["log_probs"].sum() / denom


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets,temperature", [(None, 1.0), (["q_proj", "v_proj", "lm_head"], 0.7)])
def test_fused_head_matches_materialised_logits(tiny_llama_dir, targets, temperature):
    """All five fields and the loss's LoRA grads, with a LoRA adapter on lm_head too (its delta must count:
    a head that reads lm_head.weight alone drops it)."""
    model = _model(tiny_llama_dir, targets)
    base = model.get_base_model()
    assert trl_utils.add_fused_lm_head._fastllm_original is not None  # routed when the loss patch applied
    forward = base.__dict__["forward"]
    trl_utils.add_fused_lm_head(base, temperature=temperature, outputs=FIELDS)
    assert base.__dict__["forward"] is forward  # fastllm's loss forward stays
    model.train()
    ids = torch.randint(0, 320, (2, 19))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 11:] = -100
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert "logits" not in out  # the protocol's output has per-token fields only
    out.loss.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    want, want_loss = _reference(model, ids, labels, temperature, backward=True)
    ref = _grads(model)
    assert out.label_mask.equal(labels[:, 1:] != -100)
    for f in FIELDS:
        if f == "is_top1":
            assert out.is_top1.dtype == torch.bool and out.is_top1.equal(want[f])
        else:
            torch.testing.assert_close(getattr(out, f), want[f], rtol=1e-5, atol=1e-5, msg=f)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-6, atol=1e-6)
    assert sorted(got) == sorted(ref) and len(got) > 0
    if targets is not None:
        assert any("lm_head" in n for n in got)
    for n in got:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_head_num_items_and_all_ignored(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    base = model.get_base_model()
    trl_utils.add_fused_lm_head(base)  # log_probs only
    ids = torch.randint(0, 320, (2, 9))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True, num_items_in_batch=40)
    assert out.entropy is None and out.is_top1 is None
    _, want = _reference(model, ids, ids, 1.0, num_items=40)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    ignored = torch.full_like(ids, -100)
    out = model(input_ids=ids, labels=ignored, fused_lm_head=True)
    out.loss.backward()  # a differentiable zero: no error, finite zero grads
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_unpatched_models_get_trls_own_head(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    base = model.get_base_model()
    unpatch(model)
    assert "forward" not in base.__dict__
    trl_utils.add_fused_lm_head(base)  # routed to TRL's own function: it installs its forward
    assert base.__dict__["forward"].__func__.__code__.co_name == "_fused_forward"  # TRL's, under functools.wraps


def test_routing_rebinds_imported_trainer_modules_and_unroutes(tiny_llama_dir):
    import trl.trainer.grpo_trainer as grpo
    import trl.trainer.sft_trainer as sft

    from fastllm.patching.trl_routing import route_fused_lm_head, unroute_fused_lm_head

    _model(tiny_llama_dir)  # patching with the loss patch installs the routing
    routed = trl_utils.add_fused_lm_head
    assert routed._fastllm_original is not None
    assert sft.add_fused_lm_head is routed and grpo.add_fused_lm_head is routed
    unroute_fused_lm_head()
    assert sft.add_fused_lm_head is routed._fastllm_original is trl_utils.add_fused_lm_head
    assert route_fused_lm_head()
    assert sft.add_fused_lm_head is trl_utils.add_fused_lm_head is not routed._fastllm_original


def test_routing_is_held_by_patched_models_and_removed_with_the_last(tiny_llama_dir):
    """The routing is process-wide and reference-counted: installed with the first patched model, removed by
    ``unpatch`` of the last, so unpatching every model leaves TRL exactly as it was."""
    import trl.trainer.sft_trainer as sft

    from fastllm.patching import trl_routing

    unpatch()  # models of earlier tests
    original = trl_utils.add_fused_lm_head
    assert getattr(original, "_fastllm_original", None) is None and trl_routing.routing_users() == 0
    a, b = _model(tiny_llama_dir), _model(tiny_llama_dir)
    assert trl_routing.routing_users() == 2 and trl_utils.add_fused_lm_head._fastllm_original is original
    unpatch(a)
    assert trl_routing.routing_users() == 1 and sft.add_fused_lm_head is trl_utils.add_fused_lm_head is not original
    unpatch(b)
    assert trl_routing.routing_users() == 0
    assert trl_utils.add_fused_lm_head is original and sft.add_fused_lm_head is original


def test_a_broken_trl_install_does_not_break_loading(tiny_llama_dir, monkeypatch, caplog):
    """trl present but not importable (a dependency missing): patching and loading go on, logged once."""
    import sys

    from fastllm.patching import trl_routing

    unpatch()
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # import raises ImportError
    monkeypatch.setattr(trl_routing, "_IMPORT_ERROR", None)
    with caplog.at_level("WARNING", logger="fastllm"):
        model, _ = FastLlama.from_pretrained(tiny_llama_dir, dtype=torch.float32, patch=PatchConfig(loss=True))
        FastLlama.from_pretrained(tiny_llama_dir, dtype=torch.float32, patch=PatchConfig(loss=True))
    assert caplog.text.count("does not import") == 1
    assert trl_routing.routing_users() == 0
    x = torch.randint(0, 320, (1, 7))
    assert torch.isfinite(model(input_ids=x, labels=x).loss)
