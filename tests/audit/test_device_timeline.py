"""The profile's kernel breakdown: kinds from real kernel names, busy and idle time per step."""

import pytest

from codream_secure.audit.device.timing import (
    SHORT_GAP_US,
    device_timeline,
    kernel_kind,
    render_timeline,
)

# names as an H100 profile of the optimised step printed them (torch 2.11, cuDNN on sm_90)
H100_NAMES = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution (cuDNN fprop)",
    "sm90_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32": (
        "convolution input gradient (cuDNN dgrad)"),
    "void convolve_common_engine_float_NHWC<__nv_bfloat16, 3, 1>": (
        "generic cuDNN convolution (no tensor cores)"),
    "triton_red_fused__to_copy_mean_pow_2": "inductor reduction",
    "triton_per_fused_add_linalg_vector_norm_7": "inductor reduction",
    "triton_poi_fused__native_batch_norm_legit_no_training_relu_4": "inductor pointwise",
    "triton_poi_fused__to_copy_34": "inductor pointwise",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "matrix product",
    "Memcpy DtoD (Device -> Device)": "copy or fill",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": (
        "copy or fill"),
    "void at::native::reduce_kernel<512, 1>": "other",
}


@pytest.mark.parametrize("name", sorted(H100_NAMES))
def test_kernel_kinds_of_real_kernel_names(name):
    assert kernel_kind(name) == H100_NAMES[name]


def test_timeline_splits_idle_time_into_launch_gaps_and_waits():
    # two steps of three kernels: a 2 us launch gap, then a 30 us wait, per step
    kernels = []
    for base in (0.0, 1000.0):
        kernels += [("triton_poi_fused_relu_0", base, base + 10),
                    ("sm90_xmma_fprop_implicit_gemm", base + 12, base + 20),
                    ("triton_red_fused_mean_1", base + 50, base + 60)]
    t = device_timeline(kernels, steps=2)
    assert t["kernels_per_step"] == 3
    assert t["busy_ms"] == pytest.approx(28 / 1e3)
    assert t["span_ms"] == pytest.approx(1060 / 2 / 1e3)
    # inside the span: 2 + 30 per step, and the 940 us between the steps (a wait)
    assert t["short_gaps_ms"] == pytest.approx(2 / 1e3)
    assert t["long_gaps_ms"] == pytest.approx((30 + 30 + 940) / 2 / 1e3)
    assert t["long_gaps_per_step"] == 1.5
    assert t["idle_inside_span_ms"] == pytest.approx(t["short_gaps_ms"] + t["long_gaps_ms"])
    assert t["kinds"]["convolution (cuDNN fprop)"] == {"per_step": 1, "ms": pytest.approx(0.008)}
    assert list(t["kinds"])[-1] == "convolution (cuDNN fprop)"  # 8 us: sorted by time


def test_overlapping_kernels_count_once_as_busy():
    t = device_timeline([("a", 0.0, 10.0), ("b", 5.0, 15.0), ("c", 8.0, 9.0),
                         ("d", 15.0 + SHORT_GAP_US, 30.0)], steps=1)
    assert t["busy_ms"] == pytest.approx((15 + 30 - 15 - SHORT_GAP_US) / 1e3)
    assert t["short_gaps_ms"] == 0 and t["long_gaps_ms"] == pytest.approx(SHORT_GAP_US / 1e3)
    assert t["kinds"]["other"]["per_step"] == 4


def test_no_kernels_and_bad_steps():
    assert device_timeline([], steps=3)["busy_ms"] == 0
    assert "0 kernels" in render_timeline(device_timeline([], steps=3))
    with pytest.raises(ValueError, match="steps"):
        device_timeline([("a", 0.0, 1.0)], steps=0)


def test_render_names_every_kind_with_its_time():
    text = render_timeline(device_timeline(
        [("sm90_xmma_dgrad_x", 0.0, 500.0), ("triton_poi_fused_y", 503.0, 600.0)], steps=1))
    assert "2 kernels and copies per step" in text and "idle 0.003 ms" in text
    assert "convolution input gradient (cuDNN dgrad)" in text and "0.500" in text
