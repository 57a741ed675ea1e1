"""Decode-step graphs (``fastllm.modules.decode_graphs``) on the CPU, with a stand-in for the CUDA capture.

A CUDA graph cannot be captured on the CPU, so ``DecodeGraphs._capture`` is swapped for ``_Rerun``, which models
one faithfully: at construction it clones the tensor inputs into static buffers (as ``_Graph`` does), and each
replay copies the new inputs into those buffers and re-runs the captured call on them (the captured cache object
included), returning ``_fresh`` outputs. Everything else is the real code path: ``why_eager``, the keys (shapes,
cache addresses, module fingerprint), warm-up / capture / replay, the LRU, a failed capture, and the patch-level
options and errors on a CPU model. The GPU counterpart with real CUDA graphs is ``tests/test_gpu_decode_graphs.py``.
"""

import gc
import inspect
import logging
import math
import types
import unittest.mock
import weakref
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

pytest.importorskip("peft")

import fastllm  # noqa: E402
from fastllm import FastLlama, PatchConfig, patch_report  # noqa: E402
from fastllm.modules import decode_graphs  # noqa: E402
from fastllm.modules import static_cache as caches  # noqa: E402
from fastllm.modules.decode_graphs import (  # noqa: E402
    DecodeGraphs,
    make_graphed_forward,
    static_generate,
    static_generate_kwargs,
    why_eager,
)
from fastllm.ops import nf4 as nf4_ops  # noqa: E402
from fastllm.patching.api import find_base, patch_config  # noqa: E402

NEW = 7  # new tokens: the prefill gives the first, a warm-up step the second, then a capture and NEW - 3 replays
PROMPT = 9  # odd on purpose
VOCAB = 320
PREFILL = "eager: not one token (prefill)"
WARMUP = "eager: warm-up"


def _write_into(dst, src):
    """Copy the tensors of ``src`` into those of ``dst`` (the same structure)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k, v in dst.items():
            _write_into(v, src[k])
    elif isinstance(dst, tuple):
        for a, b in zip(dst, src):
            _write_into(a, b)


class _Rerun:
    """Stand-in for ``decode_graphs._Graph``. A CUDA capture runs the step's Python (host effects: the sliding-window
    layers' ``cumulative_length_int``) but none of its kernels; a replay runs the kernels and no Python. So: at
    construction the call runs once with the cache's tensors restored after it (host effects only), and each replay
    copies the new inputs into static buffers cloned at construction, re-runs the call on them with the host counters
    restored after it (device effects only), its outputs written into the same output tensors every time."""

    def __init__(self, run, kwargs, cache):
        self.cache_ref = weakref.ref(cache)
        self.paths = decode_graphs.tensor_paths(kwargs)
        self.inputs = {p: decode_graphs._at(kwargs, p).clone() for p in self.paths}
        self.cache = cache
        self.run = run
        self.static = decode_graphs.with_inputs(kwargs, self.inputs)
        saved = [(t, t.clone()) for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        run(**self.static)
        for t, v in saved:
            t.copy_(v)
        self.out = None

    def replay(self, kwargs, cache):
        for path in self.paths:
            self.inputs[path].copy_(decode_graphs._at(kwargs, path))
        counters = [(layer, layer.cumulative_length_int) for layer in caches.host_counters(self.cache)]
        out = self.run(**self.static)
        for layer, value in counters:
            layer.cumulative_length_int = value
        if self.out is None:
            self.out = out
        else:
            _write_into(self.out, out)
        return decode_graphs._fresh(self.out, self.cache, cache)


class _FailingCapture:
    """A capture that raises (as one hitting a host sync inside ``torch.cuda.graph`` would)."""

    calls = 0

    def __init__(self, run, kwargs, cache):
        type(self).calls += 1
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line of the message")


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_llama_i128_dir):
    """A plain fp32 tiny Llama with LoRA on every linear (non-zero B, so adapters show in the logits), eval mode.
    Shared by the module: each test binds its own ``DecodeGraphs`` and unbinds it after."""
    m, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.float32, max_seq_length=256, load_in_4bit=False)
    torch.manual_seed(0)
    m = FastLlama.get_peft_model(m, r=8, lora_alpha=16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """Let ``why_eager`` take CPU tensors as graphable."""
    monkeypatch.setattr(decode_graphs, "_graphable_device", lambda x: x.device.type in ("cuda", "cpu"))


@pytest.fixture
def bind(model, cpu_as_cuda):
    """``bind(max_graphs=..., capture=...)`` -> a fresh ``DecodeGraphs`` whose graphed forward is bound on the
    model's ``LlamaModel`` (as ``patch`` binds it); unbound after the test."""
    inner = find_base(model).model
    assert "forward" not in vars(inner)  # on the CPU, patch leaves LlamaModel.forward alone

    def _bind(max_graphs=decode_graphs.MAX_GRAPHS, capture=_Rerun):
        graphs = DecodeGraphs(max_graphs=max_graphs)
        graphs._capture = capture
        inner.forward = types.MethodType(make_graphed_forward(graphs), inner)
        return graphs

    try:
        yield _bind
    finally:
        vars(inner).pop("forward", None)


