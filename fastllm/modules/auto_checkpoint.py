"""``gradient_checkpointing="auto"``: per decoder layer, keep, recompute or offload, the fastest mix under a budget.

Three ways to run a layer in training, from fastest to leanest:

- ``keep``: no checkpoint; autograd keeps everything the layer saves, ``K`` bytes a token (measured);
- ``recompute``: the layer's input is kept (``R`` = hidden size x element size a token), the rest is recomputed in
  backward (the fused decoder-layer op where it applies);
- ``offload``: as recompute, with the input parked in pinned host memory (``checkpointing.Offloader``: side-stream
  copies, prefetched one layer ahead in backward): nothing stays on the GPU.

With ``n`` layers, ``T`` tokens in the batch and ``avail`` bytes left under the budget once the rest of the step is
counted (weights, optimizer state, the peak of the loss and of one layer's backward), the plan keeps
``k = min(n, avail // (K T))`` layers, recomputes ``r = min(n - k, (avail - k K T) // (R T))`` and offloads the rest:
keeping saves a layer's whole recompute, while recompute and offload differ only by copies that overlap compute.
Kept layers are the last ones (backward reaches them first).

Calibration (on CUDA, per largest token count seen): the first pass at a new largest ``T`` runs layer 0 with its
saved tensors counted (``K``) and parked on the host, and every other layer offloaded, the leanest plan; the next
pass runs the leanest plan again, and its peak (``torch.cuda.max_memory_allocated``, reset at that pass's start, read
once layer 0's output gradient arrives) minus the allocation at its start is the step's overhead (the first step's
peak would count the workspaces and optimizer state it creates, which later steps find already allocated). Later
passes of at most that ``T`` plan against it, so a plan needs about the all-offload peak plus what it chooses to
keep; a longer batch calibrates again. The first planned pass after a calibration is checked once: its whole step's
peak (read when the next pass begins, so the optimizer step and everything after layer 0's backward count) above
the budget is added to the overhead, and the plans from then on are made with it. The two calibration passes and the
checked one reset the device's peak-memory counter; no other pass does. On the CPU there is no allocator counter:
the budget (``memory_budget``) bounds the kept and recomputed layers' own bytes, and without one every layer recomputes.

Below the leanest plan's need, the fused layers also run their MLPs over row tiles (``ops.lora_layer.mlp_tile_rows``):
a layer's backward then holds a tile's gate/up/activation buffers (about ``3 x intermediate`` elements a row,
``row_elements``) instead of the whole batch's, for one more dequant of the MLP weights per tile. The tile is the
largest power of two that covers what the plan is over by (``lean_tile_rows``): few tiles cost little, and the first
such pass is checked like a planned one; over the budget still, the tiles halve (down to ``MIN_TILE_ROWS``).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .._compat import cuda_allocatable
from ..ops.lora_layer import mlp_tile_rows
from .checkpointing import Offloader

logger = logging.getLogger("fastllm")
GiB = 1 << 30
MODES = ("keep", "recompute", "offload")
MIN_TILE_ROWS = 256
TILE_MARGIN = 1.25  # the tile's saving estimate covers the overshoot with this much to spare


def plan_layers(n: int, avail: float, keep_bytes: float, input_bytes: float) -> tuple[str, ...]:
    """The per-layer modes (layer order) for ``n`` layers when ``avail`` bytes may hold kept activations
    (``keep_bytes`` a layer) and recomputed layers' inputs (``input_bytes`` a layer)."""
    avail = max(avail, 0.0)
    k = n if keep_bytes <= 0 else min(n, int(avail // keep_bytes))
    left = avail - k * keep_bytes
    r = n - k if input_bytes <= 0 else min(n - k, int(left // input_bytes))
    return ("offload",) * (n - k - r) + ("recompute",) * r + ("keep",) * k


def lean_tile_rows(tokens: int, over: float, row_bytes: float, cap: int | None = None) -> int:
    """MLP tile rows for a pass of ``tokens`` rows whose leanest plan is ``over`` bytes above the budget, when
    tiling saves ``row_bytes`` per row taken out of the MLP's buffers: the largest power of two below ``tokens``
    (and at most ``cap``) that saves ``TILE_MARGIN x over``; at least ``MIN_TILE_ROWS``."""
    rows = tokens - 1
    if row_bytes > 0:
        rows = min(rows, int(tokens - TILE_MARGIN * max(over, 0.0) / row_bytes))
    if cap is not None:
        rows = min(rows, cap)
    return max(MIN_TILE_ROWS, 1 << max(rows, 1).bit_length() - 1)


@dataclass
class _Calibration:
    tokens: int
    keep_per_token: float               # K: bytes a kept layer saves, per token
    overhead: float | None = None       # the all-offload step's peak above its start (CUDA); None until measured
    warm: bool = False                  # overhead measured on a step after the first (CUDA)
    checked: bool = False               # a planned pass's whole-step peak compared with the budget (CUDA)
    tile_cap: int | None = None         # MLP tile rows found too many by a checked pass over the budget
    tile_checked: bool = False          # a tiled pass under budget was checked


@dataclass
class AutoCheckpoint:
    """The ``_gradient_checkpointing_func`` of every decoder layer under ``"auto"`` (``layer_function(i)``)."""

    n_layers: int
    recompute: object                                   # the recompute function (fused layer op or per-op)
    budget: float | None = None                         # bytes; None: the device's, less a margin
    static: set = field(default_factory=set)            # storages of parameters / quant state: never counted
    offloader: Offloader = field(default_factory=Offloader)
    calibrations: list = field(default_factory=list)
    plan: tuple = ()
    plan_tokens: int = 0
    passes: int = 0
    _pending: _Calibration | None = None                # a calibration pass whose peak is not read yet
    _start: float = 0.0
    _keep_bytes: float = 0.0                            # bytes counted in this calibration pass's layer 0
    short: float | None = None                          # bytes the leanest plan needs, when over the budget
    row_elements: int = 0                               # elements an MLP tile saves a row (3 x intermediate)
    tile_rows: int | None = None                        # MLP tile rows of this pass, when over the budget
    _check: tuple | None = None                         # (calibration, budget, tile rows or None) being checked
    _warned: bool = False

    def layer_function(self, index: int):
        def gradient_checkpointing_func(function, *args, **kwargs):
            return self(index, function, *args, **kwargs)

        gradient_checkpointing_func.fastllm_auto = self  # for tests and reports
        return gradient_checkpointing_func

    # ---- the plan -------------------------------------------------------------------------------------------
    def _budget(self, device: torch.device) -> float | None:
        if self.budget is not None:
            return self.budget
        if device.type != "cuda":
            return None
        # what this process holds plus what it can still get, within its memory cap
        return (torch.cuda.memory_allocated(device) + cuda_allocatable(device)) * 0.95 - 0.5 * GiB

    def _begin(self, x: torch.Tensor) -> None:
        """Plan this pass (its first layer's input ``x``): calibrate at a new largest token count."""
        self.passes += 1
        self.offloader.new_pass()
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.numel() // x.shape[-1]
        cuda = x.is_cuda
        budget = self._budget(x.device)
        if self._check is not None:
            self._correct(x.device)
        if budget is None:  # a CPU model without a budget: recompute, as True does
            self.plan, self.plan_tokens = ("recompute",) * self.n_layers, tokens
            return
        known = [c for c in self.calibrations if c.tokens >= tokens]
        self.plan_tokens = tokens
        cal = min(known, key=lambda c: c.tokens) if known else _Calibration(tokens, 0.0)
        if not known or (cuda and not cal.warm and cal.tokens == tokens):
            # measure: K on a new largest token count (layer 0 kept and counted), then the overhead once more on
            # the next pass of that count, a warm one (the first step also creates workspaces that later steps find
            # allocated); a shorter pass in between plans with the first, larger, overhead
            self._pending, self.short, self.tile_rows = cal, None, None  # calibration measures untiled layers
            if cuda:
                torch.cuda.reset_peak_memory_stats(x.device)
                self._start = torch.cuda.memory_allocated(x.device)
            lean = "offload" if cuda else "recompute"
            self.plan = ("measure" if not known else lean,) + (lean,) * (self.n_layers - 1)
            self._keep_bytes = 0.0
            return
        input_bytes = tokens * x.shape[-1] * x.element_size()
        avail = budget
        if cuda:
            avail -= torch.cuda.memory_allocated(x.device) + cal.overhead
        self.plan = plan_layers(self.n_layers, avail, cal.keep_per_token * tokens, input_bytes)
        self.short = budget - avail if avail < 0 else None  # the leanest plan's need, when the budget is below it
        self.tile_rows = None if self.short is None else lean_tile_rows(
            tokens, -avail, self.row_elements * x.element_size(), cal.tile_cap)
        flag = "checked" if self.tile_rows is None else "tile_checked"  # a tiled plan is checked on its own
        if cuda and cal.warm and not getattr(cal, flag):
            setattr(cal, flag, True)
            self._check = (cal, budget, self.tile_rows)
            torch.cuda.reset_peak_memory_stats(x.device)
        if self.short is not None and not self._warned:
            self._warned = True
            logger.warning("fastllm: memory_budget %.2f GiB is below what this step needs with every layer "
                           "offloaded (%.2f GiB): running that, the leanest plan, with the MLPs in %d-row tiles",
                           budget / GiB, self.short / GiB, self.tile_rows)

    def _correct(self, device: torch.device) -> None:
        """The checked pass has ended (this is the next one's start): what its step's peak went over its budget
        is overhead the calibration missed (allocator rounding, what ran after layer 0's backward)."""
        (cal, budget, tile), self._check = self._check, None
        over = torch.cuda.max_memory_allocated(device) - budget
        if over > 0 and tile is not None:
            cal.tile_cap, cal.tile_checked = max(MIN_TILE_ROWS, tile // 2), tile <= MIN_TILE_ROWS
            logger.info("fastllm: auto checkpointing's tiled step peaked %.3f GiB over its budget: MLP tiles of %d "
                        "rows from now on", over / GiB, cal.tile_cap)
        elif over > 0:
            cal.overhead += over
            logger.info("fastllm: auto checkpointing's first planned step peaked %.3f GiB over its budget: "
                        "planning with that much more overhead", over / GiB)

    def _finish_calibration(self, device: torch.device) -> None:
        cal, self._pending = self._pending, None
        if cal is None:
            return
        if device.type == "cuda":
            cal.warm = cal.overhead is not None  # this was the second, warm measurement
            cal.overhead = torch.cuda.max_memory_allocated(device) - self._start
        if not any(c is cal for c in self.calibrations):
            self.calibrations = [c for c in self.calibrations if c.tokens > cal.tokens] + [cal]
        logger.info("fastllm: auto checkpointing calibrated at %d tokens: %.3f GiB kept a layer, %s", cal.tokens,
                    cal.keep_per_token * cal.tokens / GiB,
                    "CPU" if cal.overhead is None else f"step overhead {cal.overhead / GiB:.2f} GiB")

    # ---- one layer call -------------------------------------------------------------------------------------
    def __call__(self, index: int, function, *args, **kwargs):
        x = args[0] if args else None
        if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
            return function(*args, **kwargs)  # nothing is saved for backward
        if index == 0:
            self._begin(x)
        mode = self.plan[index] if index < len(self.plan) else "recompute"
        if mode == "keep":
            y = function(*args, **kwargs)
        elif mode == "recompute":
            with self._tiles():
                y = self.recompute(function, *args, **kwargs)
        elif mode == "offload":
            with self.offloader.hooks(), self._tiles():
                y = self.recompute(function, *args, **kwargs)
        else:
            y = self._measure(function, *args, **kwargs)
        if index == 0 and self._pending is not None:  # the pass's backward ends with layer 0's
            out = y[0] if isinstance(y, tuple) else y
            device = out.device
            if out.requires_grad:
                out.register_hook(lambda g: self._finish_calibration(device))
            else:
                self._finish_calibration(device)
        return y

    def _tiles(self):
        return mlp_tile_rows(self.tile_rows) if self.tile_rows is not None else nullcontext()

    def _measure(self, function, *args, **kwargs):
        """Layer 0 of a calibration pass: run it as ``keep``, counting the bytes autograd saves (parked on the host
        on CUDA, so the count costs no GPU memory); its output's gradient marks the end of the pass's backward."""
        seen: set = set()

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.static and ptr not in seen and not isinstance(t, torch.nn.Parameter):
                seen.add(ptr)
                self._keep_bytes += storage.nbytes()
            return self.offloader.pack(t)

        with torch.autograd.graph.saved_tensors_hooks(pack, self.offloader.unpack):
            y = function(*args, **kwargs)
        self._pending.keep_per_token = self._keep_bytes / max(self.plan_tokens, 1)
        return y

    def summary(self) -> str:
        if not self.plan:
            return "auto: no training pass yet"
        counts = {m: sum(p == m for p in self.plan) for m in (*MODES, "measure")}
        what = ", ".join(f"{n} {m}" for m, n in counts.items() if n)
        budget = "device's" if self.budget is None else f"{self.budget / GiB:.2f} GiB"
        over = "" if self.short is None else (f" (over budget: the leanest plan needs {self.short / GiB:.2f} GiB; "
                                              f"MLPs in {self.tile_rows}-row tiles)")
        return (f"auto (budget {budget}): last pass {self.plan_tokens} tokens: {what}{over}; "
                f"{len(self.calibrations)} calibration(s), {self.passes} pass(es)")


def static_storages(model: torch.nn.Module) -> set:
    """The storages of the model's parameters, buffers and bitsandbytes quant states: saved by a kept layer, but
    not its activations."""
    out = set()
    for t in (*model.parameters(), *model.buffers()):
        out.add(t.untyped_storage().data_ptr())
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None),
                  getattr(getattr(qs, "state2", None), "absmax", None)):
            if isinstance(t, torch.Tensor):
                out.add(t.untyped_storage().data_ptr())
    return out


__all__ = ["AutoCheckpoint", "MODES", "plan_layers", "static_storages"]
