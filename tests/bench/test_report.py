"""Paired timing, device peaks and the written report (JSON, Markdown, PNG charts). No timing asserts
beyond orderings that sleeps of very different lengths guarantee."""
from __future__ import annotations

import builtins
import json
import time

import pytest
import torch

from turbotune import bench
from turbotune.bench import Case, measure_paired
from turbotune.bench import report


def test_measure_paired_interleaves_and_orders():
    calls = []

    def make(name, s):
        def fn():
            calls.append(name)
            time.sleep(s)
        return fn

    slow, fast = measure_paired([make("slow", 0.004), make("fast", 0.0005)], torch.device("cpu"), warmup=1,
                                rounds=6)
    assert slow.repeats == fast.repeats == 6
    assert fast.p50 < slow.p50 and fast.min <= fast.p20 <= fast.p50 <= fast.p80
    assert calls[2:] == ["slow", "fast"] * 6  # round-robin after the warm-up
    assert measure_paired([], torch.device("cpu")) == []


def _toy_suite(quick, device):
    yield Case("toy", "torch", "fwd", "n", "float32", "cpu", lambda: time.sleep(0.003), baseline=True,
               work={"flop": 1e9})
    yield Case("toy", "turbotune", "fwd", "n", "float32", "cpu", lambda: time.sleep(0.0005), work={"flop": 1e9})
    yield Case("toy", "torch", "bwd", "n", "float32", "cpu", lambda: time.sleep(0.001), baseline=True)
    yield Case("toy", "turbotune", "bwd", "n", "float32", "cpu", lambda: time.sleep(0.002))


def _e2e_suite(quick, device):
    yield Case("step", "stock", "train-step", "b", "float32", "cpu", lambda: time.sleep(0.002), baseline=True)
    yield Case("step", "turbotune", "train-step", "b", "float32", "cpu", lambda: time.sleep(0.001))


@pytest.fixture
def toy_suites(monkeypatch):
    suites = {"toy": _toy_suite, "finetune": _e2e_suite}
    monkeypatch.setattr(bench, "all_suites", lambda: suites)
    return suites


def test_run_paired_where_and_suite_column(toy_suites):
    rows = bench.run(["toy"], quick=True, device="cpu", progress=False, budget_s=0.02)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert all(r["suite"] == "toy" for r in rows) and len(rows) == 4
    assert by[("turbotune", "fwd")]["ratio_vs_torch"] > 1 > by[("turbotune", "bwd")]["ratio_vs_torch"]
    assert by[("turbotune", "fwd")]["tflops"] > 0 and "pct_peak_flops" not in by[("turbotune", "fwd")]  # CPU
    only = bench.run(["toy"], quick=True, device="cpu", progress=False, budget_s=0.02, where=lambda c: c.mode == "bwd")
    assert {r["mode"] for r in only} == {"bwd"}
    unpaired = bench.run(["toy"], quick=True, device="cpu", progress=False, budget_s=0.02, paired=False)
    assert len(unpaired) == 4 and all(r["ratio_vs_torch"] for r in unpaired)


def test_device_peaks_and_throughput():
    assert bench.device_peaks(torch.device("cpu")) is None
    peaks = {"tflops_16bit": 100.0, "tflops_fp32": 10.0, "gb_per_s": 1000.0}
    t = bench._throughput({"flop": 1e12, "bytes": 1e9}, 1000.0, "bfloat16", peaks)
    assert t["tflops"] == pytest.approx(1.0) and t["pct_peak_flops"] == pytest.approx(1.0)
    assert t["gb_per_s"] == pytest.approx(1.0) and t["pct_peak_bw"] == pytest.approx(0.1)
    assert bench._throughput({"flop": 1e12}, 1000.0, "float32", peaks)["pct_peak_flops"] == pytest.approx(10.0)


def test_write_report_with_charts(toy_suites, tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.run(["toy", "finetune"], quick=True, device="cpu", progress=False, budget_s=0.02)
    paths = bench.write_report(rows, str(tmp_path / "out"))
    data = json.loads(open(paths["json"]).read())
    assert data["rows"] == rows and data["environment"]["torch"] == torch.__version__
    md = open(paths["markdown"]).read()
    assert "## Summary" in md and "## toy" in md and "## finetune" in md
    assert "![speedup_ops.png](speedup_ops.png)" in md and "![speedup_tasks.png](speedup_tasks.png)" in md
    names = sorted(p.split("/")[-1] for p in paths["charts"])
    assert names == ["speedup_ops.png", "speedup_tasks.png"]
    for p in paths["charts"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_report_without_matplotlib(toy_suites, tmp_path, monkeypatch):
    rows = bench.run(["toy"], quick=True, device="cpu", progress=False, budget_s=0.02)
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    paths = bench.write_report(rows, str(tmp_path / "out"))
    assert paths["charts"] == [] and "matplotlib" in paths["charts_skipped"]
    assert "Charts skipped" in open(paths["markdown"]).read()


def test_summary_and_tables():
    rows = [dict(suite="s", op="a", provider="torch", mode="fwd", shape="1", dtype="float32", device="cpu", p20=1.0,
                 p50=2.0, p80=3.0, baseline=True, ratio_vs_torch=1.0),
            dict(suite="s", op="a", provider="turbotune", mode="fwd", shape="1", dtype="float32", device="cpu",
                 p20=0.5, p50=1.0, p80=1.5, baseline=False, ratio_vs_torch=2.0),
            dict(suite="s", op="b", provider="turbotune-varlen", mode="fwd", shape="1", dtype="float32",
                 device="cpu", p20=0.5, p50=1.0, p80=1.5, baseline=False, ratio_vs_torch=0.5)]
    assert "| s | 2 | 0.50x | 1.00x | 2.00x |" in report.summary(rows)
    assert list(report.suite_tables(rows)) == ["s"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_timing_uses_do_bench():
    x = torch.randn(2048, 2048, device="cuda")
    t = bench.measure(lambda: x @ x, torch.device("cuda"), budget_s=0.05)
    assert 0 < t.min <= t.p20 <= t.p50 <= t.p80
    a, b = measure_paired([lambda: x @ x, lambda: x + x], torch.device("cuda"), budget_s=0.05)
    assert b.p50 < a.p50  # an add is cheaper than a 2048^3 matmul
    assert bench.device_peaks(torch.device("cuda")) is None or bench.device_peaks()["gb_per_s"] > 0
