"""Probe: does inductor fuse one BN layer's moments into its BN/ReLU pass?

Run from the repository root where triton is installed (the CPU wheel is enough):
    python docs/results/codegen-fusion-probe-2026-11-27.py \
        > docs/results/codegen-fusion-probe-2026-11-27.txt
Each form and setting compiles in its own process; printed: launches and MB by kind.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

FORMS = ("dims", "view2d", "manual_t")
SETTINGS = ({}, {"split_reductions": False},
            {"triton.tiling_prevents_reduction_fusion": False,
             "triton.tiling_prevents_pointwise_fusion": False},
            {"triton.tile_reductions": True, "triton.prefer_nd_tiling": True},
            {"triton.cooperative_reductions": True},
            {"aggressive_fusion": True, "split_reductions": False})


def layer(form: str, settings: dict) -> None:
    """Compile relu(x*a+b) and x's per-channel sums and sums of squares, on stub kernels."""
    import torch
    import torch._inductor.config as inductor

    from codream_secure.audit.device.codegen import _codegen_only

    _codegen_only()
    inductor.cpu_backend, inductor.benchmark_kernel = "triton", True
    for key, value in settings.items():
        owner, *path = inductor, *key.split(".")
        for name in path[:-1]:
            owner = getattr(owner, name)
        setattr(owner, path[-1], value)
    n, c, h, w, split = 256, 64, 32, 32, 128

    def f(x, a, b):
        y = torch.relu(x * a.view(1, c, 1, 1) + b.view(1, c, 1, 1))
        if form == "dims":
            xf = x.float()
            return y, xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))
        v = x.permute(0, 2, 3, 1).reshape(-1, c)  # the channels_last storage as (NHW, C)
        if form == "view2d":
            vf = v.float()
            return y, vf.sum(0), (vf * vf).sum(0)
        # (S, C, R): the split reduction's own loop order, the BN/ReLU pass on the same view
        v = v.reshape(split, -1, c).permute(0, 2, 1)
        yv = torch.relu(v * a.view(1, c, 1) + b.view(1, c, 1))
        y = yv.permute(0, 2, 1).reshape(n, h, w, c).permute(0, 3, 1, 2)
        vf = v.float()
        return y, vf.sum(2).sum(0), (vf * vf).sum(2).sum(0)

    x = torch.randn(n, c, h, w).to(torch.bfloat16).to(memory_format=torch.channels_last)
    torch.compile(f)(x, torch.randn(c), torch.randn(c))


def main() -> None:
    from codream_secure.audit.device.codegen import census_dir

    for settings in SETTINGS:
        for form in FORMS:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                subprocess.run([sys.executable, __file__, form, json.dumps(settings)],
                               env=env, check=True, capture_output=True)
                s = census_dir(Path(cache)).summary()
            kinds = ", ".join(f"{k} {v['launches']} ({v['MB']:.0f} MB)"
                              for k, v in s["by_kind"].items())
            print(f"{form:9s} {json.dumps(settings)}: {s['launches']} launches; {kinds}",
                  flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        layer(sys.argv[1], json.loads(sys.argv[2]))
    else:
        main()
