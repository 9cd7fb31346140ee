"""Which implementation of an op runs, decided once per (op, device, dtype).

Implementations
---------------
``triton``     Triton kernels: compiled on a CUDA GPU, or run by the Triton
               interpreter on CPU tensors when ``TRITON_INTERPRET=1`` (how the
               kernels are tested on machines without a GPU).
``native``     the C++ extension ``turbotune._C``: CPU kernels (OpenMP) and
               CUDA C++ kernels when the extension was built with CUDA.
``aten``       a fused CPU kernel of ATen's that the op wraps (for attention:
               SDPA's CPU flash-attention kernel); declared per op with
               ``aten_cpu_dtypes`` and described by ``aten_description``.
``reference``  plain PyTorch, computing in fp32; always available.

Default choice: on CUDA tensors Triton, then native CUDA, then reference; on
CPU tensors native C++, then ATen, then reference. The interpreter is never
chosen by default (it is slow); set ``TURBOTUNE_BACKEND=triton`` to run Triton
kernels on CPU tensors under ``TRITON_INTERPRET=1``.

``TURBOTUNE_BACKEND=reference|triton|native|aten`` forces a path for every op
that has it (ops without it keep their default). Forcing a path that cannot run
on the given device raises :class:`BackendUnavailable` with the reason. An op
may still run a call on a path further down its chain when the call needs a
feature the chosen path lacks (attention: dropout on ATen); it says so in its
``aten_description`` / summary, which ``turbotune info`` prints.

Ops declare what they have with :func:`register_op`; ``turbotune info`` prints
:func:`explain` for every registered op.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import _native

REFERENCE = "reference"
TRITON = "triton"
NATIVE = "native"
ATEN = "aten"
IMPLEMENTATIONS = (REFERENCE, TRITON, NATIVE, ATEN)
ENV_VAR = "TURBOTUNE_BACKEND"
CHECK_ENV_VAR = "TURBOTUNE_CHECK"

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """A forced implementation cannot run for this op, device and dtype."""


@dataclass(frozen=True)
class OpSpec:
    """The implementations one op provides, and for which dtypes."""

    name: str
    triton_dtypes: Tuple[torch.dtype, ...] = ()
    native_cpu_dtypes: Tuple[torch.dtype, ...] = ()
    native_cuda_dtypes: Tuple[torch.dtype, ...] = ()
    summary: str = ""
    aten_cpu_dtypes: Tuple[torch.dtype, ...] = ()
    aten_description: str = ""


@dataclass(frozen=True)
class Choice:
    """The implementation chosen for one (op, device, dtype), and why."""

    impl: str
    reason: str


_OPS: Dict[str, OpSpec] = {}


def register_op(
    name: str,
    *,
    triton_dtypes=(),
    native_cpu_dtypes=(),
    native_cuda_dtypes=(),
    summary: str = "",
    aten_cpu_dtypes=(),
    aten_description: str = "",
) -> OpSpec:
    """Declare an op and the dtypes each of its accelerated implementations handles.

    The reference implementation is implied and accepts every floating dtype.
    Registering the same name twice replaces the earlier entry (module reload).
    """
    spec = OpSpec(name, tuple(triton_dtypes), tuple(native_cpu_dtypes), tuple(native_cuda_dtypes), summary,
                  tuple(aten_cpu_dtypes), aten_description)
    _OPS[name] = spec
    select_cached.cache_clear()
    return spec


def update_op(name: str, **changes) -> OpSpec:
    """Change fields of a registered op (e.g. ``native_cpu_dtypes`` when a native
    implementation is plugged in later) and forget cached choices."""
    try:
        spec = dataclasses.replace(_OPS[name], **{k: tuple(v) if k.endswith("_dtypes") else v
                                                  for k, v in changes.items()})
    except KeyError:
        raise KeyError(f"turbotune: unknown op {name!r}; registered: {sorted(_OPS)}") from None
    _OPS[name] = spec
    select_cached.cache_clear()
    return spec


def registered_ops() -> Dict[str, OpSpec]:
    """Every registered op by name (importing :mod:`turbotune.ops` registers them all)."""
    return dict(_OPS)


# --------------------------------------------------------------------------- environment


@functools.lru_cache(maxsize=None)
def _triton_installed() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break turbotune
        return False, f"triton failed to import ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on the CPU, in Python."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_mode() -> Tuple[str, str]:
    """``("gpu" | "interpreter" | "unavailable", reason)``."""
    ok, why = _triton_installed()
    if not ok:
        return "unavailable", why
    if interpreter_enabled():
        return "interpreter", f"{why}, TRITON_INTERPRET=1"
    if torch.cuda.is_available():
        return "gpu", f"{why}, CUDA device {torch.cuda.get_device_name(0)}"
    return "unavailable", f"{why}, but no CUDA device (set TRITON_INTERPRET=1 to interpret the kernels on the CPU)"


def checks_enabled() -> bool:
    """True when ``TURBOTUNE_CHECK=1``: validate inputs whose check needs a device
    synchronisation (e.g. ``attention_varlen``'s ``cu_seqlens`` on CUDA). CPU tensors
    are always checked."""
    return os.environ.get(CHECK_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def forced() -> Optional[str]:
    """The implementation forced by ``TURBOTUNE_BACKEND``, or None."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={value!r} is not valid; expected one of: auto, {', '.join(IMPLEMENTATIONS)}")
    return value


