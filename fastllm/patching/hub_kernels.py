"""transformers' hub kernels and fastllm's patches on one model: fastllm turns kernelization off while it patches.

transformers >= 5.2x loads models with ``use_kernels=True`` and re-kernelizes the modules marked
``@use_kernel_forward_from_hub`` (LlamaRMSNorm among them) whenever ``train()`` / ``eval()`` change the kernels
mode; re-kernelizing pops or rebinds each such module's per-instance ``forward``, which would silently drop
fastllm's patch on it. Both libraries replace the same forwards, so only one of them can own a model at a time:
``suspend`` resets the model's kernelization (the torch forwards come back, the mode is cleared, so ``train()``
no longer re-kernelizes) before fastllm patches, and the registry runs the returned undo after ``unpatch``,
which kernelizes the model again in the mode it had (its TRAINING / INFERENCE bit following ``model.training``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .report import logger


def _kernelized(base: nn.Module) -> list[nn.Module]:
    """The transformers models inside ``base`` (itself included) whose kernelization is on."""
    return [m for m in base.modules()
            if getattr(m, "use_kernels", False) is True and callable(getattr(m, "reset_kernels", None))]


def _mode_for(model: nn.Module, mode):
    """``mode`` with its TRAINING / INFERENCE bit set as ``model.training`` says (what ``train()`` would pick)."""
    try:
        from kernels import Mode
    except ImportError:
        return mode
    want = Mode.TRAINING if model.training else Mode.INFERENCE
    return want | Mode.TORCH_COMPILE if mode is not None and Mode.TORCH_COMPILE in mode else want


def suspend(base: nn.Module) -> Callable[[], None] | None:
    """Turn hub-kernel kernelization off on ``base``; returns the undo (None when it was off)."""
    models = [(m, getattr(m, "kernels_mode", None)) for m in _kernelized(base)]
    if not models:
        return None
    for m, _ in models:
        m.reset_kernels()

    def restore() -> None:
        for m, mode in models:
            if getattr(m, "use_kernels", False):
                continue  # kernelized again by its owner meanwhile
            try:
                m.set_use_kernels(True, mode=_mode_for(m, mode))
            except Exception as err:  # a kernel repository that cannot load now: leave the torch forwards
                logger.warning("fastllm: unpatch could not turn transformers' hub kernels back on for %s (%s); "
                               "the model runs transformers' torch forwards", type(m).__name__, err)

    return restore


def kernelized_since(base: nn.Module) -> bool:
    """Whether something turned kernelization back on after ``suspend`` (it would have replaced our forwards)."""
    return bool(_kernelized(base))
