"""PatchConfig(compile=True) on a tiny 4-bit + LoRA Llama, on the CPU with inductor.

Zero graph breaks, no new graphs after warm-up over varied lengths (``error_on_recompile`` after warm-up), loss
and gradients vs ``eager(model)`` under non-reentrant gradient checkpointing (backward included), greedy
generation vs eager, each region explained to one graph with ``torch._dynamo.explain``, and exact revert.

Also run under torch 2.11 + transformers 5.17 (the GPU machine's versions) on the CPU: before the plain-tensor
NF4 path, the training test there saw 18 graph breaks (``functools.cache``'d ``bnb()`` -> ``find_spec``).
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import fastllm  # noqa: E402
from fastllm import FastLlama, PatchConfig, compile_report, eager, patch, unpatch  # noqa: E402
from fastllm.modules import decoder  # noqa: E402
from fastllm.modules.nf4_linear import nf4_linear4bit_compiled_forward  # noqa: E402

WARMUP = (9, 13, 17)
LENGTHS = WARMUP + (5, 11, 20, 24, 31, 40, 64)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_i128_dir):
    """Tiny Llama whose linears' in_features are multiples of 64: bitsandbytes 0.50's own CPU 4-bit forward
    (the eager reference) is wrong otherwise (see tests/modules/test_nf4_linear.py)."""
    return tiny_llama_i128_dir


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qlora(path, compile=True, gc=True):
    model, _ = FastLlama.from_pretrained(path, load_in_4bit=True, dtype=torch.float32,
                                         patch=PatchConfig(compile=compile))
    torch.manual_seed(0)
    model = FastLlama.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=gc)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B: the adapters take part in forward and backward
    return model


def _ids(t, b=2, seed=0):
    x = torch.randint(0, 320, (b, t), generator=torch.Generator().manual_seed(seed + t))
    return x.to("cuda" if torch.cuda.is_available() else "cpu")  # where FastLlama.from_pretrained puts the model


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _graph_breaks():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def test_compiled_training_over_lengths_matches_eager_without_new_graphs(tiny_dir):
    model = _qlora(tiny_dir)
    base = fastllm.patching.find_base(model)
    report = fastllm.patch_report(model)
    assert report.counts["compile_attention"] == 2 and report.counts["compile_mlp"] == 2
    assert report.counts["compile_rms_norm"] == 5 and report.counts["compile_nf4_linear"] == 14
    assert "nf4_linear" not in report.counts  # superseded: the compiled twin reads plain tensors
    assert all(layer.gradient_checkpointing for layer in base.model.layers)
    attn_calls = []
    hooks = [layer.self_attn.register_forward_hook(lambda *a: attn_calls.append(1)) for layer in base.model.layers]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    after_warmup = None
    for i, t in enumerate(LENGTHS):
        x = _ids(t)
        with eager(model):
            ref_loss, ref_grads = _loss_and_grads(model, x)
        attn_calls.clear()
        # After warm-up any recompile raises (dynamo's strict mode), not only shows up in the counts below.
        with torch._dynamo.config.patch(error_on_recompile=i >= len(WARMUP)):
            loss, grads = _loss_and_grads(model, x)
        # Checkpointing is live around the compiled regions: each layer's attention ran again in backward.
        assert len(attn_calls) == 2 * len(base.model.layers)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        opt.step()
        if i == len(WARMUP) - 1:
            after_warmup = compile_report(model).graphs
    for h in hooks:
        h.remove()
    rep = compile_report(model)
    assert rep.graph_breaks == 0 and _graph_breaks() == 0, rep.break_reasons
    assert rep.graphs == after_warmup, f"new graphs after warm-up: {rep.graphs_per_region}"
    assert rep.graphs <= 30 and rep.eager_calls == {}
    # One graph per region, shared by both layers (compiled once per model, not per layer).
    assert rep.graphs_per_region == {"rms_norm": 1, "attention": 1, "mlp": 1}, rep.graphs_per_region


def test_padding_mask_and_generation_match_eager(tiny_dir):
    model = _qlora(tiny_dir, gc=False)
    model.train()
    for t in WARMUP + (21,):
        x = _ids(t)
        mask = torch.ones_like(x)
        mask[0, :3] = 0  # left padding on one row: attention gets a 4-D mask tensor
        with eager(model):
            ref = model(input_ids=x, attention_mask=mask, labels=x).loss
        out = model(input_ids=x, attention_mask=mask, labels=x).loss
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        for t in (7, 12):
            x = _ids(t, b=1)
            got = model.generate(input_ids=x, max_new_tokens=6, do_sample=False)
            if t == 7:
                warm = compile_report(model).graphs
            with eager(model):
                want = model.generate(input_ids=x, max_new_tokens=6, do_sample=False)
            assert torch.equal(got, want)
    rep = compile_report(model)
    assert rep.graph_breaks == 0 and _graph_breaks() == 0, rep.break_reasons
    assert rep.graphs == warm, rep.graphs_per_region  # a second prompt length and new cache lengths: nothing new
    assert {"qkv", "attend"} <= set(rep.graphs_per_region)  # with a cache: update runs between two regions
    assert rep.graphs <= 30


def test_decode_steps_run_the_norms_eagerly(tiny_dir, monkeypatch):
    """A decode step's RMSNorms skip their compiled region (a region call costs more than the kernel there): the
    generated tokens stay eager's, no graph breaks, and the report counts those calls. The CUDA condition is
    lifted so the CPU takes the decode path."""
    from fastllm.modules import decoder

    monkeypatch.setattr(decoder, "_decode_step", lambda x: not torch.is_grad_enabled() and x.numel() == x.shape[-1])
    model = _qlora(tiny_dir, gc=False)
    model.eval()
    x = _ids(9, b=1)
    with torch.no_grad():
        got = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
        with eager(model):
            want = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    rep = compile_report(model)
    assert rep.graph_breaks == 0, rep.break_reasons
    # 4 decode steps (the first new token comes from the prompt's forward), 2 norms per layer and the final norm
    n_layers = len(model.get_base_model().model.layers)
    assert rep.eager_calls == {"rms_norm (decode)": 4 * (2 * n_layers + 1)}


def test_regions_explain_to_one_graph_each(tiny_dir):
    """``torch._dynamo.explain`` on each region with the real patched LoRA + 4-bit modules: one graph, no
    break (the break reasons, if any, are the assertion message)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _qlora(tiny_dir, gc=False)
    layer = fastllm.patching.find_base(model).model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, 11, 64, requires_grad=True)
    cos, sin = (torch.randn(2, 11, 16) for _ in range(2))
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    mask = torch.zeros(2, 1, 11, 11)
    calls = {"rms_norm": (decoder.rms_norm_region, (layer.input_layernorm.weight, x, 1e-5)),
             "mlp": (decoder.mlp_region, (mlp, x)),
             "attention": (decoder.attention_region, (attn, x, cos, sin, mask, sdpa, 0.0, {"sliding_window": None})),
             "qkv": (decoder.qkv_region, (attn, x, cos, sin))}
    for name, (fn, args) in calls.items():
        out = torch._dynamo.explain(fn)(*args)
        assert (out.graph_count, out.graph_break_count) == (1, 0), (name, out.break_reasons)
    q, k, v = decoder.qkv_region(attn, x, cos, sin)
    out = torch._dynamo.explain(decoder.attend_region)(attn, q, k, v, mask, sdpa, 0.0, {"sliding_window": None})
    assert (out.graph_count, out.graph_break_count) == (1, 0), ("attend", out.break_reasons)


