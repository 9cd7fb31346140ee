"""``turbotune.optim.AdamW``: a drop-in ``torch.optim.AdamW`` with fused mixed precision.

One class, variants by flags:

``master_weights``      for bf16/fp16 params keep an fp32 copy in the optimizer
                        state; the kernel updates it and writes the rounded param
                        in the same pass ("auto" = on for 16-bit params, except
                        bf16 params with ``stochastic_rounding=True``).
``state_dtype``         ``torch.float32`` (default) or ``torch.bfloat16`` moments.
``stochastic_rounding`` bf16 params without master weights are rounded
                        stochastically (unbiased), so updates smaller than
                        half a bf16 ulp are not lost on average.
``max_grad_norm``       clip the global gradient L2 norm inside ``step()``: one
                        pass computes the norm, the clip coefficient is folded
                        into the update (no scaling pass, gradients not
                        rewritten); the norm is kept in ``last_grad_norm``.

Dispatch (``turbotune info`` shows it as op ``adamw``, the norm pass of
``max_grad_norm`` as op ``clip_grad_norm``): params are grouped per param group
by (device, param dtype, state dtype, master weights); each group is one call
of the native multi-tensor kernel — C++/OpenMP on CPU, CUDA C++ on the current
stream on GPU — or the readable single-tensor reference
(:mod:`turbotune.optim._reference`) where no kernel can run.

Layouts: the kernels walk a param's memory as one flat array, so they take any
param whose storage is dense (contiguous, channels_last / channels_last_3d conv
weights as ``turbotune.optimize(cnn)`` makes them, a transposed weight, ...).
Moments and the master copy are kept in the param's layout; a gradient in
another layout (or dtype) is copied into it for the kernel. Params with gaps
in memory (a strided slice) take the reference path.

GradScaler: the class sets ``_step_supports_amp_scaling``; ``GradScaler.step``
then hands the optimizer ``grad_scale`` / ``found_inf`` tensors instead of
unscaling itself. As torch's fused AdamW, the step divides each gradient by the
scale, writes the unscaled gradient back into ``p.grad``, and skips the update
(and the step count) when ``found_inf != 0``. On CUDA both tensors stay on the
device (no host synchronisation); on CPU they are read on the host.

Memory per parameter (params + grads + optimizer state), AdamW without amsgrad:

==========================================  =======
fp32 params, fp32 state                      16 B
bf16 params, fp32 master + fp32 state        16 B
bf16 params, fp32 master + bf16 state        12 B
bf16 params, bf16 state, stochastic rounding  8 B
==========================================  =======
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _native, backend
from ._layout import is_dense, like, same_layout
from ._reference import adamw_single_tensor
from .clip import DTYPE_CODE, global_grad_norm

OP = "adamw"
backend.register_op(
    OP,
    native_cpu_dtypes=backend.FLOATS,
    native_cuda_dtypes=backend.FLOATS,
    summary="fused multi-tensor AdamW (fp32 master weights, bf16 state, stochastic rounding, GradScaler, "
    "clipping folded into the update with max_grad_norm)",
)

_STATE_DTYPES = (torch.float32, torch.bfloat16)
_MASTER = "master_param"
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_OWN_STATE = _MOMENTS + (_MASTER,)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def _check_max_grad_norm(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_grad_norm: expected None or a number, got {type(value).__name__}")
    if not float(value) >= 0.0:
        raise ValueError(f"max_grad_norm: expected None or a number >= 0 (inf: only measure the norm), got {value}")
    return float(value)


def _validate_group(g: Dict[str, Any], check_params: bool = True) -> None:
    lr = _check_float("lr", g["lr"])
    if lr < 0:
        raise ValueError(f"lr: expected lr >= 0, got {lr}")
    eps = _check_float("eps", g["eps"])
    if eps < 0:
        raise ValueError(f"eps: expected eps >= 0, got {eps}")
    wd = _check_float("weight_decay", g["weight_decay"])
    if wd < 0:
        raise ValueError(f"weight_decay: expected weight_decay >= 0, got {wd}")
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        b = _check_float(f"betas[{i}]", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}]: expected a value in [0, 1), got {b}")
    mw = g["master_weights"]
    if not (mw == "auto" or isinstance(mw, bool)):
        raise ValueError(f"master_weights: expected 'auto', True or False, got {mw!r}")
    if g["state_dtype"] not in _STATE_DTYPES:
        raise ValueError(f"state_dtype: expected torch.float32 or torch.bfloat16, got {g['state_dtype']}")
    if not isinstance(g["stochastic_rounding"], bool):
        raise TypeError(f"stochastic_rounding: expected a bool, got {g['stochastic_rounding']!r}")
    if g["stochastic_rounding"] and mw is True:
        raise ValueError(
            "stochastic_rounding: rounds bf16 params that have no master copy; it cannot be combined with "
            "master_weights=True (use master_weights='auto' or False)"
        )
    if g.get("capturable", False):
        raise ValueError("capturable: turbotune.optim.AdamW does not support capturable=True")
    if g.get("differentiable", False):
        raise ValueError("differentiable: turbotune.optim.AdamW does not support differentiable=True")
    for p in g["params"] if check_params else ():
        if not isinstance(p, Tensor):
            raise TypeError(f"params: expected tensors, got {type(p).__name__}")
        if p.is_sparse:
            raise ValueError("params: sparse parameters are not supported by AdamW")
        if p.is_complex():
            raise ValueError(f"params: complex parameters are not supported (got a {p.dtype} parameter)")
        if p.dtype not in DTYPE_CODE:
            raise ValueError(f"params: expected float32, float16 or bfloat16 parameters, got {p.dtype}")


def _uses_master(group: Dict[str, Any], p: Tensor) -> bool:
    if p.dtype == torch.float32:
        return False
    mw = group["master_weights"]
    if mw == "auto":
        return not (group["stochastic_rounding"] and p.dtype == torch.bfloat16)
    return bool(mw)


def _check_state_tensor(index: int, name: str, value: Any, p: Tensor) -> None:
    """Raise ``ValueError`` unless ``value`` can be parameter ``index``'s ``name`` state (dtype and device
    mismatches are fixed by the caller: floating state is converted, as torch's loader does)."""
    where = f"optimizer state of parameter {index}"
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: {name!r} must be a tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"{where}: {name!r} must be a dense tensor, got layout {value.layout}")
    if not value.is_floating_point():
        raise ValueError(f"{where}: {name!r} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"{where}: {name!r} is a meta tensor (it holds no values)")
    if value.shape != p.shape:
        raise ValueError(
            f"{where}: {name!r} has shape {tuple(value.shape)} ({value.numel()} elements) but the parameter has "
            f"shape {tuple(p.shape)} ({p.numel()} elements); was this state saved for another model?"
        )


def _check_step(index: int, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.device.type == "meta":
            raise ValueError(
                f"optimizer state of parameter {index}: 'step' must be a one-element real tensor or a number, "
                f"got a {value.device.type} tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"optimizer state of parameter {index}: 'step' must be a number, got {type(value).__name__}")
    if not float(value) >= 0:
        raise ValueError(f"optimizer state of parameter {index}: 'step' must be >= 0, got {float(value)}")


def _count_steps(steps: List[Tensor], found_inf: Optional[Tensor]) -> None:
    """Add one to each step counter, unless GradScaler found an inf or NaN (no host synchronisation).

    ``found_inf`` is what ``GradScaler.step`` hands the optimizer: the *sum* of
    its per-device flags, so 2.0 when two devices saw an inf. A skipped step
    must not count whatever that sum is: the counters are decremented by
    ``found_inf != 0``, never by ``found_inf`` itself.
    """
    torch._foreach_add_(steps, 1.0)
    if found_inf is not None and steps:
        skipped = (found_inf != 0).to(dtype=torch.float32, device=steps[0].device)
        torch._foreach_sub_(steps, [skipped] * len(steps))


def _kernel_pointers(params, ptrs, amsgrad: bool, master: bool):
    """The per-tensor lists the native kernels take: pointers to params, grads (in
    the param's dtype and layout), exp_avg, exp_avg_sq, max_exp_avg_sq (or []),
    master copies (or []), and the element counts; ``ptrs`` are the entries
    :meth:`AdamW._prepare_state` returned. Returns ``(grads, lists)``: the caller
    keeps ``grads`` alive until the kernel has read them (a grad of another dtype
    or layout than its param is copied into a temporary in the param's; a kernel
    that writes the grads back leaves its result there)."""
    grads = []
    for p in params:
        g = p.grad
        if g.dtype != p.dtype or not same_layout(g, p):
            g = like(p, p.dtype, g)  # the kernel walks p's memory order: the grad must share it
        grads.append(g)
    return grads, (
        [e[0] for e in ptrs],
        [g.data_ptr() for g in grads],
        [e[1] for e in ptrs],
        [e[2] for e in ptrs],
        [e[3] for e in ptrs] if amsgrad else [],
        [e[4] for e in ptrs] if master else [],
        [e[6] for e in ptrs],
    )


def _unscale_other_grads(params, grads, unscale: Union[float, Tensor]) -> None:
    """The kernel wrote the unscaled grads back into ``grads``; where that was a temporary (a
    grad of another dtype or layout than its param), unscale ``p.grad`` itself."""
    for p, g in zip(params, grads):
        if g is not p.grad:
            p.grad.mul_(unscale)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter) with fused mixed-precision kernels.

    Drop-in for :class:`torch.optim.AdamW`: same update, param groups with their
    own hyper-parameters, LR schedulers, ``zero_grad``, ``state_dict`` /
    ``load_state_dict`` (with master weights off and fp32 state the state dict
    has exactly torch's layout and loads into ``torch.optim.AdamW`` and back).

    Args:
        params: iterable of tensors (fp32 / fp16 / bf16, dense, real; zero-element
            tensors are allowed and get state entries as in torch) or dicts
            defining param groups.
        lr: learning rate (>= 0; a float or a one-element tensor).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to the denominator (>= 0).
        weight_decay: decoupled weight decay coefficient (>= 0).
        amsgrad: keep the running maximum of the second moment (a NaN in either
            operand propagates, as ``torch.maximum``).
        maximize: maximize the objective instead of minimizing.
        master_weights: ``"auto"`` (default), ``True`` or ``False``. With master
            weights a 16-bit param has an fp32 copy in ``state["master_param"]``;
            updates are applied to it and the param receives its rounded value.
            The copy is taken at the first step: if the params are changed
            outside the optimizer later (e.g. a checkpoint is loaded into the
            model), create a new optimizer or update ``state["master_param"]``.
            It follows its param to another device like the moments do.
        state_dtype: ``torch.float32`` or ``torch.bfloat16`` for ``exp_avg`` /
            ``exp_avg_sq`` (/ ``max_exp_avg_sq``). bf16 moments halve the state
            memory; they keep 8 mantissa bits, so the per-element step size
            carries ~0.4% relative rounding noise and tiny second moments
            lose precision — fine for fine-tuning, measurably noisier than fp32
            for long pre-training runs.
        stochastic_rounding: for bf16 params without master weights, round each
            new param value stochastically (unbiased) instead of to nearest.
        max_grad_norm (keyword-only): ``None`` (default: no clipping) or a
            number >= 0. Each ``step()`` then computes the global L2 norm of
            the gradients of all params of all groups that have one (after
            unscaling, under a GradScaler) and updates with every gradient
            multiplied by ``min(1, max_grad_norm / (norm + 1e-6))`` — the same
            result as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)``
            before ``step()``, without its scaling pass: ``p.grad`` is not
            rewritten by the clipping. ``float("inf")`` measures the norm
            without clipping. Can be changed later through the attribute.
        foreach, fused: accepted for compatibility with ``torch.optim.AdamW`` and
            ignored (the update is always fused).
        capturable, differentiable: must be False.

    Attributes:
        max_grad_norm: the clipping threshold (``None``: off); settable.
        last_grad_norm: with ``max_grad_norm`` set, the global gradient norm
            the latest ``step()`` measured (before clipping, after unscaling):
            a 0-dim ``torch.float32`` **tensor** on the gradients' device (the
            first param's device if they span several), as
            ``clip_grad_norm_`` returns. It is computed on the device with no
            host synchronisation; reading it with ``float()`` / ``.item()``
            synchronises. ``inf``/``NaN`` on a step GradScaler skips. ``None``
            before the first step with ``max_grad_norm`` set, and whenever it
            is ``None``.

    ``step()`` never synchronises a CUDA device with the host (unless the
    reference fallback runs, or ``lr`` is a CUDA tensor).

    State is checked against its parameter when it is loaded and when a param
    is first stepped (then again only if a state tensor is replaced): a
    moment or master copy whose shape differs from the param's, or that is not
    a dense floating-point tensor, raises ``ValueError`` naming the parameter
    index and both shapes; floating state of another dtype or on another
    device is converted once.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Union[Tensor, Dict[str, Any]]],
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        master_weights: Union[str, bool] = "auto",
        state_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
        *,
        max_grad_norm: Optional[float] = None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
        )
        _validate_group(dict(defaults, params=[]))
        if not isinstance(params, Tensor):  # (a tensor gets torch's own TypeError)
            try:
                params = list(params)
            except TypeError:
                raise TypeError(f"params: expected an iterable of tensors or dicts, got {type(params).__name__}") \
                    from None
        self._max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.last_grad_norm: Optional[Tensor] = None
        # id(param) -> (param, config, state tensors) of states already checked and prepared
        self._ready: Dict[int, Tuple[Any, ...]] = {}
        super().__init__(params, defaults)

    @property
    def max_grad_norm(self) -> Optional[float]:
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: Optional[float]) -> None:
        self._max_grad_norm = _check_max_grad_norm(value)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["max_grad_norm"] = self._max_grad_norm
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        has_max = "max_grad_norm" in state
        max_grad_norm = state.pop("max_grad_norm", None)
        super().__setstate__(state)
        if has_max or "_max_grad_norm" not in self.__dict__:  # load_state_dict passes no max_grad_norm: keep ours
            self._max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.__dict__.setdefault("last_grad_norm", None)
        self._ready = {}
        # state dicts saved by torch.optim.AdamW lack turbotune's keys: use this optimizer's defaults
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"):
                group.setdefault(key, defaults.get(key, False if key in ("amsgrad", "maximize") else None))
            group.setdefault("decoupled_weight_decay", True)
            for key in ("master_weights", "state_dtype", "stochastic_rounding"):
                group.setdefault(key, defaults.get(key, {"master_weights": "auto", "state_dtype": torch.float32,
                                                         "stochastic_rounding": False}[key]))

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.AdamW``.

        Every state tensor is checked against its parameter before anything is
        changed: a shape mismatch (e.g. a checkpoint of another model) or a
        non-floating moment raises ``ValueError`` naming the parameter index and
        both shapes, and leaves the optimizer as it was. torch's loader casts
        every floating state tensor to its param's dtype; moments and master
        weights are set aside first and restored in the dtype this optimizer
        keeps them in (master weights stay fp32), on the param's device.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping with 'state' and 'param_groups', got "
                            f"{type(state_dict).__name__}")
        state_dict = dict(state_dict)
        if not isinstance(state_dict.get("state"), Mapping):
            raise ValueError(f"state_dict: expected 'state' to be a mapping, got "
                             f"{type(state_dict.get('state')).__name__}")
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups):
            raise ValueError("state_dict: expected 'param_groups' to be a list of dicts, each with a 'params' list")
        for g in saved_groups:
            _validate_group(dict(self.defaults, **{k: v for k, v in g.items() if k in self.defaults}, params=[]))
        params = [p for g in self.param_groups for p in g["params"]]
        by_id: Dict[Any, Tuple[int, Tensor]] = {}
        if len(saved_groups) == len(self.param_groups) and all(
            len(s["params"]) == len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):  # otherwise torch's loader raises its own ValueError below
            saved_ids = [i for g in saved_groups for i in g["params"]]
            by_id = {key: (index, p) for index, (key, p) in enumerate(zip(saved_ids, params))}
        for key, st in state_dict["state"].items():
            if key not in by_id:
                continue
            index, p = by_id[key]
            for name in _OWN_STATE:
                if name in st:
                    _check_state_tensor(index, name, st[name], p)
            if "step" in st:
                _check_step(index, st["step"])

        held: Dict[Any, Dict[str, Tensor]] = {}
        stripped = {}
        for key, st in state_dict["state"].items():
            st = dict(st)
            held[key] = {k: st.pop(k) for k in _OWN_STATE if k in st}
            stripped[key] = st
        state_dict["state"] = stripped
        super().load_state_dict(state_dict)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for key, tensors in held.items():
            if key not in by_id:
                continue
            p = by_id[key][1]
            group = group_of[id(p)]
            st = self.state[p]
            for name, value in tensors.items():
                dtype = torch.float32 if name == _MASTER else group["state_dtype"]
                st[name] = like(p, dtype, value.detach())  # the param's device, dtype kept here and layout
        self._ready = {}

    # ------------------------------------------------------------------ state

    def _param_index(self, p: Tensor) -> int:
        for i, q in enumerate(q for g in self.param_groups for q in g["params"]):
            if q is p:
                return i
        return -1

    def _prepare_state(self, p: Tensor, group: Dict[str, Any], native_cuda: bool) -> Tuple[int, ...]:
        """Create, check and convert the state of ``p`` on first use (cheap afterwards: identity checks).

        Returns the data pointers ``(param, exp_avg, exp_avg_sq, max_exp_avg_sq or 0, master or 0, step,
        numel)``, valid until the state or the param's storage changes (then the next call re-checks).
        """
        st = self.state[p]
        sdt = group["state_dtype"]
        master = _uses_master(group, p)
        config = (sdt, master, bool(group["amsgrad"]), native_cuda, p.device, p.dtype, p.shape, p.stride())
        ready = self._ready.get(id(p))
        if (ready is not None and ready[0] is p and ready[1] == config and ready[3][0] == p.data_ptr()
                and all(st.get(k) is t for k, t in ready[2])):
            return ready[3]

        if len(st) == 0 or "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if native_cuda else "cpu")
            st["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)  # p's layout
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
        index = None
        dense = is_dense(p)
        for name in _OWN_STATE:
            t = st.get(name)
            if t is None:
                continue
            if not (isinstance(t, Tensor) and t.shape == p.shape and t.is_floating_point()
                    and t.layout == torch.strided and t.device.type != "meta"):
                index = self._param_index(p) if index is None else index
                _check_state_tensor(index, name, t, p)
            want = torch.float32 if name == _MASTER else sdt
            if t.dtype != want or t.device != p.device or not (same_layout(t, p) if dense else is_dense(t)):
                # e.g. the model moved to another device, or its conv weights to another memory format, after
                # the state was created (the master copy too): convert once, into the param's layout
                st[name] = like(p, want, t)
        if group["amsgrad"] and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
        if master:
            if _MASTER not in st:
                st[_MASTER] = like(p, torch.float32, p.detach())
        elif _MASTER in st:
            del st[_MASTER]
        step = st.get("step")
        if step is not None:
            _check_step(self._param_index(p) if index is None else index, step)
        if not isinstance(step, Tensor):
            st["step"] = torch.tensor(float(step or 0), dtype=torch.float32)
        want = p.device if native_cuda else torch.device("cpu")
        step = st["step"]
        if step.device != want or step.dtype != torch.float32 or step.dim() != 0 or not step.is_contiguous():
            st["step"] = step.to(device=want, dtype=torch.float32).reshape(()).clone()
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()) + (
            (_MASTER,) if master else ())
        ptrs = (
            p.data_ptr(),
            st["exp_avg"].data_ptr(),
            st["exp_avg_sq"].data_ptr(),
            st["max_exp_avg_sq"].data_ptr() if group["amsgrad"] else 0,
            st[_MASTER].data_ptr() if master else 0,
            st["step"].data_ptr(),
            p.numel(),
        )
        self._ready[id(p)] = (p, config, tuple((k, st[k]) for k in keys), ptrs)
        return ptrs

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step; returns ``closure()``'s value if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        chosen: Dict[Tuple, str] = {}  # backend choice per (device, dtype), decided once per step

        plan = []
        for group in self.param_groups:
            _validate_group(group, check_params=False)
            buckets: Dict[Tuple, List[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients (params: got a sparse .grad)")
                if p.grad.is_complex():
                    raise RuntimeError("AdamW does not support complex gradients")
                key = (p.device, p.dtype)
                impl_name = chosen.get(key)
                if impl_name is None:
                    impl_name = chosen[key] = backend.select(OP, p.device, p.dtype).impl
                native = impl_name == backend.NATIVE and is_dense(p)
                impl = "native" if native else "reference"
                buckets[(impl, p.device, p.dtype, _uses_master(group, p))].append(p)
            for (impl, device, dtype, master), params in buckets.items():
                on_cuda = impl == "native" and device.type == "cuda"
                ptrs = [self._prepare_state(p, group, on_cuda) for p in params]
                plan.append((group, on_cuda, impl, device, dtype, master, params, ptrs))

        coefs = None
        if self._max_grad_norm is not None:
            grads = [p.grad for entry in plan for p in entry[6]]
            self.last_grad_norm, coefs = global_grad_norm(grads, self._max_grad_norm, grad_scale)

        host_found_inf: Optional[bool] = None  # read once, lazily, for CPU / reference groups
        for group, on_cuda, impl, device, dtype, master, params, ptrs in plan:
            coef = None if coefs is None else coefs[device]
            if on_cuda:
                self._step_cuda(group, params, ptrs, dtype, master, grad_scale, found_inf, coef)
                continue
            if host_found_inf is None:
                host_found_inf = bool(found_inf is not None and float(found_inf) != 0.0)
            if host_found_inf:
                continue  # GradScaler found inf/NaN: skip the update, the step count and the grad write-back
            unscale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
            coef = 1.0 if coef is None else float(coef)
            if impl == "native":  # the kernel advances the step counters
                self._step_cpu(group, params, ptrs, dtype, master, unscale, coef, grad_scale is not None)
            else:
                states = [self.state[p] for p in params]
                _count_steps([s["step"] for s in states], None)
                self._step_reference(group, params, states, master, unscale, coef, grad_scale is not None)
        return loss

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )

    @staticmethod
    def _seed(group, dtype, master) -> int:
        if group["stochastic_rounding"] and dtype == torch.bfloat16 and not master:
            return int(torch.randint(0, 1 << 62, (1,)).item())  # CPU generator: no device sync
        return 0

    def _step_reference(self, group, params, states, master, unscale, coef, write_grad):
        h = self._hyper(group)
        sr = bool(group["stochastic_rounding"])
        for p, st in zip(params, states):
            grad = p.grad
            multiplier = coef
            if write_grad:
                grad.mul_(unscale)  # the unscaled grad stays in p.grad, as torch's fused AdamW leaves it
            else:
                multiplier = unscale * coef
            adamw_single_tensor(
                p, grad, st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq"),
                st.get(_MASTER) if master else None, float(st["step"]),
                grad_multiplier=multiplier, stochastic_rounding=sr and not master, **h,
            )

    def _step_cpu(self, group, params, ptrs, dtype, master, unscale, coef, write_grad):
        C = _native.require("turbotune.optim.AdamW (CPU kernel)")
        h = self._hyper(group)
        grads, pointers = _kernel_pointers(params, ptrs, h["amsgrad"], master)  # grads stay alive for the call
        C.adamw_cpu(
            *pointers,
            [e[5] for e in ptrs],
            DTYPE_CODE[dtype],
            DTYPE_CODE[group["state_dtype"]],
            h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["amsgrad"], h["maximize"],
            unscale, coef, write_grad,
            bool(group["stochastic_rounding"]) and dtype == torch.bfloat16 and not master,
            self._seed(group, dtype, master),
        )
        if write_grad:
            _unscale_other_grads(params, grads, unscale)

    def _step_cuda(self, group, params, ptrs, dtype, master, grad_scale, found_inf, coef):
        C = _native.require_cuda("turbotune.optim.AdamW (CUDA kernel)")
        device = params[0].device
        h = self._hyper(group)
        steps = [self.state[p]["step"] for p in params]
        inf_ptr = 0
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
            inf_ptr = found_inf.data_ptr()
        _count_steps(steps, found_inf)  # a skipped step does not count
        scale_ptr = 0
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
            scale_ptr = grad_scale.data_ptr()
        coef_ptr = 0
        if coef is not None:
            if not isinstance(coef, Tensor):
                coef = torch.tensor([float(coef)], dtype=torch.float32, device=device)
            coef_ptr = coef.data_ptr()
        grads, pointers = _kernel_pointers(params, ptrs, h["amsgrad"], master)  # grads stay alive for the call
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            C.adamw_cuda(
                *pointers,
                [e[5] for e in ptrs],
                DTYPE_CODE[dtype],
                DTYPE_CODE[group["state_dtype"]],
                h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["amsgrad"], h["maximize"],
                scale_ptr,
                inf_ptr,
                coef_ptr,
                bool(group["stochastic_rounding"]) and dtype == torch.bfloat16 and not master,
                self._seed(group, dtype, master),
                stream,
            )
        if grad_scale is not None and any(g is not p.grad for p, g in zip(params, grads)):
            unscale = grad_scale.reciprocal()
            if found_inf is not None:  # a skipped step leaves the grads as they are, as the kernel does
                unscale = torch.where(found_inf != 0, torch.ones_like(unscale), unscale)
            _unscale_other_grads(params, grads, unscale)  # device ops on the stream: no host synchronisation
