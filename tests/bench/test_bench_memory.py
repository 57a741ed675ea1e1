"""``fastllm bench memory`` on the CPU: its workers, rows and plot on the tiny shape, and the longest-length search.
The memory numbers themselves are GPU measurements (NaN here)."""

import json
import os
from types import SimpleNamespace

import pytest

from fastllm.bench import memory


def test_curve_rows_and_plot_on_the_cpu(tmp_path):
    out = str(tmp_path / "mem")
    assert memory.main(["--providers", "hf,fastllm", "--shape", "tiny", "--seqs", "16,33", "--steps", "1",
                        "--warmup", "0", "--device", "cpu", "--out", out]) == 0
    with open(os.path.join(out, "memory.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["provider"], r["seq"]) for r in rows] == [("hf", 16), ("hf", 33), ("fastllm", 16), ("fastllm", 33)]
    assert all(r["tokens_per_s"] > 0 and r["batch"] == 1 and "error" not in r for r in rows)
    assert os.path.getsize(os.path.join(out, "memory.png")) > 0


def test_caps_need_cuda(capsys):
    with pytest.raises(SystemExit) as done:
        memory.main(["--caps", "24", "--device", "cpu"])
    assert done.value.code == 2 and "--caps needs --device cuda" in capsys.readouterr().err


def test_the_cli_lists_it():
    from fastllm.cli import BENCHES

    assert BENCHES["memory"] == "fastllm.bench.memory"


@pytest.mark.parametrize("limit,want", [(10_000, 9216), (4096, 4096), (2000, None), (10**9, 16384)])
def test_longest_length_search_doubles_then_bisects(monkeypatch, limit, want):
    """The search over the worker's fit/out-of-memory answers (here a length limit stands in for the GPU)."""
    seen = []

    def point(provider, args, seq, cap=None):
        seen.append(seq)
        return {"seq": seq} if seq <= limit else {"seq": seq, "error": "torch.OutOfMemoryError: CUDA out of memory"}

    monkeypatch.setattr(memory, "_point", point)
    args = SimpleNamespace(min_seq=4096, max_seq=16384, resolution=1024)
    best, tried = memory.longest_under_cap("fastllm", args, 24.0)
    assert best == want and [r["seq"] for r in tried] == seen
    assert all(s % 1024 == 0 for s in seen)


def test_a_failure_that_is_not_out_of_memory_ends_the_search(monkeypatch):
    monkeypatch.setattr(memory, "_point", lambda provider, args, seq, cap=None: {"seq": seq, "error": "ImportError"})
    best, tried = memory.longest_under_cap("unsloth", SimpleNamespace(min_seq=4096, max_seq=65536, resolution=1024),
                                           24.0)
    assert best is None and len(tried) == 1
