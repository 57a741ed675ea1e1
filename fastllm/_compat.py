"""Every version gate and feature probe lives here (torch, triton, transformers, peft, bitsandbytes).

Nothing here imports triton at module import: ``triton_available()`` does it lazily, so that
``TRITON_INTERPRET`` set by a test or a user before the first call is honoured.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .arch import SUPPORTED_MODEL_TYPES  # noqa: F401  (re-exported: the table is the source)

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
class Switch:
    """A process-wide switch: ``set(True)`` / ``set(False)``, or ``set(None)`` to follow the environment variable
    ``env`` again (``default`` while unset; off when empty or ``0``, else on), read once at the next use and kept
    (hot paths ask per call)."""

    def __init__(self, env: str, default: bool = False):
        self.env, self.default, self.value = env, default, None

    def set(self, on: bool | None) -> None:
        self.value = on

    def __bool__(self) -> bool:
        if self.value is None:
            env = os.environ.get(self.env)
            self.value = self.default if env is None else env not in ("", "0")
        return self.value


def triton_available() -> bool:
    """True if triton imports (it may still lack a GPU: see ``triton_usable``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the torch fallbacks
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str | None = None) -> bool:
    """Can a Triton kernel run for tensors on ``device``?

    CUDA devices need triton; CPU tensors only run through the interpreter.
    """
    if not triton_available():
        return False
    dev = torch.device(device) if device is not None else None
    if triton_interpret():
        return True
    if dev is None:
        return torch.cuda.is_available()
    return dev.type == "cuda"


def require_triton(device: torch.device | str) -> None:
    """Raise a clear error when ``backend="triton"`` is asked for where it cannot run."""
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package: pip install triton, "
                           "or use backend='auto' / 'torch'.")
    if not triton_usable(device):
        raise RuntimeError(f"backend='triton' needs a CUDA tensor (got device {device}); on the CPU use "
                           "backend='auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton "
                           "to run the kernel through the Triton interpreter (slow, for tests).")


def pick_backend(backend: str, device: torch.device | str) -> str:
    """Resolve ``"auto" | "triton" | "torch"`` for tensors on ``device``.

    "auto" takes Triton on CUDA and the torch fallback elsewhere (never the interpreter: it is
    for tests, thousands of times slower).
    """
    if backend == "auto" and type(device) is torch.device:  # the hot case: a tensor's own device, every op call
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        require_triton(device)
        return "triton"
    dev = torch.device(device)
    return "triton" if dev.type == "cuda" and triton_available() else "torch"


def records_graph(*tensors) -> bool:
    """Whether autograd records a graph for an op on ``tensors`` (grad mode on and one of them needs grad; None
    entries are skipped). Ops take their autograd.Function only then, and the bare kernel otherwise."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bf16_supported(device: torch.device | str | None = None) -> bool:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def allocatable_bytes(free: int, total: int, fraction: float, reserved: int, allocated: int) -> int:
    """Bytes a new CUDA allocation can still get: the blocks the caching allocator holds unused (``reserved -
    allocated``) plus what it may still reserve, the device's free memory within the process's cap
    (``torch.cuda.set_per_process_memory_fraction``: no reserving past ``fraction * total``)."""
    return max(0, reserved - allocated) + max(0, min(free, int(fraction * total) - reserved))


def cuda_allocatable(device: torch.device) -> int:
    """``allocatable_bytes`` on a CUDA device now. ``mem_get_info`` alone ignores the process's cap (a shared or
    capped GPU would be planned as if whole) and the allocator's cached blocks."""
    free, total = torch.cuda.mem_get_info(device)
    return allocatable_bytes(free, total, torch.cuda.get_per_process_memory_fraction(device),
                             torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


@functools.cache
def bnb():
    """The bitsandbytes module, or None when it is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes

    return bitsandbytes


def is_linear4bit(module) -> bool:
    b = bnb()
    return b is not None and isinstance(module, b.nn.Linear4bit)


def versions() -> dict[str, str]:
    """Versions of the stack, stamped on benchmark rows and reports."""
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "bitsandbytes", "trl"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            out[name] = "missing"
            continue
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "unknown"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def enable_hf_checkpointing(model) -> None:
    """transformers' own non-reentrant gradient checkpointing switch, across 5.x renames."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hub_kernels_switch() -> bool:
    """Whether this transformers loads models with the ``kernels`` hub kernels (``from_pretrained(use_kernels=)``)."""
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "set_use_kernels")


def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed triton, or None when it is missing or its version does not parse."""
    if not triton_available():
        return None
    import triton

    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None
