"""``turbotune.optimize(model)``: one entry point, one handle, several model paths.

Each *model path* (BERT-family encoders in :mod:`turbotune.models.bert`, conv
nets in :mod:`turbotune.models.cnn`) registers itself with
:func:`register_path`, giving

- ``matches(model) -> bool``: cheap structural test (no forward pass);
- ``apply(model, **options) -> OptimizeHandle``: patch *this instance* only.

:func:`optimize` asks the paths in registration order and hands the model to
the first that matches. A model no path recognises is left untouched: a
one-line warning says so, and the returned handle reports ``kind="none"``.

Patching is instance-scoped and reversible (DESIGN.md, convention 8): a path
may replace submodules or bound ``forward`` methods of this model, never a
class attribute, and ``state_dict()`` keeps the original keys. The handle's
:meth:`OptimizeHandle.revert` restores the exact original modules and
parameters, so a reverted model is bit-identical to one never optimized.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["optimize", "OptimizeHandle", "register_path", "registered_paths"]


class OptimizeHandle:
    """What :func:`optimize` returns.

    Attributes:
        model: the optimized model (the same object that was passed in).
        kind: which path optimized it (``"bert"``, ``"cnn"``, or ``"none"``).
        changes: one human-readable line per thing that was patched.
        options: the options the path applied (e.g. ``dtype``, ``padding_free``).

    ``revert()`` undoes every change (idempotent); the handle is also a context
    manager that reverts on exit.
    """

    def __init__(self, model: torch.nn.Module, kind: str, undo: Optional[Callable[[], None]] = None,
                 changes: Optional[List[str]] = None, options: Optional[dict] = None):
        self.model = model
        self.kind = kind
        self.changes = list(changes or [])
        self.options = dict(options or {})
        self._undo = undo
        self.reverted = False

    @property
    def active(self) -> bool:
        """True until :meth:`revert` has run (and something was patched)."""
        return self._undo is not None and not self.reverted

    def revert(self) -> torch.nn.Module:
        """Restore the model exactly as it was before :func:`optimize`; returns it."""
        if self._undo is not None and not self.reverted:
            self._undo()
        self.reverted = True
        if getattr(self.model, "_turbotune_handle", None) is self:
            del self.model._turbotune_handle
        return self.model

    def __enter__(self) -> "OptimizeHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "reverted" if self.reverted else ("active" if self._undo is not None else "no-op")
        return f"OptimizeHandle(kind={self.kind!r}, {state}, changes={len(self.changes)})"


@dataclass
class _Path:
    name: str
    matches: Callable[[torch.nn.Module], bool]
    apply: Callable[..., OptimizeHandle]
    doc: str = ""
    options: List[str] = field(default_factory=list)


_PATHS: Dict[str, _Path] = {}


def register_path(name: str, matches: Callable[[torch.nn.Module], bool], apply: Callable[..., OptimizeHandle],
                  doc: str = "") -> None:
    """Register a model path (re-registering a name replaces it)."""
    _PATHS[name] = _Path(name, matches, apply, doc)


def registered_paths() -> Dict[str, str]:
    """``{name: one-line description}`` of every registered path, in dispatch order."""
    return {p.name: p.doc for p in _PATHS.values()}


def optimize(model: torch.nn.Module, **options) -> OptimizeHandle:
    """Make ``model`` (this instance only) faster for training and inference.

    Args:
        model: a ``torch.nn.Module``: a Hugging Face BERT-family model or a
            conv net built from Conv2d -> BatchNorm2d -> activation blocks.
        **options: passed to the model path, e.g. ``padding_free=True``,
            ``dtype=torch.bfloat16`` (see :mod:`turbotune.models.bert` and
            :mod:`turbotune.models.cnn`).

    Returns:
        an :class:`OptimizeHandle`; ``handle.revert()`` restores the model.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"turbotune.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    existing = getattr(model, "_turbotune_handle", None)
    if existing is not None and existing.active:
        raise RuntimeError(f"turbotune.optimize: this {type(model).__name__} is already optimized "
                           f"({existing!r}); call handle.revert() first")
    for path in _PATHS.values():
        if path.matches(model):
            handle = path.apply(model, **options)
            model._turbotune_handle = handle
            return handle
    known = ", ".join(_PATHS) or "none registered"
    warnings.warn(f"turbotune.optimize: no model path recognises {type(model).__name__} "
                  f"(paths: {known}); the model runs stock", stacklevel=2)
    return OptimizeHandle(model, "none", options=options)
