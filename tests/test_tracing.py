"""Tracing with untraceable parts, and reading an untraceable parent's source.

One trace finds every untraceable submodule: a failed submodule call is rolled back (its graph
nodes, cached parameter proxies, attribute changes) and kept as one opaque call. These tests pin
what that rollback must undo.
"""

from __future__ import annotations

import collections
import functools
import operator
import pickle
import threading
import types

import pytest
import torch
from helpers import assert_equivalent, randomise_bn_stats, remaining_batch_norms
from torch import nn

from fuser import FuserError, fuse_with_report
from fuser.fidelity import ForwardReference
from fuser.in_place import tensor_augmented_assignments_as_methods
from fuser.shapes import deterministic_kernels
from fuser.tracing import AUGMENTED_ASSIGNMENTS, trace_with_opaque_submodules


def conv_bn(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(seed))


def prepared(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn_stats(model).eval()


# --- rollback of a failed submodule call ------------------------------------------------------


class ScaledGate(nn.Module):
    """Untraceable (branches on data) after it has read its own parameter and called a child."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4).reshape(4, 1, 1))

    def forward(self, x):
        y = self.block(x) * self.scale
        if y.sum() > 0:
            return y
        return -y


class ReadsGateParameterAfterCallingIt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.gate = ScaledGate()
        self.head = conv_bn(4)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)) + self.gate.scale)


def test_parameter_read_inside_a_failed_call_is_read_again_after_the_rollback():
    # The failed call made a get_attr node for gate.scale and cached its proxy; the rollback
    # erases the node, so the parent's own read of gate.scale must make a new one.
    model = prepared(ReadsGateParameterAfterCallingIt())

    fused, report = fuse_with_report(model)

    assert [module.name for module in report.untraced] == ["gate"], report
    assert isinstance(fused, torch.fx.GraphModule), "the top level traces once gate is opaque"
    assert {site.bn for site in report.folded} == {"stem.1", "gate.block.1", "head.1"}, report
    assert remaining_batch_norms(fused) == []
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * (image().abs() + 0.1))


class CachesBeforeFailing(nn.Module):
    """Stores a value computed from its input on itself, then fails (like torchvision's
    ``MultiScaleRoIAlign``, which caches its scales on first call)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.cached = None

    def forward(self, x):
        y = self.block(x)
        self.cached = y.shape[1]
        if y.mean() > 0:
            return y
        return y * 2


class CallsCachingChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = CachesBeforeFailing()
        self.head = conv_bn(4)

    def forward(self, x):
        return self.head(self.child(x))


def test_attributes_a_failed_call_set_are_not_left_on_either_model():
    model = prepared(CallsCachingChild())

    fused, report = fuse_with_report(model)

    assert [module.name for module in report.untraced] == ["child"], report
    assert model.child.cached is None, "the caller's model was changed"
    assert fused.child.cached is None, "a proxy from the failed call was left on the copy"
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * (image().abs() + 0.1))


# --- code FX runs but does not record: torch.autocast ------------------------------------------


class AutocastBlock(nn.Module):
    """Runs a conv/BN under bfloat16 autocast in each way code can enter it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.how = how
        self.register_buffer("precision", torch.zeros(()))  # the model's own dtype

    def forward(self, x):
        if self.how == "with":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.block(x)
        if self.how == "decorator":
            return self.decorated(x)
        # "off": full precision even under a caller's autocast
        with torch.autocast("cpu", enabled=False):
            return self.block(x.to(self.precision.dtype))

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def decorated(self, x):
        return self.block(x)


class StemThenAutocast(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.mixed = AutocastBlock(how)

    def forward(self, x):
        return self.mixed(self.stem(x))


@pytest.mark.parametrize("how", ["with", "decorator", "off"])
def test_a_module_entering_autocast_stays_one_call_and_keeps_its_dtypes(how):
    # FX runs the autocast block while tracing and records none of it: traced through, the
    # block would run in float32 (or, for "off", under the caller's autocast), and the fused
    # model would return another dtype. Torch's own fuse does exactly that.
    model = prepared(StemThenAutocast(how))
    caller_autocast = how == "off"
    fused, report = fuse_with_report(model, (image(),))

    assert [module.name for module in report.untraced] == ["mixed"], report
    assert "torch.autocast" in report.untraced[0].error
    assert isinstance(fused, torch.fx.GraphModule), "the rest of the model still traces"
    assert {site.bn for site in report.folded} == {"stem.1", "mixed.block.1"}, report
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=caller_autocast):
        expected, got = model(image()), fused(image())
    assert got.dtype == expected.dtype == (torch.float32 if how == "off" else torch.bfloat16)
    assert_equivalent(model, fused, image())


class StartsAThread(nn.Module):
    """Runs ``work`` in another thread, and waits for it, every time it is called."""

    def __init__(self, work) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.work = work

    def forward(self, x):
        thread = threading.Thread(target=self.work)
        thread.start()
        thread.join()
        return self.block(x)


def fuse_while_another_thread_works(work) -> None:
    """Fuse a model whose trace runs ``work`` in another thread: the model traces and folds whole
    (what a trace refuses, it refuses in its own thread only)."""
    model = prepared(nn.Sequential(StartsAThread(work), conv_bn(4)))
    fused, report = fuse_with_report(model)

    assert report.untraced == [], report
    assert remaining_batch_norms(fused) == []


def test_autocast_in_another_thread_is_not_refused_while_a_model_is_traced():
    """The trace makes entering autocast fail in its own thread only."""
    dtypes: list[torch.dtype] = []

    def other_thread() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes.append((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)

    fuse_while_another_thread_works(other_thread)

    assert dtypes, "the other thread ran during the trace"
    assert set(dtypes) == {torch.bfloat16}, "the other thread's autocast worked during the trace"


# --- code FX runs but does not record: grad mode ---------------------------------------------


class GradModeBlock(nn.Module):
    """Runs a conv/BN with the grad mode changed, in each way code can change it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.how = how

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                return self.block(x)
        if self.how == "decorator":
            return self.decorated(x)
        if self.how == "inference_mode":
            with torch.inference_mode():
                y = self.block(x)
            return y.clone()  # an inference tensor made normal, as code leaving the mode does
        if self.how == "call":  # a plain call, undone by hand
            previous = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
            y = self.block(x)
            torch.set_grad_enabled(previous)
            return y
        with torch.enable_grad():  # "enable_grad": tracks gradients even under a caller's no_grad
            return self.block(x)

    @torch.no_grad()
    def decorated(self, x):
        return self.block(x)


class StemThenGradMode(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.region = GradModeBlock(how)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.region(self.stem(x)))


GRAD_MODE_CHANGES = ["no_grad", "decorator", "inference_mode", "call", "enable_grad"]


@pytest.mark.parametrize("how", GRAD_MODE_CHANGES)
def test_a_module_changing_the_grad_mode_stays_one_call_and_keeps_its_gradients(how):
    # FX runs the region while tracing and records none of it: traced through, the fused model
    # would track gradients through the region (a backward pass would reach the stem, whose
    # weights the original keeps out of it), or, for "enable_grad", not under a caller's no_grad
    # (which this model's head then hides: that one is checked for staying one call only).
    # Torch's own fuse does exactly that.
    model = prepared(StemThenGradMode(how))
    fused, report = fuse_with_report(model, (image(),))

    assert [module.name for module in report.untraced] == ["region"], report
    assert "grad mode" in report.untraced[0].error
    assert isinstance(fused, torch.fx.GraphModule), "the rest of the model still traces"
    assert {site.bn for site in report.folded} == {"stem.1", "region.block.1"}, report
    inputs = image().requires_grad_()
    expected, got = model(inputs), fused(inputs)
    gradients = [
        torch.autograd.grad(y.sum(), inputs, allow_unused=True)[0] for y in (expected, got)
    ]
    assert (gradients[0] is None) == (gradients[1] is None) == (how != "enable_grad")
    assert_equivalent(model, fused, image())


def test_a_plain_decorated_forward_keeps_its_output_out_of_autograd():
    """``@torch.no_grad()`` on the root's own forward: nothing folds (its children are called by
    code that runs as written), and the fused output still tracks no gradients."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(4)

        @torch.no_grad()
        def forward(self, x):
            return self.block(x)

    model = prepared(Frozen())
    fused, report = fuse_with_report(model, (image(),))

    assert "grad mode" in report.untraced[0].error, report
    assert {site.bn for site in report.folded} == {"block.1"}, report
    assert model(image()).requires_grad is fused(image()).requires_grad is False
    assert_equivalent(model, fused, image())


def test_grad_mode_changes_in_another_thread_are_not_refused_while_a_model_is_traced():
    """The trace makes changing the grad mode fail in its own thread only."""
    modes: list[bool] = []

    def other_thread() -> None:
        with torch.no_grad():
            modes.append(torch.is_grad_enabled())

    fuse_while_another_thread_works(other_thread)

    assert modes == [False], "the other thread's no_grad did not work during the trace"
    assert torch.no_grad.__enter__ is torch.autograd.grad_mode.no_grad.__dict__["__enter__"]


# --- code FX runs but does not record: module attributes set as the code runs ------------------


class KeepsItsFeatures(nn.Module):
    """Stores what it computes and counts its calls, for a caller to read after each call."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.features = None
        self.calls = 0

    def forward(self, x):
        x = self.block(x)
        self.features = x
        self.calls += 1
        return x * 0.5


