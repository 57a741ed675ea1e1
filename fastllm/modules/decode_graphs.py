"""Generation's decode steps as CUDA graphs over a static KV cache (``PatchConfig(decode_graphs=...)``).

A decode step (one token) is host-bound: a small QLoRA model's step has an order of magnitude less GPU work
than Python and launches (docs/benchmarks.md). With a static cache (fixed-address KV tensors, a device-side length
counter) the whole decoder stack of one step is the same kernels on the same addresses every step, so it is
captured once as a CUDA graph and replayed: the step's host cost becomes a few input copies and one replay.

How a call of the patched decoder model's ``forward`` (``LlamaModel``, ``Qwen2Model``, ...) goes
(``DecodeGraphs.step``):

- not a graphable decode step (more than one token, grad mode on, no static cache, a 2-D attention mask that
  grows every step, ...): the class's own forward; the reason is counted in ``stats``;
- a new *key* (input shapes and dtypes, the cache's tensor addresses, the flags passed, autocast state):
  first seen -> one eager step (it warms up lazy state: compiled regions, cuBLAS handles); seen again on the
  next call -> capture, then replay. A key never seen twice in a row (beam search reorders the cache into new
  tensors every step) is never captured;
- a captured key: copy the tensor inputs into the graph's static buffers, replay, return fresh outputs.

The static cache comes from ``generate``: the patched model's ``generate`` adds ``cache_implementation="static"``
(``static_generate_kwargs``) where the call leaves the cache to transformers (a passed generation config that chooses
no cache, as TRL's rollouts pass, gets a static copy); a cache, cache choice, beams or assistant the user passes is
kept as it is (and then decode runs eagerly unless that cache is static).

What a replay cannot notice, and how it is covered: the state the forward's Python branches on (weights replaced,
adapters switched, disabled, merged or rescaled, hooks, train/eval, the config's output flags) is fingerprinted
after every call that is not a graphed step (each ``generate`` starts with its prefill) and whenever the cache
object changes (each ``generate`` makes its own), and is part of the key. A change between two one-token calls
over the same cache object, with no other call between them, is not seen. Weights updated in place (an optimizer
step) are read by the replay as they are.

The shared NF4 dequant workspace (``fastllm.ops.nf4``): a step whose 4-bit linears dequantize (a batch of more than one
token row: one row takes bnb's GEMV) writes the dense weights into that buffer, so the graph replays writes to its
address. The buffer is replaced when a larger weight needs it and dropped by ``clear_workspaces``; a replay after that
would write into memory another tensor may own by then. So a graph holds the buffers it captured (they stay allocated
while it lives), and the key carries ``workspace_epoch``: after a growth or a clear the step is captured again, and the
graphs of older epochs are dropped at that capture, releasing their buffers.

Sliding-window static cache layers (Mistral with a window, Qwen2/3's sliding layers) branch on a host-side length
(``host_counters``): index_copy while the window fills, a roll once it is full. A replay runs no Python, so the graphs
advance that length themselves after each replay, and the key carries which side of the window each layer is on.

A capture that fails (an op that syncs with the host, a lazily created tensor) is logged once, counted, and
turns graphs off for the model; that step and every later one run eagerly, with the same results.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections import Counter, OrderedDict

import torch
from torch import nn

from ..ops import dense_decode
from ..ops.nf4 import workspace_buffers, workspace_epoch
from .deferred_stop import deferred_stop_checks
from .static_cache import CACHE_KWARGS, cache_addresses, device_side_rolls, host_counters, static_cache_of

logger = logging.getLogger("fastllm")

MAX_GRAPHS = 4  # per model, least recently used dropped first (one per batch size / cache in use)
_EAGER_FLAGS = ("output_attentions", "output_hidden_states")  # outputs a graph does not keep


def why_not_graphable(model: nn.Module) -> str | None:
    """Why no step of ``model`` can be graphed whatever its inputs, or None. Sharded parameters (FSDP2, tensor
    parallel: DTensors) are gathered into buffers that the gathering hooks free again after the step; a graph
    would replay its collectives into memory that is no longer theirs."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # no process group, no DTensor
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "sharded parameters (FSDP2 / DTensor)"
    return None


