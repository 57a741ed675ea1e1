"""``compile_report(model)``: what torch.compile did for a model's compiled regions.

Graphs are counted per region by fastllm's backend (one count per graph inductor compiles, recompiles
included); graph breaks come from ``torch._dynamo.utils.counters["graph_break"]`` since the regions were
made (that counter is process-wide: other compiled code in the same process adds to it).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..modules import decoder
from .api import find_base


@dataclasses.dataclass(frozen=True)
class CompileReport:
    graphs: int                       # graphs compiled for the regions (all regions, recompiles included)
    graphs_per_region: dict[str, int]
    recompiles: int                   # graphs beyond the first of each region
    graph_breaks: int                 # dynamo graph breaks since the regions were made (process-wide)
    break_reasons: dict[str, int]     # reason -> count, from dynamo's counters (process-wide)
    compile_seconds: float            # wall time in the backend for forward graphs
    eager_calls: dict[str, int]       # calls run eagerly: unsupported kwargs (the class's own forward), and
                                      # decode steps' RMSNorms (by design: a region call costs more there)
    recompile_limit: int              # dynamo's per-function limit: a region at it silently runs eagerly

    @property
    def at_limit(self) -> list[str]:
        return [r for r, n in self.graphs_per_region.items() if n >= self.recompile_limit]

    def summary(self) -> str:
        per = ", ".join(f"{r} {n}" for r, n in sorted(self.graphs_per_region.items())) or "none yet"
        out = (f"compiled {self.graphs} graphs ({per}); {self.recompiles} recompiles; {self.graph_breaks} graph "
               f"breaks; {self.compile_seconds:.1f}s compiling")
        if self.at_limit:
            out += f"; at dynamo's recompile limit (runs eagerly now): {self.at_limit}"
        return out

    def __str__(self) -> str:
        return self.summary()


def compile_report(model: nn.Module) -> CompileReport | None:
    """The compile report of ``model`` (a PEFT wrapper works too), or None if it never had compiled regions."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    regions = decoder.regions_of(find_base(model))
    if regions is None:
        return None
    st = regions.stats
    reasons = {str(k): v for k, v in counters["graph_break"].items()}
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    return CompileReport(graphs=st.total_graphs, graphs_per_region=dict(st.graphs), recompiles=st.recompiles,
                         graph_breaks=sum(reasons.values()) - st.breaks_before, break_reasons=reasons,
                         compile_seconds=st.seconds, eager_calls=dict(st.eager_calls), recompile_limit=limit)
