"""``NF4Param``: a bitsandbytes 4-bit weight as a tensor subclass that FSDP2 shards with its quant state.

bitsandbytes stores an NF4 weight ``W (N, K)`` as packed bytes ``(N*K / (2 * itemsize), 1)`` of the
quant-storage dtype (uint8: two 4-bit codes per byte) plus a ``QuantState``: one absmax per
``blocksize`` values (uint8 codes when double-quantized, with fp32 ``state2.absmax`` per 256 blocks,
``state2.code`` and ``offset``), the 16-value NF4 ``code``, the shape and dtype. FSDP2 only moves
parameters, and a plain parameter loses the Python ``quant_state`` attribute; dtype casts or float
storage can change bytes (bitsandbytes issue #1945: bf16 storage gathered by NCCL rewrites NaN bit
patterns). So, as torchao's ``NF4Tensor`` does, this subclass implements FSDP2's extension protocol:

- outer tensor: exactly bnb's packed shape, so ``fully_shard`` splits it on dim 0 the way it splits
  any parameter. Its reported dtype is a floating dtype of the storage's item size (uint8 storage ->
  ``float8_e4m3fn``): torch <= 2.12's ``fully_shard`` first wraps every shard as
  ``nn.Parameter(dtensor)`` with ``requires_grad=True`` and only then copies the real flag, and
  autograd refuses that for an integer dtype. Only the label changes: ``packed`` keeps its uint8
  bytes and every op on the weight runs on them; rows ``[s, e)`` of packed bytes hold values ``[s*v, e*v)`` with
  ``v = 2 * itemsize`` values per row, i.e. absmax blocks ``[s*v/blocksize, e*v/blocksize)``.
- inner tensors: ``packed`` and ``absmax`` are split together (``split``/``slice``/``new_zeros``/
  ``copy_`` below keep the block alignment); the small double-quant tensors (``code``, ``absmax2``,
  ``code2``, ``offset``: ~N*K/16384 floats) are replicated on every rank.
- ``fsdp_pre_all_gather`` hands FSDP2 the local ``(packed, absmax)`` shards; FSDP2 all-gathers them
  as raw bytes (it views mixed-dtype inputs as uint8) and ``fsdp_post_all_gather`` wraps the gathered
  full tensors back into an ``NF4Param`` whose ``quant_state`` is a real bnb ``QuantState``. No
  dtype cast ever touches the bytes: mixed precision's ``param_dtype`` is ignored here (FSDP2 already
  skips it for integer storage), so the gathered weight is byte-identical to the loaded one.

Under torch.compile the gathered weight is traced as a wrapper subclass: its inner tensors are real
attributes named as in ``__tensor_flatten__``, and it reports no storage of its own (``view`` keeps
the subclass, so FSDP2 never asks for one), which dynamo's fake-tensor conversion requires.

A few ops run on the packed bytes and return plain tensors (``_BYTE_OPS``: a dtype view, ``t``; and the
bitsandbytes / fastllm 4-bit custom ops), so bnb's own ``Linear4bit.forward`` (``matmul_4bit`` ->
``gemm_4bit`` / ``dequantize_4bit``) and fastllm's NF4 linear (the Triton launcher reads ``data_ptr()``,
overridden to the packed bytes) work on the gathered weight unchanged. Every other op raises
``NotImplementedError`` naming it: arithmetic on the codes (``p * 2``, ``p.sum()``) would silently
return garbage. The weight is frozen: it never requires grad, so FSDP2 never reduce-scatters it and no
optimizer sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NF4Meta", "NF4Param", "nf4_param_from_params4bit", "outer_dtype", "shardable_rows"]

_aten = torch.ops.aten
_SPLIT = ("packed", "absmax")


@dataclass(frozen=True)
class NF4Meta:
    """Everything of a bnb QuantState that is not a tensor."""

    blocksize: int
    cols: int                 # K (in_features): rows of W = values / K
    dtype: torch.dtype        # dequantized dtype
    quant_type: str
    blocksize2: int | None    # None: not double-quantized


_FLOAT_OF_SIZE = {1: torch.float8_e4m3fn, 2: torch.float16, 4: torch.float32, 8: torch.float64}


def outer_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype an ``NF4Param`` reports for packed bytes of ``storage``: a floating dtype of the same
    item size (see the module doc: FSDP2 of torch <= 2.12 cannot shard an integer-dtype parameter)."""
    return storage if storage.is_floating_point else _FLOAT_OF_SIZE[storage.itemsize]


