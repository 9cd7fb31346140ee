"""Optimizers: :class:`AdamW` (fused, mixed precision) and :func:`clip_grad_norm_`.

See :mod:`turbotune.optim.adamw` for the flags and the memory per parameter
of each configuration; :func:`adamw_single_tensor` is the readable reference.
"""
from ._reference import adamw_single_tensor, stochastic_round_to_bf16
from .adamw import AdamW
from .clip import clip_grad_norm_, clip_grad_norm_ref

__all__ = ["AdamW", "clip_grad_norm_", "clip_grad_norm_ref", "adamw_single_tensor", "stochastic_round_to_bf16"]
