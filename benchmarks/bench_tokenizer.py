"""pytest-benchmark view of the ``tokenizer`` suite (python/turbotune/bench/suites/tokenizer.py).

    python -m pytest benchmarks/bench_tokenizer.py                            # quick subset (0.25 MB)
    TURBOTUNE_BENCH_FULL=1 python -m pytest benchmarks/bench_tokenizer.py     # 2 MB of text
    python benchmarks/bench_tokenizer.py [--full]                             # table of MB/s and ratios (paired)
    python benchmarks/bench_tokenizer.py --against DIR                        # this build vs an older one

``--against DIR``: DIR holds an older build of the package renamed ``turbotune_old`` (its Python
files and its ``_C*.so``, e.g. ``cp -r python/turbotune DIR/turbotune_old && cp
build/*/_C*.so DIR/turbotune_old/`` at the old commit): the padded-batch calls of both builds
run in this process, interleaved call by call (finer than the harness's paired rounds: the two
builds see the same load on every batch), and their CPU-time ratio is printed.

Each case is one full pass over the text; compare rows of the same group.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

_suite = importlib.import_module("turbotune.bench.suites.tokenizer")


def cases(quick: bool):
    return list(_suite.tokenizer_suite(quick, torch.device("cpu")))


_CASES = cases(os.environ.get("TURBOTUNE_BENCH_FULL") != "1") if "pytest" in sys.modules else []


@pytest.mark.parametrize("case", _CASES, ids=[f"{c.mode}-{c.provider}" for c in _CASES])
def test_tokenizer(benchmark, case):
    benchmark.group = f"tokenizer {case.mode} {case.shape}"
    benchmark.extra_info.update(bytes=case.work["bytes"], tokens=case.work["items"], baseline=case.baseline)
    benchmark.pedantic(case.fn, rounds=5, iterations=1, warmup_rounds=1)


def main(argv=None) -> int:
    """Time every case (providers of a mode paired, round-robin) and print a Markdown table."""
    import argparse

    from turbotune.bench import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="2 MB of text instead of 0.25 MB")
    ap.add_argument("--mb", type=float, default=None, help="MB of corpus text (overrides --full)")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per case")
    ap.add_argument("--scaling", action="store_true",
                    help="only turbotune on the whole corpus, 1 vs all threads (paired rounds, best of each)")
    ap.add_argument("--against", metavar="DIR", default=None,
                    help="compare the padded-batch calls with an older build (DIR/turbotune_old)")
    args = ap.parse_args(argv)
    if args.scaling:
        return scaling()
    if args.against:
        return against(args.against, mb=args.mb or 2.0)
    if args.mb:
        os.environ["TURBOTUNE_TOKENIZER_BENCH_MB"] = str(args.mb)
    rows = run(["tokenizer"], quick=not args.full, device=torch.device("cpu"), budget_s=args.budget, progress=False)
    print(f"text: {rows[0]['shape']}; {os.cpu_count()} CPUs; providers of a mode timed paired (round-robin); "
          "best = fastest pass\n")
    print("| mode | provider | median s | best s | MB/s (median) | Mtokens/s (median) | x vs HF (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "baseline" if r["baseline"] else f"{r['ratio_vs_torch']:.1f}x"
        print(f"| {r['mode']} | {r['provider']} | {r['p50'] / 1e3:.4f} | {r['min'] / 1e3:.4f} | "
              f"{r['gb_per_s'] * 1e3:.1f} | {r['tokens_per_s'] / 1e6:.2f} | {ratio} |")
    ours = {r["mode"]: r["p50"] for r in rows if r["provider"] == "turbotune"}
    if "raw-1thread" in ours and "raw-allcores" in ours:
        print(f"\nturbotune raw encoding, 1 -> {_suite._threads()} threads: "
              f"{ours['raw-1thread'] / ours['raw-allcores']:.2f}x")
    peers = {r["mode"]: r["p50"] for r in rows if r["provider"] == "nanotoken-cold"}
    for mode in peers:
        print(f"turbotune vs nanotoken-cold ({mode}): {peers[mode] / ours[mode]:.2f}x")
    return 0


def scaling(rounds: int = 6) -> int:
    """turbotune on the whole corpus with 1 thread and with all threads, raw and padded (paired rounds)."""
    from turbotune.bench import measure_paired
    from turbotune.data import packaged_model_dir
    from turbotune.tokenizers import BertTokenizer

    lines = _suite.corpus_lines(1e9)  # every line
    mb = sum(len(s.encode("utf-8")) for s in lines) / 1e6
    tok = BertTokenizer.from_pretrained(packaged_model_dir())
    n = _suite._threads()
    kw = dict(padding=True, truncation=True, max_length=128, return_tensors="pt")
    fns = {
        ("raw", 1): lambda: tok.encode_batch_ragged(lines, num_threads=1),
        ("raw", n): lambda: tok.encode_batch_ragged(lines, num_threads=n),
        ("padded", 1): lambda: tok(lines, num_threads=1, **kw),
        ("padded", n): lambda: tok(lines, num_threads=n, **kw),
    }
    timings = measure_paired(list(fns.values()), torch.device("cpu"), warmup=1, rounds=rounds)
    best = {k: t.min / 1e3 for k, t in zip(fns, timings)}
    print(f"whole corpus {mb:.1f} MB, {len(lines)} lines, best of {rounds} interleaved rounds\n")
    print(f"| call | 1 thread MB/s | {n} threads MB/s | scaling |")
    print("|---|---|---|---|")
    for what in ("raw", "padded"):
        a, b = best[(what, 1)], best[(what, n)]
        print(f"| {what} | {mb / a:.1f} | {mb / b:.1f} | {a / b:.2f}x |")
    return 0


def against(old_dir: str, mb: float = 2.0, rounds: int = 7) -> int:
    """This build's padded-batch calls vs an older build's, interleaved call by call (one thread).

    Each round alternates which build goes first on each batch and sums per-call CPU time
    (``time.thread_time``: robust against other processes on a shared machine); the ratio of
    each round is printed, with the median.
    """
    import time

    sys.path.insert(0, old_dir)
    from turbotune_old.tokenizers import BertTokenizer as Old  # noqa: E402

    from turbotune.data import movie_reviews, packaged_model_dir
    from turbotune.tokenizers import BertTokenizer

    model = packaged_model_dir()
    old, new = Old.from_pretrained(model, num_threads=1), BertTokenizer.from_pretrained(model, num_threads=1)
    corpus = _suite.corpus_lines(mb)
    reviews = [r.text for r in movie_reviews()]
    cases = [
        ("corpus, batch 32, padding='max_length', max_length=128, 'pt' (the suite's padded-batch32)", corpus,
         dict(padding="max_length", truncation=True, max_length=128, return_tensors="pt")),
        ("movie reviews, batch 32, padding=True, truncation, max_length=128, 'pt'", reviews,
         dict(padding=True, truncation=True, max_length=128, return_tensors="pt")),
        ("movie reviews, batch 32, truncation, lists (datasets.map style)", reviews,
         dict(truncation=True, max_length=128)),
    ]
    clock = time.thread_time
    print(f"this build vs {old_dir} (turbotune_old); CPU time per pass, ratio = new / old (< 1: faster)\n")
    print("| call | calls | old us/call | new us/call | new/old per round | median |")
    print("|---|---|---|---|---|---|")
    for name, texts, kw in cases:
        batches = [texts[i:i + 32] for i in range(0, len(texts), 32)]
        for b in batches[:50]:  # warm-up (imports, lazy class creation)
            old(b, **kw)
            new(b, **kw)
        ratios, t_old, t_new = [], [], []
        for _ in range(rounds):
            to = tn = 0.0
            for i, b in enumerate(batches):
                if i % 2:
                    t0 = clock(); old(b, **kw); t1 = clock(); new(b, **kw); t2 = clock()
                    to += t1 - t0
                    tn += t2 - t1
                else:
                    t0 = clock(); new(b, **kw); t1 = clock(); old(b, **kw); t2 = clock()
                    tn += t1 - t0
                    to += t2 - t1
            ratios.append(tn / to)
            t_old.append(to)
            t_new.append(tn)
        med = sorted(ratios)[len(ratios) // 2]
        print(f"| {name} | {len(batches)} | {min(t_old) / len(batches) * 1e6:.1f} | "
              f"{min(t_new) / len(batches) * 1e6:.1f} | {' '.join(f'{r:.3f}' for r in sorted(ratios))} | "
              f"**{med:.3f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
