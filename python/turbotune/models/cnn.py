"""The CNN path of :func:`turbotune.optimize`: conv nets built from
``Conv2d -> BatchNorm2d -> ReLU / SiLU / GELU`` blocks, optionally with a
residual add before the activation (ResNet, VGG-BN, MobileNet-style stems...).

What ``optimize(model)`` does to such a model (this instance only):

1. **Finds the patterns.** Each submodule is traced with ``torch.fx``; in the
   graph, ``conv -> bn [-> + residual] [-> act]`` chains whose intermediate
   results have no other user are replaced by one fused call. A module that
   does not trace is searched recursively, and ``nn.Sequential`` containers are
   matched by module sequence (``Conv2d, BatchNorm2d[, act]``). The traced
   module's ``forward`` is replaced *on the instance*; its submodules,
   parameters and buffers are the same objects, so ``state_dict()`` keys and
   values are unchanged and an optimizer built before or after ``optimize``
   updates the same ``Parameter`` objects.
2. **Training** (``bn.training``): the conv runs as stock, then BatchNorm +
   residual + activation run as one op, :func:`turbotune.ops.batch_norm_act`
   (Triton kernels on a GPU, ATen's batch norm on the CPU). Running statistics
   and ``num_batches_tracked`` are updated exactly as ``nn.BatchNorm2d`` does.
3. **Inference** (eval mode, no gradient needed): BatchNorm is folded into the
   conv (``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma /
   sqrt(var + eps) + beta``, computed in fp64), the folded weights are cached
   (and, on the CPU, pre-packed for oneDNN) until a parameter or running
   statistic changes, and the activation (and the residual add) run inside the
   convolution: oneDNN post-ops on the CPU. Going back to ``train()`` uses the
   unfolded parameters, which were never modified.
4. **Layout**: activations are made channels_last at each fused conv
   (``channels_last=None`` picks it where it is faster: always on CUDA, and on
   the CPU for inference); parameters keep their layout.
5. **Precision**: ``dtype=torch.bfloat16 | torch.float16`` runs the model's
   forward under ``torch.autocast``; ``dtype="auto"`` picks bf16 only where it
   is fast (CUDA with bf16, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere.
   The fused ops also work under a user's own ``torch.autocast``.

``handle.revert()`` restores every patched ``forward`` and drops the caches.
The fast inference path needs ``torch.no_grad()`` / ``torch.inference_mode()``
(or parameters that do not require grad); in eval mode with gradients the
unfolded fused path runs, so gradients stay exact.
"""
from __future__ import annotations

import functools
import operator
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ..ops.batch_norm import ACTIVATIONS, batch_norm_act
from .dispatch import OptimizeHandle, register_path

__all__ = ["matches", "apply", "fast_bf16", "ConvBNAct", "fold_conv_bn"]

_BatchNorm = nn.modules.batchnorm._BatchNorm
# Hugging Face model types that go down the BERT path, never this one.
_BERT_FAMILY = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra", "deberta",
                "deberta-v2", "mpnet", "ernie", "xlm-roberta-xl", "data2vec-text", "megatron-bert", "nezha",
                "roformer", "luke", "layoutlm", "splinter", "rembert", "mobilebert", "squeezebert", "ibert",
                "modernbert", "nomic_bert"}


# ----------------------------------------------------------------------------- capability checks


@functools.lru_cache(maxsize=None)
def fast_bf16(device_type: str = "cpu") -> bool:
    """True where bf16 convolutions and matmuls are faster than fp32 (:func:`turbotune.backend.bf16_support`):
    a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX. AVX2-only CPUs run bf16 several times slower
    than fp32, so ``dtype="auto"`` stays fp32 there."""
    return backend.bf16_support(torch.device(device_type))[0]


