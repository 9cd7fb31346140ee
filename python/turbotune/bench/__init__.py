"""Benchmark harness shared by ``turbotune bench`` and ``benchmarks/``.

A *suite* is a function ``suite(quick: bool, device: torch.device) ->
Iterable[Case]`` registered with :func:`register_suite`; the modules in
:mod:`turbotune.bench.suites` are discovered and imported automatically, so a
new suite is one new file there. Every suite yields, for each configuration,
one ``baseline=True`` case running stock PyTorch and one case per other
provider; :func:`run` times them all in the same process and reports each
provider's speed-up over the baseline (``ratio_vs_torch`` = baseline median /
provider median, so > 1 means faster than torch).

By default :func:`run` times the providers of one configuration *paired*
(round-robin, :func:`measure_paired`), so load changes on a shared machine hit
every provider alike. On a GPU each timing is ``triton.testing.do_bench``.
Rows carry throughput (TFLOP/s, GB/s, items/s) from ``Case.work`` and, on a GPU
whose peak is known (:func:`device_peaks`), the fraction of that peak.
:mod:`turbotune.bench.report` writes the JSON, the Markdown report and the charts.
"""
from __future__ import annotations

import datetime
import importlib
import os
import pkgutil
import platform
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .timer import Timing, measure, measure_paired

__all__ = [
    "Case",
    "register_suite",
    "all_suites",
    "run",
    "measure",
    "measure_paired",
    "Timing",
    "device_peaks",
    "grad_modes",
    "write_results",
    "write_report",
    "markdown_table",
]

SuiteFn = Callable[[bool, torch.device], Iterable["Case"]]
_SUITES: Dict[str, SuiteFn] = {}


@dataclass
class Case:
    """One timed configuration.

    ``fn`` is called repeatedly; it must do the whole unit of work (for a
    backward case: only the backward, with the forward graph built once
    outside, see :func:`grad_modes`). ``work`` optionally declares
    ``{"flop": n}`` and/or ``{"bytes": n}`` / ``{"items": n, "unit": "tokens"}``
    so the report can add throughput columns.
    """

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device: str
    fn: Callable[[], object]
    baseline: bool = False
    work: Dict[str, float] = field(default_factory=dict)

    def key(self):
        return (self.op, self.mode, self.shape, self.dtype, self.device)


def register_suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator: register ``fn`` as the benchmark suite ``name``."""

    def deco(fn: SuiteFn) -> SuiteFn:
        _SUITES[name] = fn
        return fn

    return deco


def all_suites() -> Dict[str, SuiteFn]:
    """All registered suites, importing every module of :mod:`turbotune.bench.suites`."""
    pkg = importlib.import_module(f"{__name__}.suites")
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(sorted(_SUITES.items()))


def grad_modes(
    forward: Callable[[], object],
    inputs: Sequence[torch.Tensor],
    modes: Sequence[str] = ("fwd", "bwd", "fwd+bwd"),
) -> Dict[str, Callable[[], object]]:
    """Build the callables for ``fwd``, ``bwd`` and ``fwd+bwd`` timing of ``forward``.

    ``forward()`` returns a tensor or a tuple whose first element is the output
    to differentiate; a fixed random upstream gradient is used. ``inputs`` are
    the leaf tensors whose ``.grad`` is reset between calls.
    """

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    out = {}
    y0 = first(forward())
    dy = torch.randn_like(y0)

    def clear():
        for t in inputs:
            t.grad = None

    if "fwd" in modes:

        def fwd():
            with torch.no_grad():
                return forward()

        out["fwd"] = fwd
    if "bwd" in modes:
        holder = {"y": first(forward())}

        def bwd():
            clear()
            holder["y"].backward(dy, retain_graph=True)

        out["bwd"] = bwd
    if "fwd+bwd" in modes:

        def fwd_bwd():
            clear()
            first(forward()).backward(dy)

        out["fwd+bwd"] = fwd_bwd
    return out


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, unit="case", leave=False)
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Null()


# Dense peaks of common GPUs: (16-bit tensor-core TFLOP/s, fp32 TFLOP/s without tensor cores, memory GB/s).
_GPU_PEAKS = [
    ("H200", (989.0, 67.0, 4800.0)),
    ("H100", (989.0, 67.0, 3350.0)),
    ("A100-SXM4-80GB", (312.0, 19.5, 2039.0)),
    ("A100", (312.0, 19.5, 1555.0)),
    ("L40S", (362.0, 91.6, 864.0)),
    ("L4", (121.0, 30.3, 300.0)),
    ("A10", (125.0, 31.2, 600.0)),
    ("T4", (65.0, 8.1, 320.0)),
]


def device_peaks(device: Optional[torch.device] = None) -> Optional[Dict[str, float]]:
    """``{"tflops_16bit", "tflops_fp32", "gb_per_s", "name"}`` for a known GPU, else None (CPUs included)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, (t16, t32, bw) in _GPU_PEAKS:
        if key.lower() in name.lower():
            return {"name": name, "tflops_16bit": t16, "tflops_fp32": t32, "gb_per_s": bw}
    return None


