"""pytest-benchmark: one AdamW step on MiniLM / BERT-base parameter mixes (cases of the ``optim`` suite).

    pytest benchmarks/bench_optim.py --benchmark-only            # MiniLM mix (quick cases)
    TURBOTUNE_BENCH_FULL=1 pytest benchmarks/bench_optim.py --benchmark-only   # + BERT-base, for-loop

Run as a script to print the Markdown tables recorded in benchmarks/RESULTS.md:

    python benchmarks/bench_optim.py [--full]     # the suite's cases; the providers of each configuration
                                                  # step in turn (paired, the harness's default), so all see
                                                  # the same machine load; + the memory table
"""
import os
import sys

import pytest
import torch

from turbotune.bench import markdown_table
from turbotune.bench.suites.optim import memory_table, optim_suite

FULL = os.environ.get("TURBOTUNE_BENCH_FULL", "0") == "1"
CASES = list(optim_suite(quick=not FULL, device=torch.device("cpu")))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.shape.split()[0]}-{c.dtype}-{c.provider}" for c in CASES])
def test_adamw_step(benchmark, case):
    benchmark.group = f"{case.shape.split()[0]} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline, bytes=case.work.get("bytes"))
    benchmark.pedantic(case.fn, rounds=10, warmup_rounds=2)


def main(full: bool) -> None:
    from turbotune.bench import run

    rows = run(["optim"], quick=not full, device=torch.device("cpu"), budget_s=2.0 if full else 1.0, progress=False)
    print(markdown_table(rows))
    print("| configuration | params + grads B/param | optimizer state B/param | total B/param |")
    print("|---|---|---|---|")
    for m in memory_table():
        print(f"| {m['config']} | {m['params_grads']:g} | {m['state']:g} | {m['total']:g} |")


if __name__ == "__main__":
    main("--full" in sys.argv)