@functools.lru_cache(maxsize=None)
def _onednn_fused_conv(dtype: torch.dtype) -> bool:
    """Whether ``torch.ops.mkldnn._convolution_pointwise`` runs for ``dtype`` here
    (oneDNN's bf16 path needs AVX512 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False
    try:
        x = torch.ones(1, 2, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.ones(2, 2, 1, 1, dtype=dtype)
        with torch.no_grad():
            y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
        return bool((y == 2).all())
    except Exception:
        return False


# ----------------------------------------------------------------------------- folding


def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in (exact algebra, fp64 math).

    Args:
        conv: the convolution (``weight`` ``(C_out, C_in/groups, kh, kw)``, optional ``bias``).
        bn: the BatchNorm over ``C_out`` channels, with running statistics.
        dtype: dtype of the results (default: the conv weight's).

    Returns:
        ``(weight, bias)``: ``weight * s`` per output channel and
        ``(bias - running_mean) * s + beta``, where ``s = gamma / sqrt(running_var + eps)``.
        Detached tensors (no autograd history).
    """
    if bn.running_mean is None:
        raise ValueError("fold_conv_bn: the BatchNorm has no running statistics (track_running_stats=False)")
    with torch.no_grad():
        w = conv.weight.double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        b = (b - bn.running_mean.double()) * scale
        if bn.bias is not None:
            b = b + bn.bias.double()
        out = dtype or conv.weight.dtype
        return (w * scale.view(-1, *([1] * (w.dim() - 1)))).to(out), b.to(out)


def _version_key(*tensors) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) if t is not None else None for t in tensors)


