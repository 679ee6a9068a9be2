"""The step profile's arithmetic (torch_backend/parallel/profiling.py) on a hand-made timeline
whose answer is known: the benchmarks' idle-time and kernel-time tables come from it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mugv.torch_backend.parallel.profiling import call_ms, idle_gaps, kernel_times


def _event(kind: str, start: float, end: float, name: str):
    return SimpleNamespace(name=name, device_type=SimpleNamespace(name=kind),
                           device_time=(end - start) if kind == "CUDA" else 0.0,
                           time_range=SimpleNamespace(start=start, end=end))


def _timeline():
    # microseconds: kernels a [0, 100], b [80, 300] (overlaps a), c [1000, 1100], d [1130, 1200],
    # e [2000, 2050]; gaps: 700 after b, 30 after c (under 50, not a gap), 800 after d.
    gpu = [("CUDA", 0, 100, "a"), ("CUDA", 80, 300, "b"), ("CUDA", 1000, 1100, "c"),
           ("CUDA", 1130, 1200, "d"), ("CUDA", 2000, 2050, "e"), ("CUDA", 2000, 2050, "Optimizer.step#Adam")]
    host = [("CPU", 250, 1500, "aten::item"), ("CPU", 260, 900, "cudaStreamSynchronize"),
            ("CPU", 1150, 1900, "aten::copy_"), ("CPU", 1400, 1450, "aten::item")]
    return [_event(*e) for e in gpu + host]


def test_idle_gaps_merges_overlaps_and_names_what_waited():
    gaps = idle_gaps(_timeline(), min_gap_us=50.0)
    assert gaps["count"] == 2
    assert gaps["idle_ms"] == pytest.approx((700 + 800) / 1e3)
    assert gaps["span_ms"] == pytest.approx(2.05)
    largest, second = gaps["largest"]
    assert (largest["ms"], largest["after"], largest["before"]) == (0.8, "d", "e")
    assert largest["host"] == "aten::copy_"                 # the op running when d ended
    assert (second["ms"], second["after"], second["before"]) == (0.7, "b", "c")
    assert second["host"] == "cudaStreamSynchronize"        # the innermost of the two running at 300
    waits = {n: (c, ms) for n, c, ms in gaps["host_waits"]}
    assert waits == {"aten::item": (2, pytest.approx(1.3)), "cudaStreamSynchronize": (1, pytest.approx(0.64))}
    assert idle_gaps(_timeline(), min_gap_us=20.0)["count"] == 3


def test_kernel_times_leave_out_annotations():
    times = kernel_times(_timeline())
    assert set(times) == {"a", "b", "c", "d", "e"}
    assert times["b"] == [pytest.approx(0.22), 1]


def test_call_ms_counts_calls_after_the_warmup():
    calls = []
    ms = call_ms(lambda: calls.append(1), iters=4, warmup=2, device="cpu")
    assert len(calls) == 6 and len(ms) == 4 and all(t >= 0 for t in ms)