def test_a_module_setting_its_attributes_stays_one_call_and_keeps_setting_them():
    # FX runs `self.features = x` while tracing and records none of it: traced through, the
    # fused model would keep stale features (those of the fuser's own run) and never count a
    # call. Torch's own fuse does exactly that.
    model = prepared(nn.Sequential(conv_bn(4), KeepsItsFeatures()))
    fused, report = fuse_with_report(model, (image(),))

    assert [module.name for module in report.untraced] == ["1"], report
    assert "sets KeepsItsFeatures.features as it runs" in report.untraced[0].error
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1"}, report
    kept, original = fused.get_submodule("1"), model.get_submodule("1")
    assert kept.calls == original.calls == 0, "the fuser's own runs left their count behind"
    assert kept.features is original.features is None
    for sign in (1, -1):
        x = sign * image()
        assert_equivalent(model, fused, x)
        torch.testing.assert_close(kept.features, original.features)
        assert kept.calls == original.calls


class KeepsItsOutputs(nn.Module):
    """Appends what it computes to a list, and keeps the last one in a dict, for its caller."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.outputs: list[torch.Tensor] = []
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, x):
        x = self.block(x)
        self.outputs.append(x.detach())  # kept tensors with autograd history cannot be copied
        self.last["features"] = x.detach()
        return x * 0.5


def test_a_module_filling_its_containers_stays_one_call_and_keeps_filling_them():
    # Traced through, the list would hold the trace's proxy and the fuser's own run, and no call
    # of the fused model would append anything.
    model = prepared(nn.Sequential(conv_bn(4), KeepsItsOutputs()))
    fused, report = fuse_with_report(model, (image(),))

    assert [module.name for module in report.untraced] == ["1"], report
    assert "its outputs (a list) is changed as it runs" in report.untraced[0].error
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1"}, report
    kept, original = fused.get_submodule("1"), model.get_submodule("1")
    assert kept.outputs == [] and kept.last == {}, "the trace or the fuser's runs left entries"
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * image())
    assert len(kept.outputs) == len(original.outputs) > 0
    for got, want in zip(kept.outputs, original.outputs, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(kept.last["features"], original.last["features"])


class KeepsItsLastInAFilledDict(nn.Module):
    """Replaces the value under a key its dict already holds: the keys never change."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.last = {"features": torch.zeros(())}

    def forward(self, x):
        x = self.block(x)
        self.last["features"] = x.detach()
        return x * 0.5


def test_a_module_replacing_a_value_its_dict_holds_stays_one_call_and_keeps_replacing_it():
    # Comparing the dict's keys alone would miss the change: traced through, the fused model
    # would keep the zeros it started with.
    model = prepared(nn.Sequential(conv_bn(4), KeepsItsLastInAFilledDict()))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "its last (a dict) is changed as it runs" in untraced.pop("1", ""), report
    kept, original = fused.get_submodule("1"), model.get_submodule("1")
    assert float(kept.last["features"]) == 0.0, "the trace or the fuser's runs left a value"
    for seed in (1, 2):
        assert_equivalent(model, fused, image(seed))
        torch.testing.assert_close(kept.last["features"], original.last["features"])
    assert original.last["features"].shape == (2, 4, 5, 5)


class CountsFromNothingInItsDict(nn.Module):
    """Adds its count to its ``__dict__`` on its first call: a key that was not there before."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def forward(self, x):
        x = self.block(x)
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        return x * 0.5


def test_a_module_adding_an_attribute_to_its_dict_stays_one_call_and_keeps_counting():
    # The attributes it had before are all still there, the same objects in the same order: only
    # the new key tells the change.
    model = prepared(nn.Sequential(conv_bn(4), CountsFromNothingInItsDict()))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "its calls (an attribute) is changed as it runs" in untraced.pop("1", ""), report
    kept, original = fused.get_submodule("1"), model.get_submodule("1")
    assert "calls" not in vars(kept) and "calls" not in vars(original), (
        "the trace or the fuser's runs left a count"
    )
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))
        assert kept.calls == original.calls == call


class ReadsConstantsOfManyKinds(nn.Module):
    """Keeps, and only reads, attributes of kinds the state comparison handles apart: a set it
    never changes, and values without a ``__dict__`` (a slice, a frozenset, a range)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.modes = {"eval"}
        self.kept_channels = slice(0, 3)
        self.scales = frozenset({0.5})
        self.steps = range(2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        for _ in self.steps:
            x = x * min(self.scales)
        return x[:, self.kept_channels] if "eval" in self.modes else x


def test_attributes_the_code_only_reads_leave_the_trace_alone_whatever_their_kind():
    model = prepared(ReadsConstantsOfManyKinds())
    fused, report = fuse_with_report(model, (image(),))

    assert not report.untraced, report
    assert {site.bn for site in report.folded} == {"bn"}, report
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, image())
    assert fused(image()).shape == (2, 3, 5, 5)


class CountsAroundSetattr(nn.Module):
    """Keeps its state without ``nn.Module.__setattr__``, which the fuser's trace refuses: each
    subclass writes straight into one of the module's dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.calls = 0
        self.register_buffer("last", torch.zeros(()))


class CountsByObjectSetattr(CountsAroundSetattr):
    def forward(self, x):
        x = self.block(x)
        object.__setattr__(self, "calls", self.calls + 1)
        return x * 0.5


class CountsInItsDict(CountsAroundSetattr):
    def forward(self, x):
        x = self.block(x)
        self.__dict__["calls"] = self.calls + 1
        return x * 0.5


class KeepsItsLastSumInItsBufferDict(CountsAroundSetattr):
    def forward(self, x):
        x = self.block(x)
        self._buffers["last"] = x.detach().sum()  # register_buffer would refuse the trace's proxy
        return x * 0.5


@pytest.mark.parametrize(
    "keeper", [CountsByObjectSetattr, CountsInItsDict, KeepsItsLastSumInItsBufferDict]
)
def test_a_module_setting_its_state_around_setattr_stays_one_call_and_keeps_setting_it(keeper):
    # FX runs these writes while tracing, and nn.Module.__setattr__ never sees them: traced
    # through, the fused model would never count a call (or keep its last sum). The trace
    # compares every module's dicts with their state before it instead.
    model = prepared(nn.Sequential(conv_bn(4), keeper()))
    fused, report = fuse_with_report(model, (image(),))

    changed = "last" if keeper is KeepsItsLastSumInItsBufferDict else "calls"
    untraced = {module.name: module.error for module in report.untraced}
    assert f"its {changed} (an attribute) is changed as it runs" in untraced.pop("1"), report
    # Its code hands `self` to a function or reads one of its dicts, which could reach its
    # child: the child stays as it is too (child_usage), and the first block still folds.
    assert untraced == {"1.block": "not fused: 1's code uses it other than by calling it"}
    assert {site.bn for site in report.folded} == {"0.1"}, report
    kept, original = fused.get_submodule("1"), model.get_submodule("1")
    assert kept.calls == original.calls == 0, "the trace or the fuser's runs left a count"
    assert float(kept.last) == float(original.last) == 0.0
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * image())
        assert kept.calls == original.calls
        torch.testing.assert_close(kept.last, original.last)
    assert kept.calls > 0 or float(kept.last) != 0.0, "the model's own calls changed nothing"


def test_state_set_around_setattr_on_the_model_itself_leaves_it_untraced():
    class CountsItsCalls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(4)
            self.calls = 0

        def forward(self, x):
            object.__setattr__(self, "calls", self.calls + 1)
            return self.block(x)

    model = prepared(CountsItsCalls())
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "CountsItsCalls.calls (an attribute)" in untraced["<model>"], report
    assert not report.folded, report  # `self` handed to a function: its child stays too
    assert fused.calls == model.calls == 0
    assert_equivalent(model, fused, image())
    assert fused.calls == model.calls == 1


class CallStats:
    """A plain object (no module) a module keeps its running state in."""

    def __init__(self) -> None:
        self.calls = 0
        self.sums: list[float] = []


class CallCounter:
    """A plain object whose method counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def count(self) -> int:
        self.calls += 1
        return self.calls