# ----------------------------------------------------------------------------- the fused module

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ONEDNN_UNARY = {"relu": ("relu", ""), "silu": ("swish", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
                 "none": ("none", "")}


def _apply_activation(y: Tensor, act: str) -> Tensor:
    if act == "relu":
        return y.relu_()
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def _bn_act(bn: _BatchNorm, x: Tensor, activation: str, residual: Optional[Tensor]) -> Tensor:
    """``nn.BatchNorm2d.forward`` (same running-statistics bookkeeping) fused with the
    residual add and the activation."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return batch_norm_act(
        x, bn.weight, bn.bias, bn.running_mean if keep else None, bn.running_var if keep else None,
        training=use_batch_stats, momentum=factor, eps=bn.eps, activation=activation, residual=residual,
    )


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)) [+ residual])`` over *existing* ``conv`` / ``bn`` modules.

    Built by :func:`apply`; it lives in the patched graph, not in the model's
    module tree, so the model's ``state_dict`` is unchanged. ``conv`` may be
    None (a BatchNorm + activation without a preceding conv).

    Forward: ``x`` ``(N, C_in, H, W)`` (any float dtype), optional ``residual``
    of the output's shape; returns ``(N, C_out, H', W')``, channels_last when
    ``channels_last`` is set.
    """

    def __init__(self, conv: Optional[nn.Conv2d], bn: _BatchNorm, activation: str = "none",
                 channels_last: bool = False, fold: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvBNAct: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.conv = conv
        self.bn = bn
        self.activation = activation
        self.channels_last = channels_last
        self.fold = fold and conv is not None
        self._cache: Optional[tuple] = None

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, channels_last={self.channels_last}, fold={self.fold}"

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        bn = self.bn
        if self.fold and not bn.training and bn.running_mean is not None and not self._needs_grad(x, residual):
            return self._folded(x, residual)
        if self._cache is not None and bn.training:
            self._cache = None  # back to training: drop the folded copy
        if self.conv is not None:
            x = self.conv(x)
        return _bn_act(bn, x, self.activation, residual)

    def _needs_grad(self, x: Tensor, residual: Optional[Tensor]) -> bool:
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or (residual is not None and residual.requires_grad):
            return True
        return any(p is not None and p.requires_grad
                   for p in (self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias))

    # -- inference ------------------------------------------------------------

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _folded(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        conv, bn = self.conv, self.bn
        dtype = self._compute_dtype(x)
        if x.dtype != dtype:
            x = x.to(dtype)
        onednn = (x.device.type == "cpu" and x.dim() == 4 and conv.padding_mode == "zeros"
                  and isinstance(conv.padding, tuple) and _onednn_fused_conv(dtype))
        key = _version_key(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var) + (
            bn.eps, dtype, onednn, x.device)
        if self._cache is None or self._cache[0] != key:
            w, b = fold_conv_bn(conv, bn, dtype)
            if onednn:
                w = torch.ops.mkldnn._reorder_convolution_weight(
                    w.contiguous(memory_format=torch.channels_last), list(conv.padding), list(conv.stride),
                    list(conv.dilation), conv.groups, list(x.shape))
            self._cache = (key, w, b)
        _, w, b = self._cache
        act = self.activation
        if onednn:
            args = (w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            if residual is not None and act in ("relu", "none") and residual.dtype == dtype:
                other = residual.contiguous(memory_format=torch.channels_last)
                return torch.ops.mkldnn._convolution_pointwise.binary(
                    x, other, *args, "add", None, act if act == "relu" else None, [], None)
            unary, algo = _ONEDNN_UNARY[act] if residual is None else ("none", "")
            y = torch.ops.mkldnn._convolution_pointwise(x, *args, unary, [], algo)
        else:
            y = conv._conv_forward(x, w, b)
        if residual is None:
            return y if onednn else _apply_activation(y, act)
        y = y.add_(residual) if torch.promote_types(y.dtype, residual.dtype) == y.dtype else y + residual
        return _apply_activation(y, act)


# ----------------------------------------------------------------------------- pattern matching (fx)


def _plain_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _plain_bn(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and type(m).forward is _BatchNorm.forward


def _act_of_module(m) -> Optional[str]:
    for cls, name in _ACT_MODULES.items():
        if type(m) is cls:
            return name
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    return None


def _activation_of(node, modules) -> Optional[str]:
    """The activation an fx node applies to its single tensor input, or None."""
    if node.op == "call_module":
        return _act_of_module(modules.get(node.target))
    if node.op == "call_function":
        if node.target in (torch.relu, torch.relu_, F.relu):
            return "relu"
        if node.target is F.silu:
            return "silu"
        if node.target is F.gelu:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    if node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs:
        return "relu"
    return None


_ADDS = (operator.add, operator.iadd, torch.add)


def _residual_of(node, prev) -> Tuple[bool, object]:
    """If ``node`` adds a tensor to ``prev`` (``prev + r``, ``prev += r``, ``torch.add``,
    ``prev.add(r)``), return ``(True, r)``."""
    if node.kwargs or len(node.args) != 2:
        return False, None
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add:
        return False, None
    a, b = node.args
    other = b if a is prev else a if b is prev else None
    if other is None or other is prev or not isinstance(other, torch.fx.Node):
        return False, None
    in_place = node.target in (operator.iadd, "add_")
    if in_place and node.args[0] is not prev and len(other.users) > 1:
        return False, None  # `r += bn_out` mutates r, which someone else reads
    return True, other


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _rewrite(gm: torch.fx.GraphModule, channels_last: bool, fold: bool) -> List[str]:
    """Replace every fusible chain in ``gm``'s graph; returns one description per fusion."""
    modules = dict(gm.named_modules())
    fused: List[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _plain_bn(modules.get(node.target)) or len(node.args) != 1:
            continue
        bn_name = node.target
        src = node.args[0]
        conv_name = None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and _plain_conv(modules.get(src.target))
                and len(src.users) == 1 and len(src.args) == 1 and not src.kwargs
                and modules[src.target].out_channels == modules[bn_name].num_features):
            conv_name = src.target
        chain, last, residual, act = [node], node, None, "none"
        nxt = _single_user(last)
        if nxt is not None:
            ok, other = _residual_of(nxt, last)
            if ok:
                residual, last = other, nxt
                chain.append(nxt)
                nxt = _single_user(last)
        if nxt is not None and len(nxt.args) >= 1 and nxt.args[0] is last:
            a = _activation_of(nxt, modules)
            if a is not None:
                act, last = a, nxt
                chain.append(nxt)
        if conv_name is None and act == "none" and residual is None:
            continue  # a lone BatchNorm: nothing to fuse
        conv = modules[conv_name] if conv_name else None
        name = f"_turbotune_fused_{len(fused)}"
        gm.add_submodule(name, ConvBNAct(conv, modules[bn_name], act, channels_last, fold))
        inp = src.args[0] if conv_name else src
        with gm.graph.inserting_before(last):
            new = gm.graph.call_module(name, (inp, residual) if residual is not None else (inp,))
        last.replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        if conv_name:
            gm.graph.erase_node(src)
        fused.append(("conv+" if conv_name else "") + "bn" + ("+add" if residual is not None else "")
                     + (f"+{act}" if act != "none" else "") + f" ({conv_name + ', ' if conv_name else ''}{bn_name})")
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _trace(module: nn.Module, training: bool) -> Optional[torch.fx.GraphModule]:
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        return torch.fx.symbolic_trace(module)
    except Exception:
        return None
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------- sequence matching (no fx)


def _sequence_plan(seq: nn.Sequential, channels_last: bool, fold: bool) -> Tuple[List[Callable], List[str]]:
    mods = list(seq)
    plan: List[Callable] = []
    fused: List[str] = []
    i = 0
    while i < len(mods):
        m = mods[i]
        conv = m if _plain_conv(m) else None
        j = i + 1 if conv is not None else i
        if j < len(mods) and _plain_bn(mods[j]) and (conv is None or conv.out_channels == mods[j].num_features):
            act = _act_of_module(mods[j + 1]) if j + 1 < len(mods) else None
            if conv is not None or act is not None:
                plan.append(ConvBNAct(conv, mods[j], act or "none", channels_last, fold))
                fused.append(f"{'conv+' if conv is not None else ''}bn{'+' + act if act else ''} (Sequential[{i}])")
                i = j + (2 if act else 1)
                continue
        plan.append(m)
        i += 1
    return plan, fused


# ----------------------------------------------------------------------------- the path


class _Patcher:
    """Instance-level ``forward`` replacements and how to undo them."""

    def __init__(self):
        self.saved: List[Tuple[nn.Module, bool, object]] = []
        self.fused: List[ConvBNAct] = []
        self.changes: List[str] = []
        self.relaid: List[nn.Parameter] = []

    def channels_last_weights(self, model: nn.Module) -> int:
        """Give every contiguous 4-D conv weight the channels_last layout (same Parameter
        objects, same values: only ``.data`` is re-laid); returns how many."""
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Conv2d) and isinstance(w, nn.Parameter) and w.dim() == 4 and w.is_contiguous() \
                    and not w.is_contiguous(memory_format=torch.channels_last):
                w.data = w.data.contiguous(memory_format=torch.channels_last)
                self.relaid.append(w)
        return len(self.relaid)

    def set_forward(self, module: nn.Module, fn) -> None:
        had = "forward" in module.__dict__
        self.saved.append((module, had, module.__dict__.get("forward")))
        module.forward = fn

    def undo(self) -> None:
        for module, had, old in reversed(self.saved):
            if had:
                module.forward = old
            else:
                module.__dict__.pop("forward", None)
        for w in self.relaid:
            w.data = w.data.contiguous()
            if w.grad is not None and not w.grad.is_contiguous():
                w.grad = w.grad.contiguous()
        for f in self.fused:
            f.clear_cache()
        self.saved.clear()
        self.fused.clear()
        self.relaid.clear()


def _patch_traced(module: nn.Module, prefix: str, patcher: _Patcher, channels_last: bool, fold: bool) -> bool:
    """Trace ``module`` in train and eval mode and patch it; False when it does not trace."""
    graphs = {}
    for mode in (True, False):
        gm = _trace(module, mode)
        if gm is None:
            return False
        graphs[mode] = gm
    same = graphs[True].code == graphs[False].code
    notes = _rewrite(graphs[True], channels_last, fold)
    if not same:
        _rewrite(graphs[False], channels_last, fold)
    if not notes:
        return True
    for gm in ([graphs[True]] if same else [graphs[True], graphs[False]]):
        patcher.fused += [m for m in gm.modules() if isinstance(m, ConvBNAct)]
    if same:
        patcher.set_forward(module, graphs[True].forward)
    else:  # the forward reads self.training: one graph per mode
        train_fwd, eval_fwd = graphs[True].forward, graphs[False].forward

        def forward(*args, **kwargs):
            return (train_fwd if module.training else eval_fwd)(*args, **kwargs)

        patcher.set_forward(module, forward)
    where = prefix or type(module).__name__
    patcher.changes.append(f"{where}: fx graph rewrite{'' if same else ' (one graph per train/eval mode)'}, "
                           f"{len(notes)} fusion(s): " + "; ".join(notes))
    return True


def _patch(module: nn.Module, prefix: str, patcher: _Patcher, channels_last: bool, fold: bool) -> None:
    if _patch_traced(module, prefix, patcher, channels_last, fold):
        return
    if isinstance(module, nn.Sequential):
        plan, fused = _sequence_plan(module, channels_last, fold)
        if fused:
            def forward(x, _plan=plan):
                for step in _plan:
                    x = step(x)
                return x

            patcher.set_forward(module, forward)
            patcher.fused += [p for p in plan if isinstance(p, ConvBNAct)]
            patcher.changes.append(f"{prefix or 'Sequential'}: module-sequence match, {len(fused)} fusion(s): "
                                   + "; ".join(fused))
        for i, step in enumerate(plan):
            if isinstance(step, nn.Module) and not isinstance(step, ConvBNAct):
                _patch(step, f"{prefix}.{i}" if prefix else str(i), patcher, channels_last, fold)
        return
    for name, child in module.named_children():
        _patch(child, f"{prefix}.{name}" if prefix else name, patcher, channels_last, fold)


def _is_bert_family(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in _BERT_FAMILY


def matches(model: nn.Module) -> bool:
    """True for a module (not a BERT-family Hugging Face model) that contains a
    ``Conv2d`` followed, in module order, by a ``BatchNorm2d``. Structural; no forward pass."""
    if _is_bert_family(model):
        return False
    seen_conv = False
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            seen_conv = True
        elif seen_conv and isinstance(m, nn.BatchNorm2d):
            return True
    return False


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def apply(model: nn.Module, *, dtype=None, channels_last: Optional[bool] = None, fold: bool = True,
          **unknown) -> OptimizeHandle:
    """Optimize a conv net in place (this instance); see the module docstring.

    Args:
        model: an ``nn.Module`` for which :func:`matches` is true.
        dtype: ``None`` (run in the model's dtype), ``torch.bfloat16`` /
            ``torch.float16`` (the forward runs under ``torch.autocast``), or
            ``"auto"`` (bf16 where :func:`fast_bf16` says it is fast, else None).
        channels_last: make activations channels_last at each fused conv.
            ``None`` (default): yes (faster for oneDNN on the CPU, cuDNN on the GPU).
        fold: fold BatchNorm into the conv in eval mode (default True).

    Returns:
        an :class:`~turbotune.models.dispatch.OptimizeHandle` with ``kind="cnn"``.

    Raises:
        TypeError: an unknown option, or ``dtype`` of another type than the above.
        ValueError: ``dtype`` a string other than ``"auto"``.
    """
    if unknown:
        raise TypeError(f"turbotune.optimize (cnn path): unknown option(s) {sorted(unknown)}; "
                        "expected dtype, channels_last, fold")
    dev = _device_type(model)
    if isinstance(dtype, str):
        if dtype != "auto":  # a string of the wrong value: ValueError, as on the BERT path
            raise ValueError(f"turbotune.optimize: dtype must be None, 'auto', torch.bfloat16 or torch.float16, "
                             f"got {dtype!r}")
        dtype = torch.bfloat16 if fast_bf16(dev) else None
    elif dtype is not None and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"turbotune.optimize: dtype must be None, 'auto', torch.bfloat16 or torch.float16, got {dtype!r}")
    if dtype == torch.float32:
        dtype = None
    if channels_last is None:
        channels_last = True
    patcher = _Patcher()
    _patch(model, "", patcher, bool(channels_last), bool(fold))
    if channels_last and patcher.saved:
        # Weights in the activations' layout: a mixed-layout conv re-lays the weight and its
        # gradient on every call (measured: most of the step's copies on the CPU).
        n = patcher.channels_last_weights(model)
        patcher.changes.append(f"channels_last: {n} conv weight(s) re-laid (same Parameter objects), "
                               "activations converted at each fused conv")
    if dtype is not None:
        inner = model.forward

        def forward(*args, **kwargs):
            with torch.autocast(_device_type(model), dtype=dtype):
                return inner(*args, **kwargs)

        patcher.set_forward(model, forward)
        patcher.changes.append(f"forward runs under torch.autocast({dev!r}, {dtype})")
    options = dict(dtype=dtype, channels_last=bool(channels_last), fold=bool(fold))
    if not patcher.saved and not patcher.relaid:
        return OptimizeHandle(model, "cnn", None, ["no Conv -> BatchNorm -> activation pattern found"], options)
    return OptimizeHandle(model, "cnn", patcher.undo, patcher.changes, options)


register_path("cnn", matches, apply,
              "conv nets: Conv2d -> BatchNorm2d -> act (+ residual) fused for training, folded for inference")
