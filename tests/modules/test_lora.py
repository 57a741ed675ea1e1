"""The fused QLoRA linear (``fastllm.ops.lora_nf4_linear``) and its patch of PEFT's ``lora.Linear4bit``,
against the dense maths and against PEFT + bitsandbytes themselves."""

import pytest
import torch

from fastllm import FastLlama, PatchConfig, eager, patch_report, unpatch
from fastllm.ops import dequantize_nf4
from fastllm.ops import lora as lora_ops


def _params4bit(n, k, seed=0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                             blocksize=64).to("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 128, 96, 8), (1, 5, 192, 200, 16)])  # (batch, seq, K, N, r)
def test_fused_op_matches_dense_maths(dtype, shape):
    b, t, k, n, r = shape
    weight = _params4bit(n, k)
    w = dequantize_nf4(weight.data, weight.quant_state, backend="torch").float()  # (N, K)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(b, t, k, generator=g) * 0.5).to(dtype)
    A = torch.randn(r, k, generator=g) * 0.1   # fp32 masters, as PEFT keeps them
    B = torch.randn(n, r, generator=g) * 0.1
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    dy = torch.randn(b, t, n, generator=g).to(dtype)

    leaves = [x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_(),
              bias.clone().requires_grad_()]
    y = lora_ops.lora_nf4_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, leaves[3], backend="torch")
    y.backward(dy)
    ref = [x.float().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_(),
           bias.float().requires_grad_()]
    y_ref = ref[0] @ w.t() + ref[3] + 2.0 * (ref[0] @ ref[1].t()) @ ref[2].t()
    y_ref.backward(dy.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert y.dtype == dtype and y.shape == (b, t, n)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    for got, want, name in zip(leaves, ref, ["x", "A", "B", "bias"]):
        assert got.grad.dtype == got.dtype, name  # fp32 masters get fp32 grads
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1),
                                   msg=name)


def test_fused_op_rejects_bad_lora_shapes():
    weight = _params4bit(64, 64)
    with pytest.raises(ValueError, match="A \\(r, K\\) and B \\(N, r\\)"):
        lora_ops.lora_nf4_linear(torch.randn(2, 64), weight, torch.randn(4, 64), torch.randn(64, 8), 1.0)


def _model(path, **cfg):
    model, _ = FastLlama.from_pretrained(path, dtype=torch.float32, patch=PatchConfig(**cfg))
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapter shows in outputs and every gradient
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_grads(model, ids):
    return _grads_of(model, ids)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused ops' calls (the real ops still run): one entry per call, "linear", "qkv" or "mlp"."""
    from fastllm.ops import lora_mlp as mlp_ops
    from fastllm.ops import lora_qkv as qkv_ops

    class Calls(list):
        mlp_outputs: list  # the MLP op's need_output per call (False in a checkpoint's recompute)
        cast_modes: list   # each call's adapter-cast cache mode ("store" forward, "reuse" recompute)

    calls = Calls()
    calls.mlp_outputs, calls.cast_modes = [], []
    for fn, tag in ((lora_ops.LoRANF4Function, "linear"), (mlp_ops.LoRAMLPFunction, "mlp"),
                    (qkv_ops.LoRAQKVFunction, "qkv")):
        def counting(*args, _real=fn.apply, _tag=tag):
            calls.append(_tag)
            if _tag == "mlp":
                calls.mlp_outputs.append(args[-1])
            calls.cast_modes.append(next(a for a in args if isinstance(a, lora_ops.LoRAFrozen)).cast_cache)
            return _real(*args)

        monkeypatch.setattr(fn, "apply", counting)
    return calls


