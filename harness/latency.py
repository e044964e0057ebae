"""Wall-clock timing per pipeline stage, synchronised on GPU, and repeat statistics for benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class Stopwatch:
    """Accumulates exclusive time per stage into `last`: a nested stage pauses the enclosing one.

    So method scoring inside the LLM loop (`with ctx.watch("method")`) is charged to "method", not to "llm".
    On CUDA the device is synchronised before every clock reading. `clock` may be replaced (the FLOPs test uses
    a running FLOP count as its clock, which attributes counted FLOPs to stages the same way).
    """

    def __init__(self, device: torch.device | str = "cpu", clock: Callable[[], float] | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = clock or self._time
        self.last: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = 0.0

    def _time(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _charge(self) -> None:
        now = self.clock()
        if self._stack:
            top = self._stack[-1]
            self.last[top] = self.last.get(top, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._charge()
        self._stack.append(stage)
        self.last.setdefault(stage, 0.0)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, p90, mean and count of a list of seconds."""
    s = sorted(samples)
    p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
    return {"median": statistics.median(s), "p90": p90, "mean": statistics.fmean(s), "n": len(s)}


def interleaved(conditions: dict[str, Callable[[], dict[str, float]]], *, warmup: int = 2,
                repeats: int = 10) -> dict[str, dict[str, dict[str, float]]]:
    """Run conditions round-robin (cancels machine drift), each call returning seconds per stage.

    Returns condition -> stage -> summary (median, p90, mean, n).
    """
    for _ in range(warmup):
        for fn in conditions.values():
            fn()
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in conditions}
    for _ in range(repeats):
        for name, fn in conditions.items():
            for stage, sec in fn().items():
                samples[name].setdefault(stage, []).append(sec)
    return {k: {stage: summarize(v) for stage, v in st.items()} for k, st in samples.items()}


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak allocated memory on a CUDA device since the last reset (None on CPU, where only the process's
    maximum resident set size is meaningful: see `process_max_rss_bytes`)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def process_max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
