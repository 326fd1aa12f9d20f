"""The Triton kernels compile for an H100 (sm_90) without a GPU: no spills, no duplicated work.

Runs wherever triton is importable (it is not a project dependency): on a CUDA machine, or here
with triton on PYTHONPATH. Compiling ahead of time needs no device: Triton's front end, its MLIR
passes and the ptxas bundled with its wheel all run on the CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces compilation", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from codream_secure.gpu import _chacha20_triton as kernels  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
KEYS = {"key_ptr": "*i32", "nonce_ptr": "*i32", "sign_ptr": "*i32"}


def threads_per_element(ttgir: str, block: int) -> float:
    """How many threads hold each element of the kernel's BLOCK-long vectors (1: none twice)."""
    layout = re.search(r"#blocked = #ttg.blocked<\{sizePerThread = \[(\d+)\], threadsPerWarp = "
                       r"\[(\d+)\], warpsPerCTA = \[(\d+)\]", ttgir)
    assert layout, ttgir[:500]
    per_thread, lanes, warps = map(int, layout.groups())
    return lanes * warps / (block / per_thread)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) as `ptxas -v` reports them for sm_90a."""
    # the ptxas Triton itself uses (TRITON_PTXAS_PATH, its wheel's, or the CUDA toolkit's):
    # a CUDA machine's triton need not ship one at backends/nvidia/bin; the PTX goes in a file,
    # as Triton passes it, since not every ptxas reads stdin
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(source), "-o",
                              os.devnull], capture_output=True, text=True)
    report = run.stderr
    assert run.returncode == 0, f"{ptxas} failed ({run.returncode}): {report[-2000:]}"
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    assert registers and spills, report
    return int(registers.group(1)), int(spills.group(1))


def compile_for_h100(fn, signature: dict, constexprs: dict, num_warps: int) -> tuple[int, int]:
    """(registers, spill bytes) of fn built as the launcher builds it; no element computed twice."""
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=H100,
                              options={"num_warps": num_warps})
    assert threads_per_element(compiled.asm["ttgir"], constexprs["BLOCK"]) == 1
    return ptxas_usage(compiled.asm["ptx"])


def test_keystream_kernel_compiles_without_spills():
    registers, spills = compile_for_h100(
        kernels._chacha20_kernel,
        {"key_ptr": "*i32", "nonce_ptr": "*i32", "out_ptr": "*i32", "total_blocks": "i32",
         "blocks_per_key": "i32", "BLOCK": "constexpr"}, {"BLOCK": kernels._BLOCK},
        kernels._WARPS)
    assert spills == 0 and registers <= 64


# Observed with triton 3.6.0: 63 registers for 4-16 masks and 2-64 uploads once the mask and
# row loops are loops (up to 120 for 1-2 masks, which still get unrolled); unrolled at compile
# time the upload kernel took 167 registers for 4 masks and spilled about 1 KiB per thread for
# 16, the unmask kernel spilled from 16 uploads on (6.7 KiB at 64). Spills are what cost: each
# spilled value goes through local memory, once per ChaCha20 round for the mask loop.
@pytest.mark.parametrize(("n_masks", "n_rows"), [(2, 4), (4, 4), (16, 4), (4, 16), (16, 64)])
@pytest.mark.parametrize("ring_bits", [16, 32])
def test_fused_kernels_compile_without_spills(n_masks, n_rows, ring_bits):
    upload = compile_for_h100(
        kernels._masked_upload_kernel,
        {"x_ptr": "*fp32", **KEYS, "out_ptr": "*i32", "n": "i32", "scale": "fp32",
         "limit": "fp32", "N_MASKS": "constexpr", "RING_BITS": "constexpr", "BLOCK": "constexpr"},
        {"N_MASKS": n_masks, "RING_BITS": ring_bits, "BLOCK": kernels._FUSED_BLOCK},
        kernels._FUSED_WARPS)
    unmask = compile_for_h100(
        kernels._unmask_sum_kernel,
        {"u_ptr": "*i32", **KEYS, "out_ptr": "*fp32", "n": "i32", "m": "i32",
         "inv_scale": "fp32", "N_ROWS": "constexpr", "N_MASKS": "constexpr",
         "RING_BITS": "constexpr", "BLOCK": "constexpr"},
        {"N_ROWS": n_rows, "N_MASKS": n_masks, "RING_BITS": ring_bits,
         "BLOCK": kernels._FUSED_BLOCK},
        kernels._FUSED_WARPS)
    for registers, spills in (upload, unmask):
        assert spills == 0 and registers <= 255


@pytest.mark.parametrize("has_res, relu", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("block_c, tiles", [(64, 8), (64, 1), (8, 1)])
def test_bn_act_moments_kernel_compiles_without_spills(has_res, relu, block_c, tiles):
    from codream_secure.gpu import _bn_act_triton as bn

    signature = {"x_ptr": "*bf16", "res_ptr": "*bf16", "mean_ptr": "*fp32", "var_ptr": "*fp32",
                 "weight_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*bf16",
                 "part_ptr": "*fp32", "M": "i32", "C": "i32", "eps": "fp32",
                 "HAS_RES": "constexpr", "RELU": "constexpr", "HAS_WEIGHT": "constexpr",
                 "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
                 "TILES": "constexpr"}
    constexprs = {"HAS_RES": has_res, "RELU": relu, "HAS_WEIGHT": True, "HAS_BIAS": True,
                  "BLOCK_M": bn.BLOCK_M, "BLOCK_C": block_c, "TILES": tiles}
    compiled = triton.compile(ASTSource(bn._bn_act_moments_kernel, signature, constexprs),
                              target=H100, options={"num_warps": bn._WARPS})
    registers, spills = ptxas_usage(compiled.asm["ptx"])
    # observed with triton 3.9.0: 56-96 registers; 64-row tiles took up to 190
    assert spills == 0 and registers <= 96, (registers, spills)
