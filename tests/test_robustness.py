"""Awkward inputs: models FX cannot trace, models with nothing to fold, BNs that must stay, folds
that would overflow, and models that were fused before. Each gets a clear error or a documented
no-op, and the fused model always computes what the original does.

tests/test_api.py already covers the plain cases (a ScriptModule, an untraceable top level, one
untraceable child, fusing a fused model) and tests/test_rules.py the output-side float16 overflows
(weight and bias) and a BN in training mode; this file adds what they leave out.
"""

from __future__ import annotations

import copy

import pytest
import torch
from compat import requires_cpu_float16
from helpers import assert_equivalent, assert_left, randomise_bn_stats, remaining_batch_norms
from torch import nn

from fuser import FuserError, fuse, fuse_with_report


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def conv_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out)
    )


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn_stats(model, seed=seed).eval()


# --- untraceable models ----------------------------------------------------------------------------


class SignGate(nn.Module):
    """Untraceable: which branch runs depends on the input's values."""

    def __init__(self, channels: int, inner: nn.Module | None = None):
        super().__init__()
        self.inner = inner if inner is not None else conv_bn(channels, channels)
        self.skip = conv_bn(channels, channels)

    def forward(self, x):
        if x.mean() > 0:
            return self.inner(x)
        return self.skip(x)


class NestedGates(nn.Module):
    """A traceable model, an untraceable child, and inside it another untraceable module."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.outer = SignGate(4, inner=nn.Sequential(conv_bn(4, 4), SignGate(4)))
        self.head = conv_bn(4, 2)

    def forward(self, x):
        return self.head(self.outer(self.stem(x)))


@pytest.mark.parametrize("with_example_inputs", [False, True], ids=["traced", "shape-propagated"])
def test_untraceable_modules_nested_two_deep_are_named_and_everything_around_them_folds(
    with_example_inputs,
):
    model = prepared(NestedGates())
    x = image(2, 3, 5, 5)

    fused, report = fuse_with_report(model, example_inputs=(x,) if with_example_inputs else None)

    untraced = [module.name for module in report.untraced]
    assert "outer" in untraced and "outer.inner.1" in untraced, report
    assert "<model>" not in untraced, f"the model itself traces once its gate is opaque\n{report}"
    assert report.left == [] and len(report.folded) == 6, report
    assert remaining_batch_norms(fused) == []
    # Each branch of each gate runs for one sign of the input; check all of them.
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * (x.abs() + 0.1))
    assert_equivalent(model, fused, x)


class GateCallingItsOwnBatchNorm(nn.Module):
    """Untraceable, and calls a conv and a BN that are its own direct children."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return self.conv(x)


def test_batchnorm_called_directly_by_an_untraceable_module_is_reported_as_left():
    model = prepared(GateCallingItsOwnBatchNorm())

    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, image(2, 3, 6, 6).abs())
    # The README's report accounts for every BatchNorm call site; this one cannot be traced, so it
    # must be there as left, with a reason, not absent (a regression once reported "0 folded, 0 left").
    assert_left(report, "bn", because=("trace", "untrace"))


class GateReadingItsOwnPatchedBatchNorm(nn.Module):
    """Untraceable, and its code reads its BN's weight besides calling the BN, whose forward is
    replaced on the instance (so the BN is not one the fuser folds, nor a leaf it skips)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.bn.forward = self.bn.forward  # a bound method on the instance

    def forward(self, x):
        if x.sum() > 0:
            x = self.conv(x) + self.bn.weight.sum()
        return self.bn(x)


def test_batchnorm_called_and_read_by_an_untraceable_module_is_reported_once():
    # The BN is both called by code that runs as written and used by it otherwise: one entry
    # (call 0, standing for all its calls), where it used to get a second one, "call 1", for a
    # call the model does not make.
    model = prepared(GateReadingItsOwnPatchedBatchNorm())

    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, image(2, 3, 6, 6).abs())
    assert [site.bn for site in report.sites] == ["bn"], report
    assert_left(report, "bn", because=("runs as written",))


OFFSET = torch.linspace(-1.0, 1.0, 4).reshape(4, 1, 1)


class AddsATensorConstant(nn.Module):
    """Reads a tensor that is neither a parameter nor a buffer: FX keeps it as ``_tensor_constant0``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + OFFSET


