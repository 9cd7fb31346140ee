"""Fused residual-add + LayerNorm vs torch (pytest-benchmark front end of the
`turbotune bench` "layer_norm" suite). Compare groups with
``--benchmark-group-by=param:case`` or read ratios from `turbotune bench`."""
from bench_gelu import time_case  # benchmarks/ is on sys.path (pytest and python alike)

SUITE = "layer_norm"


def test_layer_norm(benchmark, case):
    time_case(benchmark, case)
