"""TRL trainers keep fastllm's loss: their ``add_fused_lm_head`` is routed to fastllm for fastllm-patched models.

TRL >= 1.16 trainers (SFT, DPO, GRPO, KTO, RLOO, the experimental async GRPO) call ``add_fused_lm_head(model,
...)`` on the model they train, which replaces ``model.forward`` with TRL's own logit-free head: on a fastllm model
that would bypass the ``loss`` patch (fastllm's kernels, and a LoRA delta on ``lm_head``, which TRL's head reads as
``lm_head.weight`` alone). ``route_fused_lm_head()`` wraps that function once per process: for a model whose
forward is fastllm's loss forward it records the call's arguments (``modules.fused_head.set_fused_head``) and
leaves the forward alone, so ``model(..., fused_lm_head=True)`` is answered by fastllm; every other model (a
reference model, an unpatched one) gets TRL's own function unchanged. Trainer modules bind the name at import, so
the ones already imported are rebound too, and later imports pick up the wrapper from ``trl.trainer.utils``.

The routing is process-wide, so it is reference-counted: ``acquire_routing()`` installs it with the first
patched model and returns that model's release, which the registry runs on ``unpatch``; the last release puts
TRL's own function back everywhere. TRL is optional: an install that fails to import (trl present, one of its
dependencies missing) is logged once and leaves loading and patching alone.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys

from torch import nn

from ..modules.fused_head import FusedHead, set_fused_head

log = logging.getLogger("fastllm")


def _fastllm_loss_forward(model: nn.Module) -> bool:
    bound = model.__dict__.get("forward")
    return hasattr(getattr(bound, "__func__", None), "_fastllm_loss")


def _rebind(old, new) -> None:
    """Every imported ``trl.*`` module that bound ``old`` by name (the trainers, experimental ones too)."""
    for name, mod in list(sys.modules.items()):
        if (name == "trl" or name.startswith("trl.")) and mod is not None \
                and getattr(mod, "__dict__", {}).get("add_fused_lm_head") is old:
            mod.add_fused_lm_head = new


def _trl_utils():
    """``trl.trainer.utils``, or None when TRL is absent or does not import (logged once)."""
    global _IMPORT_ERROR
    if importlib.util.find_spec("trl") is None or _IMPORT_ERROR is not None:
        return None
    try:
        import trl.trainer.utils as utils
    except Exception as err:  # a partial install must not break loading a model
        _IMPORT_ERROR = f"{type(err).__name__}: {err}"
        log.warning("fastllm: TRL is installed but does not import (%s); TRL trainers will not be routed to "
                    "fastllm's loss", _IMPORT_ERROR)
        return None
    return utils


_IMPORT_ERROR: str | None = None
_USERS = 0  # patched models holding the routing


def route_fused_lm_head() -> bool:
    """Install the routing (idempotent). Returns False when TRL is absent, broken, or has no ``add_fused_lm_head``."""
    utils = _trl_utils()
    if utils is None:
        return False

    current = getattr(utils, "add_fused_lm_head", None)
    if current is None:
        return False
    if getattr(current, "_fastllm_original", None) is not None:
        return True

    @functools.wraps(current)
    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if _fastllm_loss_forward(model):
            set_fused_head(model, FusedHead(float(temperature), bool(cast_lm_head_to_fp32), tuple(outputs)))
            log.info("fastllm: TRL's fused LM head on %s is served by fastllm's loss forward",
                     type(model).__name__)
            return None
        return current(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)

    add_fused_lm_head._fastllm_original = current
    utils.add_fused_lm_head = add_fused_lm_head
    _rebind(current, add_fused_lm_head)
    return True


def acquire_routing():
    """Count one more model that needs the routing (installed by the first); returns its release, or None when
    TRL cannot be routed."""
    global _USERS
    if not route_fused_lm_head():
        return None
    _USERS += 1
    released = False

    def release() -> None:
        global _USERS
        nonlocal released
        if released:
            return
        released = True
        _USERS -= 1
        if _USERS == 0:
            unroute_fused_lm_head()

    return release


def routing_users() -> int:
    return _USERS


def unroute_fused_lm_head() -> None:
    """Put TRL's own ``add_fused_lm_head`` back everywhere it was rebound."""
    if "trl.trainer.utils" not in sys.modules:
        return
    utils = sys.modules["trl.trainer.utils"]
    wrapper = getattr(utils, "add_fused_lm_head", None)
    original = getattr(wrapper, "_fastllm_original", None)
    if original is not None:
        utils.add_fused_lm_head = original
        _rebind(wrapper, original)
