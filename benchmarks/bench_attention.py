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


def main(argv=None) -> int:
    """``python benchmarks/bench_attention.py [length] [mode]``: the suite's cases of one length and mode,
    providers timed paired (round-robin, the harness's default), as a Markdown table."""
    import sys

    from turbotune.bench import markdown_table, run

    argv = sys.argv[1:] if argv is None else argv
    length = int(argv[0]) if argv else 128
    mode = argv[1] if len(argv) > 1 else "fwd+bwd"
    providers = ("torch", "eager", "turbotune", "turbotune-varlen")
    rows = run(["attention"], where=lambda c: c.mode == mode and f"L{length} " in c.shape and c.provider in providers,
               progress=False)
    print(markdown_table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