class KeepsStatsInAPlainObject(nn.Module):
    """Counts its calls (or keeps its sums) in a plain object it holds, scaling by the count: no
    module attribute is ever set, so neither ``__setattr__`` nor the module dicts see it."""

    def __init__(self, keeps: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.stats, self.keeps = CallStats(), keeps

    def forward(self, x):
        if self.keeps == "calls":
            self.stats.calls += 1
            scale = self.stats.calls
        else:
            self.stats.sums.append(1.0)
            scale = len(self.stats.sums)
        return self.bn(self.conv(x)) * scale


@pytest.mark.parametrize(
    "keeps, change",
    [("calls", "stats.calls (an attribute of the CallStats it holds)"),
     ("sums", "stats.sums (a list of the CallStats it holds)")],
)  # fmt: skip
def test_a_module_keeping_state_in_a_plain_object_it_holds_stays_one_call(keeps, change):
    # Traced through, the count is the constant 1 of the trace's own run: the fused model would
    # be right on its first call and off by a factor on every later one.
    model = prepared(nn.Sequential(conv_bn(4), KeepsStatsInAPlainObject(keeps)))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert f"its {change} is changed as it runs" in untraced.pop("1"), report
    assert not untraced, report
    assert {site.bn for site in report.folded} == {"0.1"}, report
    kept, original = fused.get_submodule("1").stats, model.get_submodule("1").stats
    assert (kept.calls, kept.sums) == (original.calls, original.sums) == (0, []), (
        "the trace or the fuser's runs left their mark on the held object"
    )
    for call in range(1, 4):
        assert_equivalent(model, fused, image(call))
        assert (kept.calls, kept.sums) == (original.calls, original.sums)
    assert max(original.calls, len(original.sums)) == 3


class ReadsAPlainObject(nn.Module):
    """Holds a plain object (a configuration) and only reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.config = CallStats()
        self.config.sums.append(2.0)

    def forward(self, x):
        return self.block(x) * self.config.sums[0] + self.config.calls


def test_a_plain_object_the_code_only_reads_leaves_the_trace_alone():
    model = prepared(ReadsAPlainObject())
    fused, report = fuse_with_report(model, (image(),))
    assert not report.untraced, report
    assert {site.bn for site in report.folded} == {"block.1"}, report
    assert_equivalent(model, fused, image())


def counter_function():
    """A call counter kept in a closure: ``nonlocal calls`` changes no object's attribute."""
    calls = 0

    def count() -> int:
        nonlocal calls
        calls += 1
        return calls

    return count


class ScalesByACount(nn.Module):
    """Scales its conv/BN output by a count it gets from a function it holds: a closure
    (``counter_function``) or a plain object's method."""

    def __init__(self, count) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.count = count

    def forward(self, x):
        return self.bn(self.conv(x)) * self.count()


def test_a_module_counting_with_a_method_of_a_plain_object_stays_one_call():
    model = prepared(nn.Sequential(conv_bn(4), ScalesByACount(CallCounter().count)))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "its count.calls (an attribute of the CallCounter it holds)" in untraced.pop("1")
    assert not untraced and {site.bn for site in report.folded} == {"0.1"}, report
    for call in range(1, 4):  # the copy's counter is its own (deepcopy copies a bound object)
        assert_equivalent(model, fused, image(call))
    assert model[1].count.__self__.calls == fused.get_submodule("1").count.__self__.calls == 3


def test_a_module_counting_in_a_closure_stays_one_call():
    # copy.deepcopy does not copy functions: the fused model's counter is the original's, so
    # each model's calls count for both. What the fuser owes: no count of its own runs, and a
    # fused model that counts (traced through, it would scale by the constant 1 forever).
    model = prepared(nn.Sequential(conv_bn(4), ScalesByACount(counter_function())))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    change = "its count.calls (a variable of the closure of the function it holds)"
    assert change in untraced.pop("1"), report
    assert not untraced and {site.bn for site in report.folded} == {"0.1"}, report
    with torch.no_grad():
        unscaled = model[1].bn(model[1].conv(model[0](image())))
        for call in range(1, 4):
            torch.testing.assert_close(fused(image()), unscaled * call)


class CountsInABuffer(nn.Module):
    """Counts its calls in a buffer (saved with its state dict), changing it in place."""

    def __init__(self, through_data: bool) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.through_data = through_data
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        x = self.block(x)
        counter = self.calls.data if self.through_data else self.calls
        counter.add_(1)
        return x * 0.5


def assert_counts_as_the_original(model: nn.Module, fused: nn.Module) -> None:
    """Child ``1`` of the fused model starts from the original's count (none of the fuser's own
    runs left in it) and counts each call as the original does."""
    kept, original = fused.get_submodule("1"), model.get_submodule("1")
    assert int(kept.calls) == int(original.calls) == 0, "the trace's run left its count"
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * image())
        assert int(kept.calls) == int(original.calls) > 0


@pytest.mark.parametrize("through_data", [False, True], ids=["add_", "data.add_"])
def test_a_module_counting_in_a_buffer_stays_one_call_and_keeps_counting(through_data):
    # FX hands traced code the buffer itself, not a proxy: the trace runs `add_` on the
    # fuser's copy and records nothing. Traced through, the fused model would never count, and
    # would start one call ahead of the caller's.
    model = prepared(nn.Sequential(conv_bn(4), CountsInABuffer(through_data)))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "its calls (a buffer changed in place) is changed as it runs" in untraced.pop("1")
    assert not untraced, report
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1"}, report
    assert_counts_as_the_original(model, fused)


class ScalesByATensorAttribute(nn.Module):
    """Keeps a plain tensor attribute (no buffer), or one in a list, and changes it in place on
    every call; or only reads it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.how = how
        self.scale = torch.ones(1)
        self.history = [torch.zeros(1)]

    def forward(self, x):
        x = self.block(x) * self.scale + self.history[0]
        if self.how == "attribute changed":
            self.scale.mul_(2.0)
        elif self.how == "list element changed":
            self.history[0].add_(1.0)
        return x


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no inputs", "example_inputs"])
@pytest.mark.parametrize("how", ["attribute changed", "list element changed", "only read"])
def test_a_tensor_kept_as_a_plain_attribute_and_changed_in_place_keeps_changing(how, with_inputs):
    # FX hands traced code such a tensor itself, as it does a buffer: the trace ran the change on
    # the fuser's copy and recorded none of it, so the fused model never changed it and started
    # ahead of the caller's (2.3 off on the first call; 5.6 with example inputs, whose runs
    # changed it twice more). Its module now runs as written; one that only reads it is traced.
    model = prepared(nn.Sequential(conv_bn(4), ScalesByATensorAttribute(how)))
    fused, report = fuse_with_report(model, (image(),) if with_inputs else None)

    untraced = {module.name for module in report.untraced}
    assert untraced == (set() if how == "only read" else {"1"}), report
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1"}, report
    for sign in (1, -1, 1):
        assert_equivalent(model, fused, sign * image())


class NudgesAParameterItKeeps(nn.Module):
    """Keeps another module's parameter in a list (a plain attribute: FX hands traced code the
    parameter itself, no proxy) and nudges it through ``.data``, which moves no version counter
    the parameter has."""

    def __init__(self, parameter: nn.Parameter) -> None:
        super().__init__()
        self.kept = [parameter]

    def forward(self, x):
        self.kept[0].data.add_(0.5)
        return x


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no inputs", "example_inputs"])
def test_a_parameter_kept_as_a_plain_attribute_and_nudged_through_data_keeps_being_nudged(
    with_inputs,
):
    # The trace ran the nudge on the fuser's copy, left it there, and recorded none of it: the
    # fused model started one nudge ahead and never nudged again (1.08 off on the first call and
    # the third). Its values are now watched like a buffer's and put back: the nudger runs as
    # written, and the fold, whose bias it holds, is left (run_time_writes).
    model = nn.Sequential(conv_bn(4), nn.Identity())
    model[1] = NudgesAParameterItKeeps(model[0][0].bias)
    model = prepared(model)
    fused, report = fuse_with_report(model, (image(),) if with_inputs else None)

    assert [module.name for module in report.untraced] == ["1"], report
    assert "a tensor attribute changed in place" in report.untraced[0].error, report
    assert not report.folded, report
    for seed in (1, 2, 3):
        assert_equivalent(model, fused, image(seed))


class CountsThenBranches(CountsInABuffer):
    """Counts in its buffer, then branches on its data: FX cannot trace it at all."""

    def forward(self, x):
        self.calls.add_(1)
        x = self.block(x)
        return x * 2 if bool(x.sum() > 0) else x


def test_a_buffer_changed_by_a_call_that_then_fails_to_trace_is_put_back():
    # The failed call ran its `add_` before FX gave up on it; whether the change came from it
    # or from code before it is not told apart, so the model's own code runs as written too.
    model = prepared(nn.Sequential(conv_bn(4), CountsThenBranches(through_data=False)))
    fused, report = fuse_with_report(model, (image(),))

    assert {module.name for module in report.untraced} >= {"<model>", "1"}, report
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1"}, report
    assert_counts_as_the_original(model, fused)


def test_buffers_holding_nan_that_nothing_changes_leave_the_trace_alone():
    """NaN is not equal to itself: the snapshot's comparison must not take an unchanged NaN for a
    change (that would keep the module untraced and its BatchNorms unfolded)."""

    class SkipsMissingValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(4)
            self.register_buffer("offset", torch.tensor([float("nan"), 0.5, 0.25, 0.0]))
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            return self.block(x) + self.offset.nan_to_num().view(1, 4, 1, 1)

    model = prepared(SkipsMissingValues())
    fused, report = fuse_with_report(model, (image(),))

    assert not report.untraced, report
    assert {site.bn for site in report.folded} == {"block.1"}, report
    assert model.offset.isnan().tolist() == [True, False, False, False]
    assert_equivalent(model, fused, image())


class ShiftsABufferHoldingNan(nn.Module):
    """Changes a buffer holding a NaN through ``.data`` (whose version counter is its own, so
    only the values tell): the NaN stays where it was, the other values move."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.register_buffer("offset", torch.tensor([float("nan"), 0.5, 0.25, 0.0]))

    def forward(self, x):
        x = self.block(x) + self.offset.nan_to_num().view(1, 4, 1, 1)
        self.offset.data.add_(1.0)
        return x


def test_a_buffer_holding_nan_changed_in_place_keeps_changing():
    # Comparing only where the NaNs sit would take the change for none: traced through, the
    # fused model would never shift the offset.
    model = prepared(nn.Sequential(conv_bn(4), ShiftsABufferHoldingNan()))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "its offset (a buffer changed in place) is changed as it runs" in untraced.pop("1")
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1"}, report
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))
        torch.testing.assert_close(fused.get_submodule("1").offset, model[1].offset, equal_nan=True)
    assert model[1].offset[1].item() == 2.5