def _values_per_row(packed: torch.Tensor) -> int:
    return 2 * packed.element_size() * (packed.shape[1] if packed.dim() == 2 else 1)


def shardable_rows(packed: torch.Tensor, blocksize: int, world: int) -> bool:
    """True when ``packed`` splits into ``world`` equal row chunks on absmax block boundaries."""
    rows = packed.shape[0]
    if rows % world:
        return False
    values = (rows // world) * _values_per_row(packed)
    return values % blocksize == 0


class NF4Param(torch.Tensor):
    """bnb packed NF4 bytes (outer shape/dtype) + quant state; shards with FSDP2 (see module doc)."""

    packed: torch.Tensor
    absmax: torch.Tensor

    @staticmethod
    def __new__(cls, packed: torch.Tensor, absmax: torch.Tensor, replicated: dict, meta: NF4Meta):
        return torch.Tensor._make_wrapper_subclass(
            cls, packed.shape, strides=packed.stride(), storage_offset=0, dtype=outer_dtype(packed.dtype),
            device=packed.device, requires_grad=False)

    def __init__(self, packed, absmax, replicated, meta):
        self.packed = packed
        self.absmax = absmax
        self.meta = meta
        self._replicated_keys = tuple(replicated)
        # Each inner tensor is a real attribute named as in ``__tensor_flatten__``: torch.compile reads
        # a traceable subclass's inner tensors by those names.
        for k, v in replicated.items():
            setattr(self, f"r_{k}", v)

    @property
    def replicated(self) -> dict:
        return {k: getattr(self, f"r_{k}") for k in self._replicated_keys}

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"NF4Param(packed={tuple(self.packed.shape)}, absmax={tuple(self.absmax.shape)}, meta={self.meta})"

    # ---- what bnb and fastllm read -----------------------------------------------------------
    @property
    def quant_state(self):
        """A bnb ``QuantState`` over this tensor's rows (cached; built on first use)."""
        qs = self.__dict__.get("_quant_state")
        if qs is None:
            from bitsandbytes.functional import QuantState

            m, r = self.meta, self.replicated
            rows = self.packed.numel() * 2 * self.packed.element_size() // m.cols
            state2 = None
            if m.blocksize2 is not None:
                state2 = QuantState(absmax=r["absmax2"], code=r["code2"], blocksize=m.blocksize2, dtype=torch.float32)
            qs = QuantState(absmax=self.absmax, shape=torch.Size((rows, m.cols)), code=r["code"],
                            blocksize=m.blocksize, quant_type=m.quant_type, dtype=m.dtype,
                            offset=r.get("offset"), state2=state2)
            self.__dict__["_quant_state"] = qs
        return qs

    def data_ptr(self) -> int:  # Triton launchers read this: point them at the packed bytes
        return self.packed.data_ptr()

    # ---- subclass plumbing -------------------------------------------------------------------
    def __tensor_flatten__(self):
        names = list(_SPLIT) + [f"r_{k}" for k in self.replicated]
        return names, (self.meta, tuple(self.replicated))

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        meta, keys = ctx
        return NF4Param(inner["packed"], inner["absmax"], {k: inner[f"r_{k}"] for k in keys}, meta)

    def _with(self, packed: torch.Tensor, absmax: torch.Tensor, replicated: dict | None = None) -> NF4Param:
        return NF4Param(packed, absmax, self.replicated if replicated is None else replicated, self.meta)

    def _rows_per_block(self) -> float:
        return self.meta.blocksize / _values_per_row(self.packed)

    def _absmax_range(self, start: int, end: int) -> tuple[int, int]:
        """Absmax blocks covering packed rows [start, end); raises unless block-aligned."""
        rpb = self._rows_per_block()
        total = self.packed.shape[0]
        if start % rpb or (end % rpb and end != total):
            raise NotImplementedError(f"NF4Param rows [{start}, {end}) do not fall on {self.meta.blocksize}-value "
                                      "absmax blocks; fastllm.integrations.fsdp2 replicates such weights instead")
        a0 = int(start // rpb)
        a1 = self.absmax.numel() if end == total else int(end // rpb)
        return a0, a1

    def _slice_rows(self, start: int, end: int) -> NF4Param:
        a0, a1 = self._absmax_range(start, end)
        return self._with(self.packed[start:end], self.absmax[a0:a1])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func not in _BYTE_OPS and func.namespace not in _BYTE_OP_NAMESPACES:
            # Any other op would compute on the packed 4-bit codes as if they were numbers (``p * 2`` doubling
            # bytes, ``p.sum()`` adding them): refused, as torchao's NF4Tensor refuses it.
            raise NotImplementedError(
                f"NF4Param does not implement {func}; dequantize first "
                "(fastllm.ops.nf4.dequantize_nf4(p.packed, p.quant_state) or bitsandbytes.functional.dequantize_4bit), "
                "or use p.packed for the raw bytes")
        unwrap = lambda a: a.packed if isinstance(a, NF4Param) else a  # noqa: E731
        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs)
        return func(*args, **kwargs)

    # ---- FSDP2 all-gather extension ---------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """All-gather inputs: this rank's packed rows and their absmax codes (bytes, never cast)."""
        return (self.packed, self.absmax), (self.replicated, self.meta)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """Wrap the gathered full ``packed`` (M, 1) and ``absmax`` (nblocks,) back into an NF4Param."""
        replicated, meta = metadata
        if len(all_gather_outputs) == 1:
            # FSDP2's one-rank shortcut (torch 2.13 ``wait_for_unshard``) copies only the first all-gather
            # input. With one rank the local shard is the whole weight, so its own absmax is the gathered
            # one; it stays out of the returned inner tensors, whose storage FSDP2 frees on reshard.
            (packed,) = all_gather_outputs
            if packed.shape[0] != self.packed.shape[0]:
                raise RuntimeError("NF4Param: one all-gather output but the local shard is not the whole weight")
            absmax, inner = self.absmax, (packed,)
        else:
            packed, absmax = all_gather_outputs
            inner = (packed, absmax)
        if out is not None:
            # FSDP2 re-gathers into the same buffers the unsharded NF4Param already views.
            if out.packed.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
                raise RuntimeError("NF4Param: FSDP2 all-gather output does not back the unsharded weight")
            return None
        return NF4Param(packed, absmax, replicated, meta), inner


# ---- the structural ops FSDP2 uses to shard, pad, offload and re-wrap a parameter --------------

def _detach(t: NF4Param) -> NF4Param:
    return t._with(t.packed.detach(), t.absmax.detach())


def _split(t: NF4Param, split_size, dim: int = 0):
    if dim != 0:
        raise NotImplementedError("NF4Param splits on dim 0 only")
    sizes = list(split_size) if isinstance(split_size, (list, tuple)) else None
    if sizes is None:
        n = t.shape[0]
        sizes = [min(split_size, n - s) for s in range(0, n, split_size)]
    out, start = [], 0
    for size in sizes:
        out.append(t._slice_rows(start, start + size))
        start += size
    return out


def _slice(t: NF4Param, dim: int = 0, start=None, end=None, step: int = 1):
    n = t.shape[0]
    if dim != 0 or step != 1:
        raise NotImplementedError("NF4Param slices rows (dim 0, step 1) only")
    start = 0 if start is None else max(0, min(start if start >= 0 else start + n, n))
    end = n if end is None else max(0, min(end if end >= 0 else end + n, n))
    return t._slice_rows(start, end)


def _new_zeros(t: NF4Param, size, **kwargs) -> NF4Param:
    size = list(size)
    blocks = -(-size[0] * _values_per_row(t.packed) // t.meta.blocksize)  # ceil
    kwargs.pop("dtype", None)  # the bytes keep their storage dtype
    packed = t.packed.new_zeros(size, **kwargs)
    absmax = t.absmax.new_zeros((blocks,), **kwargs)
    return t._with(packed, absmax)


def _copy_(dst: NF4Param, src, non_blocking: bool = False) -> NF4Param:
    if not isinstance(src, NF4Param) or src.meta != dst.meta:
        raise NotImplementedError("NF4Param.copy_ takes another NF4Param with the same quant metadata")
    dst.packed.copy_(src.packed, non_blocking)
    dst.absmax.copy_(src.absmax, non_blocking)
    return dst


def _as_strided(t: NF4Param, size, stride, storage_offset=None) -> NF4Param:
    if list(size) != list(t.shape):
        raise NotImplementedError(f"NF4Param.as_strided to {list(size)} from {list(t.shape)}")
    return t._with(t.packed, t.absmax)


def _to_copy(t: NF4Param, *, dtype=None, device=None, non_blocking=False, **kwargs):
    if dtype is not None and dtype not in (t.dtype, t.packed.dtype):
        raise NotImplementedError(f"NF4Param holds packed {t.packed.dtype} bytes; casting them to {dtype} would "
                                  "corrupt the 4-bit codes (dequantize with its quant_state instead)")
    move = lambda x: x.to(device=device, non_blocking=non_blocking)  # noqa: E731
    return t._with(move(t.packed), move(t.absmax), {k: move(v) for k, v in t.replicated.items()})


def _view(t: NF4Param, size):
    """A view that keeps the packed rows (FSDP2's ``view(-1)`` of the local shard) stays an NF4Param, so
    FSDP2 never asks it for a storage (a wrapper subclass has none); any other view is of the bytes."""
    packed = t.packed.view(size)
    if packed.dim() >= 1 and packed.shape[0] == t.packed.shape[0]:
        return t._with(packed, t.absmax)
    return packed


def _pin_memory(t: NF4Param, device=None) -> NF4Param:
    return t._with(t.packed.pin_memory(), t.absmax.pin_memory(), {k: v.pin_memory() for k, v in t.replicated.items()})


def _is_pinned(t: NF4Param, device=None) -> bool:
    return all(x.is_pinned() for x in (t.packed, t.absmax, *t.replicated.values()))


_HANDLERS = {
    _aten.detach.default: _detach,
    _aten.alias.default: _detach,
    _aten.split.Tensor: _split,
    _aten.split_with_sizes.default: _split,
    _aten.slice.Tensor: _slice,
    _aten.new_zeros.default: _new_zeros,
    _aten.copy_.default: _copy_,
    _aten.as_strided.default: _as_strided,
    _aten.view.default: _view,
    _aten._to_copy.default: _to_copy,
    _aten._pin_memory.default: _pin_memory,
    _aten.is_pinned.default: _is_pinned,
}


# Ops that run on the packed bytes themselves and return plain tensors; every other op not in ``_HANDLERS`` raises.
_BYTE_OPS = frozenset({
    _aten.view.dtype,  # the bytes reinterpreted (the Triton dequant's ``packed.view(torch.uint8)``)
    _aten.t.default,   # bitsandbytes < 0.50's Linear4bit.forward passes ``weight.t()`` to matmul_4bit
})
# Custom ops that take packed 4-bit bytes with their quant state (bnb's dequantize_4bit / gemm_4bit, fastllm's
# nf4_dequantize / nf4_linear): what ``Linear4bit.forward`` and fastllm's NF4 linear run on the gathered weight.
_BYTE_OP_NAMESPACES = frozenset({"bitsandbytes", "fastllm"})


def nf4_param_from_params4bit(weight) -> NF4Param:
    """An ``NF4Param`` over a quantized bnb ``Params4bit`` (shares its tensors; nothing is copied)."""
    qs = weight.quant_state
    if qs is None:
        raise ValueError("Params4bit has no quant_state: quantize it (move it to its device) first")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("weight was repacked for bitsandbytes' CPU inference kernel; load with fastllm's loader")
    replicated = {"code": qs.code}
    blocksize2 = None
    if qs.nested:
        offset = qs.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=qs.absmax.device)
        replicated.update(absmax2=qs.state2.absmax, code2=qs.state2.code, offset=offset)
        blocksize2 = int(qs.state2.blocksize)
    meta = NF4Meta(blocksize=int(qs.blocksize), cols=int(qs.shape[1]), dtype=qs.dtype, quant_type=qs.quant_type,
                   blocksize2=blocksize2)
    return NF4Param(weight.data, qs.absmax, replicated, meta)
