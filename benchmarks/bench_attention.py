"""Fused attention vs SDPA (each backend that accepts the inputs) and eager
softmax(QK^T)V: pytest-benchmark front end of the `turbotune bench` "attention"
suite (same cases: BERT shapes, no mask / ~50% padding (masked and varlen),
optional dropout, fwd / bwd / fwd+bwd). Compare groups with
``--benchmark-group-by=group`` or read ratios from `turbotune bench --only attention`."""
import torch

SUITE = "attention"


def test_attention(benchmark, case):
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline, **case.work)

    def run():
        case.fn()
        if case.device == "cuda":
            torch.cuda.synchronize()

    benchmark(run)


def interleaved(length: int = 128, rounds: int = 15, mode: str = "fwd+bwd"):
    """Time the suite's cases of one length round-robin over providers (median of ``rounds``),
    so load changes on a shared machine hit every provider alike. Returns Markdown rows."""
    import statistics
    import time

    from turbotune.bench.suites.attention import attention_suite

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    providers = ("torch", "eager", "turbotune", "turbotune-det", "turbotune-varlen")
    groups = {}
    for c in attention_suite(False, device):
        if c.mode == mode and f"L{length} " in c.shape and c.provider in providers:
            groups.setdefault(c.shape, []).append(c)
    lines = []
    for shape, cases in groups.items():
        for c in cases:
            c.fn()
            c.fn()
        times = {c.provider: [] for c in cases}
        for _ in range(rounds):
            for c in cases:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                c.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[c.provider].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times["torch"])
        cells = [f"{p}: {statistics.median(t):.3g} ms ({base / statistics.median(t):.2f}x)" for p, t in times.items()]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":  # python benchmarks/bench_attention.py [length]
    import sys

    print("\n".join(interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 128)))
