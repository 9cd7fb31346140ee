"""Malformed input thrown at every public function of turbotune.

Each probe must give a clear TypeError / ValueError whose message names the offending argument
(or the documented error type: IndexError for an out-of-range index, FileNotFoundError for a
missing file, ModelDirError / DataError, which are ValueErrors, ...), or a correct result:
NaN / inf, empty tensors, non-contiguous and overlapping strides must match stock PyTorch (NaN
propagation included). Probes run in subprocesses, one per area (``probe_harness``): a segfault
or an abort fails the probe that caused it, not the pytest run. Every probe is its own test item
(``test_probe[<area>-<code>]``); the subprocess of an area runs once, when its first probe is
asked for.

A "huge" tensor is an expanded view of one element with more than 2**31 elements (no memory);
the probe processes cap their address space (``probe_harness.run_probes(mem_gib=...)``), so an
op that tried to materialize one would get an allocation error rather than fill the machine.
"""
from __future__ import annotations

import os
import re

import pytest

from probe_harness import mismatch, run_probes
from tokenizer_probes import INPUT_PROBES as TOKENIZER_INPUT_PROBES
from tokenizer_probes import SETUP as TOKENIZER_SETUP
from tokenizer_probes import folder_probes, write_folders

COMMON = r"""
import math, os, warnings
import torch
import torch.nn.functional as F
import turbotune
from turbotune import ops, optim, padding
from turbotune.testing import assert_close
torch.manual_seed(0)

def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)

def special(*shape, dtype=torch.float32):
    # random values with NaN, +inf and -inf in the first rows
    x = torch.randn(*shape)
    flat = x.view(-1, shape[-1])
    flat[0, 0] = float("nan")
    if flat.shape[0] > 1:
        flat[1, 1 % shape[-1]] = float("inf")
    if flat.shape[0] > 2:
        flat[2, 0] = float("-inf")
    return x.to(dtype)

HUGE = torch.zeros(1).expand(2**16, 2**16)   # 2**32 elements, one float of memory
"""

# ----------------------------------------------------------------------------- ops

# meta tensors everywhere: the shapes, or (with TURBOTUNE_BACKEND=triton) the documented BackendUnavailable
META_OK = "ok|BackendUnavailable: meta"

LAYER_NORM = [
    ("ops.layer_norm(None, None, None)", "TypeError: x must be a torch.Tensor"),
    ("ops.layer_norm([[1.0, 2.0]], None, None)", "TypeError: x must be a torch.Tensor"),
    ("ops.layer_norm(torch.ones(2, 4, dtype=torch.int64), None, None)", "TypeError: x must be a floating"),
    ("ops.layer_norm(torch.ones(2, 4, dtype=torch.complex64), None, None)", "TypeError: x must be a floating"),
    ("ops.layer_norm(torch.tensor(1.0), None, None)", "ValueError: x must have shape"),
    ("ops.layer_norm(torch.empty(3, 0), None, None)", "ValueError: x must have shape"),
    ("ops.layer_norm(r(2, 4), r(5), None)", r"ValueError: weight must have shape \(4,\)"),
    ("ops.layer_norm(r(2, 4), [1.0] * 4, None)", "ValueError: weight must have shape"),
    ("ops.layer_norm(r(2, 4), torch.ones(4, dtype=torch.int32), None)", "TypeError: weight must be a floating"),
    ("ops.layer_norm(r(2, 4), r(4, device='meta'), None)", "ValueError: weight is on meta"),
    ("ops.layer_norm(r(2, 4), None, r(3))", "ValueError: bias must have shape"),
    ("ops.layer_norm(r(2, 4), None, r(4, device='meta'))", "ValueError: bias is on meta"),
    ("ops.layer_norm(r(2, 4), None, None, residual=r(2, 5))", "ValueError: residual must have x's shape"),
    ("ops.layer_norm(r(2, 4), None, None, residual=torch.ones(2, 4, dtype=torch.int64))",
     "TypeError: residual must be a floating"),
    ("ops.layer_norm(r(2, 4), None, None, residual=r(2, 4, device='meta'))", "ValueError: residual is on meta"),
    ("ops.layer_norm(r(2, 4), None, None, eps=-1.0)", "ValueError: eps"),
    ("ops.layer_norm(r(2, 4), None, None, eps=float('nan'))", "ValueError: eps"),
    ("ops.layer_norm(r(2, 4), None, None, eps='1e-5')", "TypeError: .*eps"),
    ("ops.layer_norm(r(2, 4), None, None, eps=None)", "TypeError: .*eps"),
    # meta tensors everywhere: shapes only
    ("y = ops.layer_norm(r(2, 4, device='meta'), r(4, device='meta'), r(4, device='meta'))\n"
     "assert y.shape == (2, 4) and y.device.type == 'meta'", META_OK),
    # empty batch
    ("x = torch.empty(0, 3, 4, requires_grad=True); w = r(4).requires_grad_()\n"
     "y = ops.layer_norm(x, w, None); assert y.shape == (0, 3, 4)\n"
     "y.sum().backward(); assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(4))", "ok"),
    # NaN / inf: as torch, forward and backward
    ("for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
     "    x = special(4, 8, dtype=dt).requires_grad_(); w = r(8).requires_grad_(); b = r(8).requires_grad_()\n"
     "    y = ops.layer_norm(x, w, b)\n"
     "    x2 = x.detach().clone().requires_grad_(); w2 = w.detach().clone().requires_grad_()\n"
     "    b2 = b.detach().clone().requires_grad_()\n"
     "    y2 = F.layer_norm(x2.float(), (8,), w2, b2).to(dt)\n"
     "    assert_close(y, y2, name='y')\n"
     "    g = r(4, 8).to(dt); y.backward(g); y2.backward(g)\n"
     "    assert_close(x.grad, x2.grad, name='dx'); assert_close(w.grad, w2.grad, name='dw')\n"
     "    assert_close(b.grad, b2.grad, name='db')", "ok"),
    ("x = special(4, 8); res = special(4, 8).flip(0)\n"
     "y, s = ops.layer_norm(x, None, None, residual=res)\n"
     "assert_close(s, x + res, name='s'); assert_close(y, F.layer_norm(x + res, (8,)), name='y')", "ok"),
    ("y = ops.layer_norm(r(3, 8), None, None, eps=float('inf'))\nassert torch.equal(y, torch.zeros(3, 8))", "ok"),
    # non-contiguous, transposed and overlapping (expanded / as_strided) inputs
    ("base = r(6, 16); w = r(8); b = r(8)\n"
     "for x in (base[:, ::2], base.t()[:8].t()[:, :8], base[::2, 3:11], r(1, 8).expand(5, 8),\n"
     "          torch.as_strided(r(20), (6, 8), (2, 1)), r(8, 6).t()):\n"
     "    assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (8,), w, b))", "ok"),
    ("x = r(5, 8); res = r(1, 8).expand(5, 8)\n"
     "y, s = ops.layer_norm(x, None, None, residual=res)\n"
     "assert_close(s, x + res); assert_close(y, F.layer_norm(x + res, (8,)))", "ok"),
    ("w = r(16)[::2].requires_grad_(); x = r(3, 8).requires_grad_()\n"
     "ops.layer_norm(x, w, None).sum().backward(); w2 = w.detach().clone().requires_grad_()\n"
     "x2 = x.detach().clone().requires_grad_(); F.layer_norm(x2, (8,), w2).sum().backward()\n"
     "assert_close(w.grad, w2.grad); assert_close(x.grad, x2.grad)", "ok"),
    # 2**32 elements: an allocation error or a clear ValueError, never a crash
    ("ops.layer_norm(HUGE, None, None)", "ValueError|RuntimeError|MemoryError: (x|alloc|memory)"),
    # turbotune.nn.LayerNorm
    ("turbotune.nn.LayerNorm(4)(None)", "TypeError: x must be a torch.Tensor"),
    ("turbotune.nn.LayerNorm(4)(r(2, 5))", r"ValueError: weight must have shape \(5,\)"),
    ("turbotune.nn.LayerNorm(4)(r(2, 4), residual=r(3, 4))", "ValueError: residual must have"),
    ("turbotune.nn.LayerNorm(4)(r(2, 4, dtype=torch.float64).to(torch.int32))", "TypeError: x must be a floating"),
    ("turbotune.nn.LayerNorm.from_torch(torch.nn.Linear(2, 2))", "TypeError: .*module must be a torch.nn.LayerNorm"),
    ("turbotune.nn.LayerNorm.from_torch(None)", "TypeError: .*module must be a torch.nn.LayerNorm"),
    ("m = turbotune.nn.LayerNorm(8); x = special(3, 8)\n"
     "assert_close(m(x), torch.nn.functional.layer_norm(x, (8,), m.weight, m.bias))", "ok"),
]

