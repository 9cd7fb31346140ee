"""The benchmark harness: timing, ratios and written results (no timing asserts)."""
import json
import time

import torch

from turbotune import bench
from turbotune.bench import Case, grad_modes, markdown_table, measure, write_results


def test_measure_reports_ordered_percentiles():
    t = measure(lambda: time.sleep(0.001), torch.device("cpu"), budget_s=0.05, min_repeats=5)
    assert t.repeats >= 5
    assert 0 < t.p20 <= t.p50 <= t.p80
    assert t.p50 >= 0.9  # slept at least ~1 ms


def test_grad_modes_compute_gradients():
    x = torch.randn(4, 5, requires_grad=True)
    fns = grad_modes(lambda: (x * 2).sin(), [x])
    assert set(fns) == {"fwd", "bwd", "fwd+bwd"}
    fns["fwd"]()
    assert x.grad is None
    fns["bwd"]()
    g1 = x.grad.clone()
    fns["fwd+bwd"]()
    torch.testing.assert_close(x.grad, g1)  # same upstream gradient, fresh grad each call


def test_run_computes_ratio_against_baseline(monkeypatch):
    def suite(quick, device):
        yield Case("toy", "torch", "fwd", "n", "float32", "cpu", lambda: time.sleep(0.002), baseline=True)
        yield Case("toy", "fast", "fwd", "n", "float32", "cpu", lambda: time.sleep(0.0005), work={"bytes": 1e6})
        yield Case("toy", "orphan", "bwd", "n", "float32", "cpu", lambda: None)

    monkeypatch.setitem(bench._SUITES, "toy", suite)
    monkeypatch.setattr(bench, "all_suites", lambda: {"toy": suite})
    rows = bench.run(["toy"], quick=True, device="cpu", progress=False, budget_s=0.03)
    by = {r["provider"]: r for r in rows}
    assert by["torch"]["ratio_vs_torch"] == 1.0
    assert by["fast"]["ratio_vs_torch"] > 1.0  # a 4x shorter sleep is measurably faster
    assert by["orphan"]["ratio_vs_torch"] is None
    assert by["fast"]["gb_per_s"] > 0
    for key in ("op", "provider", "mode", "shape", "dtype", "device", "p20", "p50", "p80", "ratio_vs_torch"):
        assert key in by["fast"]


def test_unknown_suite_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="unknown benchmark suite"):
        bench.run(["no-such-suite"], progress=False)


def test_write_results(tmp_path):
    rows = [dict(op="a", provider="torch", mode="fwd", shape="1", dtype="float32", device="cpu",
                 p20=1.0, p50=2.0, p80=3.0, repeats=5, baseline=True, ratio_vs_torch=1.0),
            dict(op="a", provider="turbotune", mode="fwd", shape="1", dtype="float32", device="cpu",
                 p20=0.5, p50=1.0, p80=1.5, repeats=5, baseline=False, ratio_vs_torch=2.0)]
    paths = write_results(rows, str(tmp_path / "out"))
    data = json.loads(open(paths["json"]).read())
    assert data["rows"] == rows and data["environment"]["torch"] == torch.__version__
    md = open(paths["markdown"]).read()
    assert "| a | turbotune | fwd | 1 | float32 | cpu | 1 |" in md and "2.00x" in md
    assert "baseline" in markdown_table(rows)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_layer_norm_suite_is_registered_with_baselines():
    suites = bench.all_suites()
    assert "layer_norm" in suites
    cases = list(suites["layer_norm"](True, torch.device("cpu")))
    keys_with_baseline = {c.key() for c in cases if c.baseline}
    assert all(c.key() in keys_with_baseline for c in cases)
    assert {c.mode for c in cases} == {"fwd", "bwd", "fwd+bwd"}
