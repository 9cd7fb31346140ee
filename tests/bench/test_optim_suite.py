"""The optim bench suite's CNN (channels_last) cases: real ResNet shapes, the layout they claim, and they run."""
import torch

from turbotune.bench.suites.optim import _params, cnn_shapes, optim_suite
from turbotune.models.resnet import resnet18


def test_cnn_shapes_are_the_resnet_parameter_shapes():
    assert cnn_shapes("resnet18-11.7M") == [tuple(p.shape) for p in resnet18().parameters()]


def test_channels_last_params_and_grads_share_the_layout():
    ps = _params([(8, 3, 3, 3), (8,), (10, 8)], torch.float32, torch.device("cpu"), channels_last=True)
    assert ps[0].is_contiguous(memory_format=torch.channels_last) and not ps[0].is_contiguous()
    assert all(p.grad.stride() == p.stride() for p in ps)
    assert ps[1].is_contiguous() and ps[2].is_contiguous()


def test_quick_suite_has_the_cnn_cases_and_they_run():
    cases = [c for c in optim_suite(quick=True, device=torch.device("cpu")) if c.shape.startswith("resnet18")]
    assert [c.provider for c in cases] == ["torch-fused", "turbotune", "single-tensor reference (old fallback)"]
    assert [c.baseline for c in cases] == [True, False, False]
    for c in cases:
        c.fn()  # builds that case's params and optimizer (freeing the previous case's) and steps once