GELU = [
    ("ops.bias_gelu(None)", "TypeError: x must be a torch.Tensor"),
    ("ops.bias_gelu(torch.ones(3, dtype=torch.int64))", "TypeError: x must be a floating"),
    ("ops.bias_gelu(torch.tensor(1.0))", "ValueError: x must have shape"),
    ("ops.bias_gelu(r(2, 4), r(5))", r"ValueError: bias must have shape \(4,\)"),
    ("ops.bias_gelu(r(2, 4), [0.0] * 4)", "TypeError: bias must be a torch.Tensor"),
    ("ops.bias_gelu(r(2, 4), torch.ones(4, dtype=torch.int64))", "TypeError: bias must be a floating"),
    ("ops.bias_gelu(r(2, 4), r(4, device='meta'))", "ValueError: bias is on meta"),
    ("ops.bias_gelu(r(2, 4), approximate='fast')", "ValueError: approximate"),
    ("ops.bias_gelu(r(2, 4), approximate=None)", "ValueError: approximate"),
    ("assert ops.bias_gelu(torch.empty(0, 4), r(4)).shape == (0, 4)", "ok"),
    ("assert ops.bias_gelu(torch.empty(3, 0), torch.empty(0)).shape == (3, 0)", "ok"),
    ("y = ops.bias_gelu(r(2, 4, device='meta'), r(4, device='meta')); assert y.shape == (2, 4)", META_OK),
    ("for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
     "    for approx in ('none', 'tanh'):\n"
     "        x = special(4, 8, dtype=dt).requires_grad_(); b = special(8, 8)[0].requires_grad_()\n"
     "        x2 = x.detach().clone().requires_grad_(); b2 = b.detach().clone().requires_grad_()\n"
     "        y = ops.bias_gelu(x, b, approx); y2 = F.gelu(x2.float() + b2, approximate=approx).to(dt)\n"
     "        assert_close(y, y2, name='y ' + approx)\n"
     "        g = r(4, 8).to(dt); y.backward(g); y2.backward(g)\n"
     "        assert_close(x.grad, x2.grad, name='dx'); assert_close(b.grad, b2.grad, name='db')", "ok"),
    ("base = r(6, 16); b = r(8)\n"
     "for x in (base[:, ::2], r(8, 6).t(), base[::2, 3:11],\n"
     "          r(1, 8).expand(5, 8), torch.as_strided(r(20), (6, 8), (2, 1))):\n"
     "    assert_close(ops.bias_gelu(x, b), F.gelu(x + b))\n"
     "    xg = x.detach().clone().requires_grad_(); assert_close(ops.bias_gelu(xg, b), F.gelu(x + b))", "ok"),
    ("ops.bias_gelu(HUGE, torch.zeros(2**16))", "ValueError|RuntimeError|MemoryError: (x|alloc|memory)"),
    ("ops.linear_gelu(None, r(4, 3))", "TypeError: x must be a torch.Tensor"),
    ("ops.linear_gelu(torch.ones(2, 3, dtype=torch.int64), r(4, 3))", "TypeError: x must be a floating"),
    ("ops.linear_gelu(r(2, 3), None)", "ValueError: weight must be a"),
    ("ops.linear_gelu(r(2, 3), r(4, 3, 1))", "ValueError: weight must be a"),
    ("ops.linear_gelu(r(2, 3), r(4, 5))", "ValueError: x's last dim 3 does not match weight"),
    ("ops.linear_gelu(r(2, 3), r(4, 3), r(5))", r"ValueError: bias must have shape \(4,\)"),
    ("ops.linear_gelu(r(2, 3), r(4, 3), approximate='x')", "ValueError: approximate"),
    ("x = special(4, 3); w = r(5, 3); b = r(5)\nassert_close(ops.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))",
     "ok"),
    ("x = r(6, 3)[::2]; w = r(3, 5).t(); b = r(10)[::2]\n"
     "assert_close(ops.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))", "ok"),
]

