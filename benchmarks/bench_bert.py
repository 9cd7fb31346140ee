"""End-to-end MiniLM on real movie-review batches: stock HF (eager, sdpa) vs turbotune.optimize.

    pytest benchmarks/bench_bert.py --benchmark-only [--quick]      # the `bert` suite's cases

Run as a script for the paired table recorded in benchmarks/RESULTS.md (providers
interleaved round by round, medians; the goal column compares turbotune with the
faster of HF eager / sdpa against the padding limit L of the same batches):

    python benchmarks/bench_bert.py --threads 1,2 --rounds 7
    python benchmarks/bench_bert.py --threads 2 --configs infer-fp32,train-fp32-noattndrop --batches 2

Configs: infer-fp32, train-fp32 (model dropout, attention dropout 0.1),
train-fp32-noattndrop (attention-probability dropout 0 for every provider),
infer-bf16, train-bf16-noattndrop (turbotune dtype=bf16 vs stock fp32 and stock
under CPU autocast). Goals (CPU fp32): inference >= 0.9 L, training step >= 0.8 L.
"""
import argparse
import statistics

import torch

SUITE = "bert"

CONFIGS = {
    "infer-fp32": ("infer", "fp32", None),
    "train-fp32": ("train", "fp32", None),
    "train-fp32-noattndrop": ("train", "fp32", 0.0),
    "infer-bf16": ("infer", "bf16", None),
    "train-bf16-noattndrop": ("train", "bf16", 0.0),
}


def test_bert(benchmark, case):
    benchmark.group = f"{case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline)
    benchmark.pedantic(case.fn, rounds=3, warmup_rounds=1)


def main() -> None:
    from turbotune.bench.suites.bert import BATCH, batches, paired_rounds, providers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=3, help="distinct batches of 32 cycled through")
    ap.add_argument("--configs", default="infer-fp32,train-fp32,train-fp32-noattndrop")
    ap.add_argument("--padding", default="max_length,longest")
    args = ap.parse_args()
    print("| threads | config | pad | L | provider | median ms | sentences/s | vs faster stock | / L | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for padding in args.padding.split(","):
            bs, limit = batches(args.batches, padding)
            pad = "128" if padding == "max_length" else "longest"
            for cfg in args.configs.split(","):
                mode, dtype, attn_drop = CONFIGS[cfg]
                fns = providers(mode, bs, dtype, attn_drop)
                times = paired_rounds(fns, args.rounds)
                med = {k: statistics.median(v) for k, v in times.items()}
                stock = min(med["hf-sdpa"], med["hf-eager"])
                goal = 0.9 if mode == "infer" else 0.8
                for k, ms in med.items():
                    ratio = stock / ms
                    is_ours = k.startswith("turbotune")
                    verdict = ""
                    if is_ours and dtype == "fp32":
                        verdict = f"{'met' if ratio >= goal * limit else 'NOT met'} (>= {goal} L)"
                    print(f"| {threads} | {cfg} | {pad} | {limit:.2f} | {k} | {ms:.1f} | {BATCH / ms * 1e3:.0f} "
                          f"| {ratio:.2f}x | {ratio / limit:.2f} | {verdict} |", flush=True)
                del fns


if __name__ == "__main__":
    main()