def module_fingerprint(model: nn.Module) -> tuple:
    """What the forward's Python branches on besides its inputs, which a replay would freeze: every parameter's and
    buffer's address (a reloaded or moved weight), each module's train/eval flag and hooks (global ones too), PEFT's
    adapter state (disabled, merged, active, scaling), and the config's output flags."""
    from torch.nn.modules import module as nn_module

    ptrs = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
    modules = []
    for m in model.modules():
        entry = (m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        if hasattr(m, "merged_adapters"):  # a PEFT tuner layer
            entry += (getattr(m, "disable_adapters", None), tuple(m.merged_adapters),
                      str(getattr(m, "active_adapters", "")), str(getattr(m, "scaling", "")))
        modules.append(entry)
    hooks = tuple(tuple(d) for d in (nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks))
    config = getattr(model, "config", None)
    flags = tuple(getattr(config, f, None) for f in ("output_attentions", "output_hidden_states", "use_cache",
                                                       "_attn_implementation"))
    return ptrs, tuple(modules), hooks, flags


def _tokens(kwargs: dict) -> int:
    x = kwargs.get("input_ids")
    return (x if x is not None else kwargs["inputs_embeds"]).shape[1]


def _graphable_device(x: torch.Tensor) -> bool:
    return x.is_cuda


def why_eager(args: tuple, kwargs: dict) -> str | None:
    """Why this call of the decoder model's ``forward`` is not a graphable decode step, or None when it is."""
    if args:
        return "positional arguments"
    if torch.is_grad_enabled():
        return "grad mode on"
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if not isinstance(x, torch.Tensor) or not _graphable_device(x):
        return "inputs not on CUDA"
    if x.dim() < 2 or x.shape[1] != 1:
        return "not one token (prefill)"
    if static_cache_of(kwargs) is None:
        return "no static KV cache (generate with cache_implementation='static')"
    mask = kwargs.get("attention_mask")
    masks = mask.values() if _is_mapping(mask) else (mask,)
    if any(isinstance(m, torch.Tensor) and m.dim() != 4 for m in masks):
        return "2-D attention mask (it grows every step)"
    if any(kwargs.get(f) for f in _EAGER_FLAGS):
        return "attentions or hidden states asked for"
    for name, v in kwargs.items():
        if not (v is None or isinstance(v, (torch.Tensor, bool, int, float, str)) or name in CACHE_KWARGS
                or _is_mapping(v)):
            # a container's tensors would not be copied into the graph's inputs, and its id is no key
            return f"argument {name!r} of type {type(v).__name__}"
    return None


def _is_mapping(v) -> bool:
    """A flat dict of tensors (or None) by name: the per-layer-type mask mapping ``generate`` passes models with
    sliding layers (Qwen2/3: ``{"full_attention": ..., "sliding_attention": ...}``). Its tensors are graph inputs."""
    return type(v) is dict and all(isinstance(k, str) and (t is None or isinstance(t, torch.Tensor))
                                   for k, t in v.items())


def tensor_paths(kwargs: dict) -> list[tuple]:
    """Where a step's tensor inputs are: ``(name,)`` for a tensor argument, ``(name, key)`` inside a mask mapping."""
    paths = []
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            paths.append((name,))
        elif _is_mapping(v):
            paths.extend((name, key) for key, t in v.items() if isinstance(t, torch.Tensor))
    return paths


def _at(kwargs: dict, path: tuple) -> torch.Tensor:
    v = kwargs[path[0]]
    return v if len(path) == 1 else v[path[1]]


def with_inputs(kwargs: dict, inputs: dict) -> dict:
    """``kwargs`` with the tensors at ``inputs``' paths replaced by ``inputs``' tensors (mappings copied, not
    changed)."""
    out = dict(kwargs)
    for path, t in inputs.items():
        if len(path) == 1:
            out[path[0]] = t
        else:
            if out[path[0]] is kwargs[path[0]]:
                out[path[0]] = dict(kwargs[path[0]])
            out[path[0]][path[1]] = t
    return out


def decode_switches() -> tuple:
    """The process-wide switches that pick a decode step's kernels (the GEMV and its row cap, the fused adapters'
    xa, PDL launches, the grouped attention, dense copies): part of the key, so a switch flipped between two
    ``generate`` calls gets its own capture instead of a replay of the old kernels."""
    from ..kernels.pdl import pdl_enabled
    from ..ops.lora import fused_xa
    from ..ops.nf4_gemv import decode_rows, gemv_switched_on
    from .decoder import grouped_decode

    return gemv_switched_on(), decode_rows(), fused_xa(), pdl_enabled(), grouped_decode(), dense_decode.enabled()


def _autocast_state() -> tuple:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _capture_autocast():
    """The caller's autocast without its weight-cast cache: a cached cast would hand the capture a tensor that dies
    with the caller's autocast block. The warm-up step runs under it too: dynamo guards on that cache flag, and a
    compiled region must not compile inside a capture."""
    enabled, dtype = _autocast_state()
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


class _Graph:
    """One captured decode step: the graph, its static input buffers and the outputs it writes."""

    def __init__(self, run, kwargs: dict, cache):
        self.cache_ref = weakref.ref(cache)  # weakly: a graph must not keep its KV tensors alive
        self.paths = tensor_paths(kwargs)
        self.inputs = {p: _at(kwargs, p).clone() for p in self.paths}
        static = with_inputs(kwargs, self.inputs)
        self.graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(self.graph, capture_error_mode="thread_local")
        with _capture_autocast(), device_side_rolls(cache), capture:
            out = run(**static)
        # Not the cache object itself: holding it would keep its KV tensors alive, so the next generate's new cache
        # could never get the same addresses back (and be replayed over without a new capture).
        self.out = _fresh(out, cache, _CACHE, clone=False)

    def replay(self, kwargs: dict, cache):
        for path in self.paths:
            self.inputs[path].copy_(_at(kwargs, path))
        self.graph.replay()
        return _fresh(self.out, _CACHE, cache)


def _rng_snapshot():
    """The CUDA generator and a copy of its state. A capture that fails midway never runs the generator's capture
    epilogue, and its next random op outside a graph would then raise ("Offset increment outside graph capture
    encountered unexpectedly")."""
    if not torch.cuda.is_available():
        return None
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    return gen, gen.clone_state()


def _rng_restore(snapshot) -> None:
    if snapshot is not None:
        gen, state = snapshot
        gen.graphsafe_set_state(state)


_CACHE = object()  # where the cache object sits in a captured step's outputs


def _dead_ref():
    return None


def _fresh(out, old, new, clone: bool = True):
    """``out`` with the object ``old`` replaced by ``new`` (the cache: transformers may build a new cache object
    over the same tensors) and, with ``clone``, its tensors cloned (the next replay overwrites the graph's)."""
    if isinstance(out, torch.Tensor):
        return out.clone() if clone else out
    if out is old:
        return new
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict dataclass
        return type(out)(**{k: _fresh(v, old, new, clone) for k, v in out.items()})
    if isinstance(out, tuple):
        return type(out)(_fresh(v, old, new, clone) for v in out)
    return out


class _Tokens:
    """Small ints standing for large keys parts (every cache tensor's address, the module fingerprint), so a decode
    step's key hashes and compares in microseconds: a tuple's hash is not cached, and the fingerprint holds an entry
    per module. Equal parts get equal tokens (a new generate's cache at the old addresses replays the old graph);
    past ``limit`` parts the table starts again with new numbers (keys of old graphs then miss, and they age out)."""

    def __init__(self, limit: int = 256):
        self.table: dict = {}
        self.limit = limit
        self.next = 0

    def __call__(self, part) -> int:
        token = self.table.get(part)
        if token is None:
            if len(self.table) >= self.limit:
                self.table.clear()
            token = self.table[part] = self.next
            self.next += 1
        return token


class _AddressMemo:
    """``cache_addresses`` of the cache in use, as a token, recomputed only when that cache's layers no longer hold
    the tensor objects seen last (by identity, through weak references: the memo keeps no KV tensor alive) or gained
    an attribute; a static cache's tensors are fixed once allocated, so a decode step costs one identity check a
    tensor instead of reading every address, shape and dtype."""

    def __init__(self, tokens: _Tokens):
        self.tokens = tokens
        self.cache = _dead_ref
        self.layers: list = []
        self.token: int | None = None

    def __call__(self, cache) -> int | None:
        if self.token is not None and self.cache() is cache and self._same(cache.layers):
            return self.token
        addresses = cache_addresses(cache)
        self.token = None if addresses is None else self.tokens(addresses)
        if self.token is not None:
            self.cache = weakref.ref(cache)
            self.layers = [(len(vars(layer)), [(n, weakref.ref(t)) for n, t in vars(layer).items()
                                               if isinstance(t, torch.Tensor)]) for layer in cache.layers]
        return self.token

    def _same(self, layers) -> bool:
        if len(layers) != len(self.layers):
            return False
        for layer, (count, refs) in zip(layers, self.layers):
            if len(vars(layer)) != count:
                return False
            for name, ref in refs:
                if getattr(layer, name, None) is not ref():
                    return False
        return True


class DecodeGraphs:
    """The decode-step graphs of one model (see the module docstring)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self.graphs: OrderedDict = OrderedDict()
        self.max_graphs = max_graphs
        self.stats: Counter = Counter()
        self.disabled: str | None = None
        self._last_key = None
        self._fingerprint = None
        self._refused: str | None = None
        self._cache_ref = _dead_ref
        self._capture = _Graph  # tests on the CPU swap in a stand-in for the CUDA capture
        self._tokens = _Tokens()
        self._addresses = _AddressMemo(self._tokens)

    def step(self, model: nn.Module, args: tuple, kwargs: dict):
        run = type(model).forward.__get__(model)
        reason = self.disabled or why_eager(args, kwargs)
        if reason is not None:
            self.stats[f"eager: {reason}"] += 1
            self._fingerprint = None  # a prefill (or anything else) may come after a change: look again
            return run(*args, **kwargs)
        cache = static_cache_of(kwargs)
        if self._cache_ref() is not cache:  # a new cache: a new generate call, after which the model may differ
            self._cache_ref, self._fingerprint = weakref.ref(cache), None
        key = self._key(model, kwargs, cache)
        if key is None:  # the cache allocates in this call (a one-token prompt's prefill)
            self.stats["eager: cache not allocated yet"] += 1
            self._fingerprint = None
            return run(**kwargs)
        if self._refused:  # kept with the fingerprint: looked at again when that is
            self.stats[f"eager: {self._refused}"] += 1
            return run(**kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            if key != self._last_key:  # first sight: an eager step warms up lazy state; capture on the next
                self.stats["eager: warm-up"] += 1
                with _capture_autocast():  # the capture's global state, so compiled regions compile now, not in it
                    out = run(**kwargs)
                # with the epoch after the warm-up: its own first dequant may have grown the workspace
                self._last_key = key[:-1] + (workspace_epoch(),)
                return out
            graph = self._new_graph(run, kwargs, cache, key)
            if graph is None:
                return run(**kwargs)
            advance = 0  # the capture ran the step's Python once: the host counters have moved for this step
        else:
            self.graphs.move_to_end(key)
            advance = _tokens(kwargs)
        self.stats["replayed"] += 1
        out = graph.replay(kwargs, cache)
        for layer in host_counters(cache):
            layer.cumulative_length_int += advance
        return out

    def _key(self, model: nn.Module, kwargs: dict, cache) -> tuple | None:
        addresses = self._addresses(cache)  # a token (``_AddressMemo``)
        if addresses is None:
            return None
        if self._fingerprint is None:  # once after any call that is not a decode step (a prefill); a token
            self._fingerprint = self._tokens(module_fingerprint(model))
            self._refused = why_not_graphable(model)
        parts = []
        for name, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                parts.append((name, v.shape, v.dtype, v.device))
            elif v is cache:
                parts.append((name, "cache"))
            elif _is_mapping(v):
                parts.append((name, tuple((k, None if t is None else (t.shape, t.dtype, t.device))
                                          for k, t in v.items())))
            else:  # plain values only (``why_eager`` turns other containers away)
                parts.append((name, v))
        windows = tuple(layer.cumulative_length_int >= layer.max_cache_len for layer in host_counters(cache))
        # the workspace epoch last: ``_new_graph`` reads it back from the key
        return (tuple(parts), addresses, windows, self._fingerprint, _autocast_state(), decode_switches(),
                torch.is_inference_mode_enabled(), workspace_epoch())

    def _new_graph(self, run, kwargs: dict, cache, key):
        rng = _rng_snapshot()
        held = workspace_buffers()  # before and after: a buffer replaced during the capture was written by it too
        counters = [(layer, layer.cumulative_length_int) for layer in host_counters(cache)]
        try:
            graph = self._capture(run, kwargs, cache)
        except Exception as exc:  # noqa: BLE001 - any capture error turns graphs off, reported, results unchanged
            _rng_restore(rng)
            for layer, value in counters:  # the eager step that follows advances them once
                layer.cumulative_length_int = value
            self.disabled = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            self.graphs.clear()
            logger.warning("fastllm: decode_graphs off for this model, decode steps run eagerly: %s", self.disabled)
            logger.debug("fastllm: the failed capture's traceback", exc_info=True)
            self.stats[f"eager: {self.disabled}"] += 1
            return None
        self.stats["captured"] += 1
        # The graph replays into these buffers: it keeps them allocated for as long as it can replay.
        graph.workspaces = held + workspace_buffers()
        epoch = workspace_epoch()
        for k in [k for k, g in self.graphs.items() if g.cache_ref() is None or k[-1] != epoch]:
            # their caches are gone (a new cache rarely gets all their addresses back), or their keys name a workspace
            # epoch that is over (never matched again): dropping them releases the buffers they hold
            del self.graphs[k]
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return graph

    def summary(self) -> str:
        done = f"{self.stats['captured']} captured, {self.stats['replayed']} replayed"
        eager = Counter({k[7:]: n for k, n in self.stats.items() if k.startswith("eager: ")})
        return done + ("; eager steps: " + ", ".join(f"{k} x{n}" for k, n in eager.most_common()) if eager else "")


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_graphs_of(model: nn.Module) -> DecodeGraphs | None:
    """The ``DecodeGraphs`` of a patched model (the transformers model ``patch`` found), or None."""
    return _BY_MODEL.get(model)


def new_decode_graphs(model: nn.Module) -> DecodeGraphs:
    """Fresh (empty) decode graphs for ``model``: each ``patch`` starts over, as the forwards a graph captured may
    have changed."""
    graphs = _BY_MODEL[model] = DecodeGraphs()
    return graphs


def make_graphed_forward(graphs: DecodeGraphs):
    """The decoder model's ``forward`` replacement: decode steps through ``graphs``, anything else as transformers'."""

    def graphed_model_forward(self, *args, **kwargs):
        return graphs.step(self, args, kwargs)

    return graphed_model_forward


def decode_graphs_eligible(module: nn.Module) -> str | None:
    """Why a decoder model (``LlamaModel``, ``Qwen2Model``, ...) cannot take decode graphs, or None."""
    p = next(module.parameters(), None)
    if p is None or p.device.type != "cuda":
        return "CUDA graphs need the model on a CUDA device"
    return None


_NO_STATIC = ("past_key_values", "cache", "cache_implementation", "assistant_model", "prompt_lookup_num_tokens",
              "assistant_early_exit")


def _leaves_cache(config) -> bool:
    """A generation config that chooses no cache and nothing a static cache would refuse (beams, assistants,
    prompt lookup, no cache at all)."""
    return (config.cache_implementation is None and config.use_cache is not False and (config.num_beams or 1) == 1
            and all(getattr(config, k, None) is None for k in _NO_STATIC[3:]))


def static_generate_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """``generate``'s kwargs with ``cache_implementation="static"`` (and transformers' own auto-compile of the forward
    off: fastllm graphs the decode step itself) when the call leaves the cache to transformers: no cache, cache
    choice or assistant passed, a single beam, the model's config choosing no cache either. A ``generation_config``
    passed with those same defaults (TRL's trainers pass one for their rollouts) is copied with the static cache
    set; the caller's object is not changed. Any choice of the user's is kept (a static cache would refuse a passed
    cache, assisted decoding, ...)."""
    config = getattr(model, "generation_config", None)
    passed = kwargs.get("generation_config")
    if (config is None or not _leaves_cache(config) or kwargs.get("use_cache") is False
            or any(kwargs.get(k) is not None for k in _NO_STATIC) or (kwargs.get("num_beams") or 1) > 1
            or (passed is not None and not _leaves_cache(passed))):
        return kwargs
    if passed is None:
        return {**kwargs, "cache_implementation": "static", "disable_compile": True}
    passed = copy.deepcopy(passed)
    passed.cache_implementation, passed.disable_compile = "static", True
    return {**kwargs, "generation_config": passed}


def static_generate(self, *args, **kwargs):
    """``generate`` over a static KV cache where the call leaves the cache to transformers (``static_generate_kwargs``);
    bound per instance on the patched model. With ``ops.dense_decode`` on, the call runs in its scope: dense weight
    copies for its steps, dropped at the end together with the graphs that captured them (so their memory goes). The
    stop check is read one step late on CUDA (``deferred_stop``): the host queues a step while the GPU runs the last."""
    # sharded weights are gathered into buffers freed after each layer: no address of theirs may key a copy
    scope = dense_decode.scope() if why_not_graphable(self) is None else contextlib.nullcontext(False)
    with scope as dense, deferred_stop_checks():
        try:
            return type(self).generate(self, *args, **static_generate_kwargs(self, kwargs))
        finally:
            if dense:
                for module in self.modules():
                    graphs = _BY_MODEL.get(module)
                    if graphs is not None:
                        graphs.graphs.clear()


class _Forget:
    """A removable handle that drops a model's decode graphs (and their memory pools) on ``unpatch``."""

    def __init__(self, model: nn.Module):
        self.ref = weakref.ref(model)

    def remove(self) -> None:
        model = self.ref()
        if model is not None:
            _BY_MODEL.pop(model, None)


def forget_on_unpatch(model: nn.Module) -> _Forget:
    return _Forget(model)


__all__ = ["DecodeGraphs", "cache_addresses", "decode_graphs_eligible", "decode_graphs_of", "forget_on_unpatch",
           "make_graphed_forward", "module_fingerprint", "new_decode_graphs", "static_cache_of", "static_generate",
           "static_generate_kwargs", "tensor_paths", "why_eager", "why_not_graphable", "with_inputs"]
