"""Benchmark reports: the table ``turbotune bench`` prints, and the files it writes into ``--out``.

- ``<name>.json``: every row plus the environment (device, versions, threads, date);
- ``<name>.md``: a summary (median speed-up of the turbotune providers per suite), then one table per suite;
- ``speedup_ops.png``: turbotune's speed-up over stock PyTorch per op configuration (kernel suites);
- ``speedup_tasks.png``: the same for the end-to-end suites (``finetune``, ``bert``, ``cnn``), when run.

Charts need matplotlib (``pip install 'turbotune[report]'``); without it the JSON and Markdown are
still written and the report says the charts were skipped. Every file is written to a temporary name
and renamed, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence

__all__ = ["markdown_table", "suite_tables", "summary", "speedup_chart", "write_report", "write_results",
           "END_TO_END_SUITES"]

END_TO_END_SUITES = ("finetune", "bert", "cnn")
_THROUGHPUT_ORDER = ("tflops", "pct_peak_flops", "gb_per_s", "pct_peak_bw")


def _extra_columns(rows: Sequence[dict]) -> List[str]:
    keys = {k for r in rows for k in r if k in _THROUGHPUT_ORDER or k.endswith("_per_s")}
    return [k for k in _THROUGHPUT_ORDER if k in keys] + sorted(k for k in keys if k not in _THROUGHPUT_ORDER)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows as a Markdown table (times in ms; ``vs torch`` = torch / provider, > 1 is faster)."""
    extra = _extra_columns(rows)
    head = ["op", "provider", "mode", "shape", "dtype", "device", "p50 ms", "p20 ms", "p80 ms", "vs torch"] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = "baseline" if r["baseline"] else ("-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}x")
        cells = [r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], r["device"],
                 _fmt(r["p50"]), _fmt(r["p20"]), _fmt(r["p80"]), ratio]
        cells += [_fmt(r.get(k)) for k in extra]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _by_suite(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        out.setdefault(r.get("suite") or "results", []).append(r)
    return out


def suite_tables(rows: Sequence[dict]) -> Dict[str, str]:
    """One Markdown table per suite (``suite`` row key; rows without one go under ``results``)."""
    return {s: markdown_table(rs) for s, rs in _by_suite(rows).items()}


def _turbotune_rows(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if not r["baseline"] and r["provider"].startswith("turbotune")
            and r.get("ratio_vs_torch")]


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(rows: Sequence[dict]) -> str:
    """Per suite: how many turbotune configurations, their speed-up range and geometric mean."""
    lines = ["| suite | turbotune configurations | speed-up min | geometric mean | max |", "|---|---|---|---|---|"]
    for s, rs in _by_suite(rows).items():
        t = [r["ratio_vs_torch"] for r in _turbotune_rows(rs)]
        if t:
            lines.append(f"| {s} | {len(t)} | {min(t):.2f}x | {_geomean(t):.2f}x | {max(t):.2f}x |")
        else:
            lines.append(f"| {s} | 0 | - | - | - |")
    return "\n".join(lines) + "\n"


def _label(r: dict, width: int = 58) -> str:
    shape = r["shape"] if len(r["shape"]) <= 34 else r["shape"][:32] + "…"
    lab = f"{r['op']} {r['mode']} {shape} {r['dtype']}"
    if r["provider"] != "turbotune":
        lab += f" [{r['provider'].replace('turbotune', 'tt')}]"
    return lab if len(lab) <= width else lab[:width - 1] + "…"


def speedup_chart(rows: Sequence[dict], path: str, title: str) -> Optional[str]:
    """A horizontal bar chart of turbotune's speed-up over the baseline per configuration (log scale,
    1x marked); returns ``path``, or None when there is nothing to plot. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data = _turbotune_rows(rows)
    if not data:
        return None
    labels = [_label(r) for r in data]
    ratios = [r["ratio_vs_torch"] for r in data]
    height = max(2.5, 0.28 * len(data) + 1.2)
    fig, ax = plt.subplots(figsize=(12, height))
    # green: >= 5% faster, red: >= 5% slower, grey: parity within the noise of one run
    colors = ["#2a9d5c" if x >= 1.05 else "#c0392b" if x <= 0.95 else "#8c8c8c" for x in ratios]
    y = list(range(len(data)))[::-1]
    ax.barh(y, ratios, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_xlim(lo / 1.3, hi * 1.6)
    for yi, x in zip(y, ratios):
        ax.text(x * 1.03, yi, f"{x:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up over stock (stock median time / turbotune median time; > 1 = faster)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
    os.close(fd)
    from ..training import _umask

    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def _atomic_write(path: str, text: str) -> None:
    from ..training import atomic_write_text

    atomic_write_text(path, text)


def write_report(rows: List[dict], out_dir: str, name: str = "bench", charts: bool = True,
                 env: Optional[dict] = None) -> Dict[str, object]:
    """Write ``<name>.json``, ``<name>.md`` and (with matplotlib) the PNG charts into ``out_dir``.

    Returns ``{"json": path, "markdown": path, "charts": [paths], "charts_skipped": reason or None}``.
    """
    from . import environment

    env = env or environment()
    paths: Dict[str, object] = {"json": os.path.join(out_dir, f"{name}.json"),
                                "markdown": os.path.join(out_dir, f"{name}.md"), "charts": [],
                                "charts_skipped": None}
    chart_files = []
    if charts:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            paths["charts_skipped"] = "matplotlib is not installed (pip install 'turbotune[report]')"
        else:
            ops = [r for r in rows if r.get("suite") not in END_TO_END_SUITES]
            tasks = [r for r in rows if r.get("suite") in END_TO_END_SUITES]
            where = f"{env['device']}, torch {env['torch']}, {env['torch_threads']} threads"
            for fname, part, title in (("speedup_ops.png", ops, f"turbotune vs stock PyTorch per op ({where})"),
                                       ("speedup_tasks.png", tasks,
                                        f"turbotune vs stock per end-to-end task ({where})")):
                p = speedup_chart(part, os.path.join(out_dir, fname), title)
                if p:
                    chart_files.append(p)
    paths["charts"] = chart_files
    _atomic_write(str(paths["json"]), json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    md = [f"# turbotune bench — {env['date']}", "",
          f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"{env['cpus']} CPUs ({env['torch_threads']} torch threads)", "",
          "`vs torch` = stock PyTorch median time / this provider's median time in the same run (> 1 = faster); "
          "providers of one configuration are timed paired (round-robin) unless the run says otherwise.", "",
          "## Summary", "", summary(rows)]
    for p in chart_files:
        md += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    if paths["charts_skipped"]:
        md += [f"Charts skipped: {paths['charts_skipped']}.", ""]
    for s, table in suite_tables(rows).items():
        md += [f"## {s}", "", table]
    _atomic_write(str(paths["markdown"]), "\n".join(md))
    return paths


def write_results(rows: List[dict], out_dir: str, name: str = "bench") -> Dict[str, object]:
    """:func:`write_report` (kept for the harness API): ``{"json", "markdown", "charts", ...}``."""
    return write_report(rows, out_dir, name)
