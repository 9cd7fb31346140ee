"""Timing callables: alone (:func:`measure`) or interleaved with their peers (:func:`measure_paired`).

Both report the 20th, 50th and 80th percentile (and the minimum) of many repeats after a warm-up,
in milliseconds.

- CPU: ``time.perf_counter`` around each call; the repeat count comes from a time budget so that
  slow cases do not take forever and fast ones are not noisy.
- CUDA: ``triton.testing.do_bench`` (it flushes the L2 cache between repeats, so a kernel is not
  timed on data a previous repeat left in cache), CUDA events when Triton is missing.

Paired timing runs the providers of one configuration round-robin, one call each per round, so a
change in machine load (a shared CI runner, a neighbour's build) hits every provider alike and the
ratio stays meaningful even when the absolute times do not. ``turbotune bench`` times every
configuration this way.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class Timing:
    p20: float
    p50: float
    p80: float
    repeats: int
    min: float = math.nan


def _quantiles(samples: List[float]) -> Timing:
    t = torch.tensor(samples, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], len(samples), float(t.min()))


def _do_bench():
    try:
        from triton.testing import do_bench

        return do_bench
    except Exception:  # pragma: no cover - Triton is a dependency on Linux
        return None


def _cuda_events(fn: Callable[[], object], device: torch.device, n: int) -> List[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in events]


def _gpu_timing(fn: Callable[[], object], device: torch.device, budget_s: float, min_repeats: int) -> Timing:
    """Per-call milliseconds on a GPU: ``do_bench`` (L2 flushed between repeats; ``repeats`` is then 0,
    do_bench chooses it from the budget), or CUDA events when Triton is missing."""
    do_bench = _do_bench()
    if do_bench is not None:
        q = do_bench(fn, warmup=max(1, int(budget_s * 250)), rep=max(5, int(budget_s * 1000)),
                     quantiles=[0.0, 0.2, 0.5, 0.8])
        return Timing(q[1], q[2], q[3], 0, q[0])
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 1e3, 1e-6)
    return _quantiles(_cuda_events(fn, device, int(min(1000, max(min_repeats, budget_s / est)))))


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    budget_s: float = 0.5,
    min_repeats: int = 5,
    max_repeats: int = 200,
) -> Timing:
    """Time ``fn()`` alone on ``device``; returns percentiles in milliseconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return _gpu_timing(fn, device, budget_s, min_repeats)
    samples: List[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def measure_paired(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    budget_s: float = 0.5,
    min_rounds: int = 5,
    max_rounds: int = 200,
    rounds: Optional[int] = None,
    before: Optional[Callable[[int], object]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> List[Timing]:
    """Time several callables round-robin (one call of each per round); one :class:`Timing` per callable.

    ``before(i)``, when given, runs untimed before every call of ``fns[i]`` (e.g. restoring inputs that
    the call overwrites; on a GPU once per round, before the repeats of ``do_bench``). ``clock`` (CPU only) may be ``time.thread_time``: with one thread, the cost of
    the calls themselves on a machine shared with other jobs.

    ``budget_s`` is per callable: the number of rounds is chosen so that the whole measurement
    takes about ``budget_s * len(fns)`` (within ``[min_rounds, max_rounds]``), unless ``rounds``
    is given. On a GPU each round times each callable with ``do_bench`` (a short budget), and the
    percentiles are taken over the rounds' medians.
    """
    device = torch.device(device)
    fns = list(fns)
    if not fns:
        return []
    est = [0.0] * len(fns)
    for _ in range(max(1, warmup)):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            est[i] = time.perf_counter() - t0
    if rounds is None:
        per_round = max(sum(est), 1e-6)
        rounds = int(min(max_rounds, max(min_rounds, budget_s * len(fns) / per_round)))
    samples: List[List[float]] = [[] for _ in fns]
    if device.type == "cuda":
        rounds = min(rounds, 10)
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                if before is not None:
                    before(i)
                samples[i].append(_gpu_timing(fn, device, budget_s / rounds, 3).p50)
    else:
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                if before is not None:
                    before(i)
                t0 = clock()
                fn()
                samples[i].append((clock() - t0) * 1e3)
    return [_quantiles(s) for s in samples]