CROSS_ENTROPY = [
    ("ops.cross_entropy(None, torch.zeros(2, dtype=torch.long))", "TypeError: logits must be a torch.Tensor"),
    ("ops.cross_entropy(r(2, 3), None)", "TypeError: target must be a torch.Tensor"),
    ("ops.cross_entropy(r(2, 3), [0, 1])", "TypeError: target must be a torch.Tensor"),
    ("ops.cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))",
     "TypeError: logits must be a floating"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2))", "TypeError: target must hold int64"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.int32))", "TypeError: target must hold int64"),
    ("ops.cross_entropy(r(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))", "ValueError: logits must have shape"),
    ("ops.cross_entropy(r(2, 0), torch.zeros(2, dtype=torch.long))", "ValueError: logits must have C >= 1"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(3, dtype=torch.long))", "ValueError: target must have shape"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long, device='meta'))", "ValueError: target is on meta"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), ignore_index=None)",
     "TypeError: ignore_index must be an int"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), ignore_index=1.5)",
     "TypeError: ignore_index must be an int"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.5)",
     "ValueError: label_smoothing"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=float('nan'))",
     "ValueError: label_smoothing"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing='0.1')",
     "ValueError: label_smoothing"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), reduction='avg')", "ValueError: reduction"),
    ("ops.cross_entropy(r(2, 3), torch.zeros(2, dtype=torch.long), reduction=None)", "ValueError: reduction"),
    ("ops.cross_entropy(r(2, 3), torch.tensor([0, 3]))", "IndexError: .*(target|out of bounds)"),
    ("ops.cross_entropy(r(2, 3), torch.tensor([0, -2]))", "IndexError: .*(target|out of bounds)"),
    # empty batch: NaN for mean (as torch), 0 for sum
    ("for red in ('mean', 'sum', 'none'):\n"
     "    x = torch.empty(0, 5, requires_grad=True); t = torch.empty(0, dtype=torch.long)\n"
     "    assert_close(ops.cross_entropy(x, t, reduction=red), F.cross_entropy(x, t, reduction=red))", "ok"),
    ("for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
     "    for red in ('mean', 'sum', 'none'):\n"
     "        for ls in (0.0, 0.1):\n"
     "            x = special(6, 5, dtype=dt).requires_grad_(); t = torch.tensor([0, 1, 2, -100, 4, 3])\n"
     "            x2 = x.detach().clone().requires_grad_()\n"
     "            y = ops.cross_entropy(x, t, label_smoothing=ls, reduction=red)\n"
     "            y2 = F.cross_entropy(x2.float(), t, label_smoothing=ls, reduction=red).to(dt)\n"
     "            assert_close(y, y2, name='loss')\n"
     "            y.sum().backward(); y2.sum().backward(); assert_close(x.grad, x2.grad, name='dlogits')", "ok"),
    ("t = torch.tensor([1, 0, 2])\n"
     "for x in (r(3, 10)[:, ::2], r(5, 3).t(), r(1, 5).expand(3, 5), torch.as_strided(r(12), (3, 5), (2, 1))):\n"
     "    assert_close(ops.cross_entropy(x, t), F.cross_entropy(x, t))", "ok"),
    ("ops.cross_entropy(HUGE, torch.zeros(2**16, dtype=torch.long))",
     "ValueError|RuntimeError|MemoryError: (logits|alloc|memory)"),
]

BATCH_NORM = [
    ("ops.batch_norm_act(None, None, None)", "TypeError: x must be a torch.Tensor"),
    ("ops.batch_norm_act(torch.ones(2, 3, 4, dtype=torch.long), None, None)", "TypeError: x must be a floating"),
    ("ops.batch_norm_act(r(4), None, None)", "ValueError: x must have shape"),
    ("ops.batch_norm_act(r(4, 0, 2), None, None)", "ValueError: x must have shape"),
    ("ops.batch_norm_act(r(2, 3, 4), r(4), None)", r"ValueError: weight must have shape \(3,\)"),
    ("ops.batch_norm_act(r(2, 3, 4), None, torch.zeros(3, dtype=torch.long))", "TypeError: bias must be a floating"),
    ("ops.batch_norm_act(r(2, 3, 4), r(3, device='meta'), None)", "ValueError: weight is on meta"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, torch.zeros(3))", "ValueError: .*running_mean and running_var"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, training=False)", "ValueError: .*running_mean"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, residual=r(2, 3, 5))", "ValueError: residual must have shape"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, eps=0.0)", "ValueError: eps"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, eps=float('inf'))", "ValueError: eps"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, eps='1e-5')", "TypeError: .*eps"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, momentum=1.5)", "ValueError: momentum"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, momentum=None)", "TypeError: .*momentum"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, activation='tanh')", "ValueError: activation"),
    ("ops.batch_norm_act(r(2, 3, 4), None, None, activation=None)", "ValueError: activation"),
    ("ops.batch_norm_act(r(1, 3), None, None)", "ValueError: .*more than 1 value per channel"),
    ("y = ops.batch_norm_act(r(2, 3, 4, device='meta'), None, None); assert y.shape == (2, 3, 4)", META_OK),
    ("x = torch.empty(0, 3, 4); rm, rv = torch.zeros(3), torch.ones(3)\n"
     "y = ops.batch_norm_act(x, None, None, rm, rv, training=False); assert y.shape == (0, 3, 4)", "ok"),
    ("for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
     "    for act, ref in (('relu', F.relu), ('none', lambda z: z), ('silu', F.silu)):\n"
     "        x = special(4, 3, 5, dtype=dt).requires_grad_(); w = r(3).requires_grad_(); b = r(3)\n"
     "        rm, rv = torch.zeros(3), torch.ones(3); rm2, rv2 = rm.clone(), rv.clone()\n"
     "        x2 = x.detach().clone().requires_grad_(); w2 = w.detach().clone().requires_grad_()\n"
     "        y = ops.batch_norm_act(x, w, b, rm, rv, activation=act)\n"
     "        y2 = ref(F.batch_norm(x2.float(), rm2, rv2, w2, b, training=True)).to(dt)\n"
     "        assert_close(y, y2, name='y'); assert_close(rm, rm2, name='rm'); assert_close(rv, rv2, name='rv')\n"
     "        g = r(4, 3, 5).to(dt); y.backward(g); y2.backward(g)\n"
     "        assert_close(x.grad, x2.grad, name='dx'); assert_close(w.grad, w2.grad, name='dw')", "ok"),
    ("w, b = r(3), r(3)\n"
     "for x in (r(2, 3, 8)[..., ::2], r(2, 4, 3).transpose(1, 2), r(1, 3, 4).expand(2, 3, 4),\n"
     "          r(2, 3, 4, 4).to(memory_format=torch.channels_last), torch.as_strided(r(30), (2, 3, 4), (6, 2, 1))):\n"
     "    res = r(1, 3, *[1] * (x.dim() - 2)).expand(x.shape)\n"
     "    assert_close(ops.batch_norm_act(x, w, b, residual=res), F.relu(F.batch_norm(x, None, None, w, b, True) + res))",
     "ok"),
    ("ops.batch_norm_act(torch.zeros(1).expand(2**16, 2, 2**15), None, None)",
     "ValueError|RuntimeError|MemoryError: (x|alloc|memory)"),
]

