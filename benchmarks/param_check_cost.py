"""Host time of FastDreamStep's "have the parameters moved?" check, against the named walk.

`python benchmarks/param_check_cost.py [MODEL]`: microseconds per check for the check the step
runs (each module's own dicts) and for the walk it replaced (named_parameters + named_buffers
and a layout tuple), timed in turn three times in one run; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import time

import torch

from codream_secure.gpu.fast_dream import FastDreamStep, _state
from codream_secure.models import MODEL_NAMES, build_model


def per_call_us(fn, calls: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/param_check_cost.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet18", choices=MODEL_NAMES,
                        help="zoo model, CIFAR-shaped input (default resnet18)")
    name = parser.parse_args(argv).model
    model = build_model(name, input_shape=(3, 32, 32), num_classes=10).eval()
    step = FastDreamStep(model)
    step._state()

    def named_walk() -> tuple:
        return tuple((k, v.data_ptr(), v.shape, v.stride(), v.dtype)
                     for k, v in _state(model).items())

    print(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for _ in range(3):
        walk, check = per_call_us(named_walk), per_call_us(step._state)
        print(f"named walk {walk:.0f} us, FastDreamStep check {check:.0f} us, "
              f"ratio {walk / check:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