# -- helpers -----------------------------------------------------------------------------------------------------


def _ids(batch=1, length=PROMPT, seed=7):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, x, mask=None, **extra):
    if not extra:
        extra = dict(cache_implementation="static")
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask if mask is not None else torch.ones_like(x),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, disable_compile=True, **extra)
    return out.sequences, torch.stack(out.logits)


def _reference(graphs, model, x, mask=None, **extra):
    """The same decode steps over the same kind of (static) cache, every one eager (graphs disabled)."""
    saved, graphs.disabled = graphs.disabled, "reference"
    try:
        return _generate(model, x, mask, **extra)
    finally:
        graphs.disabled = saved


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # sequences
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # logits


# -- generation through the graphed forward ----------------------------------------------------------------------


def test_replayed_steps_equal_eager_steps(model, bind):
    graphs = bind()
    x = _ids()
    got = _generate(model, x)
    assert graphs.stats == Counter({PREFILL: 1, WARMUP: 1, "captured": 1, "replayed": NEW - 2}), graphs.summary()
    assert len(graphs.graphs) == 1 and graphs.disabled is None
    assert graphs.summary().startswith(f"1 captured, {NEW - 2} replayed; eager steps: ")
    assert got[0].shape == (1, PROMPT + NEW) and got[1].shape == (NEW, 1, VOCAB)
    _assert_same(got, _reference(graphs, model, x))


def test_second_call_and_adapter_switch(model, bind):
    graphs = bind()
    x = _ids()
    first = _generate(model, x)
    _assert_same(_generate(model, x), first)  # a new static cache per generate call: a new key, the same results
    assert graphs.stats["replayed"] >= 2 * (NEW - 2)
    captured = graphs.stats["captured"]

    with model.disable_adapter():
        off = _generate(model, x)
        # The adapter flags are part of the fingerprint: a new key, so a new warm-up and capture.
        assert graphs.stats["captured"] == captured + 1, graphs.summary()
        off_ref = _reference(graphs, model, x)
    assert not torch.equal(off[1], first[1])  # the adapters change the logits...
    _assert_same(off, off_ref)  # ...and the replay saw them off
    # Back on: the fingerprint changes back, results are the adapter-on ones again.
    _assert_same(_generate(model, x), first)
    _assert_same(first, _reference(graphs, model, x))
    assert len(graphs.graphs) <= decode_graphs.MAX_GRAPHS


def test_user_static_cache_reused_across_calls(model, bind):
    """One static cache (same tensors) over several generate calls: the graph captured in the first is replayed in
    the next; adapters switched off change the module fingerprint, so that call captures its own graph."""
    from transformers import StaticCache
    from transformers.models.llama.modeling_llama import LlamaModel

    name = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    cache = StaticCache(config=find_base(model).config, max_cache_len=32)
    graphs = bind()
    x = _ids()

    def run():
        cache.reset()  # in place: the cache keeps its tensors (addresses)
        return _generate(model, x, **{name: cache})

    first = run()
    assert graphs.stats == Counter({PREFILL: 1, WARMUP: 1, "captured": 1, "replayed": NEW - 2}), graphs.summary()
    _assert_same(run(), first)
    # The same key: the first call's graph replays every decode step, with no warm-up nor capture.
    assert graphs.stats == Counter({PREFILL: 2, WARMUP: 1, "captured": 1, "replayed": 2 * NEW - 3}), graphs.summary()
    with model.disable_adapter():
        off = run()
        assert graphs.stats["captured"] == 2 and graphs.stats[WARMUP] == 2, graphs.summary()
        cache.reset()
        off_ref = _reference(graphs, model, x, **{name: cache})
    assert not torch.equal(off[1], first[1])
    _assert_same(off, off_ref)
    replayed = graphs.stats["replayed"]
    _assert_same(run(), first)  # adapters back on: the first graph again
    assert graphs.stats["captured"] == 2 and graphs.stats["replayed"] == replayed + NEW - 1, graphs.summary()
    assert len(graphs.graphs) == 2
    cache.reset()
    _assert_same(first, _reference(graphs, model, x, **{name: cache}))


def test_left_padded_batch(model, bind):
    graphs = bind()
    x = _ids(batch=2)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    got = _generate(model, x, mask)
    assert graphs.stats["captured"] == 1 and graphs.stats["replayed"] == NEW - 2, graphs.summary()
    _assert_same(got, _reference(graphs, model, x, mask))