@pytest.mark.parametrize("fused_layer", [False, True])
def test_patched_lora_matches_peft_and_bitsandbytes(tiny_llama_i128_dir, fused_calls, fused_layer):
    from fastllm.modules.layer import LAYER_CALLS

    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True, fused_layer=fused_layer)
    assert patch_report(model).counts["lora"] == 14
    model.train()
    ids = torch.randint(0, 320, (2, 37))
    before = LAYER_CALLS["fused"]
    loss, grads = _loss_grads(model, ids)
    assert patch_report(model).counts["lora_attention"] == 2
    if fused_layer:  # each decoder layer is one op (forward, then its own recompute and backward)
        assert LAYER_CALLS["fused"] - before == 2 and fused_calls == []
    else:
        # Forward + checkpointed recompute, in both layers: q/k/v as one op, o alone, the MLP as one op.
        assert [fused_calls.count(t) for t in ("qkv", "linear", "mlp")] == [2 * 2, 2 * 2, 2 * 2]
        # The recompute skips the MLP's down projection (its output is dropped there); the grads below show it
        # is right to.
        assert fused_calls.mlp_outputs == [True, True, False, False]
        # The forward keeps its adapter casts for the recompute, which takes them instead of casting again.
        assert fused_calls.cast_modes == ["store"] * 6 + ["reuse"] * 6
    with eager(model):  # PEFT's forward over bitsandbytes' own Linear4bit
        ref_loss, ref_grads = _loss_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads) and len(grads) == 28
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_training_follows_eager(tiny_llama_i128_dir, fused_calls):
    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    model.train()
    ids = torch.randint(0, 320, (2, 29))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # fp32 compute dtype under bf16 autocast: PEFT runs the adapter in bf16, so the fused path defers.
        loss, grads = _loss_grads(model, ids)
    assert fused_calls == []
    with eager(model), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_cases_the_fused_path_leaves_to_peft(tiny_llama_i128_dir, fused_calls):
    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    model.eval()
    ids = torch.randint(0, 320, (1, 19))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        with eager(model), model.disable_adapter():
            off_ref = model(input_ids=ids).logits
        assert fused_calls == []
        torch.testing.assert_close(off, off_ref)
        # A second adapter, both active: PEFT's loop over adapters.
        from peft import LoraConfig

        model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        model.base_model.set_adapter(["default", "second"])
        for n, p in model.named_parameters():
            if "lora_B.second" in n:
                torch.nn.init.normal_(p, std=0.05)
        both = model(input_ids=ids).logits
        with eager(model):
            both_ref = model(input_ids=ids).logits
        torch.testing.assert_close(both, both_ref)
        # q and v run PEFT's loop; k, o and the MLP (only "default" there) still take fused ops, in both layers.
        assert [fused_calls.count(t) for t in ("qkv", "linear", "mlp")] == [0, 2 * 2, 2]
        model.base_model.set_adapter("default")
        one = model(input_ids=ids).logits
        assert [fused_calls.count(t) for t in ("qkv", "linear", "mlp")] == [2, 2 * 2 + 2, 2 + 2]
        assert not torch.allclose(one, both)


def test_auto_on_cuda_opt_in_on_cpu_and_compile_turns_it_off(tiny_llama_i128_dir):
    from fastllm.patching.specs import resolve

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on, why = resolve(PatchConfig(compile=False), cpu)  # auto: CUDA only
    assert on["lora"] is False and "PatchConfig(lora=True)" in why["lora"]
    assert resolve(PatchConfig(compile=False), cuda)[0]["lora"] is True
    assert resolve(PatchConfig(lora=True), cpu)[0]["lora"] is True
    on, why = resolve(PatchConfig(lora=True, compile=True), cpu)
    assert on["lora"] is False and "compile" in why["lora"]
    on, why = resolve(PatchConfig(lora=False), cuda)
    assert on["lora"] is False and why["lora"] == "disabled by PatchConfig"
    # compile is opt-in everywhere (the eager fused path is the faster default), with the measured reason
    on, why = resolve(PatchConfig(), cuda)
    assert on["compile"] is False and on["lora"] is True and "PatchConfig(compile=True)" in why["compile"]
    assert resolve(PatchConfig(compile=True), cuda)[0]["compile"] is True


def test_lora_patch_applies_without_checkpointing(tiny_llama_i128_dir):
    model, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.float32,
                                         patch=PatchConfig(lora=True, nf4_linear=True))
    model = FastLlama.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    counts = patch_report(model).counts
    assert counts["lora"] == 14 and counts["lora_attention"] == 2
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_unpatch_restores_peft_forward(tiny_llama_i128_dir):
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
    attns = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    assert all("forward" in vars(m) for m in layers + attns) and len(attns) == 2
    unpatch(model)
    assert not any("forward" in vars(m) for m in layers + attns)


def test_generate_with_cache_matches_eager(tiny_llama_i128_dir, fused_calls):
    """Inference through the patched attention (cache update between the fused q/k/v and attention)."""
    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    model.eval()
    ids = torch.randint(0, 320, (2, 11))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, **gen)
        logits = model(input_ids=out).logits
        assert fused_calls.count("qkv") > 0
        with eager(model):
            out_ref = model.generate(input_ids=ids, **gen)
            logits_ref = model(input_ids=out).logits
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)


