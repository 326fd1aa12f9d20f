"""The fast path of local training and distillation: one batch's forward and loss, compiled.

`train_local` and `distill` run their loops through a `BatchStep`. Without a `FastPath` it calls
the loss function eagerly (the CPU default, bitwise reproducible). With one, full batches go
through torch.compile(fullgraph=True, dynamic=False): one graph per architecture and batch size,
shared by every model of that architecture. A trailing batch of another size runs the same
function eagerly, so an epoch never compiles twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from codream_secure.compiling import architecture, with_own_code
from codream_secure.errors import ConfigError

__all__ = ["BatchStep", "FastPath", "make_optimizer"]

BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class FastPath:
    """How train_local and distill speed up a step (precision is set separately).

    On CUDA any fast path also turns on cudnn.benchmark, as the dream step does.
    """

    compile_backend: str = "inductor"
    cuda_graphs: bool = False  # mode="reduce-overhead"; needs CUDA and inductor
    channels_last: bool = False  # 4-D inputs and the model in NHWC strides
    fused_optimizer: bool = True  # torch.optim's one-kernel SGD/Adam step

    def __post_init__(self) -> None:
        if self.compile_backend not in BACKENDS:
            raise ConfigError(f"compile_backend must be one of {', '.join(BACKENDS)}, "
                              f"got {self.compile_backend!r}")
        if self.cuda_graphs and self.compile_backend != "inductor":
            raise ConfigError("cuda_graphs needs compile_backend='inductor'")

    @classmethod
    def optimised(cls, device: torch.device, precision: str, *,
                  cuda_graphs: bool = False) -> FastPath | None:
        """The simulate default: compiled, channels_last and fused with bf16 on CUDA, else None.

        Same rule as FastDreamStep.optimised. CUDA graphs are opt-in (simulate's [device]
        train_cuda_graphs = "on"): 4.45 vs 11.89 ms per ResNet-18 training step on an H100, but a
        short simulation gained nothing over their compile time (docs/gpu-measurements.md).
        """
        if device.type == "cuda" and precision == "bf16":
            return cls(channels_last=True, cuda_graphs=cuda_graphs)
        if cuda_graphs:
            raise ConfigError(f"cuda_graphs: training graphs need CUDA and bf16, got device "
                              f"{device.type!r}, precision {precision!r}")
        return None


def make_optimizer(model: nn.Module, kind: str, lr: float, momentum: float,
                   weight_decay: float, *, fused: bool = False) -> torch.optim.Optimizer:
    """A fresh SGD (with momentum) or Adam over the model's parameters."""
    options = {"fused": True} if fused else {}
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay, **options)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **options)
    raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")


@functools.cache
def _compiled(terms: Callable, backend: str, cuda_graphs: bool, arch: tuple) -> Callable:
    # one wrapper, with a code object of its own, per (function, settings, architecture):
    # models of one architecture share its graph, and no Dynamo cache nears its recompile
    # limit however many architectures a process trains (compiling.py)
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(with_own_code(terms), fullgraph=True, dynamic=False, backend=backend,
                         mode=mode)


class BatchStep:
    """Calls terms(model, x, *rest) -> (loss, count): compiled for full batches where a FastPath
    is given, eagerly otherwise."""

    def __init__(self, terms: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                 model: nn.Module, batch_size: int, fast: FastPath | None) -> None:
        self.terms, self.model, self.batch_size, self.fast = terms, model, batch_size, fast
        self._compiled = None if fast is None else _compiled(
            terms, fast.compile_backend, fast.cuda_graphs, architecture(model))
        self._cuda_graphs = fast is not None and fast.cuda_graphs and _on_cuda(model)
        if fast is not None and _on_cuda(model):  # as FastDreamStep: static shapes, so tune once
            torch.backends.cudnn.benchmark = True
        if fast is not None and fast.channels_last:
            model.to(memory_format=torch.channels_last)  # same values, NHWC strides, in place

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x as the step wants it: NHWC strides on the channels_last path (one copy per call)."""
        if self.fast is not None and self.fast.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def optimizer(self, kind: str, lr: float, momentum: float, weight_decay: float
                  ) -> torch.optim.Optimizer:
        fused = self.fast is not None and self.fast.fused_optimizer
        return make_optimizer(self.model, kind, lr, momentum, weight_decay, fused=fused)

    def __call__(self, x: torch.Tensor, *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compiled is None or x.shape[0] != self.batch_size:
            return self.terms(self.model, x, *rest)
        if self._cuda_graphs:  # the previous replay's outputs may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(self.model, x, *rest)


def _on_cuda(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())