ATTENTION = [
    ("ops.attention(None, r(1, 2, 3, 4), r(1, 2, 3, 4))", "TypeError: q must be a torch.Tensor"),
    ("ops.attention(r(1, 2, 3, 4), r(1, 2, 3, 4), None)", "TypeError: v must be a torch.Tensor"),
    ("ops.attention(r(2, 3, 4), r(2, 3, 4), r(2, 3, 4))", r"ValueError: q must have shape \(B, H, L, D\)"),
    ("q = torch.ones(1, 2, 3, 4, dtype=torch.long); ops.attention(q, q, q)", "TypeError: q must be a floating"),
    ("ops.attention(r(1, 2, 3, 4), r(1, 2, 3, 4, dtype=torch.float16), r(1, 2, 3, 4))", "TypeError: k has dtype"),
    ("ops.attention(r(1, 2, 3, 4), r(1, 2, 3, 4, device='meta'), r(1, 2, 3, 4))", "ValueError: k is on meta"),
    ("ops.attention(r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 5, 4))", "ValueError: k and v must have the same shape"),
    ("ops.attention(r(1, 2, 3, 4), r(1, 2, 3, 5), r(1, 2, 3, 5))", "ValueError: q and k must share the head dim"),
    ("ops.attention(r(1, 2, 3, 4), r(2, 2, 3, 4), r(2, 2, 3, 4))", "ValueError: k must have shape"),
    ("q = torch.empty(1, 2, 3, 0); ops.attention(q, q, q)", "ValueError: head dim D must be >= 1"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attention_mask=torch.ones(1, 3))", "TypeError: attention_mask must be"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attention_mask=torch.ones(1, 4, dtype=torch.bool))",
     "ValueError: attention_mask must have shape"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attention_mask=[[1, 1, 1]])", "ValueError: attention_mask must have"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attention_mask=torch.ones(1, 3, dtype=torch.bool, device='meta'))",
     "ValueError: attention_mask is on meta"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))",
     "TypeError: .*key_padding_mask"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attn_bias=torch.zeros(1, 2, 3, 3, dtype=torch.long))",
     "TypeError: attn_bias must be a floating"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attn_bias=r(3, 3, 3))", "ValueError: attn_bias must be broadcastable"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, attn_bias=r(1, 1, 1, 1, 3))",
     "ValueError: attn_bias must be broadcastable"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_p=1.0)", "ValueError: dropout_p"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_p='0.1')", "ValueError: dropout_p"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_p=float('nan'))", "ValueError: dropout_p"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, softmax_scale=float('inf'))", "ValueError: softmax_scale"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, softmax_scale='1')", "ValueError: softmax_scale"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, deterministic='yes')", "TypeError: deterministic"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_p=0.1, dropout_seed=-1)", "ValueError: dropout_seed"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_p=0.1, dropout_seed=2**64)", "ValueError: dropout_seed"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_offset=2**40)", "ValueError: dropout_offset"),
    ("q = r(1, 2, 3, 4); ops.attention(q, q, q, dropout_offset=None)", "ValueError: dropout_offset"),
    # empty: no batch, no query, no key (rows without a key are zeros)
    ("q = torch.empty(0, 2, 3, 4); assert ops.attention(q, q, q).shape == (0, 2, 3, 4)", "ok"),
    ("q, k = r(1, 2, 0, 4), r(1, 2, 5, 4); assert ops.attention(q, k, k).shape == (1, 2, 0, 4)", "ok"),
    ("q, k = r(1, 2, 3, 4), r(1, 2, 0, 4); out = ops.attention(q, k, k)\n"
     "assert torch.equal(out, torch.zeros(1, 2, 3, 4))", "ok"),
    ("q, k = r(1, 2, 3, 4).requires_grad_(), r(1, 2, 0, 4).requires_grad_()\n"
     "ops.attention(q, k, k).sum().backward(); assert torch.equal(q.grad, torch.zeros_like(q))", "ok"),
    ("q = r(1, 2, 3, 4); m = torch.zeros(1, 3, dtype=torch.bool)\n"
     "assert torch.equal(ops.attention(q, q, q, attention_mask=m), torch.zeros_like(q))", "ok"),
    ("q = r(1, 2, 3, 4); bias = torch.full((1, 1, 3, 3), float('-inf'))\n"
     "assert torch.equal(ops.attention(q, q, q, attn_bias=bias), torch.zeros_like(q))", "ok"),
    ("q = r(1, 2, 2, 4); k = r(1, 2, 5, 4)\n"
     "assert_close(ops.attention(q, k, k, causal=True), ops.attention_ref(q, k, k, causal=True))", "ok"),
    ("q = r(1, 2, 5, 4); k = r(1, 2, 2, 4)\n"
     "assert_close(ops.attention(q, k, k, causal=True), ops.attention_ref(q, k, k, causal=True))", "ok"),
    ("q = r(2, 2, 3, 4); m = torch.ones(2, 3, dtype=torch.bool); m[1, 0] = False\n"
     "assert_close(ops.attention(q, q, q, attention_mask=m.int()), ops.attention_ref(q, q, q, attention_mask=m))",
     "ok"),
    # NaN / inf propagate as in the reference (and SDPA)
    ("for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
     "    q = special(1, 2, 4, 8, dtype=dt); k = r(1, 2, 4, 8, dtype=dt); v = special(1, 2, 4, 8, dtype=dt).flip(2)\n"
     "    # softmax(q k^T / sqrt(D)) v in plain math (SDPA's CPU flash kernel drops a NaN of q)\n"
     "    ref = (torch.softmax(q.float() @ k.float().transpose(-1, -2) / 8 ** 0.5, -1) @ v.float()).to(dt)\n"
     "    assert_close(ops.attention(q, k, v), ref, name='out')", "ok",
     {"ops_triton": "the Triton forward (interpreted) gives 0, not NaN, for a bf16 query row holding +inf "
                    "(fp32 / fp16 give NaN)"}),
    ("q = special(1, 2, 4, 8).requires_grad_(); k = r(1, 2, 4, 8).requires_grad_()\n"
     "v = special(1, 2, 4, 8).flip(2).detach().requires_grad_()\n"
     "q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))\n"
     "out = ops.attention(q, k, v); ref = torch.softmax(q2 @ k2.transpose(-1, -2) / 8 ** 0.5, -1) @ v2\n"
     "g = r(1, 2, 4, 8); out.backward(g); ref.backward(g)\n"
     "for a, b, n in ((q, q2, 'dq'), (k, k2, 'dk'), (v, v2, 'dv')): assert_close(a.grad, b.grad, name=n)", "ok"),
    ("q = r(1, 2, 3, 4); bias = special(1, 2, 3, 3)\n"
     "assert_close(ops.attention(q, q, q, attn_bias=bias), ops.attention_ref(q, q, q, attn_bias=bias))", "ok"),
    # strides: transposed (B, L, H, D) projections, expanded (overlapping) k / v / bias
    ("q = r(2, 5, 3, 8).transpose(1, 2); k = r(1, 1, 4, 8).expand(2, 3, 4, 8); v = r(2, 4, 3, 16)[..., ::2].transpose(1, 2)\n"
     "bias = r(1, 1, 1, 4).expand(2, 3, 5, 4)\n"
     "assert_close(ops.attention(q, k, v, attn_bias=bias), ops.attention_ref(q, k, v, attn_bias=bias))", "ok"),
    # head dim not unit-stride, with a bias (ATen's CPU flash path), forward and backward
    ("q, k = r(2, 5, 3, 16)[..., ::2].transpose(1, 2), r(2, 3, 4, 8)\n"
     "v = r(2, 4, 3, 16)[..., ::2].transpose(1, 2); bias = r(1, 1, 1, 4)\n"
     "ts = [t.requires_grad_() for t in (q.detach().clone(), k.clone(), v.detach().clone())]\n"
     "rs = [t.detach().contiguous().requires_grad_() for t in ts]\n"
     "out = ops.attention(*ts, attn_bias=bias); ref = ops.attention_ref(*rs, attn_bias=bias)\n"
     "assert_close(out, ref, name='out'); g = r(2, 3, 5, 8); out.backward(g); ref.backward(g)\n"
     "for a, b in zip(ts, rs): assert_close(a.grad, b.grad, name='grad')", "ok"),
    ("q = torch.as_strided(r(64), (1, 2, 5, 8), (0, 8, 4, 1))\n"
     "assert_close(ops.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))", "ok"),
    # Lq * Lk >= 2**34 with dropout: a clear ValueError before any work
    ("q = torch.zeros(1).expand(1, 1, 2**17, 8); k = torch.zeros(1).expand(1, 1, 2**18, 8)\n"
     "ops.attention(q, k, k, dropout_p=0.1)", "ValueError: .*Lq \\* Lk"),
    ("ops.attention_dropout_mask(-1, 1, 2, 2, 0.1, 0)", "ValueError: batch"),
    ("ops.attention_dropout_mask(1, '2', 2, 2, 0.1, 0)", "ValueError: heads"),
    ("ops.attention_dropout_mask(1, 1, 2, 2, 1.0, 0)", "ValueError: dropout_p"),
    ("ops.attention_dropout_mask(1, 1, 2, 2, 0.1, -5)", "ValueError: seed"),
    ("ops.attention_dropout_mask(1, 1, 2, 2, 0.1, 0, offset=-1)", "ValueError: .*offset"),
    ("ops.attention_dropout_mask(1, 1, 2**20, 2**20, 0.1, 0)", "ValueError: .*seqlen_q \\* seqlen_k"),
    ("ops.attention_dropout_mask(1, 1, 2, 2, 0.1, 0, device='nowhere')", "ValueError|RuntimeError: .*(device|nowhere)"),
    ("assert ops.attention_dropout_mask(0, 2, 0, 3, 0.1, 0).shape == (0, 2, 0, 3)", "ok"),
    # varlen
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu.long(), cu, 3, 3)", "ValueError: cu_seqlens_q must be a"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, None, 3, 3)", "ValueError: cu_seqlens_k must be a"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu.to('meta'), 3, 3)", "ValueError: cu_seqlens_k is on meta"),
    ("q = r(5, 2, 4); cu = torch.tensor([1, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, 3, 3)", "ValueError: cu_seqlens_q must start at 0"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 6], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, 4, 4)", "ValueError: cu_seqlens_q must end at the token count 5"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 4, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, 5, 5)", "ValueError: cu_seqlens_q must be non-decreasing"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, 2, 3)", "ValueError: max_seqlen_q = 2 is smaller"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, '3', 3)", "ValueError: max_seqlen_q must be"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, 3, -1)", "ValueError: max_seqlen_k must be"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu[:2], 3, 3)", "ValueError: cu_seqlens_q and cu_seqlens_k must have"),
    ("q = r(5, 2, 4); cu = torch.tensor([0, 2, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, r(5, 3, 4), r(5, 3, 4), cu, cu, 3, 3)", "ValueError: k must have q's head count"),
    ("q = r(1, 5, 2, 4); cu = torch.tensor([0, 5], dtype=torch.int32)\n"
     "ops.attention_varlen(q, q, q, cu, cu, 5, 5)", "ValueError: q must have shape"),
    ("q = torch.empty(0, 2, 4); cu = torch.zeros(3, dtype=torch.int32)\n"
     "assert ops.attention_varlen(q, q, q, cu, cu, 0, 0).shape == (0, 2, 4)", "ok"),
    ("q = special(7, 2, 8); cu = torch.tensor([0, 0, 3, 7], dtype=torch.int32)\n"
     "for causal in (False, True):\n"
     "    assert_close(ops.attention_varlen(q, q, q, cu, cu, 4, 4, causal=causal),\n"
     "                 ops.attention_varlen_ref(q, q, q, cu, cu, causal=causal))", "ok"),
    ("q = r(2, 7, 8).transpose(0, 1); k = r(1, 2, 8).expand(7, 2, 8); cu = torch.tensor([0, 3, 7], dtype=torch.int32)\n"
     "assert_close(ops.attention_varlen(q, k, k, cu, cu, 4, 4), ops.attention_varlen_ref(q, k, k, cu, cu))", "ok"),
]