def test_batch_norm_statistics_changed_in_place_by_the_model_are_not_folded():
    """Statistics drifting with every call (the model halves a running mean after using it):
    a fold would freeze them, and the trace would fold them already halved once."""

    class DriftingStatistics(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            self.bn.running_mean.mul_(0.5)
            return y

    model = prepared(DriftingStatistics())
    before = model.bn.running_mean.clone()
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert "BatchNorm2d.running_mean (a buffer changed in place)" in untraced["<model>"], report
    assert not report.folded, report
    assert torch.equal(fused.bn.running_mean, before)
    assert torch.equal(model.bn.running_mean, before)
    for _ in range(3):
        assert_equivalent(model, fused, image())
        torch.testing.assert_close(fused.bn.running_mean, model.bn.running_mean)


def test_a_parameter_changed_in_place_while_tracing_is_refused_with_a_clear_error():
    """A parameter reached as a tensor (not as a module attribute, which FX makes a proxy) and
    changed in place: the trace changes the fuser's copy, and copying every weight before each
    trace to undo that would cost more than the trace."""

    class ClampsItsWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(4)
            self.block.requires_grad_(False)

        def forward(self, x):
            for parameter in self.block[0].parameters():
                parameter.clamp_(-0.1, 0.1)
            return self.block(x)

    model = prepared(ClampsItsWeights())
    weight = model.block[0].weight.clone()
    assert weight.abs().max() > 0.1, "the clamp would change nothing"
    with pytest.raises(
        FuserError, match=r"changes parameter Conv2d\.weight, Conv2d\.bias in place"
    ):
        fuse_with_report(model)
    assert torch.equal(model.block[0].weight, weight), "the caller's model was changed"


def test_a_container_filled_by_code_outside_its_module_leaves_that_code_untraced():
    """The parent's code appends to its child's list: keeping the child as a call does not stop
    that, so the parent (here the model) runs as written, its children fused on their own."""

    class FillsItsChildsList(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(4)
            self.keeper = KeepsItsOutputs()

        def forward(self, x):
            x = self.stem(x)
            self.keeper.outputs.append(x.detach())
            return self.keeper(x)

    model = prepared(FillsItsChildsList())
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "KeepsItsOutputs.outputs (a list)" in untraced["<model>"], report
    fused(image())
    model(image())
    assert len(fused.keeper.outputs) == len(model.keeper.outputs) == 2
    assert_equivalent(model, fused, image())


def test_the_constants_fx_stores_on_the_root_still_trace():
    """FX sets its own attributes on the root while tracing (a tensor made in ``forward`` becomes
    ``_tensor_constant0``): that is no write of the model's code."""

    class AddsAConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(4)

        def forward(self, x):
            return self.block(x) + torch.tensor(0.25)

    model = prepared(AddsAConstant())
    fused, report = fuse_with_report(model, (image(),))

    assert report.untraced == [], report
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, image())


def test_attribute_writes_in_another_thread_are_not_refused_while_a_model_is_traced():
    """The trace makes setting a module attribute fail in its own thread only."""
    elsewhere = nn.Identity()

    def other_thread() -> None:
        elsewhere.seen = True

    fuse_while_another_thread_works(other_thread)

    assert elsewhere.seen, "the other thread's write failed during the trace"


# --- code FX runs but does not record: a class's own __call__ -----------------------------------


class DoublingConv(nn.Conv2d):
    """Calling it doubles what its (inherited) forward returns."""

    def __call__(self, x):
        return super().__call__(x) * 2


class ShiftingBatchNorm(nn.BatchNorm2d):
    def __call__(self, x):
        return super().__call__(x) + 1


class CallsItsChildTwice(nn.Module):
    """Its own __call__ runs the model's children around forward; FX traces only forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def __call__(self, x):
        return super().__call__(self.block(x))

    def forward(self, x):
        return self.block(x)


def with_hook(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda module, args, output: output - 0.5)
    return module


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(DoublingConv(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
        lambda: nn.Sequential(with_hook(DoublingConv(4, 4, 3, padding=1)), nn.BatchNorm2d(4)),
        lambda: nn.Sequential(conv_bn(4), ShiftingBatchNorm(4), conv_bn(4)),
        lambda: nn.Sequential(conv_bn(4), with_hook(ShiftingBatchNorm(4)), conv_bn(4)),
        CallsItsChildTwice,
        lambda: nn.Sequential(CallsItsChildTwice(), conv_bn(4)),
    ],
    ids=["conv", "hooked conv", "batchnorm", "hooked batchnorm", "model", "child"],
)
def test_a_module_whose_class_overrides_call_computes_what_it_did(make):
    # Kept as one call, its __call__ code ran twice (once recorded by the trace, once in the
    # node); fused as a root or replaced by its fused GraphModule, it ran not at all.
    model = prepared(make())
    for example_inputs in ((image(),), None):
        fused, _ = fuse_with_report(model, example_inputs)
        assert_equivalent(model, fused, image())


class GateWithThreshold(nn.Module):
    """Traceable when called without a threshold, untraceable with one."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def forward(self, x, threshold=None):
        y = self.block(x)
        if threshold is not None and y.sum() > threshold:
            return -y
        return y


class CallsGateTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = GateWithThreshold()

    def forward(self, x):
        return self.gate(x) + self.gate(x, 0.0)


def test_module_traceable_at_one_call_site_and_not_at_another_is_opaque_at_both():
    # Folding gate.block's BN inside the traced first call would change the weights the opaque
    # second call runs with; the module must be one opaque call everywhere.
    model = prepared(CallsGateTwice())

    fused, report = fuse_with_report(model)

    assert [module.name for module in report.untraced] == ["gate"], report
    gate_calls = [n for n in fused.graph.nodes if n.op == "call_module" and n.target == "gate"]
    assert len(gate_calls) == 2, fused.graph
    for sign in (1, -1):
        assert_equivalent(model, fused, sign * (image().abs() + 0.1))


# --- code FX runs but does not record: x += y ---------------------------------------------------


class ShiftsItsInput(nn.Module):
    """Changes the tensor its caller passed in, then computes from it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def forward(self, x):
        x += 0.5
        return self.block(x)


class ChangesATensorSeenElsewhere(nn.Module):
    """``op=`` on a tensor that is also read through another name, a view, or by its caller
    (after a child changed it); and on a number, which has no in-place form."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.block = conv_bn(4)
        self.shift = ShiftsItsInput()

    def forward(self, x):
        out = self.block(x)
        if self.how == "another name":
            skip = out
            out *= 2.0
            return out + skip
        if self.how == "a view":
            flat = out.flatten(1)
            flat -= 0.5
            return out
        if self.how == "the caller":
            shifted = self.shift(out)
            return out + shifted
        channels = out.shape[1]
        channels //= 2
        return out[:, :channels]


@pytest.mark.parametrize("how", ["another name", "a view", "the caller", "a number"])
@pytest.mark.parametrize("with_inputs", [True, False], ids=["example_inputs", "no inputs"])
def test_an_augmented_assignment_changes_the_tensor_in_place(how, with_inputs):
    # FX's Proxy has no in-place operators, so Python runs ``out = out * 2`` instead: traced, the
    # tensor read through the other name (or view, or by the caller) keeps its old value, and the
    # fused model computes something else (off by up to 2x the output here). Torch's fuse does.
    model = prepared(ChangesATensorSeenElsewhere(how))
    fused, report = fuse_with_report(model, (image(),) if with_inputs else None)

    assert isinstance(fused, torch.fx.GraphModule) and report.untraced == [], report
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, image())


@pytest.mark.parametrize("how", ["another name", "a view", "the caller"])
def test_a_fused_model_changing_a_tensor_in_place_pickles_exactly(how):
    # A GraphModule is saved as code and traced again on load by FX's own tracer, which writes
    # ``x += y`` as ``x = x + y``: with example inputs, the fuser writes tensor ``op=`` as method
    # calls (``x.__iadd__(y)``), which load as they are.
    model = prepared(ChangesATensorSeenElsewhere(how))
    fused = fuse_with_report(model, (image(),))[0]

    assert_equivalent(model, pickle.loads(pickle.dumps(fused)), image())


class NegatesItsOwnTensorAroundACall(nn.Module):
    """``op=`` on the module's own tensors, through ``.data``, a view of it, or an index: each
    negated before the conv runs and again after, so every call computes the same."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 4).reshape(4, 1, 1))

    def negate(self) -> None:
        if self.how == ".data":
            weight = self.conv.weight.data
            weight *= -1
        elif self.how == "a view of .data":
            bias = self.conv.bias.data.view(-1)
            bias *= -1.0
        elif self.how == "an index of .data":
            row = self.conv.weight.data[0]
            row *= -1
        elif self.how == "a chunk of .data":
            half = self.conv.weight.data.chunk(2)[1]
            half *= -1
        else:  # a buffer: a tensor, not a proxy, while tracing; the graph keeps no op for it
            self.offset *= -1

    def forward(self, x):
        self.negate()
        out = self.conv(x) + self.offset
        self.negate()
        return out


@pytest.mark.parametrize(
    "how", [".data", "a view of .data", "an index of .data", "a chunk of .data", "a buffer"]
)
def test_a_model_changing_its_own_tensors_in_place_pickles_exactly_without_example_inputs(how):
    # The module's own tensors and their views are tensors whatever the inputs, so their ``op=``
    # is written as a method without example inputs too; FX's own ``x *= -1`` would load as
    # ``x = x * -1``, and the saved model would compute with the weight's sign the other way.
    model = prepared(nn.Sequential(NegatesItsOwnTensorAroundACall(how), nn.BatchNorm2d(4)))
    fused = fuse_with_report(model)[0]

    assert_equivalent(model, pickle.loads(pickle.dumps(fused)), image())


class HalvesANumberReadFromItsWeight(nn.Module):
    """``op=`` on numbers read from the module's own weight, which have no in-place methods."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        if self.how == "a size":
            half = self.conv.weight.data.shape[0]
        else:
            half = torch.numel(self.conv.bias.data)
        half //= 2
        return out[:, :half]


