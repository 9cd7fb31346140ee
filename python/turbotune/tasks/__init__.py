"""Fine-tuning tasks behind ``turbotune finetune`` / :func:`turbotune.finetune`.

- ``text`` (:mod:`turbotune.tasks.text`): sequence classification with a BERT-family encoder;
- ``image`` (:mod:`turbotune.tasks.image`, with the CNN support): image classification.

Every task trains with the one loop of :mod:`turbotune.training`.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..training import FinetuneError

__all__ = ["finetune", "TASKS"]

TASKS = {"text": "turbotune.tasks.text:finetune_text", "image": "turbotune.tasks.image:finetune_image"}


def task_function(task: str):
    """The entry point of ``task``; a clear :class:`FinetuneError` when this installation lacks it."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    module, fn = TASKS[task].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise FinetuneError(f"task {task!r} needs {module}, which this turbotune installation does not have "
                            f"(the {task} task is not built in yet)") from None
    if not hasattr(mod, fn):
        raise FinetuneError(f"task {task!r}: {module} has no {fn}()")
    return getattr(mod, fn)


def finetune(task: str = "text", **options: Any):
    """Fine-tune on a task: ``finetune()`` runs the default (MiniLM on the movie reviews).

    ``task="text"``: see :func:`turbotune.tasks.text.finetune_text` for the options;
    ``task="image"``: :func:`turbotune.tasks.image.finetune_image`.
    """
    return task_function(task)(**options)