PADDING = [
    ("padding.unpad_input(None, torch.ones(2, 3))", "ValueError|TypeError: hidden must be"),
    ("padding.unpad_input(r(2), torch.ones(2, 3))", "ValueError: hidden must be"),
    ("padding.unpad_input(r(2, 3, 4), None)", "TypeError: attention_mask must be a torch.Tensor"),
    ("padding.unpad_input(r(2, 3, 4), torch.ones(2, 3))", "TypeError: attention_mask must be bool"),
    ("padding.unpad_input(r(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))", "ValueError: attention_mask must have"),
    ("padding.unpad_input(r(2, 3, 4), torch.ones(2, 3, dtype=torch.bool, device='meta'))",
     "ValueError: attention_mask is on meta"),
    ("packed, idx, cu, mx = padding.unpad_input(torch.empty(0, 3, 4), torch.ones(0, 3, dtype=torch.bool))\n"
     "assert packed.shape == (0, 4) and cu.tolist() == [0] and mx == 0", "ok"),
    ("packed, idx, cu, mx = padding.unpad_input(r(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))\n"
     "assert packed.shape == (0, 4) and cu.tolist() == [0, 0, 0] and mx == 0", "ok"),
    ("h = r(4, 3, 5).transpose(0, 1)\n"
     "m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])\n"
     "packed, idx, cu, mx = padding.unpad_input(h, m)\n"
     "assert cu.tolist() == [0, 2, 6, 6] and mx == 4\n"
     "back = padding.pad_input(packed, idx, 3, 4)\n"
     "assert torch.equal(back, h * m[..., None])", "ok"),
    ("h = special(2, 3, 4); m = torch.ones(2, 3, dtype=torch.bool)\n"
     "packed, idx, cu, mx = padding.unpad_input(h, m)\n"
     "assert torch.equal(padding.pad_input(packed, idx, 2, 3).isnan(), h.isnan())", "ok"),
    ("padding.pad_input(None, torch.zeros(1, dtype=torch.long), 1, 1)", "ValueError|TypeError: packed must be"),
    ("padding.pad_input(r(2, 4), None, 1, 2)", "ValueError: indices must be a 1-D tensor"),
    ("padding.pad_input(r(2, 4), torch.zeros(3, dtype=torch.long), 1, 2)", "ValueError: indices must be a 1-D"),
    ("padding.pad_input(r(2, 4), torch.zeros(2), 1, 2)", "TypeError: indices must be int64"),
    ("padding.pad_input(r(2, 4), torch.tensor([0, 1]), -1, 2)", "ValueError: batch and seqlen"),
    ("padding.pad_input(r(2, 4), torch.tensor([0, 1]), '1', 2)", "TypeError: batch"),
    ("padding.pad_input(r(2, 4), torch.tensor([0, 5]), 1, 2)", "IndexError|ValueError: .*(indices|out of)"),
    ("padding.pad_input(r(2, 4), torch.tensor([0, 1]), 2**40, 2**40)",
     "ValueError|RuntimeError|MemoryError: (batch|alloc|memory|overflow)"),
    ("padding.pad_input(r(2, 4), torch.tensor([0, 1], device='meta'), 1, 2)",
     "ValueError: indices is on meta"),
    ("padding.seqlens_to_cu_seqlens(None)", "TypeError: seqlens must be a torch.Tensor"),
    ("padding.seqlens_to_cu_seqlens(torch.tensor([1.5, 2.0]))", "TypeError: seqlens must"),
    ("padding.seqlens_to_cu_seqlens(torch.tensor([3, -1]))", "ValueError: seqlens"),
    ("assert padding.seqlens_to_cu_seqlens(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]", "ok"),
    ("assert padding.seqlens_to_cu_seqlens(torch.tensor([], dtype=torch.long)).tolist() == [0]", "ok"),
]