def test_model_reading_a_tensor_constant_traces_and_folds():
    # torchvision's MaxViT does this in every attention layer; FX traces such models whole.
    model = prepared(AddsATensorConstant())

    fused, report = fuse_with_report(model)

    assert report.untraced == [], report
    assert report.site("bn").folded, report
    assert_equivalent(model, fused, image(2, 3, 6, 6))


class ChecksItsChildIsNotNone(nn.Module):
    """Untraceable, and tests its child against None before calling it (torchvision's RoIHeads)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if self.head is not None and x.sum() > 0:
            return self.head(x)
        return x


def test_child_checked_against_none_by_an_untraceable_parent_still_folds():
    # Mask R-CNN v2's mask head is such a child: its four BNs are neither folded nor reported.
    model = prepared(ChecksItsChildIsNotNone())

    fused, report = fuse_with_report(model)

    assert report.site("head.1").folded, report
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, image(2, 3, 6, 6).abs())


class WithScriptedChild(nn.Module):
    """An eager model with a TorchScript submodule, as when a team ships a scripted block."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.scripted = torch.jit.script(conv_bn(4, 4).eval())

    def forward(self, x):
        return self.scripted(self.stem(x))


@pytest.mark.parametrize("with_example_inputs", [False, True], ids=["traced", "shape-propagated"])
def test_scripted_submodule_runs_as_it_is_and_the_rest_of_the_model_folds(with_example_inputs):
    model = prepared(WithScriptedChild())
    x = image(2, 3, 5, 5)

    fused, report = fuse_with_report(model, example_inputs=(x,) if with_example_inputs else None)

    assert report.site("stem.1").folded, report
    assert "<model>" not in [module.name for module in report.untraced], report
    assert isinstance(fused.get_submodule("scripted"), torch.jit.ScriptModule)
    assert_equivalent(model, fused, x)


