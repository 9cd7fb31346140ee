"""Timing one callable: CUDA events on a GPU, ``perf_counter`` on the CPU.

Both report the 20th, 50th and 80th percentile of many repeats after a
warm-up, in milliseconds. The CPU timer picks the repeat count from a time
budget so that slow cases do not take forever and fast ones are not noisy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass(frozen=True)
class Timing:
    p20: float
    p50: float
    p80: float
    repeats: int


def _quantiles(samples: List[float]) -> Timing:
    t = torch.tensor(samples, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], len(samples))


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    budget_s: float = 0.5,
    min_repeats: int = 5,
    max_repeats: int = 200,
) -> Timing:
    """Time ``fn()`` on ``device``; returns percentiles in milliseconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # Estimate one call to size the repeat count from the budget.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end) / 1e3, 1e-6)
        n = int(min(max_repeats * 5, max(min_repeats, budget_s / est)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return _quantiles([s.elapsed_time(e) for s, e in events])

    samples: List[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)
