"""Drop-in forward for ``bitsandbytes.nn.Linear4bit`` through ``fastllm.ops.nf4_linear``.

``nf4_linear4bit_forward(self, x)`` has the signature and semantics of ``Linear4bit.forward`` in
bitsandbytes 0.50: it casts ``x`` to ``compute_dtype`` (set from the first input, as bnb's
``set_compute_type`` does), casts the bias the same way, computes ``x @ W.T + b`` and returns the
result in the input's dtype. The patch registry binds it per instance (``types.MethodType``) on the
**base** Linear4bit that PEFT's ``base_layer(x)`` reaches, so LoRA adapters, ``disable_adapter()``
and merging are untouched. Nothing here mutates modules beyond what bnb's own forward does.

``nf4_linear4bit_compiled_forward`` is the same forward for code that ``torch.compile`` traces (bound
instead when compile is on). Traced code must not see bitsandbytes' objects: on torch 2.11 the
``functools.cache``'d ``bnb()`` probe inside ``nf4_linear4bit_forward`` reaches ``importlib.util.find_spec``,
which dynamo refuses to trace (a graph break per linear; the resumed frames then recompile per weight shape
until dynamo's recompile limit). So the compiled forward reads only ``self._fastllm_nf4``, an ``NF4Alias``
(registered and reverted by the patch registry) whose ``args`` are plain tensors and ints: the packed bytes
as a plain ``torch.Tensor`` view (``Params4bit.data``) and the quant-state tensors. ``refresh_nf4_aliases``
re-reads them eagerly right before each compiled region runs, so a weight moved or re-gathered (``.to``,
FSDP2) after patching is never read stale.
"""

from __future__ import annotations

import torch

from .._compat import SUPPORTED_DTYPES, bnb, is_linear4bit
from ..ops import dense_decode
from ..ops.nf4 import NF4Args, nf4_args, nf4_linear, nf4_linear_args
from ..ops.nf4_gemv import decode_rows as gemv_rows
from ..ops.nf4_gemv import gemv_enabled

__all__ = ["NF4Alias", "decode_rows", "nf4_linear4bit_compiled_forward", "nf4_linear4bit_forward",
           "nf4_linear_eligible", "prepare_nf4_call", "refresh_nf4_aliases"]


def nf4_linear_eligible(module) -> str | None:
    """None when ``module`` can take ``nf4_linear4bit_forward``, else the reason it cannot."""
    if not is_linear4bit(module):
        return "not a bitsandbytes Linear4bit"
    qs = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is None:
        return "weight not quantized yet (no quant_state: move the module to its device first)"
    if qs.quant_type != "nf4":
        return f"quant_type {qs.quant_type!r} is not nf4"
    if getattr(qs, "packing_format_for_cpu", False):
        return "weight repacked for bitsandbytes' CPU inference kernel (AVX512-BF16 layout)"
    if qs.dtype not in SUPPORTED_DTYPES:
        return f"unsupported weight dtype {qs.dtype}"
    if module.compute_dtype is not None and module.compute_dtype not in SUPPORTED_DTYPES:
        return f"unsupported compute_dtype {module.compute_dtype}"
    if tuple(qs.shape) != (module.out_features, module.in_features):
        return f"quant_state.shape {tuple(qs.shape)} is not (out_features, in_features)"
    if qs.blocksize & (qs.blocksize - 1):
        return f"blocksize {qs.blocksize} is not a power of two"
    return None


def prepare_nf4_call(module, x: torch.Tensor):
    """What bnb's ``Linear4bit.forward`` does before its matmul: fix the quant state, set the compute
    dtype from the first input, cast x to it and convert the stored bias once (in place, as bnb does).

    Returns ``(x_in_compute_dtype, input_dtype, bias)``, or None when the weight was repacked by bnb's
    CPU inference path (only bnb reads that layout).
    """
    bnb().nn.modules.fix_4bit_weight_quant_state_from_module(module)
    params = module._parameters  # not module.weight: nn.Module.__getattr__ is Python, and this runs per call
    if getattr(params["weight"].quant_state, "packing_format_for_cpu", False):
        return None
    if not module.compute_type_is_set:
        module.set_compute_type(x)
        module.compute_type_is_set = True
    inp_dtype = x.dtype
    if module.compute_dtype is not None and x.dtype != module.compute_dtype:
        x = x.to(module.compute_dtype)
    bias = params.get("bias")
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)  # bnb converts the stored bias once, in place
        if module.compute_dtype is not None:
            bias = bias.to(module.compute_dtype)
    return x, inp_dtype, bias


def goes_to_bnb_gemv(x: torch.Tensor, weight) -> bool:
    """One token without grad on CUDA over a bnb ``Params4bit`` (a decode step): bnb's own forward, with its
    fused 4-bit GEMV, serves it better than dequant + GEMM (not FSDP2's NF4Param: only fastllm reads that)."""
    return (x.numel() == x.shape[-1] and x.is_cuda and not (x.requires_grad and torch.is_grad_enabled())
            and type(weight) is bnb().nn.Params4bit and not dense_decode.active())


