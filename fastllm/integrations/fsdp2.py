"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for FastLlama QLoRA models: 4-bit base + LoRA.

``shard(model)`` applies ``fully_shard`` to every decoder layer and then to the root (the PEFT model),
so one layer's parameters are gathered at a time and the root's (embeddings, final norm, lm_head)
around the whole forward: fastllm's chunked loss runs inside ``LlamaForCausalLM.forward`` and so sees
the gathered ``lm_head.weight``.

The 4-bit weights (design and why)
----------------------------------
bitsandbytes keeps an NF4 weight as packed bytes plus a ``QuantState`` held as a *Python attribute*
of a ``Params4bit``. The ways of sharding that look simpler are broken:

- ``bnb_4bit_quant_storage=bf16`` shards the bytes as plain bf16 parameters, but the bytes are not
  bf16 numbers: on GPUs the gather rewrites NaN bit patterns in ~0.1% of them and the matmul goes
  wrong (bitsandbytes #1945);
- uint8 storage as a plain parameter loses ``quant_state`` (bnb then re-creates a ``Params4bit`` from
  the module's copy inside every forward, re-registering a parameter under FSDP's feet) and keeps the
  full absmax on every rank. It happens to train correctly on CPU gloo ranks with torch 2.13, but it
  is reported to crash or train at loss 0 / grad nan elsewhere (accelerate #3983), and it relies on
  FSDP2 never casting integer parameters.

So fastllm does what torchao's ``NF4Tensor`` does, in its own ``NF4Param`` (``nf4_fsdp.py``): the
weight becomes a tensor subclass with bnb's packed shape whose FSDP2 hooks
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` all-gather the packed bytes **and** the absmax
codes together, as bytes, and rebuild a real ``QuantState`` on the gathered tensors. Each rank keeps
``1/world`` of the 4-bit weights and of their absmax; the double-quant second level (``absmax2``,
``code2``, ``offset``, ~1/16384 of the values) is replicated. The gathered weight is byte-identical
to the loaded one (tested). A weight whose rows cannot split into ``world`` equal, absmax-block
aligned chunks (never the case for Llama shapes) is kept whole on every rank through FSDP2's
``ignored_params``, and counted in the log line.

Frozen parameters (4-bit weights, embeddings, norms, lm_head) never require grad: FSDP2 allocates no
gradient buffer and does no reduce-scatter for them, and an optimizer built on
``trainable_parameters(model)`` keeps state for the LoRA shards only. LoRA parameters are sharded on
dim 0 and their gradients reduce-scattered (averaged over ranks, so the loss of a global batch split
over ranks has the same gradient as one process on the whole batch).

``mixed_precision``: ``None`` (parameters used in their own dtype), ``"bf16"`` / ``"fp16"`` (LoRA and
other float parameters gathered in that dtype, gradients reduced in fp32), or a
``MixedPrecisionPolicy``. ``cpu_offload=True`` keeps the sharded parameters, gradients and optimizer
state in pinned CPU memory and copies each shard to the GPU for its all-gather (FSDP2's
``CPUOffloadPolicy``; an ``NF4Param`` moves its packed bytes, absmax and double-quant state together).
It needs a CUDA mesh: on a CPU (gloo) mesh it raises, naming the fix (``cpu_offload=False``).

torch.compile (``PatchConfig(compile=True)``)
---------------------------------------------
The compiled regions (attention, MLP, RMSNorm; ``fastllm.modules.decoder``) run inside each layer's
FSDP2 hooks, which dynamo skips, so a region sees the gathered parameters: plain tensors for LoRA and
an ``NF4Param`` for each 4-bit weight. ``NF4Param`` is a traceable wrapper subclass, so
AOTAutograd flattens it into its inner tensors: the compiled graph, and the NF4 custom op inside it,
receive plain packed bytes and absmax tensors: one graph per region, shared by all layers, no graph
break, losses equal to one compiled process (tests/integrations/test_fsdp2_compile_precision.py).

HF Trainer / TRL SFTTrainer
---------------------------
Pass the sharded model as is, under ``torchrun``. ``shard`` marks it as already distributed (see
``_declare_sharded``), so Trainer neither wraps it in DDP nor shards it again; with transformers
>= 5.2x gradient accumulation defers the reduce-scatter to the last micro-batch (older versions reduce
on every micro-batch: same gradients, more traffic). TRL's SFTTrainer casts a 4-bit model's LoRA weights
to bf16 *after* it receives the model, which FSDP2 (dtype fixed at ``fully_shard``) does not follow:
cast ``trainable_parameters(model)`` to bf16 before ``shard`` when training with TRL.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from .nf4_fsdp import NF4Param, nf4_param_from_params4bit, shardable_rows

logger = logging.getLogger("fastllm")

__all__ = ["NF4Param", "full_lora_state_dict", "save_adapter", "shard", "trainable_parameters"]

_MP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _mp_policy(mixed_precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision is None or mixed_precision is False:
        return MixedPrecisionPolicy()
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    dtype = _MP_DTYPES.get(mixed_precision) if isinstance(mixed_precision, str) else mixed_precision
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"mixed_precision must be None, 'bf16', 'fp16', a torch dtype of those or a "
                         f"MixedPrecisionPolicy, got {mixed_precision!r}")
    # Gradients are reduced in fp32: summing bf16 partial gradients over ranks loses bits that one
    # process accumulating over the whole batch would keep.
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("fastllm.integrations.fsdp2.shard needs torch.distributed: run under torchrun and call "
                           "torch.distributed.init_process_group() first (nccl on GPUs, gloo on CPUs)")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _decoder_layers(base: nn.Module) -> list[nn.Module]:
    """The decoder layers of the table's layer class (a vision tower's layers stay in the root's FSDP unit)."""
    from ..arch import modules_of

    layers = modules_of(base, "layer")
    if not layers:
        raise ValueError(f"{type(base).__name__} has no decoder layers of fastllm's architecture table")
    return layers


def _linear4bit_modules(model: nn.Module) -> list[nn.Module]:
    from .._compat import is_linear4bit

    return [m for m in model.modules() if is_linear4bit(m)]


def _wrap_4bit(model: nn.Module, world: int) -> tuple[int, set[nn.Parameter]]:
    """Turn each shardable ``Linear4bit.weight`` into an ``NF4Param``; returns (count, params left whole)."""
    n, whole = 0, set()
    for m in _linear4bit_modules(model):
        w = m.weight
        if isinstance(w, NF4Param):
            n += 1
            continue
        qs = getattr(w, "quant_state", None)
        if qs is None or getattr(qs, "packing_format_for_cpu", False) or not shardable_rows(w.data, qs.blocksize,
                                                                                             world):
            whole.add(w)
            continue
        m.weight = nn.Parameter(nf4_param_from_params4bit(w), requires_grad=False)
        # bnb keeps a second reference to the full quant state on the module; drop it so the full
        # absmax can be freed (the NF4Param carries its own).
        if getattr(m, "quant_state", None) is not None:
            m.quant_state = None
        n += 1
    return n, whole


def _offload_policy(cpu_offload: bool, mesh):
    """FSDP2's CPUOffloadPolicy (pinned host shards, copied to the GPU for each all-gather) or none."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if not cpu_offload:
        return OffloadPolicy()
    if mesh.device_type != "cuda":
        # On a CPU mesh the shards already live in host memory: there is nothing to offload, and
        # CPUOffloadPolicy's pinned buffers need CUDA.
        raise ValueError(f"cpu_offload=True needs a CUDA device mesh (NCCL ranks with torch.cuda.set_device("
                         f"LOCAL_RANK)); this mesh is on {mesh.device_type!r}, where the parameters already live in "
                         "host memory: pass cpu_offload=False")
    # The optimizer step then runs on the CPU shards: build the optimizer after shard() as usual.
    return CPUOffloadPolicy(pin_memory=True)


def _declare_sharded(model: nn.Module, base: nn.Module, world: int) -> str:
    """Tell transformers' Trainer that the model already owns its sharding and gradient reduction.

    Under torchrun, Trainer (through accelerate) wraps a trainable model in DDP, which refuses DTensor
    parameters; accelerate's FSDP2 plugin would leave an FSDP-sharded model alone but is not available on
    CPU (gloo) ranks. transformers >= 5.2x has a path for models sharded *before* Trainer (its own
    ``from_pretrained(distributed_config=...)``): no DDP or FSDP wrap, no device move, the optimizer
    built on the sharded parameters, ``set_requires_gradient_sync`` between accumulation steps. That path
    keys on ``is_distributed_loading_by_transformers`` and reads ``config.distributed_config`` (never
    serialized); both are set here. Older transformers (5.17 on the GPU hosts) has no such path: there
    the model is marked as already prepared by accelerate (``_is_accelerate_prepared``, accelerate's own
    guard against wrapping a model twice), so it is used as given; the reduce-scatter then runs on every
    micro-batch (same result, more traffic). Returns which of the two applies.
    """
    if not hasattr(type(base), "is_distributed_loading_by_transformers"):
        model._is_accelerate_prepared = True
        return "accelerate-prepared"
    from transformers.distributed import DistributedConfig

    base._is_distributed_loading_by_transformers = True
    if getattr(base.config, "distributed_config", None) is None:
        base.config.distributed_config = DistributedConfig(fsdp_size=world)
    return "distributed_config"


def shard(model: nn.Module, *, mesh=None, mixed_precision=None, cpu_offload: bool = False,
          reshard_after_forward: bool = True) -> nn.Module:
    """Shard a FastLlama (QLoRA) model with FSDP2 in place and return it.

    Call after ``FastLlama.get_peft_model`` (patched or not), on every rank, with the model on this
    rank's device (``device_map=None`` under torchrun puts it on ``cuda:LOCAL_RANK``). Build the
    optimizer afterwards, from ``trainable_parameters(model)``, or hand the model to HF ``Trainer``.
    """
    from torch.distributed.fsdp import fully_shard

    from ..patching import find_base

    base = find_base(model)
    mesh = mesh if mesh is not None else _default_mesh()
    offload = _offload_policy(cpu_offload, mesh)
    world = mesh.size()
    n4, whole = _wrap_4bit(model, world)
    kwargs = dict(mesh=mesh, mp_policy=_mp_policy(mixed_precision), reshard_after_forward=reshard_after_forward,
                  offload_policy=offload)
    for layer in _decoder_layers(base):
        ignored = {p for p in layer.parameters() if p in whole}
        fully_shard(layer, ignored_params=ignored or None, **kwargs)
    ignored_root = {p for p in model.parameters() if p in whole}
    fully_shard(model, ignored_params=ignored_root or None, **kwargs)
    trainer_path = _declare_sharded(model, base, world)
    n_lora = sum(1 for p in model.parameters() if p.requires_grad)
    logger.info("fastllm: FSDP2 over %d ranks: %d decoder layers + root; %d 4-bit weights sharded with their "
                "quant state, %d kept whole; %d trainable (LoRA) tensors sharded; HF Trainer sees it via %s", world,
                len(_decoder_layers(base)), n4, len(whole), n_lora, trainer_path)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should see (LoRA): frozen ones get no optimizer state."""
    return [p for p in model.parameters() if p.requires_grad]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), else ``t``.

    With CPU offload the shards live on the CPU while the mesh is NCCL's: gather a device copy.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    local, mesh = t.to_local(), t.device_mesh
    if local.device.type != mesh.device_type:
        t = DTensor.from_local(local.to(mesh.device_type), mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor()


def full_lora_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable tensors on the CPU, keyed like ``model.state_dict()``.

    A collective: every rank must call it. With ``rank0_only`` the other ranks get ``{}``.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = _full(p.detach()).cpu()  # every rank joins the all-gather, in the same order
        if rank == 0 or not rank0_only:
            out[name] = full.clone()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default") -> None:
    """Gather the LoRA adapter to rank 0 and write it there in PEFT format (``adapter_model.safetensors``
    + ``adapter_config.json``), loadable by ``peft.PeftModel.from_pretrained``. Call on every rank."""
    from peft import get_peft_model_state_dict

    state = full_lora_state_dict(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        from safetensors.torch import save_file

        # PEFT's own filter (drops the adapter name from keys, keeps only this adapter's tensors).
        adapter = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(path, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        model.peft_config[adapter_name].save_pretrained(str(path))
    if dist.is_initialized():
        dist.barrier()
