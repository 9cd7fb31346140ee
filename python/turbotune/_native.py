"""Loads the native extension ``turbotune._C`` and reports what it can do.

Nothing here raises at import time: a missing or broken extension is recorded
and explained by :func:`status` / :func:`require`, so ``import turbotune``
always works and the pure-PyTorch reference paths stay usable.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

try:  # pragma: no cover - exercised implicitly by every import
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or an OSError from a bad shared object
    _C = None  # type: ignore[assignment]
    _IMPORT_ERROR = exc


@dataclass(frozen=True)
class NativeStatus:
    """What the native extension offers on this machine."""

    loaded: bool
    error: Optional[str]
    cuda_built: bool = False
    cuda_usable: bool = False
    cuda_devices: int = 0
    cuda_error: Optional[str] = None
    cuda_runtime: int = 0
    openmp: bool = False
    threads: int = 1
    cpu_features: dict = field(default_factory=dict)

    def cuda_summary(self) -> str:
        """One line for humans: e.g. 'CUDA extension built, no usable driver (...)'."""
        if not self.loaded:
            return "native extension not loaded"
        if not self.cuda_built:
            return "CUDA extension not built (host-only build)"
        if self.cuda_usable:
            major, minor = divmod(self.cuda_runtime // 10, 100)
            return f"CUDA extension built and usable ({self.cuda_devices} device(s), CUDA runtime {major}.{minor})"
        return f"CUDA extension built, no usable driver ({self.cuda_error})"


@functools.lru_cache(maxsize=None)
def status() -> NativeStatus:
    """Probe the extension once and cache the answer."""
    if _C is None:
        return NativeStatus(loaded=False, error=f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}")
    cuda = _C.cuda_status()
    return NativeStatus(
        loaded=True,
        error=None,
        cuda_built=bool(cuda["built"]),
        cuda_usable=bool(cuda["built"]) and cuda["device_count"] > 0,
        cuda_devices=int(cuda["device_count"]),
        cuda_error=cuda["error"],
        cuda_runtime=int(cuda["runtime_version"]),
        openmp=bool(_C.built_with_openmp),
        threads=int(_C.max_threads()),
        cpu_features=dict(_C.cpu_features()),
    )


def require(feature: str = "the native extension") -> Any:
    """Return the ``_C`` module or raise one readable error naming ``feature``."""
    if _C is None:
        raise RuntimeError(
            f"turbotune: {feature} needs the compiled extension turbotune._C, which failed to load "
            f"({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}). Reinstall with `pip install .` from the "
            "source tree (needs a C++17 compiler and CMake), or use the reference path with "
            "TURBOTUNE_BACKEND=reference."
        )
    return _C


def require_cuda(feature: str) -> Any:
    """Return ``_C`` if its CUDA kernels can run here, else raise naming ``feature``."""
    mod = require(feature)
    st = status()
    if not st.cuda_usable:
        raise RuntimeError(f"turbotune: {feature} needs the CUDA kernels: {st.cuda_summary()}.")
    return mod