def test_failed_capture_runs_eagerly_and_says_so(model, bind, caplog):
    _FailingCapture.calls = 0
    graphs = bind(capture=_FailingCapture)
    x = _ids()
    with caplog.at_level(logging.WARNING, logger="fastllm"):
        got = _generate(model, x)
        reason = graphs.disabled
        assert reason is not None and reason.startswith("capture failed (RuntimeError"), reason
        assert "second line" not in reason  # first line of the message only
        assert graphs.stats["captured"] == 0 and graphs.stats["replayed"] == 0 and not graphs.graphs
        # The failed step and every later one run eagerly under that reason.
        assert graphs.stats[f"eager: {reason}"] == NEW - 2, graphs.summary()
        again = _generate(model, x)  # graphs stay off: every call of the next generate (prefill too) is eager
        assert graphs.stats[f"eager: {reason}"] == NEW - 2 + NEW, graphs.summary()
    assert _FailingCapture.calls == 1
    warnings = [r for r in caplog.records if r.name == "fastllm" and "decode_graphs off" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    ref = _reference(graphs, model, x)
    _assert_same(got, ref)
    _assert_same(again, ref)
    assert graphs.disabled == reason  # the reference run's override was undone


def test_lru_keeps_max_graphs(model, bind):
    graphs = bind(max_graphs=1)
    inputs = {1: _ids(batch=1), 2: _ids(batch=2, seed=8)}
    refs = {b: _reference(graphs, model, x) for b, x in inputs.items()}
    graphs.stats.clear()
    for i, b in enumerate((1, 2, 1, 2)):
        _assert_same(_generate(model, inputs[b]), refs[b])
        assert len(graphs.graphs) == 1
        assert graphs.stats["captured"] == i + 1, graphs.summary()
        (key, _), = graphs.graphs.items()
        shapes = dict((name, shape) for name, shape, *_ in key[0] if isinstance(shape, torch.Size))
        assert shapes["input_ids"] == (b, 1)  # the graph kept is the newest one


# -- the step logic on a stand-in module -------------------------------------------------------------------------


class _Echo(nn.Module):
    """A module whose forward returns its input (plus a counter): the step logic without a model."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids=None, cache=None, **kwargs):
        self.calls += 1
        return input_ids * 2, cache


class _FakeCache:  # a real transformers Cache is weak-referenceable; SimpleNamespace is not
    is_compileable = True

    def __init__(self, layers):
        self.layers = layers


def _fake_cache(n=4, initialized=True):
    layer = SimpleNamespace(is_initialized=initialized, keys=torch.zeros(n), values=torch.zeros(n))
    return _FakeCache([layer])


def test_step_warm_up_capture_replay_and_alternating_keys(cpu_as_cuda):
    graphs = DecodeGraphs()
    graphs._capture = _Rerun
    m = _Echo()
    a, b = _fake_cache(), _fake_cache()
    with torch.no_grad():
        x = torch.tensor([[3]])
        out = graphs.step(m, (), {"input_ids": x, "cache": a})
        assert graphs.stats[WARMUP] == 1 and not graphs.graphs
        out = graphs.step(m, (), {"input_ids": torch.tensor([[5]]), "cache": a})  # capture, then replay
        assert graphs.stats["captured"] == 1 and graphs.stats["replayed"] == 1
        assert out[0].item() == 10 and out[1] is a
        out = graphs.step(m, (), {"input_ids": torch.tensor([[7]]), "cache": a})
        assert out[0].item() == 14 and graphs.stats["replayed"] == 2
        # The replay returns fresh tensors: a later replay does not overwrite an earlier output.
        first = out[0]
        graphs.step(m, (), {"input_ids": torch.tensor([[9]]), "cache": a})
        assert first.item() == 14
        # Keys that never repeat twice in a row (beam search's reordered caches) are never captured.
        captured = graphs.stats["captured"]
        for cache in (b, _fake_cache(), b, _fake_cache()):
            graphs.step(m, (), {"input_ids": torch.tensor([[1]]), "cache": cache})
        assert graphs.stats["captured"] == captured
        # A static cache whose layers are not allocated yet runs eagerly.
        graphs.step(m, (), {"input_ids": torch.tensor([[1]]), "cache": _fake_cache(initialized=False)})
        assert graphs.stats["eager: cache not allocated yet"] == 1


class _Dequant(nn.Module):
    """Writes its input into a dense-weight workspace of ``n`` values, as a 4-bit linear's dequant does, and returns
    what it reads back (the sum: n * input)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, input_ids=None, cache=None, **kwargs):
        w = nf4_ops._workspace(input_ids.device, torch.float32, (self.n,))
        w.copy_(input_ids.float().reshape(1).expand(self.n))
        return w.sum().reshape(1, 1), cache


