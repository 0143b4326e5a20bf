"""Hooks that read the module they are registered on (``fuser.hook_usage``).

A hooked module is fused on its own and its hooks move to the fused module, which is what they
are then handed. A hook reading that module's parameters or children would see the folded ones,
so such a module is kept whole. The property suite's hooks only shift values and never read their
module, so these tests, not the gate, pin the reading of a hook's code.
"""

from __future__ import annotations

import functools
import linecache

import pytest
import torch
from helpers import assert_equivalent, randomise_bn_stats
from torch import nn

from fuser import fuse_with_report
from fuser.hook_usage import hook_reading_its_module


class Block(nn.Module):
    """A conv/BN pair behind a module of its own, with a plain attribute hooks may read."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.scale = 0.5

    def forward(self, x):
        return self.body(x)


def ignores_module(module, args, output):
    return output + 1


def reads_parameters(module, args, output):
    return output + sum(p.sum() for p in module.parameters())


def reads_a_child(mod, args, output):
    return output * mod.body[1].running_var.view(1, -1, 1, 1)


def reads_a_plain_attribute(module, args, output):
    return output * module.scale


def reads_the_training_flag(module, args, output):
    return output if module.training else output - 1


def hands_the_module_on(module, args, output):
    return output + len(list(module.children()))


def pre_hook_reading_a_buffer(module, args):
    return (args[0] + module.body[1].running_mean.view(1, -1, 1, 1),)


def takes_everything_in_args(*args):
    return args[2] + 1


class Recorder:
    """Hooks that are bound methods: ``self`` is the recorder, the module comes second."""

    def __init__(self) -> None:
        self.seen = 0
        self.offset = torch.ones(())  # not the model's: fusing never changes it

    def shift(self, module, args, output):
        return output + self.offset

    def count(self, module, args, output):
        self.seen += 1

    def peek(self, module, args, output):
        return output + module.body[0].weight.sum()

    def __call__(self, module, args, output):
        return output + 1


class OutsideModule(nn.Module):
    """A module that is not part of the model: fusing the model never changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.ones(()))

    def shift(self, module, args, output):
        return output + self.offset


ONE_LINE_LAMBDAS = (lambda m, a, o: o + 1, lambda m, a, o: o * m.body[0].bias.sum())

HOOKS = {
    "function ignoring its module": (ignores_module, None),
    "function reading its module's parameters": (reads_parameters, "module"),
    "function reading a child": (reads_a_child, "mod.body"),
    "function reading a plain attribute": (reads_a_plain_attribute, None),
    "function reading the training flag": (reads_the_training_flag, None),
    "function handing its module on": (hands_the_module_on, "module.children"),
    "lambda ignoring its module": (lambda module, args, output: output + 1, None),
    "lambda reading its module": (
        lambda module, args, output: output + module.body[0].bias,
        "body",
    ),
    "two lambdas on one line": (ONE_LINE_LAMBDAS[0], "no source"),
    "functools.partial": (functools.partial(ignores_module), "not a Python function"),
    "callable object": (Recorder(), "not a Python function"),
    "bound method ignoring its module": (Recorder().count, None),
    "bound method of an object that is no module": (Recorder().shift, None),
    "bound method of a module outside the model": (OutsideModule().shift, None),
    "bound method reading its module": (Recorder().peek, "module.body"),
    "module taken in *args": (takes_everything_in_args, "*args"),
}


@pytest.mark.parametrize("case", sorted(HOOKS))
def test_a_hook_reading_its_module_is_found(case):
    hook, reason = HOOKS[case]
    block = Block()
    block.register_forward_hook(hook)

    why = hook_reading_its_module(block)

    if reason is None:
        assert why is None
    else:
        assert why is not None and reason in why, why


def test_a_lambda_written_inside_a_longer_call_is_read():
    block = Block()
    block.register_forward_hook(
        lambda module, args, output: output + 1  # these lines do not parse alone
    )
    assert hook_reading_its_module(block) is None


def test_a_pre_hook_reading_its_module_is_found():
    block = Block()
    block.register_forward_pre_hook(pre_hook_reading_a_buffer)
    assert "forward pre-hook pre_hook_reading_a_buffer reads its module" in (
        hook_reading_its_module(block) or ""
    )


def test_a_plain_attribute_a_graph_module_has_of_its_own_counts_as_read():
    """The fused module keeps its own ``code``, so a hook reading a model's ``code`` would not
    see the model's value."""

    def reads_code(module, args, output):
        return output * module.code

    block = Block()
    block.code = 2.0
    block.register_forward_hook(reads_code)
    assert "module.code" in (hook_reading_its_module(block) or "")


