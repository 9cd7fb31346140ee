"""Native CPU attention vs SDPA on real movie-review batches (MiniLM and BERT-base shapes, batch
32, padded to the longest / to 128, packed varlen): pytest-benchmark front end of the
`turbotune bench` "attention_cpu" suite, plus an interleaved runner for paired ratios.

    python benchmarks/bench_attention_cpu.py            # 4 batches, 1 and 2 threads, 7 rounds
    python benchmarks/bench_attention_cpu.py --quick    # 1 batch, MiniLM only, 5 rounds
    python -m pytest benchmarks/bench_attention_cpu.py --benchmark-only
"""
import argparse
import statistics
import time

import torch

SUITE = "attention_cpu"


def test_attention_cpu(benchmark, case):
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline, **case.work)
    benchmark(case.fn)


def interleaved(rounds: int = 7, quick: bool = False, threads=(1, 2)):
    """Time each group's providers one after the other in every round (so load changes on a shared
    machine hit them alike). Per provider: the median wall time and the median over rounds of the
    paired ratio sdpa / provider, by wall time and by process CPU time (CPU time is the robust
    measure of work on a loaded machine; with 2 threads it sums both threads). Returns Markdown."""
    from turbotune.bench.suites.attention_cpu import cases

    groups = {}
    for c in cases(quick, threads=threads, models=["MiniLM"] if quick else None):
        groups.setdefault((c.mode, c.shape), []).append(c)
    lines = [
        "| mode | shape | sdpa ms | turbotune-dense ms | x sdpa (wall / cpu) | turbotune-varlen ms | x sdpa (wall / cpu) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (mode, shape), group in groups.items():
        for c in group:  # warm-up
            c.fn()
            c.fn()
        wall = {c.provider: [] for c in group}
        cpu = {c.provider: [] for c in group}
        for r in range(rounds):
            for c in group[r % len(group):] + group[:r % len(group)]:
                c0, t0 = time.process_time(), time.perf_counter()
                c.fn()
                wall[c.provider].append((time.perf_counter() - t0) * 1e3)
                cpu[c.provider].append((time.process_time() - c0) * 1e3)
        cells = [f"{statistics.median(wall['sdpa']):.2f}"]
        for provider in ("turbotune-dense", "turbotune-varlen"):
            rw = statistics.median(b / x for b, x in zip(wall["sdpa"], wall[provider]))
            rc = statistics.median(b / max(x, 1e-3) for b, x in zip(cpu["sdpa"], cpu[provider]))
            cells += [f"{statistics.median(wall[provider]):.2f}", f"{rw:.2f}x / {rc:.2f}x"]
        lines.append(f"| {mode} | {shape} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 batch, MiniLM only, 5 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 7)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} torch threads available")
    print("\n".join(interleaved(rounds, args.quick, tuple(args.threads))))