class _AddressReplay(_Rerun):
    """A stand-in that, like a CUDA graph, replays on the workspace *address* it captured, not on the buffer in use at
    replay time, and owns no reference to it: the buffer is found among those ``DecodeGraphs`` keeps for the graph
    (``workspaces``). A replay whose buffer nobody kept would write freed memory: here it fails the test."""

    def __init__(self, run, kwargs, cache):
        super().__init__(run, kwargs, cache)
        run(**self.static)  # a capture runs the step once (allocations happen now)
        self.ptr = nf4_ops._WORKSPACES[_WS_KEY].data_ptr()

    def replay(self, kwargs, cache):
        kept = [b for b in getattr(self, "workspaces", ()) if b.data_ptr() == self.ptr]
        assert kept, "replay into a workspace buffer that nothing keeps allocated"
        buf = kept[0]
        with unittest.mock.patch.object(nf4_ops, "_workspace", lambda d, t, shape: buf[: math.prod(shape)].view(shape)):
            return super().replay(kwargs, cache)


_WS_KEY = (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("change", ["grow", "clear"])
def test_workspace_growth_or_clear_recaptures_and_keeps_the_captured_buffer(cpu_as_cuda, change):
    """A captured step writes into the shared dequant workspace. After the workspace grows (a larger weight) or is
    cleared, the old graph is not replayed: the key carries the workspace epoch, so the step is warmed up and captured
    again over the new buffer. Until then the old graph keeps its buffer allocated; the new capture drops it."""
    nf4_ops.clear_workspaces()
    graphs = DecodeGraphs()
    graphs._capture = _AddressReplay
    m, cache = _Dequant(8), _fake_cache()

    def step(v):
        return graphs.step(m, (), {"input_ids": torch.tensor([[v]]), "cache": cache})[0].item()

    with torch.no_grad():
        assert step(1) == 8 and graphs.stats[WARMUP] == 1  # the eager warm-up allocates the workspace
        assert step(2) == 16 and step(3) == 24 and graphs.stats["captured"] == 1 and graphs.stats["replayed"] == 2
        old = StorageWeakRef(nf4_ops._WORKSPACES[_WS_KEY].untyped_storage())
        if change == "grow":
            nf4_ops._workspace(torch.device("cpu"), torch.float32, (1024,))
        else:
            nf4_ops.clear_workspaces()
        gc.collect()
        assert not old.expired()  # the graph holds the buffer it replays into
        assert step(4) == 32 and graphs.stats[WARMUP] == 2 and graphs.stats["replayed"] == 2  # not the old graph
        assert step(5) == 40 and graphs.stats["captured"] == 2 and graphs.stats["replayed"] == 3
        (graph,) = graphs.graphs.values()  # the old graph went at the new capture, and its buffer with it
        assert graph.ptr == nf4_ops._WORKSPACES[_WS_KEY].data_ptr()
        gc.collect()
        assert old.expired()
        assert step(6) == 48 and graphs.stats["replayed"] == 4
    nf4_ops.clear_workspaces()


def test_key_tokens_follow_the_cache_tensors_and_the_fingerprint(model, cpu_as_cuda):
    """A decode step's key holds small tokens for the cache's addresses and the module fingerprint (hashing the full
    tuples every step cost more host time than the rest of the key): the same tensors give the same token, also
    through a new cache object over them; a layer tensor replaced in place, an attribute added, or another cache at
    other addresses gives a new one; equal fingerprints give equal tokens, a changed module state another."""
    graphs = DecodeGraphs()
    a = _fake_cache()
    kwargs = {"input_ids": torch.tensor([[3]]), "cache": a}
    first = graphs._key(model, kwargs, a)
    assert first == graphs._key(model, kwargs, a)
    again = _FakeCache(a.layers)  # a new cache object over the same layer tensors
    assert graphs._key(model, {**kwargs, "cache": again}, again)[1] == first[1]
    a.layers[0].values = torch.zeros(4)  # replaced in place: new addresses
    assert graphs._key(model, kwargs, a)[1] != first[1]
    replaced = graphs._key(model, kwargs, a)[1]
    a.layers[0].extra = torch.zeros(2)  # a new tensor attribute
    assert graphs._key(model, kwargs, a)[1] not in (first[1], replaced)
    b = _fake_cache()
    assert graphs._key(model, {**kwargs, "cache": b}, b)[1] not in (first[1], replaced)
    assert isinstance(first[1], int) and isinstance(first[3], int)
    graphs._fingerprint = None  # as after a prefill: looked at again, the same state gives the same token
    assert graphs._key(model, kwargs, a)[3] == first[3]
    model.train()
    try:
        graphs._fingerprint = None
        assert graphs._key(model, kwargs, a)[3] != first[3]
    finally:
        model.eval()


def test_fresh_clones_and_swaps_the_cache():
    captured, current = object(), object()
    t = torch.ones(2)
    out = decode_graphs._fresh({"a": t, "b": (captured, t, 3)}, captured, current)
    assert out["b"][0] is current and out["b"][2] == 3
    assert torch.equal(out["a"], t) and out["a"].data_ptr() != t.data_ptr()


# -- why_eager ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_cache():
    from transformers import LlamaConfig, StaticCache

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return StaticCache(config=config, max_cache_len=16)


def _decode_kwargs(cache, **changes):
    kwargs = dict(input_ids=torch.tensor([[5]]), attention_mask=torch.zeros(1, 1, 1, 16),
                  position_ids=torch.tensor([[9]]), cache=cache, inputs_embeds=None, use_cache=True)
    kwargs.update(changes)
    return kwargs


def test_why_eager_valid_decode_step(cpu_as_cuda, static_cache):
    with torch.no_grad():
        assert why_eager((), _decode_kwargs(static_cache)) is None
        # The older name of the cache argument is taken too.
        kwargs = _decode_kwargs(None)
        kwargs["past_key_values"] = static_cache
        assert why_eager((), kwargs) is None


def test_why_eager_reasons(cpu_as_cuda, static_cache):
    from transformers import DynamicCache

    with torch.enable_grad():
        assert why_eager((), _decode_kwargs(static_cache)) == "grad mode on"
    with torch.no_grad():
        assert why_eager((torch.tensor([[5]]),), _decode_kwargs(static_cache)) == "positional arguments"
        prefill = _decode_kwargs(static_cache, input_ids=torch.tensor([[5, 6]]))
        assert why_eager((), prefill) == "not one token (prefill)"
        assert why_eager((), _decode_kwargs(DynamicCache())).startswith("no static KV cache")
        assert why_eager((), _decode_kwargs(None)).startswith("no static KV cache")
        mask2d = torch.ones(1, 10, dtype=torch.long)
        assert why_eager((), _decode_kwargs(static_cache, attention_mask=mask2d)).startswith("2-D attention mask")
        assert why_eager((), _decode_kwargs(static_cache, output_attentions=True)) == \
            "attentions or hidden states asked for"
        assert why_eager((), _decode_kwargs(static_cache, output_hidden_states=True)) == \
            "attentions or hidden states asked for"
        assert why_eager((), _decode_kwargs(static_cache, input_ids=None)) == "inputs not on CUDA"


def test_why_eager_cpu_inputs_without_stand_in(static_cache):
    with torch.no_grad():
        assert why_eager((), _decode_kwargs(static_cache)) == "inputs not on CUDA"


# -- the patch option on a CPU model -----------------------------------------------------------------------------


def test_patch_decode_graphs_true_on_cpu_raises_and_keeps_state(tiny_llama_i128_dir):
    m, _ = FastLlama.from_pretrained(tiny_llama_i128_dir, dtype=torch.float32, load_in_4bit=False, patch=False)
    base = find_base(m)
    cache_impl = base.generation_config.cache_implementation
    report = fastllm.patch(m)
    assert fastllm.is_patched(m) and patch_config(m) == PatchConfig()
    reason = report.disabled["decode_graphs"]
    assert reason.startswith("auto") and "CUDA" in reason, reason
    assert "forward" not in vars(base.model)
    assert base.generation_config.cache_implementation == cache_impl  # generate is left alone on the CPU
    with pytest.raises(ValueError, match="CUDA"):
        fastllm.patch(m, PatchConfig(decode_graphs=True))
    assert fastllm.is_patched(m) and patch_config(m) == PatchConfig()  # the previous patch state is kept
    assert patch_report(m) is report
    assert base.generation_config.cache_implementation == cache_impl
    off = fastllm.patch(m, PatchConfig(decode_graphs=False))
    assert off.disabled["decode_graphs"] == "disabled by PatchConfig"
    fastllm.unpatch(m)


def test_static_generate_kwargs():
    """generate goes static only where the call leaves the cache to transformers; any choice of the user's stays."""
    from transformers import GenerationConfig

    m = SimpleNamespace(generation_config=GenerationConfig())
    want = {"max_new_tokens": 3, "cache_implementation": "static", "disable_compile": True}
    assert static_generate_kwargs(m, {"max_new_tokens": 3}) == want
    for kept in ({"past_key_values": object()}, {"cache": object()}, {"cache_implementation": "dynamic"},
                 {"assistant_model": object()}, {"num_beams": 2}, {"use_cache": False},
                 {"prompt_lookup_num_tokens": 3},
                 {"generation_config": GenerationConfig(cache_implementation="dynamic")},
                 {"generation_config": GenerationConfig(num_beams=2)},
                 {"generation_config": GenerationConfig(use_cache=False)},
                 {"generation_config": GenerationConfig(prompt_lookup_num_tokens=3)}):
        assert static_generate_kwargs(m, dict(kept)) == kept
    # a passed config that leaves the cache to transformers (TRL's rollouts): a static copy, the caller's untouched
    theirs = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, disable_compile=True)
    out = static_generate_kwargs(m, {"generation_config": theirs, "max_new_tokens": 5})
    got = out["generation_config"]
    assert got is not theirs and theirs.cache_implementation is None
    assert (got.cache_implementation, got.disable_compile) == ("static", True)
    assert (got.temperature, got.do_sample, got.max_new_tokens) == (0.7, True, 5)
    assert out["max_new_tokens"] == 5 and "cache_implementation" not in out
    for config in (GenerationConfig(cache_implementation="dynamic"), GenerationConfig(num_beams=3)):
        assert static_generate_kwargs(SimpleNamespace(generation_config=config), {}) == {}
    assert static_generate_kwargs(SimpleNamespace(), {}) == {}  # no generation config: left alone


