"""Every client's dream gradient as one CUDA graph: the device runs the clients back to back.

With one CUDA graph per client (FastDreamStep.optimised), the host prepares and launches each
client's replay in turn; a small client's step is likely shorter than that host work, so the
device would idle between clients and a plain round would take longer than the clients' steps
alone. Here each client's step is compiled without graphs of its own and all of them are
captured into one graph, replayed with one launch per dream step. Clients sharing an
architecture may form one vmapped step inside the graph (`groups`), as simulate's fast path does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codream_secure.dreams import DreamLossWeights
from codream_secure.errors import ConfigError
from codream_secure.gpu.fast_dream import BatchedDreamStep, FastDreamStep

__all__ = ["GraphedDreamGradients"]


class GraphedDreamGradients:
    """grad_x of every model's dream loss at x (float32, NCHW), from one CUDA graph replay.

    The steps are FastDreamStep.optimised's (bf16, channels_last, compiled), without their own
    graphs. Warm-up calls (compilation, cuDNN's algorithm search) run before the capture on
    a side stream, as capture forbids both. The graph reads the models' parameters in place, so
    optimiser steps and load_state_dict are seen; a parameter that moved to new memory (a
    replaced tensor, a memory-format change) makes the next call capture again. `groups`
    (model indices; default one per model) puts each group of two or more, which must share an
    architecture, into one vmapped BatchedDreamStep; its stacked copy of the parameters is
    rebuilt, and the graph captured again, after a model's tensors change.
    """

    def __init__(self, models: Sequence[nn.Module], x_shape: Sequence[int],
                 weights: DreamLossWeights | None = None, *, warmup: int = 3,
                 groups: Sequence[Sequence[int]] | None = None,
                 **step_options: object) -> None:
        if not models:
            raise ConfigError("GraphedDreamGradients needs at least one model")
        groups = [[i] for i in range(len(models))] if groups is None else [
            list(g) for g in groups]
        order = [i for g in groups for i in g]
        if sorted(order) != list(range(len(models))) or not all(groups):
            raise ConfigError(f"groups must cover models 0..{len(models) - 1} once each, got "
                              f"{groups}")
        devices = {p.device for m in models for p in m.parameters()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ConfigError("GraphedDreamGradients captures a CUDA graph: every model must be "
                              f"on one CUDA device, got {sorted(map(str, devices))}")
        if warmup < 1:
            raise ConfigError(f"warmup must be at least 1 call, got {warmup}")
        self.device, self.warmup, self.n_models = next(iter(devices)), warmup, len(models)
        options = {**step_options, "cuda_graphs": False}
        self.steps: list[FastDreamStep | BatchedDreamStep] = [
            FastDreamStep.optimised(models[g[0]], weights, **options) if len(g) == 1 else
            BatchedDreamStep.optimised([models[i] for i in g], weights, **options)
            for g in groups]
        self._order = order  # the graph's k-th gradient is model order[k]'s
        self.static_x = torch.zeros(tuple(x_shape), device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._flat: torch.Tensor | None = None  # every gradient, in the graph's memory
        self._captured: list[dict[str, torch.Tensor]] = []

    def _capture(self) -> None:
        self._graph = self._flat = None  # frees the previous graph's memory pool first
        compute = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                for step in self.steps:
                    step(self.static_x)
        compute.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            flat = torch.cat([step(self.static_x).reshape(-1) for step in self.steps])
        self._graph, self._flat = graph, flat
        self._captured = [step._state() for step in self.steps]

    def _stale(self) -> bool:
        # _state() returns the same dict until a parameter's memory or layout changes (a
        # batched step's: until a model's tensors change, which restacks its parameters)
        return self._graph is None or any(
            step._state() is not captured
            for step, captured in zip(self.steps, self._captured, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every model's grad_x at x, in fresh tensors.

        One copy (a single kernel) takes them out of the graph's memory, which the next replay
        rewrites: a consumer on another stream (an upload copied out on a side stream) could
        otherwise still be reading them.
        """
        if tuple(x.shape) != tuple(self.static_x.shape):
            raise ConfigError(f"dreams of shape {tuple(x.shape)}, but the graph was built for "
                              f"{tuple(self.static_x.shape)}")
        if self._stale():
            self._capture()
        self.static_x.copy_(x)
        assert self._graph is not None and self._flat is not None
        self._graph.replay()
        grads = self._flat.clone().view(self.n_models, *self.static_x.shape).unbind()
        return in_model_order(grads, self._order)


def in_model_order(grads: Sequence[torch.Tensor], order: Sequence[int]) -> list[torch.Tensor]:
    """Gradients listed in the graph's order (`order[k]` is the k-th's model) by model index."""
    out: list[torch.Tensor | None] = [None] * len(order)
    for model, grad in zip(order, grads, strict=True):
        out[model] = grad
    return out  # type: ignore[return-value]
