"""Benchmark harness shared by ``turbotune bench`` and ``benchmarks/``.

A *suite* is a function ``suite(quick: bool, device: torch.device) ->
Iterable[Case]`` registered with :func:`register_suite`; the modules in
:mod:`turbotune.bench.suites` are discovered and imported automatically, so a
new suite is one new file there. Every suite yields, for each configuration,
one ``baseline=True`` case running stock PyTorch and one case per other
provider; :func:`run` times them all in the same process and reports each
provider's speed-up over the baseline (``ratio_vs_torch`` = baseline median /
provider median, so > 1 means faster than torch).
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import pkgutil
import platform
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .timer import Timing, measure

__all__ = [
    "Case",
    "register_suite",
    "all_suites",
    "run",
    "measure",
    "Timing",
    "grad_modes",
    "write_results",
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


def _throughput(work: Dict[str, float], ms: float) -> Dict[str, float]:
    out = {}
    s = ms / 1e3
    if s <= 0:
        return out
    if "flop" in work:
        out["tflops"] = work["flop"] / s / 1e12
    if "bytes" in work:
        out["gb_per_s"] = work["bytes"] / s / 1e9
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
) -> List[dict]:
    """Run the named suites (default: all) and return one row per timed case.

    Row keys: ``op, provider, mode, shape, dtype, device, p20, p50, p80``
    (milliseconds), ``repeats``, ``ratio_vs_torch`` (None for a case without a
    baseline in its group), and throughput columns from ``Case.work``.
    """
    registry = all_suites()
    names = list(registry) if not names else list(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; available: {sorted(registry)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if budget_s is None:
        budget_s = 0.15 if quick else 1.0
    cases: List[Case] = []
    for n in names:
        cases.extend(registry[n](quick, device))
    rows: List[dict] = []
    bar = _progress(len(cases), "turbotune bench", progress)
    try:
        for case in cases:
            bar.set_postfix_str(f"{case.op} {case.provider} {case.mode} {case.shape}")
            t = measure(case.fn, device, budget_s=budget_s, warmup=2 if quick else 5)
            row = dict(
                op=case.op, provider=case.provider, mode=case.mode, shape=case.shape, dtype=case.dtype,
                device=case.device, p20=t.p20, p50=t.p50, p80=t.p80, repeats=t.repeats,
                baseline=case.baseline, ratio_vs_torch=None,
            )
            row.update(_throughput(case.work, t.p50))
            rows.append(row)
            bar.update(1)
    finally:
        bar.close()
    base = {}
    for r in rows:
        if r["baseline"]:
            base[(r["op"], r["mode"], r["shape"], r["dtype"], r["device"])] = r["p50"]
    for r in rows:
        b = base.get((r["op"], r["mode"], r["shape"], r["dtype"], r["device"]))
        if b is not None and r["p50"] > 0:
            r["ratio_vs_torch"] = b / r["p50"]
    return rows


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


def markdown_table(rows: List[dict]) -> str:
    """Rows as a Markdown table (times in ms; ratio = torch / provider, > 1 is faster)."""
    extra = sorted({k for r in rows for k in r if k.endswith("_per_s") or k == "tflops"})
    head = ["op", "provider", "mode", "shape", "dtype", "device", "p50 ms", "p20 ms", "p80 ms", "vs torch"] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = "baseline" if r["baseline"] else ("-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}x")
        cells = [r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], r["device"],
                 f"{r['p50']:.4g}", f"{r['p20']:.4g}", f"{r['p80']:.4g}", ratio]
        cells += [f"{r[k]:.4g}" if k in r else "" for k in extra]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(rows: List[dict], out_dir: str, name: str = "bench") -> Dict[str, str]:
    """Write ``<out_dir>/<name>.json`` (rows + environment) and ``<name>.md``; return their paths.

    Each file is written to a temporary name and renamed, so an interrupted run
    never leaves a half-written result.
    """
    env = environment()
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, f"{name}.md")
    _atomic_write(json_path, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    header = (
        f"# turbotune bench — {env['date']}\n\n"
        f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"{env['cpus']} CPUs ({env['torch_threads']} torch threads)\n\n"
        "`vs torch` = stock PyTorch median time / this provider's median time (> 1 = faster).\n\n"
    )
    _atomic_write(md_path, header + markdown_table(rows))
    return {"json": json_path, "markdown": md_path}
