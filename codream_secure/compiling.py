"""torch.compile helpers shared by the dream step and the training step.

Dynamo keeps its compiled graphs in one cache per code object, and with fullgraph=True a code
object compiled more than `recompile_limit` times (8) is a hard error. Every FastDreamStep
shares `_loss_fn`'s code and every training step `_ce_terms`'s, so a process that compiles
steps for enough architectures, input shapes or settings (a benchmark, a notebook running
several simulations) would fail. Giving each compiled callable a code object of its own keeps
each cache to the few variants of one step.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

__all__ = ["architecture", "with_own_code"]


def with_own_code(fn: Callable) -> Callable:
    """fn, or the method fn binds, as a new function object with a copy of its code object."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(with_own_code(fn.__func__), fn.__self__)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"expected a Python function or method, got {type(fn).__name__}")
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    return copy


def architecture(model: nn.Module) -> tuple:
    """What a compiled graph (and vmap) needs equal: class, module tree, and every tensor's
    name, shape, dtype and device."""
    tensors = tuple((k, tuple(v.shape), v.dtype, str(v.device))
                    for k, v in [*model.named_parameters(), *model.named_buffers()])
    return type(model), str(model), tensors