@pytest.mark.parametrize("how", ["a size", "a count"])
def test_a_number_read_from_the_models_own_tensor_keeps_its_augmented_assignment(how):
    # Only tensors have in-place methods: ``half //= 2`` on a number (read from a parameter, with
    # no example inputs to tell) must stay the operator, which replaces the number as Python does.
    model = prepared(nn.Sequential(HalvesANumberReadFromItsWeight(how), nn.BatchNorm2d(2)))
    fused = fuse_with_report(model)[0]

    assert_equivalent(model, fused, image())
    assert_equivalent(model, pickle.loads(pickle.dumps(fused)), image())


class ChangesATappedTensorByEveryArithmeticOp(nn.Module):
    """Every arithmetic ``op=`` TorchScript accepts, on a tensor also read under another name."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def forward(self, x):
        out = self.block(x)
        skip = out
        out *= 2.0
        out += 1.0
        out -= 0.25
        out /= 3.0
        return out + skip


def test_a_fused_model_changing_a_tensor_in_place_scripts():
    # TorchScript rejects ``x.__imul__(y)``; the fuser writes each arithmetic ``op=`` as the
    # in-place method it runs (``x.mul_(y)``), which scripts, as the original's ``x *= y`` does.
    model = prepared(ChangesATappedTensorByEveryArithmeticOp())
    fused = fuse_with_report(model, (image(),))[0]

    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, torch.jit.script(fused), image())


@pytest.mark.parametrize("name", sorted(AUGMENTED_ASSIGNMENTS))
def test_a_tensor_augmented_assignment_runs_as_it_does_in_eager_code(name):
    """Each tensor ``op=`` becomes the method ``Tensor.__iop__`` runs, bit for bit; ``@=``, which
    has none (Python runs ``x = x @ y``), keeps the operator."""
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    node = graph.call_function(AUGMENTED_ASSIGNMENTS[name], (x, y))
    graph.output(node)
    gm = torch.fx.GraphModule(nn.Module(), graph)
    x.meta["type"] = torch.Tensor
    tensor_augmented_assignments_as_methods(gm)
    gm.recompile()
    assert (node.op == "call_method") == hasattr(torch.Tensor, name)
    generator = torch.Generator().manual_seed(0)
    if name in ("__ilshift__", "__irshift__", "__iand__", "__ior__", "__ixor__"):
        a, b = torch.randint(-50, 50, (3, 4), generator=generator), torch.randint(0, 5, (4,))
    else:
        a, b = torch.rand(3, 4, generator=generator) + 0.5, torch.randn(4, generator=generator)
    eager_x = a.clone()
    eager_result = AUGMENTED_ASSIGNMENTS[name](eager_x, b)
    fused_x = a.clone()
    fused_result = gm(fused_x, b)
    assert torch.equal(fused_result, eager_result) and torch.equal(fused_x, eager_x)


class AddsToALayerOutput(nn.Module):
    """``y += ...`` on a Linear's output, on an Identity's of it, and on an Identity's of a
    number: only the first two are tensors whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.same = nn.Identity()

    def forward(self, x):
        y = self.fc(x)
        y += x
        z = self.same(y)
        z *= 2.0
        n = self.same(x.shape[1])
        n += 1
        return z * n


def test_augmented_assignments_on_what_torch_layers_return_become_methods_without_inputs():
    # Without example inputs nothing says a value is a tensor but what returns one for certain:
    # torch's layers and functional calls annotated so. Left as `y += x`, a saved and loaded
    # model ran `y = y + x` (under autocast, float32 where the original returned bfloat16).
    gm = trace_with_opaque_submodules(AddsToALayerOutput(), "").graph_module
    tensor_augmented_assignments_as_methods(gm)
    gm.recompile()

    methods = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    operators = [n.target for n in gm.graph.nodes if n.target in AUGMENTED_ASSIGNMENTS.values()]
    assert methods.count("add_") == 1 and methods.count("mul_") == 1, gm.code
    assert operators == [operator.iadd], gm.code  # the number's
    x = torch.randn(2, 4)
    module = AddsToALayerOutput()
    module.load_state_dict(gm.state_dict())
    torch.testing.assert_close(pickle.loads(pickle.dumps(gm))(x), module(x), rtol=0, atol=0)


def _first_of(values, x):
    return x


def test_a_call_whose_first_argument_is_a_list_holding_a_slice_is_read_without_hashing_it():
    """A node's first argument may be a list, and a slice in it makes the list unhashable on
    Python 3.11: asking whether it is a known tensor must not raise."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    first = graph.call_function(_first_of, ([slice(0, 1)], x))
    graph.output(graph.call_function(operator.iadd, (first, 1.0)))
    gm = torch.fx.GraphModule(nn.Module(), graph)

    tensor_augmented_assignments_as_methods(gm)

    assert [n.op for n in gm.graph.nodes].count("call_function") == 2  # nothing known: kept


def test_augmented_assignment_in_another_thread_keeps_fx_behaviour_while_a_model_is_traced():
    """The in-place operators exist on FX's proxies for the tracing thread only, and only while
    it traces."""
    graphs: list[torch.fx.Graph] = []

    def other_thread() -> None:
        def adds(x):
            x += 1
            return x

        graphs.append(torch.fx.symbolic_trace(adds).graph)

    class StartsAThread(nn.Module):
        def forward(self, x):
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
            return x

    fuse_with_report(nn.Sequential(StartsAThread(), conv_bn(4)).eval())

    (graph,) = graphs
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [operator.add]
    assert not any(name in vars(torch.fx.Proxy) for name in AUGMENTED_ASSIGNMENTS)


# --- code FX freezes: a type check on a traced value ---------------------------------------------


class ChecksATracedType(nn.Module):
    """Branches on the type of a value that is a proxy while tracing: FX answers with the proxy's
    type, False, and the branch every real tensor takes is left out of the graph."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.block = conv_bn(4)
        self.tail = conv_bn(4)
        self.scale = nn.Parameter(torch.tensor(0.5))  # a parameter is a proxy while tracing

    def forward(self, x):
        x = self.block(x)
        if self.how == "isinstance" and isinstance(x, torch.Tensor):
            x = x * 2.0
        if self.how == "is_tensor" and torch.is_tensor(self.scale):
            x = x * self.scale
        return self.tail(x)


@pytest.mark.parametrize("how", ["isinstance", "is_tensor"])
def test_a_module_whose_trace_computes_something_else_runs_as_written(how):
    # Traced, the graph leaves out ``x * 2.0`` (``x * self.scale``): torch's fuse returns that
    # graph, off by up to 2x. With example inputs the trace is compared with the forward, and the
    # module that differs runs as written; the rest of the model is traced and folded as usual.
    model = prepared(nn.Sequential(conv_bn(4), ChecksATracedType(how), conv_bn(4)))
    fused, report = fuse_with_report(model, (image(),))

    assert [module.name for module in report.untraced] == ["1"], report
    assert "computes something else than its forward" in report.untraced[0].error
    assert {site.bn for site in report.folded} == {"0.1", "1.block.1", "1.tail.1", "2.1"}, report
    assert isinstance(fused, torch.fx.GraphModule)
    assert_equivalent(model, fused, image())


def test_two_children_that_trace_unfaithfully_are_kept_as_calls_together():
    model = prepared(
        nn.Sequential(ChecksATracedType("isinstance"), conv_bn(4), ChecksATracedType("is_tensor"))
    )
    fused, report = fuse_with_report(model, (image(),))

    assert sorted(module.name for module in report.untraced) == ["0", "2"], report
    assert len(report.folded) == 5 and not report.left, report
    assert_equivalent(model, fused, image())


class Flickers(nn.Module):
    """Returns a slightly different output on every call (a nondeterministic kernel, in effect)."""

    calls = 0

    def forward(self, x):
        Flickers.calls += 1
        return x + 1e-6 * (Flickers.calls % 2)


def test_a_trace_of_a_nondeterministic_forward_may_differ_by_four_times_its_own_spread():
    x = image()
    reference = ForwardReference(Flickers(), (x,))

    assert reference.mismatch(x + 3e-6, None) is None
    assert "computes something else" in reference.mismatch(x + 1e-5, None)


def test_outputs_compare_by_value_whatever_their_containers_and_nans():
    class ReturnsADict(nn.Module):
        def forward(self, x):
            return collections.OrderedDict(out=x.log(), rank=x.dim())

    x = image() - 0.5  # log of negatives: NaN
    reference = ForwardReference(ReturnsADict(), (x,))

    assert reference.mismatch({"out": x.log(), "rank": 4}, None) is None
    assert reference.mismatch({"out": x.log(), "rank": 3}, None) is not None
    assert reference.mismatch({"out": x.log().double(), "rank": 4}, None) is not None
    assert "raises" in reference.mismatch(None, RuntimeError("boom"))


