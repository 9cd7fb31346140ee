"""The attention_cpu benchmark suite times like with like: every group has its SDPA baseline, and
on the same real batch SDPA, the dense native call and the packed native call give the same
attention output at the real tokens (and the training providers produce gradients)."""
import pytest
import torch

from turbotune import bench
from turbotune.ops.attention import native_cpu as native

pytestmark = pytest.mark.skipif(not native.available()[0], reason="native CPU attention unavailable")


def test_suite_is_registered_with_a_baseline_per_group():
    assert "attention_cpu" in bench.all_suites()
    from turbotune.bench.suites.attention_cpu import cases

    cs = cases(True, threads=(1,), models=["MiniLM"])
    assert {c.provider for c in cs} == {"sdpa", "turbotune-dense", "turbotune-varlen"}
    assert {c.mode for c in cs} == {"fwd", "fwd+bwd"}
    groups = {c.key() for c in cs}
    assert groups == {c.key() for c in cs if c.baseline}
    assert all(c.device == "cpu" and c.work["unit"] == "tokens" for c in cs)


@pytest.mark.parametrize("pad", ["longest", 128])
def test_providers_compute_the_same_attention(pad):
    from turbotune.bench.suites.attention_cpu import _Batch, review_lengths

    lens = review_lengths(1)[0]
    b = _Batch(lens, 12, 32, max(lens) if pad == "longest" else 128, seed=0)
    ref = b.sdpa(0.0, False).transpose(1, 2)[b.key_mask]  # (tokens, H, D) at the real tokens
    dense = b.dense(0.0, False).transpose(1, 2)[b.key_mask]
    torch.testing.assert_close(dense, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(b.varlen(0.0, False), ref, atol=2e-5, rtol=1e-4)
    b.dense(0.1, True)
    b.varlen(0.1, True)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in b.padded + b.packed)
