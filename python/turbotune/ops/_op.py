"""One mechanism for every fused op: a ``torch.library`` custom op (what
``torch.compile`` and ``torch.export`` see) and an eager path that runs the
same implementation without the dispatcher.

The dispatcher costs tens of microseconds per call, which is more than a
BERT-sized LayerNorm or attention takes on a GPU. So :class:`FusedOp` calls

- the registered op under ``torch.compile`` / export (graphs stay whole);
- an ``autograd.Function`` built from the same implementation, setup and
  backward when a gradient is needed in eager mode;
- the implementation itself otherwise (inference).

A backward that launches another op calls it through
:meth:`FusedOp.from_backward`, which takes the same eager/registered route as
the forward did.
"""
from typing import Callable, Optional

import torch
from torch import Tensor


class FusedOp:
    """``turbotune::<name>`` registered from ``impl`` (whose annotations give the
    schema), its ``fake`` and, optionally, its autograd (``setup_context`` /
    ``backward`` as for ``register_autograd``)."""

    def __init__(
        self,
        name: str,
        impl: Callable,
        *,
        fake: Callable,
        setup_context: Optional[Callable] = None,
        backward: Optional[Callable] = None,
        materialize_grads: bool = True,
    ):
        self.name = f"turbotune::{name}"
        self.impl = impl
        self.op = torch.library.custom_op(self.name, mutates_args=())(impl)
        self.op.register_fake(fake)
        self.function = None
        if backward is None:
            return

        def op_setup(ctx, inputs, output):
            ctx.eager = False
            setup_context(ctx, inputs, output)

        def eager_setup(ctx, inputs, output):
            ctx.eager = True
            if not materialize_grads:
                ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
            setup_context(ctx, inputs, output)

        self.op.register_autograd(backward, setup_context=op_setup)
        self.function = type(
            f"{name}_function",
            (torch.autograd.Function,),
            {
                "forward": staticmethod(lambda *args: impl(*args)),
                "setup_context": staticmethod(eager_setup),
                "backward": staticmethod(backward),
            },
        )

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if (
            self.function is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        ):
            return self.function.apply(*args)
        return self.impl(*args)

    def from_backward(self, ctx, *args):
        """Run from another op's backward: directly when that op ran eagerly, as
        the registered op when it ran through the dispatcher (compile/export)."""
        return self.impl(*args) if getattr(ctx, "eager", False) else self.op(*args)
