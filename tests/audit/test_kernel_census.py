"""audit.device.codegen: counting an inductor module's launches and bytes; its CLI."""

import importlib.util
import json

import pytest

from codream_secure.audit.device import codegen

QUOTES = "'" * 3


def kernel(name: str, gb: float | None) -> str:
    """One kernel definition as inductor writes it into an output module."""
    meta = f"'kernel_name': '{name}'" + (f", 'kernel_num_gb': {gb}" if gb is not None else "")
    return (f"{name} = async_compile.triton('{name}', {QUOTES}\n"
            f"@triton_heuristics.pointwise(size_hints={{'x': 16777216}}, "
            f"inductor_meta={{{meta}}})\n@triton.jit\ndef {name}(in_ptr0, out_ptr0, xnumel):\n"
            f"    # triton_red_fused_sum_1.run( in a kernel's source is not a launch\n"
            f"    tmp0 = tl.load(in_ptr0 + x0)\n{QUOTES}, device_str='cuda')\n")


MODULE = (kernel("triton_poi_fused_relu_0", 0.0671)
          + kernel("triton_red_fused_sum_1", 0.0336)
          + kernel("triton_per_fused_norm_2", None)
          + "\nclass Runner:\n    def call(self, args):\n"
          + "        triton_poi_fused_relu_0.run(buf0, buf1, 16777216, stream=stream0)\n"
          + "        buf2 = extern_kernels.convolution(buf1, arg1)\n"
          + "        triton_red_fused_sum_1.run(buf1, buf2, 64, 262144, stream=stream0)\n"
          + "        triton_poi_fused_relu_0.run(buf2, buf3, 16777216, stream=stream0)\n"
          + "        triton_per_fused_norm_2.run(buf3, buf4, 1, 64, stream=stream0)\n")


def test_a_module_counts_each_launch_with_its_kernels_bytes():
    census = codegen.census_module(MODULE)
    assert census.launches == {"poi": 2, "red": 1, "per": 1}
    assert census.megabytes["poi"] == pytest.approx(2 * 67.1)
    assert census.megabytes["red"] == pytest.approx(33.6)
    assert census.unsized == {"per": 1}  # no estimate: counted, not given bytes
    assert census.largest(1) == [(pytest.approx(134.2), 2, "triton_poi_fused_relu_0")]
    summary = census.summary()
    assert summary["launches"] == 4 and summary["MB"] == pytest.approx(167.8)
    assert summary["by_kind"]["persistent reduction"] == {"launches": 1, "MB": 0}
    assert summary["launches_without_estimate"] == 1


def test_a_folder_sums_modules_and_skips_files_that_launch_nothing(tmp_path):
    for name in ("ab/forward.py", "cd/backward.py"):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text(MODULE)
    (tmp_path / "ef").mkdir()
    # a kernel file without a wrapper, and an unrelated source
    (tmp_path / "ef/kernel.py").write_text(kernel("triton_poi_fused_relu_0", 0.5))
    (tmp_path / "ef/other.py").write_text("x.run(1)\n")
    census = codegen.census_dir(tmp_path)
    assert census.modules == 2
    assert census.launches == {"poi": 4, "red": 2, "per": 2}
    assert census.megabytes["poi"] == pytest.approx(4 * 67.1)


def test_census_cli_prints_and_writes_json(tmp_path, capsys):
    (tmp_path / "cache/ab").mkdir(parents=True)
    (tmp_path / "cache/ab/module.py").write_text(MODULE)
    out = tmp_path / "census.json"
    assert codegen.main(["--census", str(tmp_path / "cache"), "--top", "1",
                         "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 launches, 168 MB" in printed and "2 x triton_poi_fused_relu_0" in printed
    (summary,) = json.loads(out.read_text()).values()
    assert summary["by_kind"]["reduction"] == {"launches": 1, "MB": 33.6}


def test_census_cli_lists_each_module_on_request(tmp_path, capsys):
    for name, text in (("ab/forward.py", MODULE), ("cd/backward.py", kernel("triton_poi_x_0", 1)
                       + "def call(args):\n    triton_poi_x_0.run(a, b, 8)\n")):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text(text)
    assert codegen.main(["--census", str(tmp_path), "--modules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("5 launches, 1168 MB; persistent reduction 1 (0 MB), pointwise 3 "
                             "(1134 MB), reduction 1 (34 MB)")
    assert lines[1:] == ["  ab/forward.py: 4 launches, 168 MB; persistent reduction 1 (0 MB), "
                         "pointwise 2 (134 MB), reduction 1 (34 MB)",
                         "  cd/backward.py: 1 launches, 1000 MB; pointwise 1 (1000 MB)"]


@pytest.mark.parametrize("argv, message", [
    (["--census", "{tmp}/absent"], "no folder"),
    (["--census", "{tmp}"], "no inductor output module"),
    (["--variants", "coordesc"], "coordesc not among"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--modules"], "--modules lists the modules of a --census DIR"),
])
def test_bad_arguments_exit_2_naming_the_problem(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        codegen.main([a.format(tmp=tmp_path) for a in argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="triton is here")
def test_generating_without_triton_says_what_to_install(capsys):
    with pytest.raises(SystemExit) as stop:
        codegen.main(["--variants", "default"])
    assert stop.value.code == 2 and "pip install triton" in capsys.readouterr().err


def test_tuning_only_variants_are_not_offered():
    variants = codegen.structural_variants()
    assert variants[0] == "default"
    assert {"no-bn-term", "grouped-bn-norms", "combined", "tile-reductions"} <= set(variants)
    assert not {"coordesc", "autotune-pointwise", "max-autotune"} & set(variants)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_generated_kernels_show_the_bn_terms_traffic(tmp_path):
    out = tmp_path / "census.json"
    assert codegen.main(["--variants", "default,no-bn-term", "--model", "resnet8",
                         "--batch", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    default, plain = result["default"], result["no-bn-term"]
    assert default["modules"] == 2 and default["launches_without_estimate"] == 0
    # the BN-statistics term reads each BatchNorm input once more and adds reductions
    assert default["MB"] > plain["MB"] > 0
    assert default["by_kind"]["reduction"]["launches"] > plain["by_kind"].get(
        "reduction", {"launches": 0})["launches"]