@contextlib.contextmanager
def force(impl: Optional[str]) -> Iterator[None]:
    """Temporarily force an implementation (``None`` restores automatic choice)."""
    old = os.environ.get(ENV_VAR)
    try:
        if impl is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = impl
        forced()  # validate early
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


# --------------------------------------------------------------------------- selection


def _triton_can_run(spec: OpSpec, device_type: str, dtype: torch.dtype) -> Tuple[bool, str]:
    if dtype not in spec.triton_dtypes:
        return False, f"no Triton kernel for {dtype}"
    mode, why = triton_mode()
    if mode == "unavailable":
        return False, why
    if device_type == "cuda":
        return (mode == "gpu"), why if mode == "gpu" else "the Triton interpreter does not run CUDA tensors"
    if device_type == "cpu":
        return (mode == "interpreter"), (why if mode == "interpreter" else "Triton needs a GPU or TRITON_INTERPRET=1 for CPU tensors")
    return False, f"Triton does not support device {device_type!r}"


def _native_can_run(spec: OpSpec, device_type: str, dtype: torch.dtype) -> Tuple[bool, str]:
    dtypes = {"cpu": spec.native_cpu_dtypes, "cuda": spec.native_cuda_dtypes}.get(device_type, ())
    if dtype not in dtypes:
        return False, f"no native {device_type} kernel for {dtype}"
    st = _native.status()
    if not st.loaded:
        return False, f"native extension not loaded ({st.error})"
    if device_type == "cuda" and not st.cuda_usable:
        return False, st.cuda_summary()
    return True, "native C++" + (" (OpenMP)" if device_type == "cpu" and st.openmp else "") + (
        " CUDA kernel" if device_type == "cuda" else " kernel"
    )


def _aten_can_run(spec: OpSpec, device_type: str, dtype: torch.dtype) -> Tuple[bool, str]:
    if device_type != "cpu":
        return False, f"no ATen kernel for {device_type} tensors"
    if dtype not in spec.aten_cpu_dtypes:
        return False, f"no ATen cpu kernel for {dtype}"
    return True, spec.aten_description or "ATen kernel"


