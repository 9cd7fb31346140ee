"""Fused cross-entropy vs torch (pytest-benchmark front end of the
`turbotune bench` "cross_entropy" suite). Compare groups with
``--benchmark-group-by=param:case`` or read ratios from `turbotune bench`.

Paired rounds on a shared machine: ``python benchmarks/bench_cross_entropy.py --rounds 15``.
"""
import torch

SUITE = "cross_entropy"


def test_cross_entropy(benchmark, case):
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline)

    def run():
        case.fn()
        if case.device == "cuda":
            torch.cuda.synchronize()

    benchmark(run)


if __name__ == "__main__":
    from bench_gelu import main  # the same paired-round runner

    main(SUITE)
