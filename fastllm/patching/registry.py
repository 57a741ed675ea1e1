"""The patch registry: every change fastllm makes to a model, recorded so it can be undone exactly.

Patches are per instance: a method is bound with ``types.MethodType`` into the module's ``__dict__``
so an eager twin of the same class in the same process is untouched. Revert is LIFO: attributes the
instance owned before get their original object back; the rest are deleted, so the class attribute
shows through again and no instance attribute is left behind.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import PatchConfig
from .report import PatchReport, logger

_MISSING = object()


@dataclass(frozen=True)
class PatchRecord:
    owner: object      # the module instance we changed
    attr: str
    original: object   # vars(owner)[attr] if it was owned there, else None
    owned: bool        # was attr in owner.__dict__ before we patched?
    spec: str          # which patch, for reports
    value: object = None  # what we set, to notice when someone else replaced it afterwards


@dataclass
class ModelState:
    """What fastllm did to one model: its config, the records (in order), hooks, and the report."""

    config: PatchConfig
    report: PatchReport
    records: list[PatchRecord] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    # Run after the records are undone, newest first: state fastllm changed that is not a plain attribute
    # (transformers' hub-kernel mode, the process-wide TRL routing).
    finalizers: list[Callable[[], None]] = field(default_factory=list)

    def set_attr(self, owner: object, attr: str, value: object, spec: str) -> None:
        """Set ``owner.attr = value`` and remember how to undo it."""
        d = vars(owner)
        owned = attr in d
        self.records.append(PatchRecord(owner, attr, d.get(attr), owned, spec, value))
        if isinstance(owner, nn.Module):
            # Bypass nn.Module.__setattr__'s parameter/buffer/submodule routing: we only ever store
            # plain attributes (bound methods, flags, functions).
            object.__setattr__(owner, attr, value)
        else:
            setattr(owner, attr, value)

    def revert(self) -> int:
        """Undo every record, newest first; returns how many were undone."""
        n = 0
        for handle in reversed(self.hooks):
            handle.remove()
            n += 1
        self.hooks.clear()
        foreign = []
        for rec in reversed(self.records):
            if vars(rec.owner).get(rec.attr, _MISSING) is not rec.value:
                # Another library re-bound this attribute after us (e.g. TRL wraps model.forward): restoring
                # ours would silently drop its change, so leave it and say so.
                foreign.append(f"{type(rec.owner).__name__}.{rec.attr}")
                continue
            if rec.owned:
                object.__setattr__(rec.owner, rec.attr, rec.original)
            else:
                object.__delattr__(rec.owner, rec.attr)
            n += 1
        self.records.clear()
        for undo in reversed(self.finalizers):
            undo()
        self.finalizers.clear()
        if foreign:
            logger.warning("fastllm: unpatch left %d attribute(s) that were replaced after patching as they are: %s",
                           len(foreign), ", ".join(sorted(set(foreign))[:5]))
        return n


    def replaced(self) -> list[PatchRecord]:
        """The records whose attribute no longer holds what fastllm set (someone replaced or removed it)."""
        return [rec for rec in self.records if not holds(rec)]


def _unwrapped(fn: object) -> object:
    """The function under bound methods and ``functools.wraps`` wrappers (accelerate's autocast wrap of forward)."""
    for _ in range(16):
        inner = getattr(fn, "__func__", None) or getattr(fn, "__wrapped__", None)
        if inner is None:
            return fn
        fn = inner
    return fn


def holds(rec: PatchRecord) -> bool:
    """Does ``rec.owner.rec.attr`` still hold fastllm's value, directly or under a wrapper that calls it?"""
    current = vars(rec.owner).get(rec.attr, _MISSING)
    if current is rec.value:
        return True
    return current is not _MISSING and callable(rec.value) and _unwrapped(current) is _unwrapped(rec.value)


# Keyed by the transformers model (LlamaForCausalLM / LlamaModel), weakly: a model that is dropped
# leaves the registry by itself.
_STATES: weakref.WeakKeyDictionary[nn.Module, ModelState] = weakref.WeakKeyDictionary()


def get_state(base: nn.Module) -> ModelState | None:
    return _STATES.get(base)


def set_state(base: nn.Module, state: ModelState) -> None:
    _STATES[base] = state


def pop_state(base: nn.Module) -> ModelState | None:
    return _STATES.pop(base, None)


def patched_models() -> list[nn.Module]:
    return list(_STATES.keys())