def _throughput(work: Dict[str, float], ms: float, dtype: str = "", peaks: Optional[Dict[str, float]] = None
                ) -> Dict[str, float]:
    out = {}
    s = ms / 1e3
    if s <= 0:
        return out
    if "flop" in work:
        out["tflops"] = work["flop"] / s / 1e12
        if peaks:
            out["pct_peak_flops"] = 100 * out["tflops"] / peaks["tflops_16bit" if "16" in dtype else "tflops_fp32"]
    if "bytes" in work:
        out["gb_per_s"] = work["bytes"] / s / 1e9
        if peaks:
            out["pct_peak_bw"] = 100 * out["gb_per_s"] / peaks["gb_per_s"]
    if "items" in work:
        out[f"{work.get('unit', 'items')}_per_s"] = work["items"] / s
    return out


def run(
    names: Optional[Sequence[str]] = None,
    *,
    quick: bool = False,
    device: Optional[torch.device] = None,
    progress: bool = True,
    budget_s: Optional[float] = None,
    paired: bool = True,
    where: Optional[Callable[[Case], bool]] = None,
) -> List[dict]:
    """Run the named suites (default: all) and return one row per timed case.

    Row keys: ``suite, op, provider, mode, shape, dtype, device, p20, p50, p80, min``
    (milliseconds), ``repeats``, ``baseline``, ``ratio_vs_torch`` (None for a case
    without a baseline in its group), throughput columns from ``Case.work``
    (``tflops``, ``gb_per_s``, ``<unit>_per_s``; on a known GPU also
    ``pct_peak_flops`` / ``pct_peak_bw``).

    ``paired``: time the providers of each configuration round-robin
    (:func:`measure_paired`); otherwise each case alone (:func:`measure`).
    ``where``: keep only the cases for which it returns True.
    """
    registry = all_suites()
    names = list(registry) if not names else list(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; available: {sorted(registry)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if budget_s is None:
        budget_s = 0.15 if quick else 1.0
    peaks = device_peaks(device)
    groups: Dict[tuple, List[tuple]] = {}
    for n in names:
        for case in registry[n](quick, device):
            if where is None or where(case):
                groups.setdefault((n,) + case.key(), []).append((n, case))
    rows: List[dict] = []
    bar = _progress(sum(len(g) for g in groups.values()), "turbotune bench", progress)
    warmup = 2 if quick else 5

    def row(suite, case, t):
        r = dict(
            suite=suite, op=case.op, provider=case.provider, mode=case.mode, shape=case.shape, dtype=case.dtype,
            device=case.device, p20=t.p20, p50=t.p50, p80=t.p80, min=t.min, repeats=t.repeats,
            baseline=case.baseline, ratio_vs_torch=None,
        )
        r.update(_throughput(case.work, t.p50, case.dtype, peaks))
        return r

    try:
        for members in groups.values():
            first = members[0][1]
            bar.set_postfix_str(f"{first.op} {first.mode} {first.shape}")
            if paired and len(members) > 1:
                timings = measure_paired([c.fn for _, c in members], device, warmup=warmup, budget_s=budget_s)
                rows.extend(row(s, c, t) for (s, c), t in zip(members, timings))
                bar.update(len(members))
            else:
                for s, c in members:
                    rows.append(row(s, c, measure(c.fn, device, budget_s=budget_s, warmup=warmup)))
                    bar.update(1)
    finally:
        bar.close()
    _ratios(rows)
    return rows


def _ratios(rows: List[dict]) -> None:
    def key(r):
        return (r.get("suite"), r["op"], r["mode"], r["shape"], r["dtype"], r["device"])

    base = {key(r): r["p50"] for r in rows if r["baseline"]}
    for r in rows:
        b = base.get(key(r))
        if b is not None and r["p50"] > 0:
            r["ratio_vs_torch"] = b / r["p50"]


def environment() -> dict:
    """Where the numbers were measured (stored beside them in the JSON)."""
    import turbotune

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "turbotune": turbotune.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


from .report import markdown_table, write_report, write_results  # noqa: E402  (re-exported: the harness API)
