"""The command line: ``python -m fuser MODEL`` builds, fuses, checks and times torchvision models.

Model runs use tiny inputs and one timed repeat, so the whole file stays well under a minute; what
they assert is the content of the output (folds counted, the float64 check's numbers, the benchmark's
three entries), and a deliberately wrong fuser must make the command fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fuser.cli
from fuser.cli import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, main
from fuser.reference import (
    RELATIVE_FLOOR,
    TOLERANCE_FACTOR,
    check_against_float64,
    max_abs_error,
    output_tensors,
)
from fuser.timing import interleaved_medians, without_batchnorm
from fuser.zoo import BATCHNORM_TYPES, build_model, randomize_batchnorm_statistics

FAST = ["--repeats", "1"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    """Run the command line in-process with ``--json``; return its exit status and parsed output."""
    status = main([*argv, *FAST, "--json"])
    return status, json.loads(capsys.readouterr().out)


def assert_check_passed(result: dict) -> None:
    check = result["check"]
    assert result["passed"] is True and check["passed"] is True, check
    assert 0.0 <= check["fused_error"] <= check["allowed"], check
    assert check["unfused_error"] > 0.0, (
        "float32 run matched float64 exactly: nothing was computed?"
    )


def assert_benchmark_complete(result: dict) -> None:
    medians = result["benchmark"]["median_ms"]
    assert set(medians) == {"unfused", "fused", "bn_free"}
    assert all(ms > 0.0 for ms in medians.values()), medians


@pytest.mark.zoo
def test_resnet18_json_reports_every_batchnorm_folded_and_the_check_passed(capsys):
    status, result = run_json(capsys, "resnet18", "--size", "32")

    assert status == EXIT_OK
    assert result["model"] == "resnet18" and result["family"] == "classification"
    assert result["input_shape"] == [1, 3, 32, 32]
    assert result["report"]["folded"] == 20 and result["report"]["left"] == 0
    assert len(result["report"]["sites"]) == 20
    assert_check_passed(result)
    assert_benchmark_complete(result)


@pytest.mark.zoo
def test_text_output_shows_report_check_and_benchmark(capsys):
    status = main(["resnet18", "--size", "32", "--batch", "2", *FAST])
    out = capsys.readouterr().out

    assert status == EXIT_OK
    assert "resnet18 (classification), input 2x3x32x32 on cpu" in out
    assert "20 BatchNorm call sites folded, 0 left" in out
    assert "layer1.0.bn1: folded into layer1.0.conv1 (output side)" in out
    assert "float64 reference check: passed" in out
    for label in ("unfused", "fused", "BN-free"):
        assert f"  {label} " in out


@pytest.mark.zoo
def test_video_model_takes_clips_and_folds(capsys):
    status, result = run_json(capsys, "r3d_18", "--size", "16", "--frames", "4")

    assert status == EXIT_OK
    assert result["family"] == "video"
    assert result["input_shape"] == [1, 3, 4, 16, 16]
    assert result["report"]["folded"] > 0
    assert_check_passed(result)
    assert_benchmark_complete(result)


@pytest.mark.zoo
def test_segmentation_model_with_aux_head_returns_a_dict_and_folds_both_heads(capsys):
    status, result = run_json(capsys, "deeplabv3_mobilenet_v3_large", "--size", "32")

    assert status == EXIT_OK
    assert result["family"] == "segmentation"
    folded = [site["bn"] for site in result["report"]["sites"] if site["folded"]]
    assert any(name.startswith("backbone.") for name in folded), folded
    assert any(name.startswith("aux_classifier.") for name in folded), folded
    assert_check_passed(result)


def test_unknown_model_exits_2_and_says_how_to_list_valid_names():
    completed = subprocess.run(
        [sys.executable, "-m", "fuser", "resnet181"], capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == EXIT_USAGE
    assert completed.stdout == ""
    assert "unknown model 'resnet181'" in completed.stderr
    assert "resnet18" in completed.stderr  # the close match is suggested
    assert "python -m fuser --list" in completed.stderr


def test_detection_model_is_refused_with_the_reason(capsys):
    assert main(["fasterrcnn_resnet50_fpn"]) == EXIT_USAGE
    assert "detection model" in capsys.readouterr().err


def test_input_too_small_for_the_model_exits_2_naming_the_shape(capsys):
    assert main(["alexnet", "--size", "16"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "alexnet cannot run on an input of shape 1x3x16x16" in err
    assert "(try another --size)" in err  # an image model has no frames to change


def test_json_and_text_give_the_same_times_in_milliseconds():
    run = fuser.cli.run_model("resnet18", size=32, repeats=1)
    text, medians = str(run), run.to_dict()["benchmark"]["median_ms"]
    labels = {"unfused": "unfused", "fused": "fused", "bn_free": "BN-free"}
    for name, label in labels.items():
        shown = re.search(rf"^  {label} +([0-9.]+) ms", text, re.MULTILINE)
        assert shown is not None, text
        assert float(shown.group(1)) == pytest.approx(medians[name], abs=5e-4), (name, text)
        assert medians[name] == pytest.approx(1e3 * run.median_seconds[name]), medians


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_exits_2_saying_so(capsys):
    assert main(["resnet18", "--device", "cuda", *FAST]) == EXIT_USAGE
    assert "--device cuda was asked for, but torch sees no CUDA device" in capsys.readouterr().err


def test_list_names_models_of_every_family(capsys):
    assert main(["--list"]) == EXIT_OK
    out = capsys.readouterr().out
    for line in ("classification:", "  resnet18", "video:", "  r3d_18", "segmentation:"):
        assert line + "\n" in out
    assert "fasterrcnn" not in out


def test_a_wrong_fuser_fails_the_check(capsys, monkeypatch):
    """The check must be able to fail: a fuser whose fold is off by 1% in one channel is caught."""
    real_fuse_with_report = fuser.cli.fuse_with_report

    def off_by_one_percent(model, example_inputs=None):
        fused, report = real_fuse_with_report(model, example_inputs=example_inputs)
        with torch.no_grad():
            fused.get_parameter("conv1.weight")[0] *= 1.01
        return fused, report

    monkeypatch.setattr(fuser.cli, "fuse_with_report", off_by_one_percent)
    status, result = run_json(capsys, "resnet18", "--size", "32")

    assert status == EXIT_CHECK_FAILED
    assert result["passed"] is False
    assert result["check"]["fused_error"] > result["check"]["allowed"]
    assert "exceeds allowed" in result["check"]["reason"]


def test_float64_check_fails_on_a_model_that_differs_and_passes_on_itself():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomize_batchnorm_statistics(model, torch.Generator().manual_seed(0))
    wrong = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    wrong.load_state_dict(model.state_dict())
    wrong[1].running_var[2] *= 1.001
    inputs = (torch.randn(2, 3, 8, 8),)

    passed = check_against_float64(model, model, inputs)
    assert passed.passed
    # The README's rule: 4 x the unfused model's error, plus 1e-6 x the largest reference output.
    rule = TOLERANCE_FACTOR * passed.unfused_error + RELATIVE_FLOOR * passed.reference_scale
    assert passed.allowed == pytest.approx(rule, rel=1e-12) and passed.reference_scale > 1
    failed = check_against_float64(model, wrong, inputs)
    assert not failed.passed and failed.fused_error > failed.allowed, failed


def test_float64_check_passes_a_fused_error_equal_to_what_is_allowed():
    """A model whose output is exactly zero: every error and the allowance are 0, and a fused
    model computing the same zeros is right."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    nn.init.zeros_(model[0].weight)
    model[1].running_mean.zero_()
    nn.init.zeros_(model[1].bias)
    check = check_against_float64(model, model, (torch.randn(2, 3, 4, 4),))
    assert (check.fused_error, check.allowed) == (0.0, 0.0)
    assert check.passed, check


