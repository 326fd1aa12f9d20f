"""The device benchmark's CPU smoke run: rows, the official-code baseline, failed sections."""

import json

import pytest
import torch

from codream_secure.audit import device
from codream_secure.audit.device import step as device_step
from codream_secure.gpu.fast_dream import FastDreamStep
from codream_secure.models import build_model


def run(tmp_path, *argv):
    assert device.main(["--quick", "--out", str(tmp_path), *argv]) == 0
    return json.loads((tmp_path / "device.json").read_text())


def test_step_rows_include_the_official_code_baseline(tmp_path):
    result = run(tmp_path, "--sections", "step", "--step-variants", "var-mean")
    rows = {r["variant"]: r for r in result["dream_step"]}
    official = rows[device.OFFICIAL]
    # the published code's hook and loss.backward() give our gradient (fp32 summation order)
    assert official["rel_err"] < 1e-5
    assert official["speedup_vs_official"] == pytest.approx(1.0)
    welford = rows["optimised, var-mean"]
    assert welford["rel_err"] < 1e-5 and welford["ms"] > 0
    eager = rows["fp32 eager (dreams.dream_gradient)"]
    assert eager["speedup_vs_official"] == pytest.approx(official["ms"] / eager["ms"])
    assert result["errors"] == {} and "--step-variants var-mean" in result["command"]