def test_cache_holds_only_its_own_keys_and_values(tiny_llama_i128_dir, fused_calls):
    """The fused q/k/v op returns column blocks of one output; the cache must not keep that whole output alive
    (transformers' caches copy on update today: this guards it)."""
    from transformers import DynamicCache

    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    model.eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 320, (2, 13)), past_key_values=cache, use_cache=True)
    assert fused_calls.count("qkv") == 2
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_adapters_cast_in_one_buffer_round_trip():
    """``cast_adapters``: one flat compute-dtype buffer whose views equal each weight's own cast (mixed dtypes,
    a non-contiguous weight), and ``adapter_views`` re-views it (what backward does from the saved buffer)."""
    from fastllm.ops.lora import adapter_views, cast_adapters

    weights = (torch.randn(4, 96), torch.randn(160, 4).to(torch.bfloat16), torch.randn(7, 4).t())
    with torch.no_grad():
        flat, views = cast_adapters(weights, torch.bfloat16)
    assert flat.dim() == 1 and flat.numel() == sum(w.numel() for w in weights)
    for w, v in zip(weights, views):
        assert v.shape == w.shape and v.dtype == torch.bfloat16
        assert torch.equal(v, w.to(torch.bfloat16))
    again = adapter_views(flat, tuple(w.shape for w in weights))
    assert all(a.data_ptr() == b.data_ptr() and torch.equal(a, b) for a, b in zip(views, again))


def test_fused_v_is_copied_only_outside_fastllms_checkpoint(tiny_llama_i128_dir):
    """Without checkpointing attention could save v, a column block of the fused q/k/v output, and so keep the
    whole output alive until backward: there v is made its own tensor. Inside fastllm's checkpoint it stays a view
    (saved tensors are dropped there), and training through both paths gives the same grads."""
    from fastllm.modules.checkpointing import nonreentrant_checkpoint
    from fastllm.modules.decoder import qkv_region

    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    cos = torch.ones(1, 9, attn.head_dim)
    sin = torch.zeros(1, 9, attn.head_dim)

    def own_storage(t):
        return t.untyped_storage().nbytes() == t.numel() * t.element_size()

    _, _, v = qkv_region(attn, x, cos, sin)
    assert own_storage(v)
    seen = []

    def region(x):
        q, k, v = qkv_region(attn, x, cos, sin)
        seen.append(own_storage(v))
        return q.sum() + k.sum() + v.sum()

    nonreentrant_checkpoint(region, x).backward()
    assert seen == [False]  # a view, no copy (the recompute stops early, after RoPE's saved tensors)
    with torch.no_grad():
        _, _, v = qkv_region(attn, x, cos, sin)
    assert not own_storage(v)  # inference: nothing is saved, no copy

    ids = torch.randint(0, 320, (2, 21))
    model.train()
    loss_ckpt, grads_ckpt = _loss_grads(model, ids)
    model.gradient_checkpointing_disable()
    loss_plain, grads_plain = _loss_grads(model, ids)
    torch.testing.assert_close(loss_plain, loss_ckpt, rtol=1e-6, atol=1e-6)
    for n in grads_ckpt:
        torch.testing.assert_close(grads_plain[n], grads_ckpt[n], rtol=1e-5, atol=1e-7, msg=n)


def _grads_of(model, ids, use_autograd_grad=False):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if use_autograd_grad:
        return loss.detach(), dict(zip((n for n, _ in named), torch.autograd.grad(loss, [p for _, p in named])))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in named}


def _rel(a: dict, b: dict) -> float:
    num = sum((a[n].float() - b[n].float()).norm() ** 2 for n in b) ** 0.5
    return (num / sum(b[n].float().norm() ** 2 for n in b) ** 0.5).item()


def test_fused_layer_in_bf16_follows_the_op_by_op_path_and_autograd_grad(tiny_llama_i128_dir):
    """bf16 weights and activations: the fused decoder layer gives the per-op fused path's loss and grads (the
    same kernels, in another order of launches), also through ``torch.autograd.grad``."""
    from fastllm.modules.layer import LAYER_CALLS

    ids = torch.randint(0, 320, (2, 41))
    results = []
    for fused_layer in (False, True):
        model, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.bfloat16,
                                             patch=PatchConfig(lora=True, nf4_linear=True, fused_layer=fused_layer))
        torch.manual_seed(0)
        model = FastLlama.get_peft_model(model, r=8, lora_alpha=16)
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        model.train()
        before = LAYER_CALLS["fused"]
        results.append((_grads_of(model, ids), _grads_of(model, ids, use_autograd_grad=True)))
        assert LAYER_CALLS["fused"] - before == (4 if fused_layer else 0)
        assert ("fused QLoRA layers" in patch_report(model).backends["gradient_checkpointing"]) == fused_layer
    ((loss, g), (loss_ag, g_ag)), ((f_loss, f_g), (f_loss_ag, f_g_ag)) = results
    torch.testing.assert_close(f_loss, loss, rtol=1e-2, atol=1e-2)
    assert _rel(f_g, g) < 2e-2
    assert torch.equal(f_loss_ag, f_loss) and _rel(f_g_ag, f_g) < 1e-6  # autograd.grad = backward, same op


