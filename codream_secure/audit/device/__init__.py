"""Device benchmark: fp32 eager vs optimised dream step, secure vs plain dream round, ChaCha20.

    python -m codream_secure.audit.device             # the full run on a CUDA machine (< 5 minutes)
    python -m codream_secure.audit.device --quick     # a CPU smoke run with tiny shapes

One run measures, on one device: the bf16 matrix-product ceiling; the dream step of ResNet-18
(CIFAR, batch 256) in fp32 eager (ours, and as CoDream's published code runs it) and optimised
(bf16 autocast, channels_last, torch.compile with CUDA graphs), with FLOPs counted by
FlopCounterMode; the time of a 4-client heterogeneous dream round with device-side secure
aggregation (ChaCha20 masks, host key schedule and Shamir shares per step) against the same
round with a plain sum; same-architecture clients vmapped; and the keystream rate of every
ChaCha20 backend. Prints a table and writes device.json / device.md.

Modules: `timing` (timers, agreement, profiles), `step` (the step and batched sections),
`rounds` (the round section), `keystream`, `report` (files and progress lines), `cli` (main);
`codegen` counts the step's generated kernels on a CPU
(python -m codream_secure.audit.device.codegen).
"""

from codream_secure.audit.device.cli import SECTIONS, main
from codream_secure.audit.device.step import OFFICIAL, STEP_VARIANTS

__all__ = ["OFFICIAL", "SECTIONS", "STEP_VARIANTS", "main"]
