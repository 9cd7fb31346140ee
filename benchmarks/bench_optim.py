"""pytest-benchmark: one AdamW step on MiniLM / BERT-base parameter mixes (cases of the ``optim`` suite).

    pytest benchmarks/bench_optim.py --benchmark-only            # MiniLM mix (quick cases)
    TURBOTUNE_BENCH_FULL=1 pytest benchmarks/bench_optim.py --benchmark-only   # + BERT-base, for-loop

Run as a script to print the Markdown tables recorded in benchmarks/RESULTS.md:

    python benchmarks/bench_optim.py [--full]     # the suite's cases, one after the other
    python benchmarks/bench_optim.py --paired     # turbotune fp32 / torch fused / turbotune bf16+master
                                                  # steps interleaved, so all three see the same machine load
"""
import gc
import os
import sys

import pytest
import torch

from turbotune.bench import markdown_table, measure
from turbotune.bench.suites.optim import memory_table, optim_suite

FULL = os.environ.get("TURBOTUNE_BENCH_FULL", "0") == "1"
CASES = list(optim_suite(quick=not FULL, device=torch.device("cpu")))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.shape.split()[0]}-{c.dtype}-{c.provider}" for c in CASES])
def test_adamw_step(benchmark, case):
    benchmark.group = f"{case.shape.split()[0]} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline, bytes=case.work.get("bytes"))
    benchmark.pedantic(case.fn, rounds=10, warmup_rounds=2)


def main(full: bool) -> None:
    cases = list(optim_suite(quick=not full, device=torch.device("cpu")))
    rows = []
    for c in cases:
        t = measure(c.fn, torch.device("cpu"), warmup=2, budget_s=2.0 if full else 1.0, min_repeats=5 if full else 10)
        rows.append(dict(op=c.op, provider=c.provider, mode=c.mode, shape=c.shape, dtype=c.dtype, device=c.device,
                         p20=t.p20, p50=t.p50, p80=t.p80, repeats=t.repeats, baseline=c.baseline,
                         ratio_vs_torch=None, gb_per_s=c.work["bytes"] / (t.p50 / 1e3) / 1e9))
    base = {(r["shape"], r["dtype"]): r["p50"] for r in rows if r["baseline"]}
    for r in rows:
        r["ratio_vs_torch"] = base[(r["shape"], r["dtype"])] / r["p50"]
    print(markdown_table(rows))
    print("| configuration | params + grads B/param | optimizer state B/param | total B/param |")
    print("|---|---|---|---|")
    for m in memory_table():
        print(f"| {m['config']} | {m['params_grads']:g} | {m['state']:g} | {m['total']:g} |")


def paired(model: str, reps: int) -> str:
    """One Markdown row: min / median of interleaved steps (robust to a machine shared with other jobs)."""
    import time

    from turbotune.bench.suites.optim import MODELS, _params
    from turbotune.optim import AdamW

    ps = _params(MODELS[model], torch.float32, torch.device("cpu"))
    qs = _params(MODELS[model], torch.bfloat16, torch.device("cpu"))
    opts = [AdamW(ps, lr=1e-4), torch.optim.AdamW(ps, lr=1e-4, fused=True), AdamW(qs, lr=1e-4)]
    for _ in range(2):
        for o in opts:
            o.step()
    times = [[], [], []]
    for _ in range(reps):
        for t, o in zip(times, opts):
            s = time.perf_counter()
            o.step()
            t.append((time.perf_counter() - s) * 1e3)
    (a0, a5), (b0, b5), (c0, c5) = [(min(t), sorted(t)[len(t) // 2]) for t in times]
    del opts, ps, qs
    gc.collect()
    return (f"| {model} | {a0:.1f} / {a5:.1f} | {b0:.1f} / {b5:.1f} | {b0 / a0:.2f}x / {b5 / a5:.2f}x "
            f"| {c0:.1f} / {c5:.1f} | {c0 / a0:.2f} / {c5 / a5:.2f} |")


if __name__ == "__main__":
    if "--paired" in sys.argv:
        print("| mix | turbotune fp32 min / median ms | torch fused fp32 min / median ms | speed-up min / median "
              "| turbotune bf16+master min / median ms | bf16+master / fp32 time, min / median |")
        print("|---|---|---|---|---|---|")
        print(paired("minilm-22M", 30), flush=True)
        print(paired("bert-base-110M", 15), flush=True)
    else:
        main("--full" in sys.argv)