def test_fused_layer_leaves_hooked_layers_to_op_by_op_checkpointing(tiny_llama_i128_dir, fused_calls):
    from fastllm.modules.layer import LAYER_CALLS

    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    layers = model.base_model.model.model.layers
    seen = []
    handle = layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model.train()
    ids = torch.randint(0, 320, (2, 23))
    reason = "module hooks on modules the fused op bypasses"
    before, before_reason = LAYER_CALLS["fused"], LAYER_CALLS[reason]
    loss, grads = _loss_grads(model, ids)
    assert LAYER_CALLS["fused"] - before == 1 and LAYER_CALLS[reason] - before_reason == 1
    assert reason in str(patch_report(model))  # the report shows the calls that went op by op
    assert len(seen) == 1  # layer 0 ran its own forward: the hook saw it (the recompute stops early, before it)
    handle.remove()
    with eager(model):
        ref_loss, ref_grads = _loss_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_layer_takes_both_forms_of_transformers_checkpoint_call(tiny_llama_i128_dir):
    """transformers >= 5.2x checkpoints ``partial(forward, layer, **kw)``; 5.1x (the GPU image's 5.17)
    ``partial(super().__call__, **kw)``, where module hooks would run inside: taken only without them."""
    import functools

    from fastllm.modules import layer as fl

    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
    model.train()
    layer0 = model.base_model.model.model.layers[0]
    seen = []

    def capture(function, *args, **kwargs):
        seen.append((function, args))
        return fl.fused_layer_checkpoint(function, *args, **kwargs)

    layer0._gradient_checkpointing_func = capture
    ids = torch.randint(0, 320, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    (function, args), = seen
    assert not isinstance(fl._plan(function, args, {}), str)
    # 5.1x's GradientCheckpointingLayer.__call__ checkpoints its own super().__call__: nn.Module's, bound to the layer
    old_form = functools.partial(torch.nn.Module.__call__.__get__(layer0), **function.keywords)
    assert not isinstance(fl._plan(old_form, args, {}), str)
    handle = layer0.register_forward_pre_hook(lambda m, a: None)
    assert fl._plan(old_form, args, {}) == "module hooks on the decoder layer (its __call__ runs inside the checkpoint)"
    if function.args:  # transformers >= 5.2x's form keeps the layer's hooks outside the checkpoint
        assert not isinstance(fl._plan(function, args, {}), str)
    handle.remove()
    handle = layer0.self_attn.o_proj.register_full_backward_hook(lambda m, gi, go: None)
    assert fl._plan(function, args, {}) == "module hooks on modules the fused op bypasses"
    handle.remove()
    assert isinstance(fl._plan(functools.partial(print), args, {}), str)


def test_fused_layer_with_triton_kernels_matches_torch_fallbacks(tiny_llama_i128_dir, monkeypatch):
    """The fused layer's RMSNorm / RoPE / SwiGLU Triton path (through the interpreter on the CPU) against its torch
    fallbacks: same loss and LoRA grads (fp32)."""
    from fastllm.modules import layer as fl

    ids = torch.randint(0, 320, (2, 19))
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setattr(fl, "pick_backend", lambda *a, _b=backend: _b)
        model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True)
        model.train()
        before = fl.LAYER_CALLS["fused"]
        results.append(_loss_grads(model, ids))
        assert fl.LAYER_CALLS["fused"] - before == 2
    (loss, grads), (t_loss, t_grads) = results
    torch.testing.assert_close(t_loss, loss, rtol=1e-5, atol=1e-5)
    assert _rel(t_grads, grads) < 1e-4


@pytest.mark.parametrize("fused_layer", [False, True])
def test_second_backward_through_checkpointed_layers(tiny_llama_i128_dir, fused_layer):
    """``retain_graph``: a second backward re-runs each checkpointed layer's recompute (torch enters its recompute
    context again) and adds the same gradients once more. (The loss is taken from the logits: the chunked loss op,
    like Liger's, scales its saved gradient in place and serves one backward.)"""
    model = _model(tiny_llama_i128_dir, lora=True, nf4_linear=True, fused_layer=fused_layer)
    model.train()
    ids = torch.randint(0, 320, (2, 17))
    loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-5, atol=1e-7, msg=n)