@functools.lru_cache(maxsize=None)
def select_cached(op: str, device_type: str, dtype: torch.dtype, forced_impl: Optional[str], interp: bool) -> Choice:
    try:
        spec = _OPS[op]
    except KeyError:
        raise KeyError(f"turbotune: unknown op {op!r}; registered: {sorted(_OPS)}") from None
    if forced_impl == REFERENCE:
        return Choice(REFERENCE, f"forced by {ENV_VAR}=reference")
    if forced_impl == TRITON and spec.triton_dtypes:
        ok, why = _triton_can_run(spec, device_type, dtype)
        if not ok:
            raise BackendUnavailable(f"turbotune.{op}: {ENV_VAR}=triton, but Triton cannot run here: {why}")
        return Choice(TRITON, f"forced by {ENV_VAR}=triton ({why})")
    if forced_impl == NATIVE and (spec.native_cpu_dtypes or spec.native_cuda_dtypes):
        ok, why = _native_can_run(spec, device_type, dtype)
        if not ok:
            raise BackendUnavailable(f"turbotune.{op}: {ENV_VAR}=native, but the native path cannot run here: {why}")
        return Choice(NATIVE, f"forced by {ENV_VAR}=native ({why})")
    if forced_impl == ATEN and spec.aten_cpu_dtypes:
        ok, why = _aten_can_run(spec, device_type, dtype)
        if not ok:
            raise BackendUnavailable(f"turbotune.{op}: {ENV_VAR}=aten, but the ATen path cannot run here: {why}")
        return Choice(ATEN, f"forced by {ENV_VAR}=aten ({why})")

    reasons = []
    if device_type == "cuda":
        ok, why = _triton_can_run(spec, device_type, dtype)
        if ok:
            return Choice(TRITON, f"Triton kernel ({why})")
        reasons.append(why)
    ok, why = _native_can_run(spec, device_type, dtype)
    if ok:
        return Choice(NATIVE, why)
    reasons.append(why)
    if spec.aten_cpu_dtypes:
        ok, why_aten = _aten_can_run(spec, device_type, dtype)
        if ok:
            return Choice(ATEN, why_aten)
        reasons.append(why_aten)
    if device_type == "cpu" and dtype in spec.triton_dtypes:
        reasons.append("Triton runs CPU tensors only when forced (TURBOTUNE_BACKEND=triton + TRITON_INTERPRET=1)")
    return Choice(REFERENCE, "PyTorch reference: " + "; ".join(dict.fromkeys(reasons)))


def cpu_flags() -> frozenset:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_support(device) -> Tuple[bool, str]:
    """Whether bf16 math is *fast* on ``device``, and why: the one answer every ``dtype="auto"`` uses
    (``optimize`` for BERT and CNNs, ``turbotune finetune``, the benchmark suites).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: only with AVX512-BF16 or AMX
    (``/proc/cpuinfo`` flags ``avx512_bf16`` / ``amx_bf16``, else the native extension's CPU probe);
    without them bf16 matmuls are emulated and several times *slower* than fp32 (measured: 9x on an
    AVX2 CPU), so they are not used by default.
    """
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, ("CUDA device supports bf16" if ok else "this CUDA device has no native bf16 (pre-Ampere)")
    if device.type != "cpu":
        return False, f"bf16 support on {device.type} is not known"
    flags = cpu_flags()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not flags:
        st = _native.status()
        if st.loaded:
            found = sorted(k for k in ("avx512bf16", "amx_bf16") if st.cpu_features.get(k))
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"


def select(op: str, device: torch.device, dtype: torch.dtype) -> Choice:
    """Choose the implementation of ``op`` for tensors on ``device`` with ``dtype``."""
    return select_cached(op, torch.device(device).type, dtype, forced(), interpreter_enabled())


def explain(device: Optional[torch.device] = None) -> Dict[str, Dict[str, Choice]]:
    """For every registered op, the choice per dtype on ``device`` (default: cuda if present)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: Dict[str, Dict[str, Choice]] = {}
    for name in sorted(_OPS):
        row = {}
        for dtype in FLOATS:
            try:
                row[str(dtype).replace("torch.", "")] = select(name, device, dtype)
            except BackendUnavailable as exc:
                row[str(dtype).replace("torch.", "")] = Choice("unavailable", str(exc))
        out[name] = row
    return out
