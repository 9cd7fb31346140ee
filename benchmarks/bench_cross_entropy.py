"""Fused cross-entropy vs torch (pytest-benchmark front end of the
`turbotune bench` "cross_entropy" suite). Compare groups with
``--benchmark-group-by=param:case`` or read ratios from `turbotune bench`.

Paired rounds on a shared machine: ``python benchmarks/bench_cross_entropy.py --rounds 15``.
"""
from bench_gelu import time_case  # benchmarks/ is on sys.path (pytest and python alike)

SUITE = "cross_entropy"


def test_cross_entropy(benchmark, case):
    time_case(benchmark, case)


if __name__ == "__main__":
    from bench_gelu import main  # the same paired-round runner

    main(SUITE)
