"""The loss forward of LlamaForCausalLM against transformers' own forward on tiny random models."""

import copy
import types

import pytest
import torch
from torch import nn

from fastllm.losses import focal_loss
from fastllm.modules.causal_lm import causal_lm_eligible, make_causal_lm_forward

transformers = pytest.importorskip("transformers")
VOCAB = 503


def _model(tied: bool) -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


def _batch(b=2, t=19):
    ids = torch.randint(0, VOCAB, (b, t))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return ids, labels


def _patched(model, loss="cross_entropy"):
    model.forward = types.MethodType(make_causal_lm_forward(loss), model)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
def test_training_loss_and_grads_match_eager(tied):
    eager = _model(tied).train()
    fast = _patched(copy.deepcopy(eager))
    assert fast.lm_head.weight is fast.model.embed_tokens.weight if tied else True
    ids, labels = _batch()
    ref = eager(input_ids=ids, labels=labels)
    out = fast(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    g_ref, g_fast = _grads(eager), _grads(fast)
    assert g_ref.keys() == g_fast.keys() and "lm_head.weight" in g_ref or tied
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_and_tuple_output():
    eager = _model(False).train()
    fast = _patched(copy.deepcopy(eager))
    ids, labels = _batch()
    ref = eager(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50))
    out = fast(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50), return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref.loss, rtol=1e-5, atol=1e-6)


def test_eval_generation_and_logits_to_keep_are_transformers():
    eager = _model(False).eval()
    fast = _patched(copy.deepcopy(eager)).eval()
    ids, labels = _batch()
    with torch.no_grad():
        ref, out = eager(input_ids=ids, labels=labels), fast(input_ids=ids, labels=labels)
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss)
        k_ref, k_out = eager(input_ids=ids, logits_to_keep=1), fast(input_ids=ids, logits_to_keep=1)
        assert k_out.logits.shape == (2, 1, VOCAB)
        torch.testing.assert_close(k_out.logits, k_ref.logits)
        gen_ref = eager.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
        gen_out = fast.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(gen_out, gen_ref)


def test_focal_and_callable_losses():
    eager = _model(False).train()
    ids, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)

    def ref_loss(loss_fn):
        h = eager.model(input_ids=ids).last_hidden_state.reshape(-1, 64)
        per = loss_fn(eager.lm_head(h).float(), shift)
        valid = shift != -100
        return (per * valid).sum() / valid.sum()

    fast = _patched(copy.deepcopy(eager), "focal")
    assert fast.forward.__func__._fastllm_loss == "focal"
    torch.testing.assert_close(fast(input_ids=ids, labels=labels).loss, ref_loss(focal_loss), rtol=1e-5, atol=1e-6)

    def squared_margin(logits, y):  # any per-token callable
        return (logits.logsumexp(-1) - logits.gather(-1, y.clamp_min(0)[:, None])[:, 0]).square()

    fast = _patched(copy.deepcopy(eager), squared_margin)
    assert fast.forward.__func__._fastllm_loss is squared_margin
    torch.testing.assert_close(fast(input_ids=ids, labels=labels).loss, ref_loss(squared_margin), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("where", ["lora", "modules_to_save"])
def test_peft_lm_head_delta_reaches_the_loss(where):
    peft = pytest.importorskip("peft")
    base = _model(False)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if where == "lora" else [])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                          modules_to_save=["lm_head"] if where == "modules_to_save" else None)
    eager = peft.get_peft_model(base, cfg)
    for n, p in eager.named_parameters():  # make the LoRA delta non-zero, so dropping it would show
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    if where == "modules_to_save":
        nn.init.normal_(eager.base_model.model.lm_head.modules_to_save["default"].weight, std=0.05)
    eager.train()
    fast = copy.deepcopy(eager)
    inner = fast.base_model.model
    inner.forward = types.MethodType(make_causal_lm_forward("cross_entropy"), inner)
    ids, labels = _batch()
    ref, out = eager(input_ids=ids, labels=labels), fast(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    g_ref, g_fast = _grads(eager), _grads(fast)
    head = [n for n in g_ref if "lm_head" in n]
    assert head, "the lm_head adapter/copy must get gradients"
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eligibility_and_unknown_loss():
    assert causal_lm_eligible(_model(False)) is None
    assert "not a causal LM class of fastllm's architecture table" in causal_lm_eligible(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown loss"):
        make_causal_lm_forward("hinge")


def test_twenty_training_steps_track_eager():
    """Loss curve and weights of 20 AdamW steps, patched vs eager, from the same seed and data."""
    eager = _model(False).train()
    fast = _patched(copy.deepcopy(eager))
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (eager, fast)]
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
        losses = []
        for model, opt in zip((eager, fast), opts):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4, msg=f"step {step}")
    torch.testing.assert_close(fast.lm_head.weight, eager.lm_head.weight, rtol=1e-3, atol=1e-4)
