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
