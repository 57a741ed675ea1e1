"""Where a profiled step leaves the GPU idle: each gap between device activities, charged to what the host
was doing when it launched the work that ended the gap.

A step whose wall time exceeds its kernels' time is waiting on the host somewhere. The device ran everything
queued before a gap, so the gap ends when the host launches the next piece of work: the op around that
launch, and the step phase (``record_function("phase:...")`` markers), say where the host fell behind.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

__all__ = ["idle_gaps", "idle_report"]

_RUNTIME = ("cuda", "cu")  # runtime / driver API events (cudaLaunchKernel, cuLaunchKernelEx, ...)


def _is_runtime(name: str) -> bool:
    return name.startswith(_RUNTIME)


def _annotation(e) -> bool:
    """A record_function range shown on the device, not device work."""
    flag = getattr(e, "is_user_annotation", None)
    return bool(flag()) if callable(flag) else e.name().startswith("phase:")


def idle_gaps(prof, min_gap_us: float = 2.0, attribute: bool = True) -> dict:
    """Device idle time of a profile: ``total`` us in ``gaps`` gaps of at least ``min_gap_us``, ``by_phase`` and
    ``by_op`` ((phase, op around the late launch) -> us; with ``attribute``), and ``span`` (first to last device
    activity, us)."""
    from torch.autograd import DeviceType

    events = prof.profiler.kineto_results.events()
    # device activity: kernels, copies, memsets; not the annotation spans that record_function ranges (the phase
    # markers, torch.optim's step) leave on the device timeline, which cover whole stretches of it
    device = sorted((e for e in events if e.device_type() == DeviceType.CUDA and not _annotation(e)),
                    key=lambda e: e.start_ns())
    if not device:
        return {"total": 0.0, "gaps": 0, "by_phase": {}, "by_op": {}, "span": 0.0}
    host = [e for e in events if e.device_type() == DeviceType.CPU]
    launches = {e.correlation_id(): e for e in host if _is_runtime(e.name())}
    ops = sorted((e for e in host if not _is_runtime(e.name())), key=lambda e: e.start_ns())
    starts = [e.start_ns() for e in ops]
    phases = [e for e in ops if e.name().startswith("phase:")]

    def around(t: int):
        """Innermost op (not a phase marker) and the phase containing host time t."""
        i = bisect.bisect_right(starts, t) - 1
        best = None
        for e in ops[max(0, i - 400): i + 1][::-1]:  # nested ops start before t; look back a window
            if e.end_ns() >= t and not e.name().startswith("phase:"):
                if best is None or e.duration_ns() < best.duration_ns():
                    best = e
        phase = next((p.name()[6:] for p in phases if p.start_ns() <= t <= p.end_ns()), "other")
        return (best.name() if best is not None else "?"), phase

    by_op: dict = defaultdict(float)
    by_phase: dict = defaultdict(float)
    busy_end = device[0].end_ns()
    total = 0.0
    n = 0
    for e in device[1:]:
        gap = (e.start_ns() - busy_end) / 1e3  # us
        busy_end = max(busy_end, e.end_ns())
        if gap < min_gap_us:
            continue
        total += gap
        n += 1
        if not attribute:
            continue
        launch = launches.get(e.correlation_id())
        t = launch.start_ns() if launch is not None else e.start_ns()
        op, phase = around(t)
        by_op[(phase, op)] += gap
        by_phase[phase] += gap
    span = (busy_end - device[0].start_ns()) / 1e3
    return {"total": total, "gaps": n, "by_phase": dict(by_phase), "by_op": dict(by_op), "span": span}


def idle_report(prof, steps: int, min_gap_us: float = 2.0, top: int = 25) -> str:
    """A text table of device idle time per step: total, per phase, and per op around the late launch."""
    gaps = idle_gaps(prof, min_gap_us)
    if not gaps["span"]:
        return "no device events\n"
    total, n, span, by_phase, by_op = gaps["total"], gaps["gaps"], gaps["span"], gaps["by_phase"], gaps["by_op"]
    lines = [f"device idle {total / steps / 1e3:.1f} ms per step in {n // max(steps, 1)} gaps >= {min_gap_us} us "
             f"(first to last device activity: {span / steps / 1e3:.1f} ms per step)"]
    lines += [f"  {p:<10} {v / steps / 1e3:8.2f} ms" for p, v in sorted(by_phase.items(), key=lambda kv: -kv[1])]
    lines.append("by (phase, op around the late launch), ms per step:")
    lines += [f"  {v / steps / 1e3:8.2f}  {p:<10} {o}" for (p, o), v in
              sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines) + "\n"
