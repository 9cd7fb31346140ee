"""End-to-end training tasks on real data, as Python APIs (the ``turbotune finetune`` CLI wraps them).

- :mod:`turbotune.tasks.image`: a small ResNet on Fashion-MNIST (:func:`~turbotune.tasks.image.finetune_image`).
"""