def test_the_trace_check_runs_with_deterministic_cudnn_and_puts_the_flags_back():
    # On an H200 a faithful trace differed from its forward in the last bits in 8 of 20 fuses
    # without these flags (pinned: cuda_transposed_conv_in_a_hooked_block).
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        with deterministic_kernels():
            inside = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        after = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    assert inside == (True, False)
    assert after == (False, True)


# --- traced code reading the state of a module that runs as written -----------------------------


class CountsAndBranches(nn.Module):
    """Counts its calls in a list, then branches on data: untraceable, so it runs as written."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.seen: list[int] = []

    def forward(self, x):
        x = self.block(x)
        self.seen.append(1)
        return x if x.sum() > 0 else -x


class ReadsItsChildsCount(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()

    def forward(self, x):
        return self.child(self.stem(x)) * len(self.child.seen)


def test_code_reading_the_state_of_an_untraceable_child_is_not_traced():
    # Traced, `len(self.child.seen)` would be read once (0, after the failed trace's rollback)
    # and kept: the fused model returned zeros. Without example inputs nothing else can see it.
    model = prepared(ReadsItsChildsCount())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert "FrozenStateRead: its code reads self.child.seen" in untraced["<model>"], report
    assert report.site("stem.1").folded, report
    for call in (1, 2, 3):
        assert_equivalent(model, fused, image(call))
        assert len(fused.child.seen) == len(model.child.seen) == call


class HookCounted(nn.Module):
    """A block whose own code reads the count a forward hook keeps on its BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn.calls = 0
        self.bn.register_forward_hook(HookCounted.count)

    @staticmethod
    def count(module, args, output):
        module.calls += 1

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.calls


def test_a_block_reading_what_a_hook_keeps_runs_as_written_and_the_rest_folds():
    model = prepared(nn.Sequential(conv_bn(4), HookCounted()))
    fused, report = fuse_with_report(model, (image(),))

    untraced = {module.name: module.error for module in report.untraced}
    assert "FrozenStateRead: its code reads self.bn.calls" in untraced["1"], report
    assert report.site("0.1").folded and not report.site("1.bn").folded, report
    assert fused.get_submodule("1.bn").calls == model[1].bn.calls == 0
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))
        assert fused.get_submodule("1.bn").calls == model[1].bn.calls == call


class ReadsItsChildsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()

    def forward(self, x):
        return self.child(self.stem(x)) * self.child.scale + self.child.block[0].bias.sum()


@pytest.mark.parametrize("with_example_inputs", [False, True], ids=["traced", "checked"])
def test_tensors_of_a_child_running_as_written_are_read_live_and_not_folded_under_the_reader(
    with_example_inputs,
):
    # FX reads a parameter live, so the trace stands. But the child's own block was fused on its
    # own, folding its BN into the conv bias the traced code reads: a wrong output, which the
    # example inputs' check (made before any fold) did not see. The child is now left whole.
    model = prepared(ReadsItsChildsParameter())
    fused, report = fuse_with_report(model, (image(),) if with_example_inputs else None)

    assert "<model>" not in {module.name for module in report.untraced}, report
    assert report.site("stem.1").folded, report
    left = report.site("child.block.1")
    assert not left.folded and "reads its tensor child.block.0.bias" in left.reason, report
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))


def test_a_hooked_sequential_whose_layer_weight_is_read_by_index_is_left_whole_not_untraced():
    # `self.body[0].weight` reaches a parameter of the hooked Sequential's first element: FX
    # reads it live, so the model is traced; the Sequential is left whole, a fold inside it would
    # change that weight.
    class ReadsByIndex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(4)
            self.body = conv_bn(4)
            self.body.register_forward_hook(lambda module, args, output: output * 2.0)

        def forward(self, x):
            return self.body(self.stem(x)) + self.body[0].weight.mean()

    model = prepared(ReadsByIndex())
    fused, report = fuse_with_report(model, (image(),))

    assert "<model>" not in {module.name for module in report.untraced}, report
    assert report.site("stem.1").folded and not report.site("body.1").folded, report
    assert_equivalent(model, fused, image())


class ReadsCountsByReflection(nn.Module):
    """Reaches the counting child through ``self.children()``: no attribute chain names it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()

    def forward(self, x):
        y = self.child(self.stem(x))
        for module in self.children():
            if isinstance(module, CountsAndBranches):
                y = y * len(module.seen)
        return y


def _defined_without_source(text: str) -> type[nn.Module]:
    """The class ``text`` defines, made by ``exec`` with no file behind it: ``inspect`` finds no
    source for it, as for a class typed into an interpreter without line history."""
    namespace = {"nn": nn, "CountsAndBranches": CountsAndBranches, "conv_bn": conv_bn}
    exec(compile(text, "<no source>", "exec"), namespace)
    return namespace["Hidden"]


HIDDEN_READER = """
class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()

    def forward(self, x):
        return self.child(self.stem(x)) * len(self.child.seen)
"""


@pytest.mark.parametrize(
    "make",
    [ReadsCountsByReflection, lambda: _defined_without_source(HIDDEN_READER)()],
    ids=["reflection", "no-source"],
)
def test_code_that_cannot_be_read_around_a_running_child_is_not_traced(make):
    # What such code reads of the running child is not known: traced, the count it reads was
    # kept as the trace found it (4.9 and 5.3 off on the second call). It runs as written now.
    model = prepared(make())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert "FrozenStateRead: its code has no source, or reaches" in untraced["<model>"], report
    for call in (1, 2, 3):
        assert_equivalent(model, fused, image(call))
        assert len(fused.child.seen) == len(model.child.seen) == call


class UsesAChildAndIndexesAList(nn.Module):
    """Traceable code that uses a child other than by calling it (through a local name) and
    indexes a plain list by a loop variable, beside a child that runs as written but is only
    called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()
        self.factors = [0.5, 2.0]

    def forward(self, x):
        stem = self.stem
        x = self.child(stem(x))
        for i in range(2):
            x = x * self.factors[i]
        return x


def test_reads_that_reach_no_running_state_leave_the_model_traced():
    model = prepared(UsesAChildAndIndexesAList())
    fused, report = fuse_with_report(model)

    assert "<model>" not in {module.name for module in report.untraced}, report
    assert report.site("stem.1").folded, report
    assert_equivalent(model, fused, image())