def test_decode_graphs_eligible_on_cpu():
    assert "CUDA" in decode_graphs.decode_graphs_eligible(nn.Linear(2, 2))
    assert "CUDA" in decode_graphs.decode_graphs_eligible(nn.Module())


def test_new_decode_graphs_registry():
    m = nn.Linear(2, 2)
    assert decode_graphs.decode_graphs_of(m) is None
    g = decode_graphs.new_decode_graphs(m)
    assert decode_graphs.decode_graphs_of(m) is g and not g.graphs
    assert decode_graphs.new_decode_graphs(m) is not g  # each patch starts over


@pytest.mark.parametrize("value", ["yes", "auto", "cuda"])
def test_patch_config_decode_graphs_type(value):
    with pytest.raises(TypeError, match="decode_graphs"):
        PatchConfig(decode_graphs=value)


def test_sharded_parameters_are_not_graphed():
    """DTensor parameters (FSDP2): their gathers cannot be replayed, so such a model's decode steps run eagerly."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    assert decode_graphs.why_not_graphable(torch.nn.Linear(4, 4)) is None  # no process group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = torch.nn.Linear(4, 4)
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Replicate()]))
        assert "sharded parameters" in decode_graphs.why_not_graphable(lin)
        assert decode_graphs.why_not_graphable(torch.nn.Linear(4, 4)) is None
    finally:
        dist.destroy_process_group()


def test_refused_model_runs_eagerly(cpu_as_cuda, monkeypatch):
    """A model ``why_not_graphable`` refuses (sharded parameters) never captures; its steps count the reason."""
    looks = []
    monkeypatch.setattr(decode_graphs, "why_not_graphable",
                        lambda model: looks.append(model) or "sharded parameters (FSDP2 / DTensor)")
    graphs = DecodeGraphs()
    graphs._capture = _Rerun
    m, cache = _Echo(), _fake_cache()
    with torch.no_grad():
        for v in (3, 5, 7):
            out = graphs.step(m, (), {"input_ids": torch.tensor([[v]]), "cache": cache})
            assert out[0].item() == 2 * v
    assert graphs.stats["captured"] == 0 and graphs.stats["eager: sharded parameters (FSDP2 / DTensor)"] == 3
    assert len(looks) == 1  # once per cache (a generate call), not once a step



@pytest.fixture
def static_generate_bound(model):
    """``patch``'s generate wrapper bound on the CPU model by hand (patch binds it on CUDA models only)."""
    base = find_base(model)
    base.generate = types.MethodType(static_generate, base)
    try:
        yield base
    finally:
        vars(base).pop("generate", None)