# ----------------------------------------------------------------------------- optim

OPTIM_SETUP = COMMON + r"""
def params(*shapes, dtype=torch.float32):
    out = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(*s, dtype=dtype))
        p.grad = torch.randn(*s, dtype=dtype)
        out.append(p)
    return out

def twin(ps):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.detach().clone()
        out.append(q)
    return out

def same_step(ps, steps=2, **kw):
    # turbotune's AdamW against torch's on copies of ps, after `steps` steps
    qs = twin(ps)
    a, b = optim.AdamW(ps, lr=0.1, **kw), torch.optim.AdamW(qs, lr=0.1, **kw)
    for _ in range(steps):
        a.step(); b.step()
    for p, q in zip(ps, qs):
        assert_close(p, q, name='param')
"""

OPTIM = [
    ("optim.AdamW(None)", "TypeError: params"),
    ("optim.AdamW(5)", "TypeError: params"),
    ("optim.AdamW([])", "ValueError: .*empty parameter list"),
    ("optim.AdamW([None])", "TypeError: params"),
    ("optim.AdamW([torch.ones(3, dtype=torch.long)])", "ValueError: params"),
    ("optim.AdamW([torch.ones(3, dtype=torch.complex64)])", "ValueError: params"),
    ("optim.AdamW([torch.ones(3, dtype=torch.float64)])", "ValueError: params"),
    ("optim.AdamW(params((3,)), lr=-1)", "ValueError: lr"),
    ("optim.AdamW(params((3,)), lr='0.1')", "TypeError: lr"),
    ("optim.AdamW(params((3,)), lr=float('nan'))", "ValueError: lr"),
    ("optim.AdamW(params((3,)), lr=torch.tensor([0.1, 0.2]))", "ValueError: lr"),
    ("optim.AdamW(params((3,)), betas=(0.9,))", "ValueError: betas"),
    ("optim.AdamW(params((3,)), betas=None)", "ValueError: betas"),
    ("optim.AdamW(params((3,)), betas=(0.9, 1.0))", r"ValueError: betas\[1\]"),
    ("optim.AdamW(params((3,)), betas=(None, 0.9))", r"TypeError: betas\[0\]"),
    ("optim.AdamW(params((3,)), eps=-1e-8)", "ValueError: eps"),
    ("optim.AdamW(params((3,)), weight_decay=-0.1)", "ValueError: weight_decay"),
    ("optim.AdamW(params((3,)), master_weights='yes')", "ValueError: master_weights"),
    ("optim.AdamW(params((3,)), state_dtype=torch.float16)", "ValueError: state_dtype"),
    ("optim.AdamW(params((3,)), stochastic_rounding=1)", "TypeError: stochastic_rounding"),
    ("optim.AdamW(params((3,)), max_grad_norm='1')", "TypeError: max_grad_norm"),
    ("optim.AdamW(params((3,)), max_grad_norm=-1.0)", "ValueError: max_grad_norm"),
    ("optim.AdamW(params((3,)), capturable=True)", "ValueError: capturable"),
    ("optim.AdamW(params((3,))).add_param_group({'params': params((2,)), 'lr': -1.0})", "ValueError: lr"),
    # steps that must match torch.optim.AdamW
    ("same_step(params((3, 4), (0,), (5,)))", "ok"),
    ("ps = params((4, 4)); ps[0].grad[0, 0] = float('nan'); ps[0].grad[1, 1] = float('inf')\n"
     "same_step(ps)", "ok"),
    ("ps = params((4, 4)); ps[0].grad[0, 0] = float('nan'); ps[0].grad[1, 1] = float('inf')\n"
     "same_step(ps, amsgrad=True, weight_decay=0.1)", "ok"),
    ("ps = params((4,)); ps[0].grad = None; same_step(ps)", "ok"),
    # gradients with odd strides: non-contiguous, expanded (overlapping) and transposed
    ("ps = params((4, 6), (6,), (3, 5))\n"
     "ps[0].grad = r(4, 12)[:, ::2]; ps[1].grad = torch.tensor([0.5]).expand(6); ps[2].grad = r(5, 3).t()\n"
     "same_step(ps)", "ok"),
    # a non-contiguous parameter (a transposed view registered as a parameter)
    ("p = torch.nn.Parameter(r(5, 3).t()); p.grad = r(3, 5); same_step([p])", "ok"),
    ("p = torch.nn.Parameter(r(5, 3).t()); p.grad = r(5, 3).t(); same_step([p], amsgrad=True)", "ok"),
    ("p = torch.nn.Parameter(r(3)); p.grad = r(3, dtype=torch.float64).float()[:3]; same_step([p])", "ok"),
    # wrong gradient dtype / device
    ("p = torch.nn.Parameter(r(3)); p.grad = r(3, dtype=torch.bfloat16).float(); p.grad = p.grad.bfloat16()\n"
     "optim.AdamW([p]).step()", "ValueError|TypeError|RuntimeError: .*(grad|dtype)"),
    ("p = torch.nn.Parameter(r(3, device='meta')); p.grad = torch.zeros(3, device='meta')\n"
     "optim.AdamW([p]).step()", "ok|ValueError|TypeError|NotImplementedError: .*(meta|device)"),
    ("p = torch.nn.Parameter(r(3)); opt = optim.AdamW([p])\n"
     "opt.step(); assert p.grad is None", "ok"),
    # malformed state dicts: ValueError / TypeError, optimizer unchanged
    ("opt = optim.AdamW(params((3,))); opt.load_state_dict(None)", "TypeError: state_dict"),
    ("opt = optim.AdamW(params((3,))); opt.load_state_dict({})", "ValueError: state_dict"),
    ("opt = optim.AdamW(params((3,))); opt.load_state_dict({'state': {}, 'param_groups': 'x'})",
     "ValueError|TypeError: .*(state_dict|param_groups)"),
    ("opt = optim.AdamW(params((3,))); opt.load_state_dict({'state': [], 'param_groups': []})",
     "ValueError|TypeError: .*(state_dict|state|param_groups)"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['state'][0]['exp_avg'] = torch.zeros(4)\n"
     "before = opt.state_dict()['state'][0]['exp_avg'].clone()\n"
     "try:\n"
     "    opt.load_state_dict(sd)\n"
     "finally:\n"
     "    assert torch.equal(opt.state[ps[0]]['exp_avg'], before)", "ValueError: .*exp_avg"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['state'][0]['exp_avg'] = [0.0, 0.0, 0.0]; opt.load_state_dict(sd)", "ValueError|TypeError: .*exp_avg"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['state'][0]['exp_avg_sq'] = torch.zeros(3, dtype=torch.long); opt.load_state_dict(sd)",
     "ValueError|TypeError: .*exp_avg_sq"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['state'][0]['exp_avg'] = torch.zeros(3, device='meta'); opt.load_state_dict(sd)\n"
     "opt.step()", "ok|ValueError|TypeError: .*exp_avg"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['state'][0]['step'] = 'one'; opt.load_state_dict(sd)", "ValueError|TypeError: .*step"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['state'][0]['step'] = torch.tensor(-3.0); opt.load_state_dict(sd)", "ValueError|TypeError: .*step"),
    ("ps = params((3,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "sd['param_groups'][0]['lr'] = 'fast'; opt.load_state_dict(sd)", "TypeError|ValueError: lr"),
    ("ps = params((3,), (4,)); opt = optim.AdamW(ps); opt.step(); sd = opt.state_dict()\n"
     "optim.AdamW(params((3,))).load_state_dict(sd)", "ValueError: .*(parameters|size|group)"),
    # a torch.optim.AdamW state dict loads and continues identically
    ("ps = params((3, 2)); qs = twin(ps); a = torch.optim.AdamW(ps, lr=0.1); a.step()\n"
     "b = torch.optim.AdamW(qs, lr=0.1); b.step(); t = optim.AdamW(ps, lr=0.1); t.load_state_dict(a.state_dict())\n"
     "t.step(); b.step(); assert_close(ps[0], qs[0])", "ok"),
    # clip_grad_norm_
    ("optim.clip_grad_norm_(None, 1.0)", "TypeError: parameters"),
    ("optim.clip_grad_norm_(params((3,)), None)", "TypeError: max_norm"),
    ("optim.clip_grad_norm_(params((3,)), '1.0')", "TypeError: max_norm"),
    ("optim.clip_grad_norm_(params((3,)), -1.0)", "ValueError: max_norm"),
    ("optim.clip_grad_norm_(params((3,)), float('nan'))", "ValueError: max_norm"),
    ("optim.clip_grad_norm_([5], 1.0)", "TypeError: parameters"),
    ("ps = params((3,)); ps[0].grad[0] = float('nan')\n"
     "optim.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)", "RuntimeError: .*non-finite"),
    ("for bad in (float('nan'), float('inf')):\n"
     "    ps = params((3,), (0,), (4, 2)); ps[0].grad[0] = bad; qs = twin(ps)\n"
     "    n1 = optim.clip_grad_norm_(ps, 1.0); n2 = torch.nn.utils.clip_grad_norm_(qs, 1.0)\n"
     "    assert_close(n1, n2)\n"
     "    for p, q in zip(ps, qs): assert_close(p.grad, q.grad)", "ok"),
    ("ps = params((4, 6), (6,), (3, 5))\n"
     "ps[0].grad = r(4, 12)[:, ::2]; ps[1].grad = torch.tensor([5.0]).expand(6, 1)[:, 0].clone(); ps[2].grad = r(5, 3).t()\n"
     "qs = twin(ps); assert_close(optim.clip_grad_norm_(ps, 1.0), torch.nn.utils.clip_grad_norm_(qs, 1.0))\n"
     "for p, q in zip(ps, qs): assert_close(p.grad, q.grad)", "ok"),
    # an expanded (overlapping) gradient cannot be scaled in place: torch's own error, as torch
    ("ps = params((6,)); ps[0].grad = torch.tensor([5.0]).expand(6); optim.clip_grad_norm_(ps, 1.0)",
     "RuntimeError: more than one element of the written-to tensor"),
    ("assert float(optim.clip_grad_norm_([], 1.0)) == 0.0", "ok"),
    ("p = torch.nn.Parameter(r(3, device='meta')); p.grad = torch.zeros(3, device='meta')\n"
     "optim.clip_grad_norm_([p], 1.0)", "ok|ValueError|TypeError|NotImplementedError: .*(meta|device)"),
]

# ----------------------------------------------------------------------------- models, data, tasks, bench

ENTRY_SETUP = COMMON + r"""
import json
import turbotune.bench
from turbotune import data
from turbotune.infer import Predictor, infer_file
from turbotune.training import DataError, ModelDirError
model_dir = data.packaged_model_dir()

def write(name, text):
    path = os.path.join(root, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
"""

ENTRY = [
    ("turbotune.optimize(None)", "TypeError: .*model must be a torch.nn.Module"),
    ("turbotune.optimize('bert-base-uncased')", "TypeError: .*model must be a torch.nn.Module"),
    ("with warnings.catch_warnings(record=True) as w:\n"
     "    warnings.simplefilter('always')\n"
     "    m = torch.nn.Sequential(torch.nn.Linear(3, 3)); h = turbotune.optimize(m)\n"
     "assert any('no model path recognises' in str(x.message) for x in w)\n"
     "x = r(2, 3); assert torch.equal(m(x), m[0](x)); h.revert()", "ok"),
    ("m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())\n"
     "turbotune.optimize(m, no_such_option=1)", "TypeError|ValueError: .*no_such_option"),
    # data loaders
    ("data.movie_reviews(os.path.join(root, 'missing.tsv'))", "FileNotFoundError: .*missing.tsv"),
    ("data.movie_reviews(write('bad.tsv', '1.5\\tgood\\nno tab here\\n'))", "ValueError: .*bad.tsv.*line 2"),
    ("data.movie_reviews(write('bad2.tsv', 'high\\tgood\\n'))", "ValueError: .*bad2.tsv.*line 1"),
    ("data.read_idx(os.path.join(root, 'missing-idx'))", "FileNotFoundError: .*missing-idx"),
    ("data.read_idx(write('garbage-idx', 'hello world'))", "ValueError: .*garbage-idx: not an IDX file"),
    ("data.fashion_mnist('validation')", "ValueError: .*split"),
    ("data.fashion_mnist(path=os.path.join(root, 'no-such-dir'))", "DatasetUnavailable: .*no-such-dir"),
    ("data.split_dataset(list(range(10)), test_size=5, val_size=5)", "ValueError: split_dataset"),
    ("data.split_dataset(list(range(10)), test_size='2')", "TypeError|ValueError: .*test_size"),
    # finetune / infer entry points
    ("turbotune.finetune(task='audio')", "ValueError: task"),
    ("turbotune.finetune(train=os.path.join(root, 'missing.csv'), model=model_dir, output=os.path.join(root, 'o'))",
     "DataError|FileNotFoundError: .*missing.csv"),
    ("path = write('nolabel.csv', 'text,score\\nhello,1\\nbye,0\\n')\n"
     "turbotune.finetune(train=path, model=model_dir, output=os.path.join(root, 'o2'))", "DataError: .*label"),
    ("turbotune.finetune(no_such_option=1)", "TypeError: .*no_such_option"),
    ("Predictor(os.path.join(root, 'no-model'))", "FileNotFoundError: .*no-model"),
    ("d = os.path.join(root, 'badcfg'); os.makedirs(d); open(os.path.join(d, 'config.json'), 'w').write('{oops')\n"
     "Predictor(d)", "ModelDirError: .*config.json"),
    ("Predictor(model_dir, mode='translate')", "ValueError: mode"),
    ("infer_file(model_dir, os.path.join(root, 'missing.txt'), os.path.join(root, 'out.jsonl'))",
     "DataError|FileNotFoundError: .*missing.txt"),
    ("path = write('in.csv', 'body\\nhello\\n'); out = os.path.join(root, 'out2.jsonl')\n"
     "try:\n"
     "    infer_file(model_dir, path, out, text_column='text')\n"
     "finally:\n"
     "    assert not os.path.exists(out)", "DataError: .*text"),
    ("infer_file(model_dir, write('in.txt', 'hi\\n'), os.path.join(root, 'o.jsonl'), batch_size=0)",
     "ValueError: batch_size"),
    ("infer_file(model_dir, write('in2.txt', 'hi\\n'), os.path.join(root, 'o.jsonl'), data_format='xml')",
     "ValueError|DataError: .*(format|xml)"),
    # bench
    ("turbotune.bench.run(['no_such_suite'], quick=True, progress=False)", "ValueError: .*no_such_suite"),
    ("turbotune.bench.run('layer_norm', quick=True, progress=False)", "ValueError|TypeError: .*(names|suite)"),
]

TOKENIZER_EXTRA = [
    ("BertTokenizer.from_pretrained(os.path.join(root, 'no-such-folder'))", "FileNotFoundError|OSError: .*no-such-folder"),
    ("BertTokenizer.from_pretrained(os.path.join(packaged_model_dir(), 'vocab.txt'))",
     "FileNotFoundError|NotADirectoryError|ValueError: .*vocab.txt"),
    ("BertTokenizer.from_pretrained(b'/nonexistent-dir')", "TypeError|FileNotFoundError: path"),
    ("assert tok('')['input_ids'] == [101, 102]", "ok"),
    ("assert tok([])['input_ids'] == []", "ok"),
    ("assert tok('a\\x00b')['input_ids'][0] == 101", "ok"),
    ("tok('a', truncation=True, max_length=None)", "ok"),
    ("tok(['a'] * 3, padding='max_length', max_length=2**62)", "ValueError: padding"),
    ("tok('a', max_length=float('inf'))", "ValueError|TypeError: max_length"),
]

# ----------------------------------------------------------------------------- the harness itself

HARNESS = [
    ("import ctypes; ctypes.string_at(0)", "CRASH"),
    ("import os; os.abort()", "CRASH"),
    ("x = 1", "ok"),
]

MEM_GIB = 4.0

# One subprocess per entry: (setup, [(area, probes)]); probes None = the tokenizer's list.
OPS_AREAS = [("layer_norm", LAYER_NORM), ("gelu", GELU), ("cross_entropy", CROSS_ENTROPY),
             ("batch_norm", BATCH_NORM), ("attention", ATTENTION), ("padding", PADDING)]
PROCESSES = {
    "ops": (COMMON, OPS_AREAS, {}),
    # again with the Triton kernels (interpreted on CPU): odd strides and NaN reach the kernels only there
    "ops_triton": (COMMON, OPS_AREAS[:5], {"TURBOTUNE_BACKEND": "triton"}),
    "optim": (OPTIM_SETUP, [("optim", OPTIM)], {}),
    "entry": (ENTRY_SETUP, [("entry", ENTRY)], {}),
    "tokenizer": (TOKENIZER_SETUP, [("tokenizer", None)], {}),
    "harness": ("", [("harness", HARNESS)], {}),
}


def _tokenizer_probes():
    from turbotune.data import packaged_model_dir

    return TOKENIZER_INPUT_PROBES + folder_probes(packaged_model_dir()) + TOKENIZER_EXTRA


def _probes(process):
    """[(area, code, expected, xfail)] of one process, in order. A probe may carry a third item,
    ``{process: reason}``: a known bug, an expected (strict) failure in those processes."""
    _, areas, _ = PROCESSES[process]
    return [(area, probe[0], probe[1], (probe[2] if len(probe) > 2 else {}).get(process))
            for area, probes in areas for probe in (_tokenizer_probes() if probes is None else probes)]


def _cases():
    out = []
    for process in PROCESSES:
        for i, (area, code, _, xfail) in enumerate(_probes(process)):
            short = re.sub(r"\s+", " ", code)[:70]
            marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
            out.append(pytest.param(process, i, id=f"{process}-{area}-{i}-{short}", marks=marks))
    return out


@pytest.fixture(scope="module")
def probe_results(tmp_path_factory):
    cache = {}

    def get(process: str):
        if process not in cache:
            setup, _, env = PROCESSES[process]
            probes = _probes(process)
            root = str(tmp_path_factory.mktemp(process))
            if process == "tokenizer":
                from turbotune.data import packaged_model_dir

                write_folders(root, packaged_model_dir())
            cache[process] = (probes, run_probes(setup, [p[1] for p in probes], vars={"root": root}, env=env,
                                                 mem_gib=MEM_GIB, timeout=300))
        return cache[process]

    return get


@pytest.mark.parametrize("process,index", _cases())
def test_probe(process, index, probe_results):
    probes, results = probe_results(process)
    _, code, expected, _ = probes[index]
    got = results[index]
    if expected == "CRASH":  # the harness' own check: a crash is reported on its probe, not raised
        assert "crashed" in got and "killed by signal" in got["crashed"], got
        return
    problem = mismatch(expected, got)
    assert problem is None, f"probe:\n{code}\n{problem}"


def test_harness_continues_after_a_crash():
    """A crashing probe is reported as crashed and the probes after it still run (in a new process)."""
    results = run_probes("import os", ["x = 1", "import ctypes; ctypes.string_at(0)", "raise ValueError('v: bad')",
                                       "os.kill(os.getpid(), 9)", "y = 2"])
    assert results[0] == {"ok": True}
    assert "SIGSEGV" in results[1]["crashed"]
    assert results[2]["types"][0] == "ValueError" and results[2]["message"] == "v: bad"
    assert "SIGKILL" in results[3]["crashed"]
    assert results[4] == {"ok": True}
    assert mismatch("ValueError: v:", results[2]) is None
    assert mismatch("TypeError: v:", results[2]) is not None
    assert mismatch("ok", results[1]).startswith("CRASHED")