def test_one_token_attend_runs_grouped_and_equals_transformers_sdpa(tiny_dir, monkeypatch):
    """A decode step's attention (one query token, 4 query heads on 2 KV heads, a padding mask) takes the grouped
    path, no repeated K/V, and equals transformers' SDPA function followed by o_proj; a prefill does not take it;
    under the eager implementation the grouped eager maths equals transformers' eager function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _qlora(tiny_dir, compile=False, gc=False)
    attn = fastllm.patching.find_base(model).model.layers[0].self_attn
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []
    real = decoder.grouped_decode_sdpa
    monkeypatch.setattr(decoder, "grouped_decode_sdpa", lambda *a: calls.append(1) or real(*a))
    for t in (1, 5):
        g = torch.Generator().manual_seed(t)
        q = torch.randn(3, 4, t, 16, generator=g)
        k, v = (torch.randn(3, 2, 13, 16, generator=g) for _ in range(2))
        mask = torch.ones(3, 1, t, 13, dtype=torch.bool)
        mask[1, ..., :4] = False  # a left-padded row
        with torch.no_grad():
            got = decoder.attend_region(attn, q, k, v, mask, sdpa, 0.0, {"sliding_window": None})
            out, _ = sdpa(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, sliding_window=None)
            want = attn.o_proj(out.reshape(3, t, -1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1, t  # the one-token call only
    # the architecture's eager maths (additive masks) takes the grouped eager form
    eager_calls = []
    real_eager = decoder.grouped_decode_eager
    monkeypatch.setattr(decoder, "grouped_decode_eager", lambda *a: eager_calls.append(1) or real_eager(*a))
    monkeypatch.setattr(attn.config, "_attn_implementation", "eager")
    interface = decoder.attention_interface(attn)
    additive = torch.zeros(3, 1, 1, 13).masked_fill(~mask[:, :, :1], torch.finfo(torch.float32).min)
    with torch.no_grad():
        got = decoder.attend_region(attn, q[:, :, :1], k, v, additive, interface, 0.0, {"sliding_window": None})
        out, _ = interface(attn, q[:, :, :1], k, v, additive, dropout=0.0, scaling=attn.scaling)
        want = attn.o_proj(out.reshape(3, 1, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(eager_calls) == 1 and len(calls) == 1
    monkeypatch.setattr(attn.config, "_attn_implementation", "sdpa")
    decoder.set_grouped_decode(False)  # the bench's "fastllm:base": transformers' function as given
    try:
        with torch.no_grad():
            decoder.attend_region(attn, q[:, :, :1], k, v, mask[:, :, :1], sdpa, 0.0, {"sliding_window": None})
    finally:
        decoder.set_grouped_decode(None)
    assert len(calls) == 1


def _snapshot(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def test_unpatch_restores_eager_exactly(tiny_dir):
    model, twin = _qlora(tiny_dir, compile=False), _qlora(tiny_dir, compile=False)
    unpatch(model), unpatch(twin)
    x = _ids(9)
    model.train(), twin.train()
    model(input_ids=x, labels=x), twin(input_ids=x, labels=x)  # bnb sets its compute dtype on a first call
    before = _snapshot(model)
    report = patch(model, PatchConfig(compile=True))
    attn = fastllm.patching.find_base(model).model.layers[0].self_attn
    assert attn.forward.__func__._fastllm_compiled == "attention"
    assert attn.q_proj.base_layer.forward.__func__ is nf4_linear4bit_compiled_forward
    assert type(attn.q_proj.base_layer._fastllm_nf4.args.packed) is torch.Tensor  # not bnb's Params4bit
    assert report.backends["compile_attention"] == "inductor" and "rms_norm" in report.disabled
    model(input_ids=x, labels=x).loss.backward()
    assert compile_report(model).graphs >= 3
    assert unpatch(model) > 0
    assert _snapshot(model) == before
    assert all("forward" not in vars(m) for m in model.modules())
    model.zero_grad(set_to_none=True)
    la, lb = model(input_ids=x, labels=x).loss, twin(input_ids=x, labels=x).loss
    assert torch.equal(la, lb)
    la.backward(), lb.backward()
    for (na, pa), (_, pb) in zip(model.named_parameters(), twin.named_parameters()):
        if pa.requires_grad:
            assert torch.equal(pa.grad, pb.grad), na


def test_auto_follows_the_device_and_mode_reaches_the_regions(tiny_dir):
    model, _ = FastLlama.from_pretrained(tiny_dir, load_in_4bit=True, dtype=torch.float32)
    report = fastllm.patch_report(model)
    if torch.cuda.is_available() and "compile" not in report.disabled:
        assert report.counts["compile_attention"] == 2
    else:
        assert "compile" in report.disabled and "compile_attention" not in report.counts
        assert compile_report(model) is None
    patch(model, PatchConfig(compile=True, compile_mode="max-autotune-no-cudagraphs"))
    from fastllm.modules.decoder import regions_of

    assert regions_of(fastllm.patching.find_base(model)).mode == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile_mode"):
        PatchConfig(compile=True, compile_mode="fast")
    for mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs: refused with the modes that work named
        with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
            PatchConfig(compile=True, compile_mode=mode)