def test_generate_wrapper_goes_static_and_keeps_a_users_cache(model, bind, static_generate_bound):
    from transformers import DynamicCache

    graphs = bind()
    x = _ids()
    with torch.no_grad():
        plain = model.generate(input_ids=x, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert graphs.stats["captured"] == 1  # static cache chosen by the wrapper, so the steps were graphed
    with torch.no_grad():  # a cache of the user's: transformers would refuse it next to cache_implementation
        own = model.generate(input_ids=x, past_key_values=DynamicCache(config=static_generate_bound.config),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert any(k.startswith("eager: no static KV cache") for k in graphs.stats), graphs.summary()
    torch.testing.assert_close(own, plain, rtol=0, atol=0)


def test_generate_wrapper_graphs_a_passed_generation_config(model, bind, static_generate_bound):
    """TRL's GRPO/RLOO rollouts pass ``generation_config=`` (cache left to transformers): the steps are graphed and the
    tokens are those of a plain call; the trainer's config object keeps its own settings."""
    from transformers import GenerationConfig

    graphs = bind()
    x = _ids()
    theirs = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=x, generation_config=theirs)
    assert graphs.stats["captured"] == 1 and theirs.cache_implementation is None, graphs.summary()
    vars(static_generate_bound).pop("generate")  # transformers' own generate: dynamic cache, eager steps
    with torch.no_grad():
        ref = model.generate(input_ids=x, generation_config=theirs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_seq_guard_takes_an_empty_dynamic_cache(model):
    """The max_seq_length guard on a manual loop's ``DynamicCache()`` (no config, no layers yet)."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=_ids(length=5), past_key_values=DynamicCache(), use_cache=True)
    assert out.logits.shape == (1, 5, VOCAB)


def _reused_cache_steps(model, graphs, cache, name, x):
    """Prefill and NEW decode steps by hand over one user static cache (reset first; a new one of the same size
    when ``cache`` is None): the logits of each step."""
    if cache is None:
        from transformers import StaticCache

        cache = StaticCache(config=find_base(model).config, max_cache_len=32)
    cache.reset()
    logits = []
    with torch.no_grad():
        out = model(input_ids=x, **{name: cache}, use_cache=True)
        for _ in range(NEW):
            nxt = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1])
            out = model(input_ids=nxt, **{name: cache}, use_cache=True)
    return torch.stack(logits)


@pytest.mark.parametrize("change", ["scaling", "hook"])
@pytest.mark.parametrize("refresh", ["prefill", "new cache"])
def test_state_changes_between_calls_make_a_new_graph(model, bind, change, refresh):
    """LoRA scaling, a forward hook: neither is an input, both change what a step computes; a replay must
    not freeze them. The fingerprint covering them is taken again after a multi-token call (a prompt's prefill) or
    when the cache object changes (each ``generate`` makes its own); with a one-token prompt here, the second case
    gets a new cache each run."""
    from transformers import StaticCache
    from transformers.models.llama.modeling_llama import LlamaModel

    name = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    base = find_base(model)
    cache = StaticCache(config=base.config, max_cache_len=32) if refresh == "prefill" else None
    graphs = bind()
    x = _ids(length=2 if refresh == "prefill" else 1)
    before = _reused_cache_steps(model, graphs, cache, name, x)
    captured = graphs.stats["captured"]
    layer = base.model.layers[0].self_attn.q_proj
    handle = None
    if change == "scaling":
        layer.scaling = {k: v * 3 for k, v in layer.scaling.items()}
    else:
        handle = layer.register_forward_hook(lambda mod, args, out: out * 2)
    try:
        with torch.no_grad():
            after = _reused_cache_steps(model, graphs, cache, name, x)
        assert graphs.stats["captured"] == captured + 1, graphs.summary()
        saved, graphs.disabled = graphs.disabled, "reference"
        want = _reused_cache_steps(model, graphs, cache, name, x)
        graphs.disabled = saved
    finally:
        if change == "scaling":
            layer.scaling = {k: v / 3 for k, v in layer.scaling.items()}
        else:
            handle.remove()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


@pytest.mark.parametrize("flip", ["fused_xa", "pdl", "grouped_decode", "decode_rows"])
def test_a_decode_switch_flipped_between_calls_makes_a_new_graph(model, bind, flip):
    """The process-wide decode switches pick a step's kernels (``decode_switches``): flipped between two calls over
    the same cache, the next step is captured again instead of replaying the kernels of the old setting."""
    from transformers import StaticCache
    from transformers.models.llama.modeling_llama import LlamaModel

    from fastllm.kernels.pdl import set_pdl
    from fastllm.modules.decoder import set_grouped_decode
    from fastllm.ops.lora import set_fused_xa
    from fastllm.ops.nf4_gemv import set_decode_rows

    setter, value = {"fused_xa": (set_fused_xa, True), "pdl": (set_pdl, True),
                     "grouped_decode": (set_grouped_decode, False), "decode_rows": (set_decode_rows, 8)}[flip]
    name = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    cache = StaticCache(config=find_base(model).config, max_cache_len=32)
    graphs = bind()
    before = _reused_cache_steps(model, graphs, cache, name, _ids(length=2))
    captured = graphs.stats["captured"]
    key = decode_graphs.decode_switches()
    setter(value)
    try:
        assert decode_graphs.decode_switches() != key
        after = _reused_cache_steps(model, graphs, cache, name, _ids(length=2))
    finally:
        setter(None)
    assert graphs.stats["captured"] == captured + 1, graphs.summary()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # CPU: the same torch maths either way


def test_container_arguments_run_eagerly(cpu_as_cuda, static_cache):
    x = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        assert "of type list" in why_eager((), {"input_ids": x, "cache": static_cache, "masks": [torch.ones(1)]})
        nested = {"m": {"n": torch.ones(1)}}  # a mask mapping is flat: anything deeper is a container
        assert "of type dict" in why_eager((), {"input_ids": x, "cache": static_cache, "masks": nested})


def test_unpatch_forgets_the_graphs():
    m = torch.nn.Linear(2, 2)
    decode_graphs.new_decode_graphs(m)
    handle = decode_graphs.forget_on_unpatch(m)
    assert decode_graphs.decode_graphs_of(m) is not None
    handle.remove()
    assert decode_graphs.decode_graphs_of(m) is None


def test_fingerprint_sees_train_mode_and_config_flags(model):
    """Train mode (dropout may act) and the config's output flags change a step without being inputs."""
    inner = find_base(model).model
    before = decode_graphs.module_fingerprint(inner)
    assert decode_graphs.module_fingerprint(inner) == before
    inner.layers[0].train()
    try:
        assert decode_graphs.module_fingerprint(inner) != before
    finally:
        inner.layers[0].eval()
    inner.config.output_hidden_states = True
    try:
        assert decode_graphs.module_fingerprint(inner) != before
    finally:
        inner.config.output_hidden_states = False
    assert decode_graphs.module_fingerprint(inner) == before


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_sliding_window_layers_graph_on_both_sides_of_the_window(tiny_arch_dir, cpu_as_cuda, model_type):
    """Sliding-window static cache layers branch on a host counter (index_copy while the window of 16 fills, a roll
    once full) that a replay does not advance: the graphs advance it and key on which side of the window a step is,
    so a 13-token prompt decoding 7 tokens warms up and captures once on each side. Qwen2's generate passes a mask
    per layer type (``{"full_attention": ..., "sliding_attention": ...}``): those tensors are graph inputs. The
    steps equal eager ones."""
    m, _ = FastLlama.from_pretrained(tiny_arch_dir(model_type), dtype=torch.float32, max_seq_length=256,
                                     load_in_4bit=False)
    m = FastLlama.get_peft_model(m, r=8, lora_alpha=16).eval()
    inner = find_base(m).model
    graphs = DecodeGraphs()
    graphs._capture = _Rerun
    inner.forward = types.MethodType(make_graphed_forward(graphs), inner)
    x = torch.randint(0, 331, (1, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, disable_compile=True,
                  cache_implementation="static")
        got = m.generate(input_ids=x, **kw)
        # decode steps start at cache lengths 13..18: 13 warm-up, 14 capture, 15 replay; 16 (full) warm-up, ...
        assert graphs.stats == Counter({PREFILL: 1, WARMUP: 2, "captured": 2, "replayed": NEW - 3}), graphs.summary()
        windows = sorted(key[2] for key in graphs.graphs)
        n_sliding = 1 if model_type == "qwen2" else 2
        assert windows == [(False,) * n_sliding, (True,) * n_sliding]
        paths = next(iter(graphs.graphs.values())).paths
        if model_type == "qwen2":
            assert {("attention_mask", "full_attention"), ("attention_mask", "sliding_attention")} <= set(paths)
        graphs.disabled = "reference"
        want = m.generate(input_ids=x, **kw)
    vars(inner).pop("forward")
    _assert_same((got.sequences, torch.stack(got.logits)), (want.sequences, torch.stack(want.logits)))


def test_generate_wrapper_drops_its_graphs_with_the_dense_copies(model, bind, static_generate_bound):
    """With ``ops.dense_decode`` on, a generate call's graphs (which read the call's dense weight copies) are dropped
    when the call returns, so the copies' memory goes; without it the graphs stay for the next call."""
    from fastllm.ops import dense_decode

    graphs = bind()
    inner = find_base(model).model
    decode_graphs._BY_MODEL[inner] = graphs  # as ``patch`` registers them (``new_decode_graphs``)
    x = _ids()
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    with torch.no_grad():
        kept = model.generate(input_ids=x, **gen)
    assert graphs.stats["captured"] == 1 and len(graphs.graphs) == 1
    dense_decode.set_enabled(True)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=x, **gen)
    finally:
        dense_decode.set_enabled(None)
        decode_graphs._BY_MODEL.pop(inner, None)
    assert graphs.stats["captured"] == 2 and len(graphs.graphs) == 0 and dense_decode.buffers() == ()
    torch.testing.assert_close(out, kept, rtol=0, atol=0)


def test_full_windows_roll_without_a_host_copy_during_a_capture():
    """A full sliding window's one-token update inside a capture (``device_side_rolls``) leaves the same keys, values,
    returns and host counter as transformers' own update, and the layer's own update is back afterwards."""
    from types import SimpleNamespace

    from transformers.cache_utils import StaticSlidingWindowLayer

    torch.manual_seed(0)
    ours, theirs = (StaticSlidingWindowLayer(max_cache_len=32, sliding_window=5) for _ in range(2))
    prompt = torch.randn(2, 3, 7, 6), torch.randn(2, 3, 7, 6)  # a prefill longer than the window
    for layer in (ours, theirs):
        layer.update(*prompt)
    cache = SimpleNamespace(layers=[ours])
    for _ in range(4):
        k, v = torch.randn(2, 3, 1, 6), torch.randn(2, 3, 1, 6)
        with caches.device_side_rolls(cache):
            assert "update" in vars(ours)
            got = ours.update(k, v)
        want = theirs.update(k, v)
        assert "update" not in vars(ours) and ours.cumulative_length_int == theirs.cumulative_length_int
        for a, b in zip(got + (ours.keys, ours.values), want + (theirs.keys, theirs.values)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    filling = StaticSlidingWindowLayer(max_cache_len=32, sliding_window=5)
    filling.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    with caches.device_side_rolls(SimpleNamespace(layers=[filling])):
        assert "update" not in vars(filling)  # not full: upstream's index_copy path captures as it is