def test_the_run_records_the_tf32_switches_its_fp32_rows_ran_under(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    result = run(tmp_path, "--sections", "keystream")
    assert result["fp32_settings"] == {"cudnn_allow_tf32": False,
                                       "float32_matmul_precision": "high"}
    assert ("cuDNN TF32 off, float32 matmul precision 'high'"
            in (tmp_path / "device.md").read_text())


def test_a_failed_section_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(device_step, "batched_rows", broken)
    result = run(tmp_path, "--sections", "batched,keystream")
    assert result["errors"] == {"batched": "RuntimeError: no kernel for you"}
    assert result["batched"] == [] and len(result["keystream"]) >= 2
    assert "no kernel for you" in (tmp_path / "device.md").read_text()


@pytest.mark.parametrize(("argv", "names"), [
    (["--step-variants", "warp-drive"], "--step-variants"),
    (["--sections", "step,teleport"], "--sections"),
    (["--round-steps", "0"], "--round-steps"),
    (["--batch", "many"], "--batch"),
    (["--device", "abacus"], "--device"),
] + ([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else []))
def test_bad_arguments_exit_2_naming_the_flag(capsys, argv, names):
    with pytest.raises(SystemExit) as exit_info:
        device.main(["--quick", *argv])
    assert exit_info.value.code == 2
    assert names in capsys.readouterr().err


def test_round_profile_splits_each_variant_by_phase(tmp_path):
    result = run(tmp_path, "--sections", "round", "--profile")
    names = [r["aggregation"] for r in result["round"]]
    assert names[:5] == ["plain", "plain, nothing leaves the device", "secure",
                         "plain, NaN checked at the round's end",
                         "secure, NaN checked at the round's end"]
    deferred = result["round"][4]
    assert deferred["ratio_same_check"] == pytest.approx(
        deferred["ms_per_step"] / result["round"][3]["ms_per_step"])
    assert "sync audit skipped: needs CUDA" in (tmp_path / "profile-round.txt").read_text()
    text = (tmp_path / "profile-round.txt").read_text()
    for name in names:
        assert f"## {name}\n" in text
    for label in ("round.gradients", "plain.send_copies", "secure.server_shamir",
                  "secure.server_unmask_sum"):
        assert label in text
    secure = next(r for r in result["round"] if r["aggregation"] == "secure")
    assert secure["max_abs_error"] <= secure["bound"]


def test_training_rows_time_each_job_eager_and_traced_from_one_initial_model(tmp_path):
    result = run(tmp_path, "--sections", "train")
    rows = {(r["job"], r["variant"]): r for r in result["training"]}
    assert set(rows) == {(job, variant) for job in ("local training", "distillation")
                         for variant in ("fp32 eager", "fp32 traced (aot_eager)")}
    for job in ("local training", "distillation"):
        eager, traced = rows[(job, "fp32 eager")], rows[(job, "fp32 traced (aot_eager)")]
        # one initial model, the same batches: the traced step trains what the eager one does
        assert traced["first_epoch_loss"] == pytest.approx(eager["first_epoch_loss"], rel=1e-5)
        assert eager["speedup"] == pytest.approx(1.0)
        assert traced["speedup"] == pytest.approx(eager["ms"] / traced["ms"])
        assert traced["gflop"] > 0 and traced["tflops"] > 0
    assert "| distillation | fp32 traced (aot_eager) |" in (tmp_path / "device.md").read_text()


def test_graphed_round_rows_on_a_cpu_stand_in(monkeypatch):
    # GraphedDreamGradients needs CUDA; a stand-in with its interface (n_models, a call
    # returning every client's gradient) runs the section's timing, checks and table code here
    import argparse

    from codream_secure.audit.device import rounds
    from codream_secure.gpu import graphed
    from codream_secure.gpu.fast_dream import FastDreamStep

    class StandIn:
        def __init__(self, models, x_shape, weights):
            self.steps = [FastDreamStep(m, weights) for m in models]
            self.n_models = len(self.steps)

        def __call__(self, x):
            return [step(x) for step in self.steps]

    monkeypatch.setattr(graphed, "GraphedDreamGradients", StandIn)
    args = argparse.Namespace(batch=4, shape=(3, 8, 8), round_models="resnet8,smallcnn,smallcnn",
                              clip=8.0, round_repeats=1, round_steps=2, iters=1, profile=True)
    rows = rounds.graphed_rows(args, torch.device("cpu"))
    assert [r["aggregation"] for r in rows] == ["plain", "plain, nothing leaves the device",
                                                "secure", "plain" + rounds.DEFERRED,
                                                "secure" + rounds.DEFERRED]
    secure = rows[2]
    assert secure["max_abs_error"] <= secure["bound"] and rows[0]["ratio"] == 1.0
    assert rows[0]["one_replay_ms"] > 0 and "## secure, one graph" in args.graphed_profile_text


def test_secure_round_check_bounds_float32_rounding_and_refuses_a_wrong_sum(monkeypatch):
    # sums near 3 * clip sit where one float32 ulp (2^-19) far exceeds n * 2^-f (2^-24.4): the
    # check must allow the decoded sum's one float32 rounding, and nothing more
    import math

    from codream_secure.audit.device import rounds

    secure = rounds.SecureRound(3, 4096, clip=8.0, device=torch.device("cpu"), fused=False,
                                side_stream=False)
    gen = torch.Generator().manual_seed(0)
    grads = [7.5 + 0.4 * torch.rand(4096, generator=gen) for _ in range(3)]
    report = secure.check(grads, step=0)
    units = 3 * math.ldexp(1.0, -secure.codec.scale_bits)
    assert units < report["max_abs_error"] <= report["bound"] <= units + math.ldexp(24.0, -24)

    honest_total = secure.total
    monkeypatch.setattr(secure, "total",
                        lambda g, step: honest_total(g, step) + 4 * math.ldexp(1.0, -19))
    with pytest.raises(AssertionError, match="differs from the plain sum"):
        secure.check(grads, step=1)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_secure_round_shares_with_the_protocols_threshold_down_to_two_clients(n):
    from codream_secure.audit.device import rounds
    from protocols.plan import majority_threshold

    secure = rounds.SecureRound(n, 256, clip=8.0, device=torch.device("cpu"), fused=False,
                                side_stream=False)
    assert secure.threshold == majority_threshold(n) <= n - 1
    gen = torch.Generator().manual_seed(n)
    report = secure.check([torch.randn(256, generator=gen) for _ in range(n)], step=0)
    assert report["max_abs_error"] <= report["bound"]
    assert len(secure.step_keys(0, 0).shares) == n - 1


def _round_inputs(n=3, m=64, bad=None):
    """Per-step gradients of n clients; `bad` = (client, step) gets a NaN and an inf."""
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(m, generator=gen) for _ in range(n)]

    def gradients(x, step):
        grads = [g + 0.01 * step for g in base]
        if bad is not None and step == bad[1]:
            grads[bad[0]] = grads[bad[0]].clone()
            grads[bad[0]][[3, 9]] = torch.tensor([float("nan"), float("inf")])
        return grads
    return gradients


@pytest.mark.parametrize("kind", ["plain", "secure"])
def test_a_deferred_check_refuses_the_round_at_its_end_naming_client_and_step(kind):
    from codream_secure.audit.device import rounds
    from codream_secure.dreams import NonFiniteGradientError

    def make(deferred):
        if kind == "plain":
            return rounds.PlainRound(3, 64, device=torch.device("cpu"), send=True,
                                     deferred_check=deferred)
        return rounds.SecureRound(3, 64, clip=8.0, device=torch.device("cpu"), fused=False,
                                  side_stream=False, deferred_check=deferred)

    gradients = _round_inputs(bad=(2, 3))
    every_step, deferred = make(False), make(True)
    with pytest.raises(NonFiniteGradientError):
        every_step.total(gradients(None, 3), step=3)  # refused at once
    totals = [deferred.total(gradients(None, step), step=step) for step in range(1, 6)]
    assert all(bool(torch.isfinite(t).all()) for t in totals)  # zeroed, never NaN or garbage
    # the zeroed values entered the sum as 0 (within the codec's rounding for the secure sum)
    zeroed = gradients(None, 3)
    zeroed[2] = torch.nan_to_num(zeroed[2], nan=0.0, posinf=0.0, neginf=0.0)
    torch.testing.assert_close(totals[2], torch.stack(zeroed).sum(0), atol=1e-6, rtol=0)
    with pytest.raises(NonFiniteGradientError, match=r"client 2's dream gradient .* at step 3"):
        deferred.finish()
    deferred.finish()  # the flags were consumed: the next round starts clean


def test_deferred_and_per_step_checks_give_the_same_plain_round():
    from codream_secure.audit.device import rounds

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(48, generator=gen) for _ in range(3)]

    def gradients(x):
        return [torch.tanh(w * x.reshape(-1)).reshape(x.shape) for w in weights]

    x0 = torch.randn(3, 4, 4, generator=gen)
    cpu = torch.device("cpu")
    a = rounds.dream_round(gradients, x0, 5, aggregator=rounds.PlainRound(3, 48, device=cpu,
                                                                        send=False))
    b = rounds.dream_round(gradients, x0, 5, aggregator=rounds.PlainRound(
        3, 48, device=cpu, send=False, deferred_check=True))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["plain", "secure"])