class GateOverScriptedChild(nn.Module):
    """Untraceable at the top level, with a TorchScript child: fused child by child."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.scripted = torch.jit.script(prepared(conv_bn(4, 4), seed=1))

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:
            return self.scripted(x)
        return -self.scripted(x)


@pytest.mark.parametrize("with_example_inputs", [False, True], ids=["traced", "inputs-recorded"])
def test_scripted_child_of_an_untraceable_model_is_named_as_running_as_it_is(with_example_inputs):
    # With example inputs the fuser runs the model to record each child's inputs, by hooks a
    # TorchScript module refuses: it must be left out of them.
    model = prepared(GateOverScriptedChild())
    x = image(2, 3, 5, 5)

    fused, report = fuse_with_report(model, example_inputs=(x,) if with_example_inputs else None)

    assert report.site("stem.1").folded, report
    reasons = {module.name: module.error for module in report.untraced}
    assert "TorchScript" in reasons.get("scripted", ""), report  # not a tracer's AssertionError
    assert isinstance(fused.get_submodule("scripted"), torch.jit.ScriptModule)
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * x)


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_torchscript_model_raises_a_fuser_error_naming_torchscript(compile_with):
    model = prepared(nn.Sequential(conv_bn(3, 4), nn.ReLU()))
    x = image(2, 3, 5, 5)
    compiled = torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, x)

    with pytest.raises(FuserError, match=r"torch\.jit\.ScriptModule"):
        fuse(compiled, example_inputs=(x,))


# --- nothing to fold ------------------------------------------------------------------------------


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.norm = nn.GroupNorm(2, 4)  # a normalisation that is not a BatchNorm
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.features(x)).mean((2, 3)))


@pytest.mark.parametrize("with_example_inputs", [False, True], ids=["traced", "shape-propagated"])
def test_model_without_batchnorm_is_a_no_op_with_an_empty_report(with_example_inputs):
    model = prepared(NoBatchNorm())
    x = image(2, 3, 6, 6)

    fused, report = fuse_with_report(model, example_inputs=(x,) if with_example_inputs else None)

    assert report.sites == [] and report.untraced == [], report
    assert "0 BatchNorm call sites folded, 0 left" in str(report)
    original_state, fused_state = model.state_dict(), fused.state_dict()
    assert original_state.keys() == fused_state.keys()
    assert all(torch.equal(original_state[k], fused_state[k]) for k in original_state)
    with torch.no_grad():
        # The same operations in the same order: not merely close, identical.
        assert torch.equal(fused(x), model(x))


# --- BatchNorms that must stay --------------------------------------------------------------------


class StemThenTrainingBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # put in training mode below, while the model is in eval

    def forward(self, x):
        return self.bn(self.conv(self.stem(x)))


class UntraceableWithTrainingBatchNorm(nn.Module):
    """The same, behind an untraceable top level: fusing then runs the model to record inputs."""

    def __init__(self):
        super().__init__()
        self.body = StemThenTrainingBatchNorm()

    def forward(self, x):
        return self.body(x) if x.numel() > 0 and x.sum() != 0 else x


@pytest.mark.parametrize(
    ("build", "path"),
    [(StemThenTrainingBatchNorm, ""), (UntraceableWithTrainingBatchNorm, "body.")],
    ids=["traceable", "untraceable"],
)
def test_batchnorm_in_training_mode_is_left_and_fusing_does_not_update_its_statistics(build, path):
    model = prepared(build())
    training_bn = model.get_submodule(f"{path}bn").train()
    x = image(4, 3, 6, 6)
    statistics_before = {k: v.clone() for k, v in training_bn.state_dict().items()}

    # Example inputs make the fuser run the model (shape propagation, recording child inputs):
    # a BN in training mode would update its running statistics on every such run.
    fused, report = fuse_with_report(model, example_inputs=(x,))

    assert_left(report, f"{path}bn", because=("train",))
    assert report.site(f"{path}stem.1").folded, report
    fused_bn = fused.get_submodule(f"{path}bn")
    assert fused_bn.training, "the fused model's BN must stay in training mode"
    for key, before in statistics_before.items():
        assert torch.equal(fused_bn.state_dict()[key], before), f"fusing changed the fused {key}"
        assert torch.equal(training_bn.state_dict()[key], before), (
            f"fusing changed the caller's {key}"
        )
    # Running either model updates its training BN's statistics: compare on copies.
    assert_equivalent(copy.deepcopy(model), copy.deepcopy(fused), x)


# --- folds that would overflow float16 ------------------------------------------------------------


@requires_cpu_float16
def test_float16_input_side_fold_that_would_overflow_is_left():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval()
    with torch.no_grad():
        model[0].running_var.fill_(1.0 - model[0].eps)
        model[0].weight.fill_(300.0)
        model[1].weight.fill_(300.0)  # folded weight 9e4 > float16's 65504
    model.half()
    x = image(2, 3, 4, 4).half() * 1e-3

    fused, report = fuse_with_report(model)

    assert_left(report, "0", because=("overflow",))
    assert_equivalent(model, fused, x)


# --- fusing twice ---------------------------------------------------------------------------------


def test_fusing_an_untraceable_model_twice_folds_nothing_the_second_time():
    model = prepared(NestedGates())
    x = image(2, 3, 5, 5)
    fused = fuse(model, example_inputs=(x,))

    refused, report = fuse_with_report(fused, example_inputs=(x,))

    assert report.sites == [], f"a second fuse found BatchNorms:\n{report}"
    assert [m.name for m in report.untraced] == ["outer", "outer.inner.1"], report
    for sign in (1, -1):
        assert_equivalent(model, refused, sign * (x.abs() + 0.1))


# --- example inputs FX's interpreter cannot run ---------------------------------------------------


class AppendsToItsList(nn.Module):
    """Writes to the list it is called with, as torchvision's Swin3D does. Hooked, so it stays one
    call in the graph, where FX's interpreter hands it an immutable list and it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_hook(lambda module, args, output: None)

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        parts.append(parts[0])
        return torch.cat(parts, dim=1)


class ConvsJoinedThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 2), conv_bn(3, 2)
        self.join = AppendsToItsList()
        self.head = nn.Linear(6 * 4 * 4, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = self.join([self.a(x), self.b(x)])
        return self.head_bn(self.head(joined.flatten(1)))


def test_inputs_the_interpreter_cannot_run_leave_only_the_folds_that_need_shapes():
    """Shape propagation fails where the model runs: the fused model is run to tell the two
    apart, the convolutions still fold, and the Linear (which needs a proven 2-D input) is left."""
    model, x = prepared(ConvsJoinedThenLinear()), image(2, 3, 4, 4)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert [report.site(name).folded for name in ("a.1", "b.1")] == [True, True]
    assert_left(report, "head_bn", because=("example_inputs",))
    assert_equivalent(model, fused, x)


def test_inputs_the_model_itself_rejects_raise_a_fuser_error():
    model = prepared(ConvsJoinedThenLinear())
    with pytest.raises(FuserError, match="example_inputs could not be run through the model"):
        fuse(model, example_inputs=(image(2, 5, 4, 4),))