def hooked_model(hook, *, pre: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = randomise_bn_stats(nn.Sequential(Block(), nn.ReLU(), Block())).eval()
    if pre:
        model[0].register_forward_pre_hook(hook)
    else:
        model[0].register_forward_hook(hook)
    return model


@pytest.mark.parametrize(
    "hook, pre",
    [
        (reads_parameters, False),
        (reads_a_child, False),
        (pre_hook_reading_a_buffer, True),
        (functools.partial(ignores_module), False),
    ],
    ids=["parameters", "child", "pre-hook", "unreadable"],
)
def test_a_module_whose_hook_reads_it_is_kept_whole(hook, pre):
    """Only that module: its parent, whose trace keeps it as one call, still folds the rest."""
    model = hooked_model(hook, pre=pre)
    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, torch.randn(2, 3, 4, 4))
    left = report.site("0.body.1")
    assert not left.folded and "not fused: its forward" in left.reason, left
    assert report.site("2.body.1").folded, report
    assert "0" in [module.name for module in report.untraced], report


@pytest.mark.parametrize("hook", [ignores_module, reads_a_plain_attribute, Recorder().count])
def test_a_module_whose_hooks_do_not_read_it_is_still_fused(hook):
    model = hooked_model(hook)
    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, torch.randn(2, 3, 4, 4))
    assert report.site("0.body.1").folded and report.site("2.body.1").folded, report


def test_a_model_whose_own_hook_reads_it_is_returned_unfused():
    torch.manual_seed(0)
    model = randomise_bn_stats(Block()).eval()
    model.register_forward_hook(reads_parameters)
    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, torch.randn(2, 3, 4, 4))
    assert not report.site("body.1").folded, report
    assert [module.name for module in report.untraced] == ["<model>"], report


class CollectsFeatures(nn.Module):
    """A wrapper whose hook is its own method: storing outputs in a dict of its own is fine,
    reading the wrapped model's weights is not (the fused model shares and changes them)."""

    def __init__(self, read_weights: bool) -> None:
        super().__init__()
        self.model = nn.Sequential(Block(), nn.ReLU(), Block())
        self.features: dict = {}
        self.model[0].register_forward_hook(self.shift if read_weights else self.collect)

    def collect(self, module, args, output):
        self.features["first"] = output

    def shift(self, module, args, output):
        return output + self.model[2].body[0].weight.sum()

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("read_weights", [False, True], ids=["stores outputs", "reads weights"])
def test_a_hook_that_is_a_method_of_the_model_reads_what_fusing_changes_only_if_it_says_so(
    read_weights,
):
    torch.manual_seed(0)
    model = randomise_bn_stats(CollectsFeatures(read_weights)).eval()
    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, torch.randn(2, 3, 4, 4))
    folded = {site.bn for site in report.sites if site.folded}
    assert folded == (set() if read_weights else {"model.0.body.1", "model.2.body.1"}), report
    if read_weights:
        why = report.site("model.2.body.1").reason
        assert "CollectsFeatures.shift of model.0 reads the module it is a method of" in why


class KeepsTheWeights(nn.Module):
    """A wrapper whose hook method reads a list holding the wrapped model's parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(Block(), nn.ReLU(), Block())
        self.watched = [list(self.model[2].parameters())]
        self.model[0].register_forward_hook(self.shift)

    def shift(self, module, args, output):
        return output + self.watched[0][0].sum()

    def forward(self, x):
        return self.model(x)


def test_a_container_on_the_module_holding_tensors_counts_as_read():
    torch.manual_seed(0)
    model = randomise_bn_stats(KeepsTheWeights()).eval()
    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, torch.randn(2, 3, 4, 4))
    assert not any(site.folded for site in report.sites), report


def test_a_container_holding_itself_counts_as_read_without_recursing_forever():
    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.history: list = []
            self.history.append(self.history)
            self.register_forward_hook(self.record)

        def record(self, module, args, output):
            self.history.append(output)

        def forward(self, x):
            return self.body(x)

    assert "self.history" in (hook_reading_its_module(Looped()) or "")


def _without_readable_source(text: str, name: str, cached: list[str]):
    """``name`` compiled from ``text`` under a file name whose lines, as ``linecache`` has them,
    are ``cached`` instead."""
    filename = f"<hook source {name} {len(cached)} {cached[-1]!r}>"
    namespace: dict = {}
    exec(compile(text, filename, "exec"), namespace)
    linecache.cache[filename] = (len(text), None, cached, filename)
    return namespace[name]


DEF = "def hook(m, a, o):\n    return o\n"
LAMBDA = "hook = lambda m, a, o: o\n"


@pytest.mark.parametrize(
    "make",
    [
        lambda: _without_readable_source(DEF, "hook", ["def (\n", "def (\n"]),
        lambda: _without_readable_source(DEF, "hook", ["def hook(m, a, o):\n", "    return o o\n"]),
        lambda: _without_readable_source(LAMBDA, "hook", ["hook = lambda m, a, o: o o\n"]),
        lambda: eval("lambda m, a, o: o"),  # no file, no cached lines
    ],
    ids=["def that cannot be cut", "def that does not parse", "lambda", "no file"],
)
def test_a_hook_whose_source_cannot_be_read_counts_as_reading_its_module(make):
    block = Block()
    block.register_forward_hook(make())
    assert "has no source that can be read" in (hook_reading_its_module(block) or "")