def test_a_deferred_round_never_makes_the_host_wait_before_its_end(kind, monkeypatch):
    # torch's sync debug mode raises on any implicit synchronisation and names the op: a
    # deferred round's steps must have none (the host then runs ahead of the device)
    from codream_secure.audit.device import rounds

    cuda = torch.device("cuda")
    m, n = 4096, 3
    aggregator = (rounds.PlainRound(n, m, device=cuda, send=True, deferred_check=True)
                  if kind == "plain" else
                  rounds.SecureRound(n, m, clip=8.0, device=cuda, deferred_check=True))
    weights = [torch.randn(m, device=cuda) for _ in range(n)]

    def gradients(x):
        return [torch.tanh(w * x.reshape(-1)).reshape(x.shape) for w in weights]

    x0 = torch.randn(4, 32, 32, device=cuda)
    rounds.dream_round(gradients, x0, 2, aggregator=aggregator)  # warm: kernels, pinned pools
    torch.cuda.synchronize()
    finish = aggregator.finish
    monkeypatch.setattr(aggregator, "finish", lambda: None)
    torch.cuda.set_sync_debug_mode("error")
    try:
        rounds.dream_round(gradients, x0, 3, aggregator=aggregator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    finish()  # the round's one synchronisation: all steps were finite


def test_targets_read_the_default_step_and_each_secure_rounds_own_plain():
    from codream_secure.audit.device import targets

    result = {
        "dream_step": [
            {"variant": "fp32 eager (dreams.dream_gradient)", "ms": 14.0},
            {"variant": "optimised (bf16, channels_last=True, compile=True)", "ms": 2.6,
             "speedup_vs_official": 8.4},
            {"variant": "optimised, no-bn-term", "ms": 2.2},  # another loss: never "fastest"
            {"variant": "optimised, coordesc", "ms": 2.45},
            {"variant": "optimised, max-autotune", "error": "timed out"}],
        "round": [{"aggregation": "plain", "ratio_same_check": 1.0, "ms_per_step": 10.0},
                  {"aggregation": "secure", "ratio_same_check": 1.14, "ms_per_step": 11.4},
                  {"aggregation": "secure, unfused kernels", "ratio_same_check": 1.3,
                   "ms_per_step": 13.0}],
        "round_graphed": [{"aggregation": "secure, NaN checked at the round's end",
                           "ratio_same_check": 1.08, "ms_per_step": 8.1}]}
    step, speedup, secure, table = targets.targets(result, model="resnet18", batch=256)
    assert (step["measured"], step["verdict"]) == (2.6, "missed")
    assert "coordesc 2.45 ms" in step["detail"]
    assert (speedup["measured"], speedup["verdict"]) == (8.4, "missed")
    assert (secure["measured"], secure["verdict"]) == (1.08, "met")
    assert "unfused" not in secure["detail"] and "round: secure x1.140" in secure["detail"]
    assert table["verdict"] == "not measured"  # no section times in this result
    empty = targets.targets({"dream_step": [], "round": []}, model="resnet18", batch=256)
    assert [t["verdict"] for t in empty] == ["not measured"] * 4


def _timed_result(seconds, sections, extras=None, **more):
    return {"dream_step": [], "round": [], "seconds": seconds,
            "default_sections": ["step", "keystream", "graphed", "round"],
            "section_seconds": sections, "extra_seconds": extras or {}, **more}


def test_the_tables_wall_time_leaves_out_extras_and_other_sections():
    from codream_secure.audit.device import targets

    sections = {"step": 120.0, "keystream": 6.0, "graphed": 95.0, "round": 100.0,
                "batched": 80.0}
    result = _timed_result(405.0, sections, {"step variants": 70.0, "profiles": 20.0})
    table = targets.targets(result, model="resnet18", batch=256)[3]
    assert table["measured"] == pytest.approx(405 - 70 - 20 - 80)  # 235 s
    assert table["verdict"] == "met"
    assert "step variants 70 s" in table["detail"] and "other sections 80 s" in table["detail"]
    slow = targets.targets(_timed_result(320.0, {**sections, "batched": 0.0}), model="resnet18",
                           batch=256)[3]
    assert (slow["measured"], slow["verdict"]) == (320.0, "missed")


@pytest.mark.parametrize("why", ["errors", "skipped", "absent"])
def test_the_tables_wall_time_needs_every_default_section(why):
    from codream_secure.audit.device import targets

    sections = {"step": 60.0, "keystream": 6.0, "graphed": 95.0, "round": 100.0}
    more = {why: {"graphed": "needs CUDA"}} if why != "absent" else {}
    if why == "absent":
        del sections["graphed"]
    table = targets.targets(_timed_result(270.0, sections, **more), model="resnet18",
                            batch=256)[3]
    assert table["verdict"] == "not measured" and "graphed" in table["detail"]


def test_a_run_writes_its_targets_into_device_json_and_md(tmp_path):
    result = run(tmp_path, "--sections", "step", "--step-variants", "var-mean")
    assert [t["verdict"] for t in result["targets"]][2:] == ["not measured"] * 2  # no rounds
    assert set(result["section_seconds"]) == {"step"}
    assert 0 < result["extra_seconds"]["step variants"] < result["section_seconds"]["step"]
    text = (tmp_path / "device.md").read_text()
    assert "## Targets (stated for" in text and "Sections: step " in text
    assert "of which step variants" in text


@pytest.mark.parametrize("name", sorted(device_step.STEP_VARIANTS))
def test_every_step_variant_builds_with_this_torch(name):
    # a misspelt inductor option would only surface as an error row on the GPU machine
    # (test_fast_dream checks that an unknown option is refused)
    model = build_model("resnet8", input_shape=(3, 16, 16), num_classes=10).eval()
    step = FastDreamStep.optimised(model, device_step.W, compile_model=True,
                                   **device_step.STEP_VARIANTS[name])
    assert step.config.compile


def test_the_combined_variant_keeps_the_loss_and_every_part_of_its_settings():
    from codream_secure.audit.device.targets import NOT_THE_SAME_LOSS

    assert not set(device_step.COMBINED) & set(NOT_THE_SAME_LOSS)
    combined = device_step.STEP_VARIANTS["combined"]
    for name in device_step.COMBINED:
        part = device_step.STEP_VARIANTS[name]
        assert combined["compile_options"].items() >= part.get("compile_options", {}).items()
        assert all(combined[k] == v for k, v in part.items() if k != "compile_options")


def test_cuda_training_rows_include_simulates_training_graphs():
    from codream_secure.audit.device import training

    rows = training.variants(torch.device("cuda"))  # builds FastPaths only: no CUDA call
    precision, fast = rows["bf16 fast path + CUDA graphs"]
    assert precision == "bf16" and fast.cuda_graphs and fast.channels_last
    assert not rows["bf16 fast path (simulate's default)"][1].cuda_graphs