def test_outputs_are_compared_through_tuples_and_dicts():
    a, b = torch.zeros(2), torch.ones(3)
    output = {"out": a, "rest": (b, [a])}

    assert [path for path, _ in output_tensors(output)] == [
        "output['out']",
        "output['rest'][0]",
        "output['rest'][1][0]",
    ]
    assert max_abs_error(output, {"out": a, "rest": (b + 0.5, [a])}) == 0.5
    with pytest.raises(ValueError, match="structure"):
        max_abs_error(output, {"out": a})


def test_built_model_has_batchnorms_far_from_identity():
    model = build_model("resnet18", size=32)

    assert not model.training
    batchnorms = [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES)]
    assert len(batchnorms) == 20
    for bn in batchnorms:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.weight < 0).any() and not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_frozen_batchnorm_buffers_are_randomised():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), FrozenBatchNorm2d(8))
    assert randomize_batchnorm_statistics(model, torch.Generator().manual_seed(0)) == 1

    frozen = model[1]
    for name, default in (("running_mean", 0.0), ("running_var", 1.0), ("weight", 1.0)):
        buffer = getattr(frozen, name)
        assert not torch.allclose(buffer, torch.full_like(buffer, default)), name


def test_bn_free_bound_replaces_every_batchnorm_and_leaves_the_model_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4)),
    )
    bound = without_batchnorm(model)

    assert not any(isinstance(m, BATCHNORM_TYPES) for m in bound.modules())
    assert isinstance(bound[1], nn.Identity) and isinstance(bound[2][1], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2][1], FrozenBatchNorm2d)


def test_benchmark_runs_the_models_round_robin():
    calls: list[str] = []
    models = {name: (lambda x, name=name: calls.append(name)) for name in ("a", "b", "c")}

    medians = interleaved_medians(models, (torch.zeros(1),), repeats=3, warmup=1)

    assert calls == ["a", "b", "c"] * 4
    assert set(medians) == {"a", "b", "c"} and all(t >= 0.0 for t in medians.values())
