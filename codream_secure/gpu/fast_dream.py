"""The optimised dream step: the same grad_x as dreams.dream_gradient, built to compile and batch.

The BatchNorm-statistics term is computed without hooks: every BatchNorm of a meta-device
skeleton of the model becomes a `_TappedBatchNorm` that appends ||mu - running_mean|| +
||var - running_var|| of its input to a tape, and the loss function empties the tape into the
loss before it returns (with bn_norms="grouped" it appends the two differences instead, and the
loss takes the norms of all layers of one width in one call). The loss is thus one function of
(parameters, buffers, x) with no net side effect: torch.compile(fullgraph=True) traces it
without graph breaks (a CPU test checks this, also under vmap), CUDA graphs capture it, and
torch.func.vmap batches it over stacked parameters. (An identity-forward autograd.Function
adding the BN gradient in its backward was tried first: exact in eager, but torch.compile of its
vmap silently dropped the custom backward.)

Parameters come from the live model at every call (torch.func.functional_call), so local training
and distillation are seen at once. fp32 eager is the default and what the CPU uses;
`FastDreamStep.optimised` turns on bf16 autocast, channels_last, cudnn.benchmark and
torch.compile(mode="reduce-overhead") on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from codream_secure.compiling import architecture, with_own_code
from codream_secure.dreams import (
    DreamLossWeights,
    Precision,
    check_precision,
    prediction_entropy,
    total_variation,
)
from codream_secure.errors import ConfigError
from codream_secure.gpu.bn_act import bn_act_moments
from codream_secure.models import BasicBlock

__all__ = ["BatchedDreamStep", "BnMoments", "BnNorms", "FastDreamStep", "Precision",
           "dream_gradients", "group_by_architecture"]

BnMoments = Literal["var_mean", "sums"]
BnNorms = Literal["per-layer", "grouped"]


class _TappedBatchNorm(_BatchNorm):
    """Eval-mode BatchNorm that appends its input's feature-statistics term to a tape."""

    tape: list[torch.Tensor] | None = None
    moments: BnMoments = "var_mean"
    norms: BnNorms = "per-layer"
    fuse: bool = False  # forward through bn_act_moments (fuse_bn=True)
    fuse_relu: bool = False  # ... with the ReLU that followed it in a Sequential

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse:
            return self.fused(x, relu=self.fuse_relu)
        if self.tape is not None:
            mean, var = _moments(x.float(), [d for d in range(x.dim()) if d != 1],
                                 self.moments)
            self._record(mean, var)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None = None,
              relu: bool = False) -> torch.Tensor:
        """[relu](BN(x) [+ residual]), the tape's moments taken in the same pass over x."""
        y, sums = bn_act_moments(x, self.running_mean, self.running_var, self.weight,
                                 self.bias, self.eps, residual, relu)
        if self.tape is not None:
            count = x.numel() // x.shape[1]
            mean = sums[0] / count
            self._record(mean, (sums[1] / count - mean.square()).clamp_min(0.0))
        return y

    def _record(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        mean, var = mean - self.running_mean.float(), var - self.running_var.float()
        if self.norms == "grouped":  # _bn_term takes the norms
            self.tape += [mean, var]
        else:
            self.tape.append(torch.linalg.vector_norm(mean) + torch.linalg.vector_norm(var))


class _FusedBasicBlock(BasicBlock):
    """models.BasicBlock with each BatchNorm, its residual add and its ReLU in one pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1.fused(self.conv1(x), relu=True)
        return self.bn2.fused(self.conv2(out), self.shortcut(x), relu=True)


def _fuse_bn(skeleton: nn.Module) -> int:
    """Route the BatchNorms of known patterns through bn_act_moments; how many were.

    The patterns: a models.BasicBlock (both BatchNorms, and its projection shortcut's), and a
    BatchNorm followed by nn.ReLU in a Sequential (the ReLU folds into it). Other BatchNorms
    stay as they are: fusing one alone would split it from the ReLU that inductor fuses it with.
    """
    fused: list[_TappedBatchNorm] = []
    for module in list(skeleton.modules()):
        if type(module) is BasicBlock:
            module.__class__ = _FusedBasicBlock
            fused += [module.bn1, module.bn2]
            shortcut = module.shortcut
            if isinstance(shortcut, nn.Sequential) and isinstance(shortcut[-1], _BatchNorm):
                shortcut[-1].fuse = True
                fused.append(shortcut[-1])
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, layer), (name, after) in itertools.pairwise(children):
                if isinstance(layer, _TappedBatchNorm) and type(after) is nn.ReLU:
                    layer.fuse = layer.fuse_relu = True
                    setattr(module, name, nn.Identity())
                    fused.append(layer)
    return len(fused)


def _moments(x: torch.Tensor, dims: list[int], how: BnMoments
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance; "sums" takes E[x^2] - E[x]^2 in one pass.

    "sums" trades Welford's stability for two plain sums that inductor can fuse into one
    reduction; in float32 its cancellation error is about 1e-7 * E[x]^2 / var, far below bf16's.
    """
    if how == "var_mean":
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var
    mean = x.mean(dim=dims)
    return mean, (x.square().mean(dim=dims) - mean.square()).clamp_min(0.0)


class _PaddedStemConv(nn.Conv2d):
    """A convolution that pads its input and weight with zero channels up to `channels`.

    The output is unchanged (zero weights times zero inputs), and grad_x of the real channels
    too: autograd slices the padding off. Why: cuDNN may run a 3-channel stem on a generic kernel
    (83 us of a ResNet-18 step in one H100 profile); wider convolutions get tensor cores.
    """

    channels: int = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.channels - x.shape[1]
        return self._conv_forward(F.pad(x, (0, 0, 0, 0, 0, extra)),
                                  F.pad(self.weight, (0, 0, 0, 0, 0, extra)), self.bias)


def _pad_stem(skeleton: nn.Module, channels: int) -> None:
    """Make the skeleton's first convolution a _PaddedStemConv of `channels` input channels."""
    stem = next((m for m in skeleton.modules() if isinstance(m, nn.Conv2d)), None)
    if stem is None or type(stem) is not nn.Conv2d:
        raise ConfigError("stem_channels: the model's first convolution must be a "
                          "plain Conv2d")
    if stem.groups != 1 or stem.padding_mode != "zeros":
        raise ConfigError("stem_channels: the first convolution must have groups=1 and "
                          f"zero padding, got groups={stem.groups}, {stem.padding_mode!r}")
    if channels <= stem.in_channels:
        raise ConfigError(f"stem_channels: {channels} must exceed the stem's "
                          f"{stem.in_channels} input channels")
    stem.__class__ = _PaddedStemConv
    stem.channels = channels


def _bn_term(tape: list[torch.Tensor]) -> torch.Tensor:
    """The tape's BatchNorm-statistics term: the sum over layers of both norms.

    A tape of scalars holds each layer's two norms already (bn_norms="per-layer"). A tape of
    differences (mean - running_mean, var - running_var; "grouped") gets one norm call per
    channel width, so a compiled step reduces all layers of one width in one small kernel
    instead of two per layer (ResNet-18: 4 instead of 40).
    """
    if tape[0].dim() == 0:
        return torch.stack(tape).sum()
    widths: dict[int, list[torch.Tensor]] = {}
    for diff in tape:
        widths.setdefault(diff.shape[-1], []).append(diff)
    return torch.stack([torch.linalg.vector_norm(torch.stack(diffs), dim=-1).sum()
                        for diffs in widths.values()]).sum()


def _skeleton(model: nn.Module, tape: list[torch.Tensor] | None,
              moments: BnMoments = "var_mean", stem_channels: int | None = None,
              norms: BnNorms = "per-layer", fuse_bn: bool = False) -> nn.Module:
    """A meta-device copy of model in eval mode whose BatchNorms write to `tape` (None: off).

    With stem_channels, its first convolution pads its input to that many channels; with
    fuse_bn, the BatchNorms of known patterns run through bn_act_moments (_fuse_bn).
    """
    if fuse_bn and (tape is None or moments != "sums"):
        raise ConfigError("fuse_bn takes the BN term's moments as one-pass sums: it needs "
                          "use_bn_statistics=True and bn_moments='sums'")
    if moments not in ("var_mean", "sums"):
        raise ConfigError(f"bn_moments must be 'var_mean' or 'sums', got {moments!r}")
    if norms not in ("per-layer", "grouped"):
        raise ConfigError(f"bn_norms must be 'per-layer' or 'grouped', got {norms!r}")
    skeleton = copy.deepcopy(model).to("meta").eval()
    if stem_channels is not None:
        _pad_stem(skeleton, stem_channels)
    layers = [m for m in skeleton.modules() if isinstance(m, _BatchNorm)]
    if tape is not None and not layers:
        raise ConfigError("model has no BatchNorm layers: pass use_bn_statistics=False")
    for layer in layers:
        if layer.running_mean is None or layer.running_var is None:
            raise ConfigError(f"{layer!r} keeps no running statistics (track_running_stats)")
        layer.__class__ = _TappedBatchNorm  # same parameters and buffers, same names
        layer.tape, layer.moments, layer.norms = tape, moments, norms
    if fuse_bn and not _fuse_bn(skeleton):
        raise ConfigError("fuse_bn: no BatchNorm of this model is in a models.BasicBlock or "
                          "followed by nn.ReLU in a Sequential")
    return skeleton


def _dream_loss(skeleton: nn.Module, tape: list[torch.Tensor] | None, config: _Config,
                weights: DreamLossWeights, state: dict[str, torch.Tensor],
                x: torch.Tensor) -> torch.Tensor:
    """The dream loss of dreams.dream_loss as one pure function of (state, x).

    The tape is emptied before and after, inside the traced function, so no tensor outlives
    the call (nothing leaks out of vmap) and torch.compile sees no net side effect.
    """
    if tape is not None:
        tape.clear()
    with config.autocast():
        logits = functional_call(skeleton, state, (x,))
    loss = (weights.pred * prediction_entropy(logits.float())
            + weights.tv * total_variation(x) + weights.l2 * torch.linalg.vector_norm(x))
    if tape is not None:
        loss = loss + weights.bn * _bn_term(tape)
        tape.clear()
    return loss


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _layout(modules: Sequence[nn.Module]) -> tuple:
    """Every submodule by name and identity, every parameter and buffer by name, identity,
    memory, shape, strides and dtype: what detached views (and graphs reading them) rest on.

    Walking each module's own dicts instead of named_parameters made the unchanged-layout check
    1.6x faster for resnet18 (benchmarks/param_check_cost.py), host time every client pays at
    every dream step.
    """
    out: list = []
    for module in modules:
        out.append(tuple(module._modules.items()))  # modules compare by identity
        for tensors in (module._parameters, module._buffers):
            out.extend((k, None) if t is None else
                       (k, id(t), t.data_ptr(), t.shape, t.stride(), t.dtype)
                       for k, t in tensors.items())
    return tuple(out)


def _versions(models: Sequence[nn.Module]) -> tuple[int, ...]:
    """In-place updates (optimiser steps, load_state_dict) bump a tensor's version counter."""
    return tuple(t._version for m in models for t in _state(m).values())


class _Config:
    """Device, precision and compile settings shared by the single and batched steps."""

    def __init__(self, device: torch.device, precision: str, channels_last: bool,
                 compile_model: bool, cudnn_benchmark: bool, fullgraph: bool,
                 compile_backend: str, compile_options: Mapping[str, object] | None = None,
                 cuda_graphs: bool = True) -> None:
        check_precision(precision)
        if compile_options and compile_backend != "inductor":
            raise ConfigError("compile_options are inductor settings: they need "
                              "compile_backend='inductor'")
        self.device, self.precision = device, precision
        self.channels_last, self.compile, self.fullgraph = channels_last, compile_model, fullgraph
        self.backend, self.options = compile_backend, dict(compile_options or {})
        self.cuda_graphs = (cuda_graphs and compile_model and device.type == "cuda"
                            and compile_backend == "inductor")
        if cudnn_benchmark and device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, fn):  # type: ignore[no-untyped-def]
        if not self.compile:
            return fn
        fn = with_own_code(fn)  # one Dynamo cache per step (compiling.py says why)
        if not self.options:
            mode = "reduce-overhead" if self.cuda_graphs else None
            return torch.compile(fn, mode=mode, fullgraph=self.fullgraph, backend=self.backend)
        from torch._inductor import list_mode_options

        # Options, not a patched global config: Dynamo reuses a compiled graph for any backend
        # with equal options, so settings patched around the call would never take effect.
        options = {**(list_mode_options("reduce-overhead") if self.cuda_graphs else {}),
                   **self.options}
        try:
            return torch.compile(fn, fullgraph=self.fullgraph, backend=self.backend,
                                 options=options)
        except RuntimeError as exc:
            raise ConfigError(f"compile_options: {str(exc).split(', known options')[0]}"
                              ) from None

    def input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and x.dim() == 4 else torch.preserve_format
        return x.detach().to(self.device, torch.float32).clone(memory_format=fmt)

    def begin(self) -> None:
        if self.cuda_graphs:  # outputs of the previous replay may now be overwritten
            torch.compiler.cudagraph_mark_step_begin()


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ConfigError("model has no parameters") from None


class FastDreamStep:
    """grad_x of one client's dream loss (float32, NCHW), equal to dreams.dream_gradient."""

    def __init__(self, model: nn.Module, weights: DreamLossWeights | None = None, *,
                 use_bn_statistics: bool = True, precision: Precision = "fp32",
                 channels_last: bool = False, compile_model: bool = False,
                 cudnn_benchmark: bool = True, fullgraph: bool = True,
                 compile_backend: str = "inductor", bn_moments: BnMoments = "var_mean",
                 compile_options: Mapping[str, object] | None = None,
                 cuda_graphs: bool = True, stem_channels: int | None = None,
                 bn_norms: BnNorms = "per-layer", fuse_bn: bool = False) -> None:
        self.model, self.weights = model, weights or DreamLossWeights()
        # cuda_graphs=False compiles without graphs of its own, for capture into a larger one
        self.config = _Config(_model_device(model), precision, channels_last, compile_model,
                              cudnn_benchmark, fullgraph, compile_backend, compile_options,
                              cuda_graphs)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # same values, NHWC strides, in place
        self._tape: list[torch.Tensor] | None = [] if use_bn_statistics else None
        self._skeleton = _skeleton(model, self._tape, bn_moments, stem_channels, bn_norms,
                                   fuse_bn)
        self._loss = self.config.wrap(self._loss_fn)
        self._detached: dict[str, torch.Tensor] = {}
        self._modules: list[nn.Module] = []
        self._layout: tuple = ()

    @classmethod
    def optimised(cls, model: nn.Module, weights: DreamLossWeights | None = None,
                  **overrides: object) -> FastDreamStep:
        """bf16 + channels_last + compile with CUDA graphs + one-pass BN moments on CUDA.

        Elsewhere fp32 eager. One-pass moments ("sums") took 2.74 ms per ResNet-18 step on an
        H100 against 2.96 ms with Welford's var_mean (docs/gpu-measurements.md).
        """
        cuda = _model_device(model).type == "cuda"
        options: dict = {"precision": "bf16" if cuda else "fp32", "channels_last": cuda,
                         "compile_model": cuda, "bn_moments": "sums" if cuda else "var_mean"}
        options.update(overrides)
        return cls(model, weights, **options)

    def _loss_fn(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _dream_loss(self._skeleton, self._tape, self.config, self.weights, state, x)

    def _state(self) -> dict[str, torch.Tensor]:
        """Detached views of the live parameters and buffers, rebuilt only when one moved.

        Detached: a compiled backward would otherwise also compute weight gradients. The views
        share storage, so in-place updates (optimiser steps, load_state_dict) are seen; keeping
        the same view objects lets CUDA graphs read them in place as static inputs instead of
        copying every parameter into the graph before each replay.
        """
        if self._modules and _layout(self._modules) == self._layout:
            return self._detached
        self._detached = {k: v.detach() for k, v in _state(self.model).items()}
        if self.config.cuda_graphs:
            for view in self._detached.values():
                torch._dynamo.mark_static_address(view)
        self._modules = list(self.model.modules())
        self._layout = _layout(self._modules)
        return self._detached

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x of the dream loss at x; neither x nor the model's .grad are touched."""
        inputs = self.config.input(x).requires_grad_(True)
        self.config.begin()
        (grad,) = torch.autograd.grad(self._loss(self._state(), inputs), inputs)
        # a fresh NCHW float32 tensor: CUDA-graph outputs are reused by the next replay
        return grad.to(torch.float32).clone(memory_format=torch.contiguous_format)


class BatchedDreamStep:
    """Per-client grad_x for clients sharing one architecture, in one vmapped pass.

    Parameters are stacked (torch.func.stack_module_state) and restacked only when a model's
    tensors changed since the last call.
    """

    def __init__(self, models: Sequence[nn.Module], weights: DreamLossWeights | None = None, *,
                 use_bn_statistics: bool = True, precision: Precision = "fp32",
                 channels_last: bool = False, compile_model: bool = False,
                 cudnn_benchmark: bool = True, fullgraph: bool = True,
                 compile_backend: str = "inductor", bn_moments: BnMoments = "var_mean",
                 compile_options: Mapping[str, object] | None = None,
                 cuda_graphs: bool = True, bn_norms: BnNorms = "per-layer") -> None:
        self.models = list(models)
        if not self.models:
            raise ConfigError("BatchedDreamStep needs at least one model")
        _check_same_architecture(self.models)
        self.weights = weights or DreamLossWeights()
        # cuda_graphs=False: compiled without graphs of its own, for capture into a larger one
        self.config = _Config(_model_device(self.models[0]), precision, channels_last,
                              compile_model, cudnn_benchmark, fullgraph, compile_backend,
                              compile_options, cuda_graphs)
        self._tape: list[torch.Tensor] | None = [] if use_bn_statistics else None
        self._skeleton = _skeleton(self.models[0], self._tape, bn_moments, norms=bn_norms)
        self._stacked: dict[str, torch.Tensor] | None = None
        self._stamp: tuple[int, ...] = ()
        self._losses = self.config.wrap(vmap(self._loss_fn, in_dims=(0, 0)))

    @classmethod
    def optimised(cls, models: Sequence[nn.Module], weights: DreamLossWeights | None = None,
                  **overrides: object) -> BatchedDreamStep:
        """bf16 + torch.compile with CUDA graphs + one-pass BN moments on CUDA; else fp32 eager."""
        cuda = _model_device(models[0]).type == "cuda"
        options: dict = {"precision": "bf16" if cuda else "fp32", "compile_model": cuda,
                         "bn_moments": "sums" if cuda else "var_mean"}
        options.update(overrides)
        return cls(models, weights, **options)

    def _loss_fn(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _dream_loss(self._skeleton, self._tape, self.config, self.weights, state, x)

    def _state(self) -> dict[str, torch.Tensor]:
        stamp = _versions(self.models)
        if self._stacked is None or stamp != self._stamp:
            params, buffers = stack_module_state(self.models)
            self._stacked = {k: v.detach() for k, v in {**params, **buffers}.items()}
            self._stamp = stamp
        return self._stacked

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n_models, *x.shape) float32: row k is grad_x of model k's dream loss."""
        base = self.config.input(x)
        n = len(self.models)
        inputs = base.unsqueeze(0).expand(n, *base.shape).clone().requires_grad_(True)
        self.config.begin()
        losses = self._losses(self._state(), inputs)
        # each client's loss depends on its own copy of x only, so one backward of the sum
        # yields every client's gradient.
        (grad,) = torch.autograd.grad(losses.sum(), inputs)
        return grad.to(torch.float32).clone(memory_format=torch.contiguous_format)


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    reference = architecture(models[0])
    for i, model in enumerate(models[1:], start=1):
        if architecture(model) != reference:
            raise ConfigError(f"model {i} does not share model 0's architecture; use "
                              "dream_gradients for heterogeneous clients")


def group_by_architecture(models: Sequence[nn.Module]) -> list[list[int]]:
    """Indices of `models` grouped by architecture, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, model in enumerate(models):
        groups.setdefault(architecture(model), []).append(i)
    return list(groups.values())


_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def dream_gradients(steps: Sequence[FastDreamStep], x: torch.Tensor, *,
                    overlap: bool = True) -> list[torch.Tensor]:
    """Every client's grad_x at x; on CUDA each client runs on its own stream when overlap.

    Steps replaying CUDA graphs run one after another on the current stream: torch.compile's
    graphs share one memory pool per device, so replays on several streams would overwrite each
    other's buffers (seen on an H100 as NaN gradients). gpu.graphed captures every client in one
    graph instead, for the host gaps between replays.
    """
    if not (overlap and x.is_cuda) or any(step.config.cuda_graphs for step in steps):
        return [step(x) for step in steps]
    main = torch.cuda.current_stream()
    grads = []
    for i, step in enumerate(steps):
        key = (x.device.index or 0, i)
        stream = _STREAMS.setdefault(key, torch.cuda.Stream(device=x.device))
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            grads.append((step(x), stream))
    for grad, stream in grads:
        main.wait_stream(stream)
        grad.record_stream(main)
    return [grad for grad, _ in grads]
