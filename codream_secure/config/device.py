"""[device]: where torch computes, in which precision, and the expert GPU switches."""

from __future__ import annotations

from dataclasses import dataclass

from codream_secure.config.checks import Checks, cuda_available, max_threads
from codream_secure.config.section import Section

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
MASKINGS: tuple[str, ...] = ("auto", "host", "device")
TRAIN_CUDA_GRAPHS: tuple[str, ...] = ("off", "on")
DREAM_GRAPHS: tuple[str, ...] = ("per-client", "one")


@dataclass(frozen=True)
class DeviceConfig(Section):
    """Device and precision; masking placement, CUDA graphs and CPU threads (expert keys)."""

    SECTION = "device"

    device: str = "auto"
    precision: str = "fp32"
    masking: str = "auto"
    train_cuda_graphs: str = "off"
    dream_graph: str = "per-client"
    threads: int = 0

    def validate(self, check: Checks) -> None:
        check.choice("device", self.device, DEVICES)
        check.choice("precision", self.precision, PRECISIONS)
        check.choice("masking", self.masking, MASKINGS)
        if self.device == "cuda" and not cuda_available():
            raise check.fail("device", "'cuda' requested but torch sees no CUDA device; "
                                       "use --device cpu or auto")
        check.choice("train_cuda_graphs", self.train_cuda_graphs, TRAIN_CUDA_GRAPHS)
        if self.train_cuda_graphs == "on":
            self._need_cuda_bf16(check, "train_cuda_graphs",
                                 "'on' graphs the compiled bf16 training path")
        check.choice("dream_graph", self.dream_graph, DREAM_GRAPHS)
        if self.dream_graph == "one":
            self._need_cuda_bf16(check, "dream_graph", "'one' captures every client's compiled "
                                                       "bf16 dream step in one CUDA graph")
        # thousands of threads hang or crash torch's and OpenBLAS's thread pools
        check.count("threads", self.threads, minimum=0, maximum=max_threads())

    def _need_cuda_bf16(self, check: Checks, key: str, what: str) -> None:
        no_cuda = self.device == "cpu" or (self.device == "auto" and not cuda_available())
        if no_cuda or self.precision != "bf16":
            found = "no CUDA device" if no_cuda else f"precision {self.precision!r}"
            raise check.fail(key, f"{what}, which needs CUDA and --precision bf16; got {found}")
