"""Fused residual-add + LayerNorm vs torch (pytest-benchmark front end of the
`turbotune bench` "layer_norm" suite). Compare groups with
``--benchmark-group-by=param:case`` or read ratios from `turbotune bench`."""
import torch

SUITE = "layer_norm"


def test_layer_norm(benchmark, case):
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(provider=case.provider, baseline=case.baseline)

    def run():
        case.fn()
        if case.device == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