def decode_rows(x: torch.Tensor, weight) -> int:
    """The token rows of ``x`` when it is a decode step that a 4-bit GEMV serves (no grad, CUDA, a bnb
    ``Params4bit`` weight; up to ``ops.nf4_gemv.decode_rows()`` for fastllm's ``ops.nf4_gemv``, one row for bnb's
    GEMV where that is switched off; neither while ``ops.dense_decode`` holds dense copies), else 0."""
    if not x.is_cuda or (x.requires_grad and torch.is_grad_enabled()) or type(weight) is not bnb().nn.Params4bit:
        return 0
    rows = x.numel() // x.shape[-1]
    if dense_decode.active():  # dense copies: one GEMM, as for a batch
        return 0
    return rows if (rows <= gemv_rows() and gemv_enabled(x.device)) or rows == 1 else 0


def nf4_linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` replacement: ``(x.to(compute_dtype) @ W.T + b).to(x.dtype)``.

    x: (..., in_features) -> (..., out_features).

    One token without grad (a decode step) goes to bnb's own forward, which runs its fused 4-bit GEMV on
    CUDA: it reads only the packed weight, where dequant + GEMM writes and re-reads the dense weight, and
    it takes a fraction of the autograd path's host time (``examples/host_overhead.py``). The condition is
    bnb's own, so the output is bnb's, bit for bit.
    """
    weight = self._parameters["weight"]
    if goes_to_bnb_gemv(x, weight):
        return bnb().nn.Linear4bit.forward(self, x)
    prepared = prepare_nf4_call(self, x)
    if prepared is None:
        return bnb().nn.Linear4bit.forward(self, x)
    x, inp_dtype, bias = prepared
    return nf4_linear(x, weight, bias).to(inp_dtype)


# ---- the compiled path: plain tensors only ---------------------------------------------------------

class NF4Alias:
    """The plain-tensor ``NF4Args`` of one Linear4bit's weight, re-read when the weight changes.

    ``args`` is what traced code reads; ``refresh`` (eager only) compares the weight object, its quant state,
    its absmax tensor and its data pointer with the last read: identity checks and one C call, ~0.3 us.
    """

    __slots__ = ("args", "_key")

    def __init__(self, module) -> None:
        self.args: NF4Args | None = None
        self._key: tuple = ()
        # A weight without its state yet (patched while FSDP2 holds it sharded) is read at the first call.
        if getattr(module.weight, "quant_state", None) is not None or getattr(module, "quant_state", None) is not None:
            with torch._C.DisableTorchFunctionSubclass():
                self.refresh(module)

    def refresh(self, module) -> None:
        """Re-read ``module.weight`` if it changed. Call under ``DisableTorchFunctionSubclass`` (fast path)."""
        w = module.weight
        # bnb's fix_4bit_weight_quant_state_from_module, read-only: a weight that lost its state (FSDP) keeps
        # it on the module.
        qs = getattr(w, "quant_state", None) or getattr(module, "quant_state", None)
        absmax = None if qs is None else qs.absmax
        ptr = w.data_ptr()  # Params4bit: the C method (torch-function subclassing is off here)
        key = self._key
        if key and key[0] is w and key[1] is qs and key[2] is absmax and key[3] == ptr:
            return
        if qs is None:
            raise RuntimeError(f"{type(module).__name__} weight has no quant_state (move it to its device first)")
        if getattr(qs, "packing_format_for_cpu", False):
            raise RuntimeError("weight was repacked by bitsandbytes' CPU inference path after patching; "
                               "unpatch, reload the model, and patch again")
        # Params4bit.data is a plain torch.Tensor over the same storage. A traceable wrapper subclass (fastllm's
        # FSDP2 NF4Param) stays itself: compile flattens it into plain inner tensors by design.
        self.args = nf4_args(w.data, qs)
        self._key = (w, qs, absmax, ptr)


def refresh_nf4_aliases(modules) -> None:
    """Refresh the ``NF4Alias`` of each Linear4bit in ``modules`` that has one (eager code only)."""
    with torch._C.DisableTorchFunctionSubclass():
        for m in modules:
            alias = m.__dict__.get("_fastllm_nf4")
            if alias is not None:
                alias.refresh(m)


def nf4_linear4bit_compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``nf4_linear4bit_forward`` for traced code: reads ``self._fastllm_nf4.args`` (plain tensors) only.

    x: (..., in_features) -> (..., out_features). Same numerics as ``nf4_linear4bit_forward``.
    """
    alias = self._fastllm_nf4
    if not torch.compiler.is_compiling():  # called eagerly (a region's eager fallback): re-read the weight
        refresh_nf4_aliases((self,))
    if not self.compute_type_is_set:
        # bnb's set_compute_type without its fp16 warning (logging inside traced code is a graph break)
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    # bnb also converts the stored bias to x's dtype in place (``bias.data = ...``); a cast is the same
    # numbers without mutating a parameter inside traced code.
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return nf4_linear_args(x, alias.args, bias).to(inp_dtype)