class _ReflectsAroundACountingChild(nn.Module):
    """A stem and a counting child (untraceable, runs as written); subclasses reach the child by
    reflection in one way or another."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()


class CallsEachChild(_ReflectsAroundACountingChild):
    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


class CallsEachNamedChild(_ReflectsAroundACountingChild):
    def forward(self, x):
        for name in ("stem",):
            x = getattr(self, name)(x)
        for _, module in self.named_children():
            x = module(x)
        return x


class AddsItsParameterSum(_ReflectsAroundACountingChild):
    def forward(self, x):
        total = sum(parameter.sum() for parameter in self.parameters())
        return self.child(self.stem(x)) + total * 0.01


class CallsASubmoduleByPath(_ReflectsAroundACountingChild):
    def forward(self, x):
        return self.get_submodule("child")(self.stem(x))


class ReadsASubmoduleByPath(_ReflectsAroundACountingChild):
    def forward(self, x):
        return self.child(self.stem(x)) * len(self.get_submodule("child").seen)


class ReadsNamedChildrenOutsideALoop(_ReflectsAroundACountingChild):
    def forward(self, x):
        children = dict(self.named_children())
        return self.child(self.stem(x)) * len(children["child"].seen)


class ReadsNamedChildrenAsPairs(_ReflectsAroundACountingChild):
    def forward(self, x):
        y = self.child(self.stem(x))
        for pair in self.named_children():
            if pair[0] == "child":
                y = y * len(pair[1].seen)
        return y


def _counted_through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.child(x) * len(module.child.seen)


class HandsItselfToAFunction(_ReflectsAroundACountingChild):
    def forward(self, x):
        return _counted_through(self, self.stem(x))


class CallsEachOfItsElements(nn.Sequential):
    def forward(self, x):
        for module in self:
            x = module(x)
        return x


def calls_each_of_its_elements() -> nn.Module:
    return CallsEachOfItsElements(
        collections.OrderedDict(stem=conv_bn(4), child=CountsAndBranches())
    )


class _CountsByReflection(_ReflectsAroundACountingChild):
    def count_calls(self) -> int:
        return sum(len(m.seen) for m in self.modules() if isinstance(m, CountsAndBranches))


class ReflectsOnlyInAMethodForwardNeverCalls(_CountsByReflection):
    def forward(self, x):
        return self.child(self.stem(x))


class ReflectsInAHelperForwardCalls(_CountsByReflection):
    def forward(self, x):
        return self.child(self.stem(x)) * self.count_calls()


class ReflectsInAHelperForwardCallsThroughSuper(_CountsByReflection):
    def forward(self, x):
        return self.child(self.stem(x)) * super().count_calls()


@pytest.mark.parametrize(
    ("make", "traced"),
    [
        (CallsEachChild, True),
        (CallsEachNamedChild, True),
        (calls_each_of_its_elements, True),
        (HandsItselfToAFunction, False),
        (AddsItsParameterSum, True),
        (CallsASubmoduleByPath, True),
        (ReadsASubmoduleByPath, False),
        (ReadsNamedChildrenOutsideALoop, False),
        (ReadsNamedChildrenAsPairs, False),
        (ReflectsOnlyInAMethodForwardNeverCalls, True),
        (ReflectsInAHelperForwardCalls, False),
        (ReflectsInAHelperForwardCallsThroughSuper, False),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_reflection_that_only_calls_or_never_runs_leaves_the_model_traced(make, traced):
    # Code that only calls what reflection finds reads no state, nor does a method the call never
    # reaches (an `init_weights`); a helper forward reaches through `self` does, and is followed.
    model = prepared(make())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert ("<model>" not in untraced) is traced, report
    assert traced or untraced["<model>"].startswith("FrozenStateRead: its code has no source"), (
        report
    )
    assert report.site("stem.1").folded is traced, report
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))


def _fused_reader(make, traced: bool, reason: str) -> tuple[nn.Module, nn.Module]:
    """Fuse ``make()`` without example inputs: its top level is traced, or (``traced`` False)
    runs as written for a reason holding ``reason``; its stem folds either way, and the fused
    model computes what the original does on three calls in turn. Returns both models."""
    model = prepared(make())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert ("<model>" not in untraced) is traced, report
    assert traced or reason in untraced["<model>"], report
    assert report.site("stem.1").folded, report
    for call in (1, 2, 3):
        assert_equivalent(model, fused, image(call))
    return model, fused


def _count_of(module: nn.Module) -> int:
    return len(module.seen)


class CountKeeper:
    """A plain object (no module) holding the counting child, whose method reads its count."""

    def __init__(self, counted: nn.Module) -> None:
        self.counted = counted

    def count(self) -> int:
        return len(self.counted.seen)


class ScalesByAHelperObject(_ReflectsAroundACountingChild):
    def __init__(self) -> None:
        super().__init__()
        self.keeper = CountKeeper(self.child)

    def forward(self, x):
        return self.child(self.stem(x)) * self.keeper.count()


class ScalesByALambda(_ReflectsAroundACountingChild):
    def __init__(self) -> None:
        super().__init__()
        child = self.child
        self.count = lambda: len(child.seen)

    def forward(self, x):
        return self.child(self.stem(x)) * self.count()


class ScalesByAPartial(_ReflectsAroundACountingChild):
    def __init__(self) -> None:
        super().__init__()
        self.count = functools.partial(_count_of, self.child)

    def forward(self, x):
        return self.child(self.stem(x)) * self.count()


class ScalesByARegistryEntry(_ReflectsAroundACountingChild):
    def __init__(self) -> None:
        super().__init__()
        self.registry = {"counted": self.child}

    def forward(self, x):
        return self.child(self.stem(x)) * len(self.registry["counted"].seen)


class Recorder:
    """A plain object whose bound method is a forward hook: it keeps the mean of each output."""

    def __init__(self) -> None:
        self.last = 0.0

    def record(self, module, args, output) -> None:
        self.last = float(output.detach().mean())


class ScalesByWhatAHookObjectRecords(_ReflectsAroundACountingChild):
    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()
        self.child.register_forward_hook(self.recorder.record)

    def forward(self, x):
        return self.child(self.stem(x)) * self.recorder.last


class ReadsPlainValuesAndCallsAPlainList(_ReflectsAroundACountingChild):
    """Code and values that reach no running module's state: an activation function, a config
    object, and a plain list holding the counting child, called by index."""

    def __init__(self) -> None:
        super().__init__()
        self.act = torch.relu
        self.config = types.SimpleNamespace(scale=0.5)
        self.plain = [self.child]

    def forward(self, x):
        return self.act(self.plain[0](self.stem(x))) * self.config.scale


@pytest.mark.parametrize(
    ("make", "traced"),
    [
        (ScalesByAHelperObject, False),
        (ScalesByALambda, False),
        (ScalesByAPartial, False),
        (ScalesByARegistryEntry, False),
        (ScalesByWhatAHookObjectRecords, False),
        (ReadsPlainValuesAndCallsAPlainList, True),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_code_and_objects_holding_a_running_module_are_not_traced_around(make, traced):
    # A plain object's method, a lambda or partial over the counting child, and a dict holding
    # it: what the trace runs through them reads the child's count once (5.2 to 5.3 off on the
    # first call, 13 to 16 on the third, traced), and the text of a lambda is not read. So is
    # the object whose bound method is the child's hook (0.5 to 0.6 off, traced). Values that
    # hold no running module, and calls of one through a plain list, stay traced.
    model, fused = _fused_reader(make, traced, "(no module)")
    assert len(fused.child.seen) == len(model.child.seen) == 3


#: Module-level state that a running module, or a hook, sets on every call and traced code reads.
KEPT: dict[str, float] = {"mean": 0.0}
SETTINGS = {"scale": 0.5}


def _kept_mean() -> float:
    return KEPT["mean"]


class KeepsItsMeanAtModuleLevel(nn.Module):
    """Untraceable (it branches on data); keeps its input's mean in a module-level dict."""

    def forward(self, x):
        KEPT["mean"] = float(x.detach().mean())
        return x if x.sum() > 0 else -x


LAST_MEAN = 0.0


class RebindsAModuleLevelName(nn.Module):
    """Untraceable (it branches on data); rebinds a module-level name to its input's mean."""

    def forward(self, x):
        global LAST_MEAN
        LAST_MEAN = float(x.detach().mean())
        return x if x.sum() > 0 else -x


def _keep_mean(module, args, output):
    KEPT["mean"] = float(output.detach().mean())


class _BesideAModuleLevelKeeper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = KeepsItsMeanAtModuleLevel()


class ReadsTheModuleLevelDict(_BesideAModuleLevelKeeper):
    def forward(self, x):
        return self.child(self.stem(x)) * KEPT["mean"]


class ReadsTheDictThroughAFunction(_BesideAModuleLevelKeeper):
    def forward(self, x):
        return self.child(self.stem(x)) * _kept_mean()


class ReadsWhatAHookKeeps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.hooked = nn.Conv2d(4, 4, 1)
        self.hooked.register_forward_hook(_keep_mean)

    def forward(self, x):
        return self.hooked(self.stem(x)) * KEPT["mean"]


class ReadsTheReboundName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = RebindsAModuleLevelName()

    def forward(self, x):
        return self.child(self.stem(x)) * LAST_MEAN


class KeepsItsMeanOnItsClass(nn.Module):
    """Untraceable (it branches on data); keeps its input's mean as a class attribute."""

    last_mean = 0.0

    def forward(self, x):
        type(self).last_mean = float(x.detach().mean())
        return x if x.sum() > 0 else -x


class ReadsTheClassAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = KeepsItsMeanOnItsClass()

    def forward(self, x):
        return self.child(self.stem(x)) * KeepsItsMeanOnItsClass.last_mean


class NamesTheDictOnlyWhereNoCallReaches(_BesideAModuleLevelKeeper):
    def forward(self, x):
        return self.child(self.stem(x))

    def describe(self) -> str:
        return f"last mean kept: {KEPT['mean']}"


class ReadsAModuleLevelSetting(_BesideAModuleLevelKeeper):
    def forward(self, x):
        return self.child(self.stem(x)) * SETTINGS["scale"]


