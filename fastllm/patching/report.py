"""PatchReport: what a ``patch`` call did, counted per patch, with every skip and its reason."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("fastllm")


@dataclass
class PatchReport:
    """Counts per patch, the backend each one runs on, skipped modules and disabled options with reasons."""

    counts: Counter = field(default_factory=Counter)
    backends: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (patch, module name, reason)
    disabled: dict[str, str] = field(default_factory=dict)              # option -> why it is off
    notes: list[str] = field(default_factory=list)
    live: dict[str, object] = field(default_factory=dict)  # patch -> object with a ``summary()`` of its calls so far

    def add(self, spec: str, n: int = 1) -> None:
        self.counts[spec] += n

    def skip(self, spec: str, name: str, reason: str) -> None:
        self.skipped.append((spec, name, reason))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        done = ", ".join(f"{n} {s}" + (f" [{self.backends[s]}]" if s in self.backends else "")
                         for s, n in self.counts.items()) or "nothing"
        parts = [f"patched {done}; skipped {len(self.skipped)}"]
        if self.skipped:
            reasons = Counter((s, r) for s, _, r in self.skipped)
            parts.append("; ".join(f"{s} x{n}: {r}" for (s, r), n in reasons.items()))
        if self.disabled:
            parts.append("off: " + ", ".join(f"{k} ({v})" for k, v in self.disabled.items()))
        parts.extend(self.notes)
        parts.extend(f"{name}: {obj.summary()}" for name, obj in self.live.items())
        if "fused" in self.backends.get("gradient_checkpointing", ""):
            from ..modules.layer import LAYER_CALLS

            if LAYER_CALLS:  # per call, process-wide: fused layers and the reasons a call went op by op
                parts.append("fused_layer calls so far: " + ", ".join(f"{k}: {n}" for k, n in LAYER_CALLS.items()))
        return " | ".join(parts)

    def __str__(self) -> str:
        return self.summary()

    def log(self) -> None:
        """Log once: the summary at INFO, and each distinct skip reason once at WARNING."""
        logger.info("fastllm: %s", self.summary())
        for (spec, reason), n in Counter((s, r) for s, _, r in self.skipped).items():
            logger.warning("fastllm: %s could not patch %d module(s): %s", spec, n, reason)
