"""Fused bias + GELU vs torch (pytest-benchmark front end of the
`turbotune bench` "gelu" suite). Compare groups with
``--benchmark-group-by=param:case`` or read ratios from `turbotune bench`.

On a shared machine, time paired rounds instead (torch and turbotune
alternate inside one loop, so load changes hit both alike)::

    python benchmarks/bench_gelu.py --rounds 15 --threads 2
    python benchmarks/bench_gelu.py --rounds 31 --threads 1 --clock cpu   # CPU time of this process

``--clock cpu`` counts only this process's CPU time (``time.process_time``),
which other processes' load hardly moves (cache and memory-bandwidth sharing
still do); with one thread it equals the compute time.
"""
import argparse
import statistics
import time

import torch

SUITE = "gelu"


def time_case(benchmark, case):
    """Time one suite case with pytest-benchmark, grouped with its torch baseline
    (shared by bench_gelu, bench_cross_entropy and bench_layer_norm)."""
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline)

    def run():
        case.fn()
        if case.device == "cuda":
            torch.cuda.synchronize()

    benchmark(run)


def test_gelu(benchmark, case):
    time_case(benchmark, case)


def paired(suite: str, rounds: int = 15, quick: bool = False, modes=("fwd", "fwd+bwd"), clock: str = "wall") -> str:
    """Time every (op, mode, shape, dtype) group of ``suite`` in paired rounds:
    each round runs the torch case then the turbotune case once. Returns a
    Markdown table with min / median ms and the ratio torch / turbotune of each."""
    from turbotune.bench import all_suites

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    groups = {}
    for c in all_suites()[suite](quick, device):
        if c.mode in modes:
            groups.setdefault(c.key(), {})[c.provider] = c

    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter

    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (now() - t0) * 1e3

    lines = ["| op | mode | shape | dtype | torch min / median ms | turbotune min / median ms | ratio (min) | ratio (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for (op, mode, shape, dtype, _), cases in groups.items():
        pair = [cases["torch"], cases["turbotune"]]
        for c in pair:  # warm up
            c.fn()
            c.fn()
        samples = {c.provider: [] for c in pair}
        for r in range(rounds):
            for c in pair if r % 2 == 0 else pair[::-1]:
                samples[c.provider].append(once(c.fn))
        t, u = samples["torch"], samples["turbotune"]
        lines.append(
            f"| {op} | {mode} | {shape} | {dtype} | {min(t):.2f} / {statistics.median(t):.2f} | "
            f"{min(u):.2f} / {statistics.median(u):.2f} | {min(t) / min(u):.3f}x | "
            f"{statistics.median(t) / statistics.median(u):.3f}x |"
        )
    return "\n".join(lines)


def main(suite: str = SUITE) -> None:
    ap = argparse.ArgumentParser(description=f"paired-round timing of the {suite!r} suite vs torch")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or this process's CPU time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {suite}: paired rounds ({args.rounds}), {args.clock} clock, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(paired(suite, args.rounds, args.quick, clock=args.clock))


if __name__ == "__main__":
    main()