@pytest.mark.parametrize(
    ("make", "traced"),
    [
        (ReadsTheModuleLevelDict, False),
        (ReadsTheDictThroughAFunction, False),
        (ReadsWhatAHookKeeps, False),
        (ReadsTheReboundName, False),
        (ReadsTheClassAttribute, False),
        (NamesTheDictOnlyWhereNoCallReaches, True),
        (ReadsAModuleLevelSetting, True),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_module_level_state_a_running_module_changes_is_read_live(make, traced):
    # A running module (or a hook) keeps the mean of what it saw in a module-level dict on every
    # call, and the code around it reads it; traced, that code kept the mean the trace saw, and
    # every later input was scaled by it (10 to 12 off reading the dict, up to 0.8 through the
    # function, 6 to 7 off reading what the hook keeps, 9 to 12 reading a rebound name, 10 to 11
    # a class attribute). Code no call reaches, and a module-level value no running code names,
    # leave the model traced.
    _fused_reader(make, traced, "names the module-level")


#: What ``WritesItsMeanAtModuleLevel`` leaves for code outside the model to read.
WRITTEN: dict[str, torch.Tensor] = {"mean": torch.zeros(())}


class WritesItsMeanAtModuleLevel(nn.Module):
    """Traceable, but sets a module-level dict on every call: a side effect FX runs and does not
    record."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def forward(self, x):
        x = self.block(x)
        WRITTEN["mean"] = x.detach().mean()
        return x


def test_code_changing_module_level_state_runs_as_written_and_the_trace_leaves_none_behind():
    # Traced, the fused model never set WRITTEN again, and the trace left one of its proxies in
    # it, which broke the next read. Now the writer runs as written (its own block still folds,
    # fused on its own) and fusing leaves the dict as it found it.
    model = prepared(nn.Sequential(conv_bn(4), WritesItsMeanAtModuleLevel()))
    model(image())
    before = WRITTEN["mean"]
    fused, report = fuse_with_report(model)

    assert WRITTEN["mean"] is before
    untraced = {module.name: module.error for module in report.untraced}
    assert "module-level WRITTEN" in untraced["1"], report
    assert report.site("0.1").folded and report.site("1.block.1").folded, report
    for call in (1, 2):
        model(image(call))
        expected = WRITTEN["mean"]
        assert_equivalent(model, fused, image(call))
        fused(image(call))
        torch.testing.assert_close(WRITTEN["mean"], expected)


#: A module-level dict holding a list that ``AppendsToAModuleLevelHistory`` fills.
HISTORY: dict[str, list] = {"means": []}


class AppendsToAModuleLevelHistory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)

    def forward(self, x):
        x = self.block(x)
        HISTORY["means"].append(x.detach().mean())
        return x


def test_a_list_held_in_module_level_state_is_watched_and_put_back_too():
    # One level further in: the trace appended a proxy to the list the dict holds, and the
    # fused model would never append again.
    model = prepared(nn.Sequential(conv_bn(4), AppendsToAModuleLevelHistory()))
    means = HISTORY["means"]
    means.clear()
    fused, report = fuse_with_report(model)

    assert HISTORY["means"] is means and means == [], means
    untraced = {module.name: module.error for module in report.untraced}
    assert "module-level HISTORY" in untraced["1"], report
    assert report.site("0.1").folded and report.site("1.block.1").folded, report
    model(image())
    fused(image())
    assert len(means) == 2
    torch.testing.assert_close(means[1], means[0])


class ReadsWhatItsChildWrites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = WritesItsMeanAtModuleLevel()

    def forward(self, x):
        return self.child(self.stem(x)) * WRITTEN["mean"]


def test_the_code_that_writes_module_level_state_is_the_one_blamed_for_it():
    # The root only reads WRITTEN: the trace's write is its child's, which runs as written; the
    # root then runs as written for reading what a running module changes, not for writing it.
    model = prepared(ReadsWhatItsChildWrites())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert untraced["<model>"].startswith("FrozenStateRead"), report
    assert "module-level WRITTEN" in untraced["child"], report
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))


class ReadsTheCountOfAnElementByAVariableIndex(nn.Module):
    """Calls each block of a ModuleList by index, then reads the count the untraceable one
    keeps, by the loop's index: which element is read is not in the text."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([conv_bn(4), CountsAndBranches()])

    def forward(self, x):
        for i in range(2):
            x = self.blocks[i](x)
        return x * len(self.blocks[i].seen)


def test_state_read_through_an_index_the_text_does_not_give_is_not_traced():
    # `self.blocks[i].seen` may be any element's: one that runs as written holds `seen`.
    model = prepared(ReadsTheCountOfAnElementByAVariableIndex())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert "FrozenStateRead: its code uses self.blocks[i] other" in untraced["<model>"], report
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))
        assert len(fused.blocks[1].seen) == len(model.blocks[1].seen) == call


class CallsARunningModuleThroughAHolder(nn.Module):
    """Calls an untraceable module held by a plain container module: a call, not a read."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.holder = nn.Module()
        self.holder.child = CountsAndBranches()

    def forward(self, x):
        return self.holder.child(self.stem(x))


def test_calling_a_running_module_through_an_attribute_chain_leaves_the_model_traced():
    model = prepared(CallsARunningModuleThroughAHolder())
    fused, report = fuse_with_report(model)

    assert "<model>" not in {module.name for module in report.untraced}, report
    assert report.site("stem.1").folded, report
    assert_equivalent(model, fused, image())


def _scaled_by_its_count(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x) * len(module.seen)


class HandsItsChildToAFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.child = CountsAndBranches()

    def forward(self, x):
        return _scaled_by_its_count(self.child, self.stem(x))


def test_a_running_child_handed_to_a_function_is_not_traced_around():
    # The function may read anything of it (here its count): the reader runs as written.
    model = prepared(HandsItsChildToAFunction())
    fused, report = fuse_with_report(model)

    untraced = {module.name: module.error for module in report.untraced}
    assert "FrozenStateRead: its code uses self.child other" in untraced["<model>"], report
    for call in (1, 2):
        assert_equivalent(model, fused, image(call))


class InspectsItsChildren(nn.Module):
    """Reaches its children by reflection and asks their type: not only calls, but nothing inside
    it runs as written."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(4)

    def forward(self, x):
        for module in self.children():
            if isinstance(module, nn.Sequential):
                x = module(x)
        return x


class ReflectiveBlockBesideARunningChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = InspectsItsChildren()
        self.child = CountsAndBranches()

    def forward(self, x):
        return self.child(self.stem(x))


def test_reflection_in_a_module_holding_no_running_module_is_traced_through():
    # What a reflective module reads is not known, but only a running module's state could
    # go stale: with none inside it, it is traced like any other.
    model = prepared(ReflectiveBlockBesideARunningChild())
    fused, report = fuse_with_report(model)

    assert {module.name for module in report.untraced} == {"child"}, report
    assert report.site("stem.body.1").folded, report
    assert_equivalent(model, fused, image())


class CountingBlock(nn.Module):
    """Calls a counting child (untraceable, so it runs as written) and is traced through; its
    other members reach that child by reflection, which no attribute chain names."""

    def __init__(self) -> None:
        super().__init__()
        self.child = CountsAndBranches()

    def forward(self, x):
        return self.child(x)

    def count_calls(self) -> int:
        return sum(len(m.seen) for m in self.modules() if isinstance(m, CountsAndBranches))

    def scaled(self, y):
        return y * self.count_calls()

    @property
    def calls(self) -> int:
        return self.count_calls()

    def __getattr__(self, name: str):
        if name == "calls_so_far":
            return self.count_calls()
        return super().__getattr__(name)

    def doubled(self, y):
        return y * 2.0


class _CallsACountingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(4)
        self.block = CountingBlock()


class ScalesByTheBlocksMethod(_CallsACountingBlock):
    def forward(self, x):
        return self.block.scaled(self.block(self.stem(x)))


class ScalesByTheBlocksProperty(_CallsACountingBlock):
    def forward(self, x):
        return self.block(self.stem(x)) * self.block.calls


class ScalesByTheBlocksGetattr(_CallsACountingBlock):
    def forward(self, x):
        return self.block(self.stem(x)) * self.block.calls_so_far


class ScalesByABoundMethodOfTheBlock(_CallsACountingBlock):
    def forward(self, x):
        count = self.block.count_calls
        return self.block(self.stem(x)) * count()


class CountsTheBlocksChildren(_CallsACountingBlock):
    def forward(self, x):
        y = self.block(self.stem(x))
        for module in self.block.children():
            y = y * len(module.seen)
        return y


class CountsThroughTheBlocksModuleDict(_CallsACountingBlock):
    def forward(self, x):
        return self.block(self.stem(x)) * len(self.block._modules["child"].seen)


class CallsEachOfTheBlocksChildren(_CallsACountingBlock):
    def forward(self, x):
        y = self.stem(x)
        for module in self.block.children():
            y = module(y)
        return y


class DoublesByTheBlocksMethod(_CallsACountingBlock):
    def forward(self, x):
        return self.block.doubled(self.block(self.stem(x)))


@pytest.mark.parametrize(
    ("make", "traced"),
    [
        (ScalesByTheBlocksMethod, False),
        (ScalesByTheBlocksProperty, False),
        (ScalesByTheBlocksGetattr, False),
        (ScalesByABoundMethodOfTheBlock, False),
        (CountsTheBlocksChildren, False),
        (CountsThroughTheBlocksModuleDict, False),
        (CallsEachOfTheBlocksChildren, True),
        (DoublesByTheBlocksMethod, True),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_code_another_module_reaches_through_a_traced_block_is_followed(make, traced):
    # A method, property or __getattr__ of a block, or nn.Module's reflection on it, runs inline
    # in the caller's trace: traced, each of the first six kept the count the trace saw (5.3 to
    # 5.5 off on the first call, 16 on the third). A method that only computes, or a loop that
    # only calls the block's children, stays traced. (The stem is only called: fused either way.)
    model, fused = _fused_reader(make, traced, "FrozenStateRead: its code reaches self.block")
    assert len(fused.block.child.seen) == len(model.block.child.seen) == 3


class ShiftedWhenGiven(nn.Module):
    """A conv/BN block, then a root whose forward adds an optional shift when one is given, as
    ``forward(x, mask=None)`` code does."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, shift=None):
        y = self.bn(self.conv(self.block(x)))
        if shift is not None:
            y = y + shift
        return y


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no inputs", "example_inputs"])
def test_a_forward_branching_on_an_optional_argument_runs_as_written(with_inputs):
    # FX hands forward a proxy for ``shift``, which is not None, so the trace took the shift as
    # always given: fused without example inputs, the model raised TypeError (tensor + None) on
    # the call that leaves it out. Now the root runs as written, and its block is fused alone.
    model = prepared(ShiftedWhenGiven())
    fused, report = fuse_with_report(model, (image(),) if with_inputs else None)

    assert [module.name for module in report.untraced] == ["<model>"], report
    assert "OptionalArgument" in report.untraced[0].error, report
    assert {site.bn for site in report.folded} == {"block.1"}, report
    assert_equivalent(model, fused, image())
    shift = torch.full((1, 4, 1, 1), 0.5)
    torch.testing.assert_close(fused(image(), shift), model(image(), shift))


def test_an_optional_argument_the_graph_never_uses_leaves_the_model_traced():
    class IgnoresIt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(4)

        def forward(self, x, unused=None):
            return self.block(x)

    model = prepared(IgnoresIt())
    fused, report = fuse_with_report(model)
    assert report.untraced == [] and {site.bn for site in report.folded} == {"block.1"}, report
    assert_equivalent(model, fused, image())
