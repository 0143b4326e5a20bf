"""How an untraceable parent's own code uses its children (``fuser.child_usage``).

The fuser swaps a child of code that runs as written for its fused version only where that code
does nothing with the child but call it, so each kind of use is pinned here: a use read as a
call that is not one would let the parent reach a folded layer, or compare a fused module where
it compared the original. The property suite's untraceable parents only ever call their children,
so these tests, not the gate, are what keeps this reading right.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_equivalent, randomise_bn_stats
from torch import nn

from fuser import fuse_with_report
from fuser.child_usage import CALLED, ELEMENTS_CALLED, OTHER, child_usage

#: ``body`` code of a parent holding ``self.blocks`` (a Sequential of conv/BN Sequentials),
#: ``self.skipped`` (its second element, under a second name) and ``self.scales`` (numbers, not
#: a child), with the verdict for ``blocks``.
BLOCKS_USES = {
    "loop calling each element": (
        ELEMENTS_CALLED,
        """
        for block in self.blocks:
            x = block(x)
        return x
        """,
    ),
    "loop over reversed(...)": (
        ELEMENTS_CALLED,
        """
        for block in reversed(self.blocks):
            x = block(x)
        return x
        """,
    ),
    "enumerate, index computed and compared with": (
        ELEMENTS_CALLED,
        """
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = block(x) * (i + 1)
        return x
        """,
    ),
    "zip with a list of numbers": (
        ELEMENTS_CALLED,
        """
        for s, block in zip(self.scales, self.blocks):
            x = block(x) * s
        return x
        """,
    ),
    "elements called by index": (
        ELEMENTS_CALLED,
        """
        return self.blocks[1](self.blocks[0](x))
        """,
    ),
    "elements counted": (
        ELEMENTS_CALLED,
        """
        if len(self.blocks) > 1:
            x = self.blocks[1](x)
        return x
        """,
    ),
    "two loops, one variable name": (
        ELEMENTS_CALLED,
        """
        for block in self.blocks:
            x = block(x)
        for block in self.blocks:
            x = block(x)
        return x
        """,
    ),
    "name reused by a comprehension after the loop": (
        ELEMENTS_CALLED,
        """
        for block in self.blocks:
            x = block(x)
        return sum(block for block in [x])
        """,
    ),
    "name reused by a lambda's argument after the loop": (
        ELEMENTS_CALLED,
        """
        for block in self.blocks:
            x = block(x)
        return (lambda block: block * 2)(x)
        """,
    ),
    "name reused by a nested function's argument after the loop": (
        ELEMENTS_CALLED,
        """
        for block in self.blocks:
            x = block(x)

        def doubled(block):
            return block * 2

        return doubled(x)
        """,
    ),
    "called whole": (CALLED, "return self.blocks(x)"),
    "is None check and a call": (
        CALLED,
        """
        if self.blocks is not None:
            x = self.blocks(x)
        return x
        """,
    ),
    "element compared by identity": (
        OTHER,
        """
        for block in self.blocks:
            if block is self.skipped:
                continue
            x = block(x)
        return x
        """,
    ),
    "element tested for membership": (
        OTHER,
        """
        for block in self.blocks:
            if block not in [self.skipped]:
                x = block(x)
        return x
        """,
    ),
    "zip, element compared by identity": (
        OTHER,
        """
        for s, block in zip(self.scales, self.blocks):
            if block is not self.skipped:
                x = block(x) * s
        return x
        """,
    ),
    "enumerate, element compared": (
        OTHER,
        """
        for i, block in enumerate(self.blocks):
            if block != self.skipped:
                x = block(x)
        return x
        """,
    ),
    "element kept after the loop": (
        OTHER,
        """
        for block in self.blocks:
            x = block(x)
        return x * len(block)
        """,
    ),
    "element read in the loop's else": (
        OTHER,
        """
        for block in self.blocks:
            x = block(x)
        else:
            x = x + block[1].running_mean.view(1, -1, 1, 1)
        return x
        """,
    ),
    "element stored": (
        OTHER,
        """
        for block in self.blocks:
            self.last = block
            x = block(x)
        return x
        """,
    ),
    "element reached through a tuple": (
        OTHER,
        """
        for pair in enumerate(self.blocks):
            x = pair[1](x)
        return x
        """,
    ),
    "loop never calls its elements": (
        OTHER,
        """
        for block in self.blocks:
            pass
        return x
        """,
    ),
    "element's attribute read": (
        OTHER,
        """
        for block in self.blocks:
            x = block(x) + block[0].bias.view(1, -1, 1, 1)
        return x
        """,
    ),
    "element indexed, not called": (
        OTHER,
        """
        return x * self.blocks[1][1].weight.view(1, -1, 1, 1)
        """,
    ),
    "counted and read into": (
        OTHER,
        """
        if len(self.blocks) > 1:
            x = self.blocks[1](x)
        return x + self.blocks[0][1].bias.view(1, -1, 1, 1)
        """,
    ),
    "called whole and by index": (
        ELEMENTS_CALLED,
        """
        return self.blocks(x) + self.blocks[0](x)
        """,
    ),
    "children called in a loop": (
        CALLED,
        """
        for child in self.children():
            x = child(x)
        return x
        """,
    ),
    "named children called in a loop": (
        CALLED,
        """
        for name, child in self.named_children():
            if name != "skipped":
                x = child(x)
        return x
        """,
    ),
    "descendants called through self.named_modules()": (
        OTHER,
        """
        for name, module in self.named_modules():
            if name == "blocks":
                x = module(x)
        return x
        """,
    ),
    "modules walked with self.modules()": (
        OTHER,
        """
        x = self.blocks(x)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                x = x + m.running_mean.view(1, -1, 1, 1)
        return x
        """,
    ),
    "parameters summed with self.parameters()": (
        OTHER,
        """
        return self.blocks(x) * sum(p.sum() for p in self.parameters())
        """,
    ),
    "child reached with getattr(self, name)": (
        OTHER,
        """
        return self.blocks(x) + getattr(self, "blocks")[1][1].bias.view(1, -1, 1, 1)
        """,
    ),
    "child reached with self.get_submodule": (
        OTHER,
        """
        return self.blocks(x) + self.get_submodule("blocks.1.1").bias.view(1, -1, 1, 1)
        """,
    ),
    "self handed to a function": (
        OTHER,
        """
        return self.blocks(x) + last_bias(self)
        """,
    ),
    "type(self) and isinstance(self, ...)": (
        CALLED,
        """
        if isinstance(self, Base) and type(self).__name__ == "Parent":
            x = self.blocks(x)
        return x
        """,
    ),
    "a base class method through super(Parent, self)": (
        CALLED,
        """
        return super(Parent, self).doubled(self.blocks(x))
        """,
    ),
    "iterated by a function that is not a plain wrapper": (
        OTHER,
        """
        for block in sorted(self.blocks, key=len):
            x = block(x)
        return x
        """,
    ),
}

#: Cases whose code calls every child by reflection, ``skipped`` among them.
EVERY_CHILD_CALLED = {"children called in a loop", "named children called in a loop"}

PARENT_SOURCE = """
import torch
from torch import nn


def last_bias(module):
    return module.blocks[1][1].bias.view(1, -1, 1, 1)


class Base(nn.Module):
    def doubled(self, x):
        return 2 * x


class Parent(Base):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)) for _ in range(2))
        )
        self.skipped = self.blocks[1]
        self.scales = [0.5, 2.0]

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent: FX cannot trace this module
            return self.body(x)
        return x

    def body(self, x):
{body}
"""


def parent_class(body: str, directory: Path, monkeypatch: pytest.MonkeyPatch) -> type[nn.Module]:
    """``Parent`` with that ``body``, imported from a real file (and registered in
    ``sys.modules`` for the test's duration, as an import does), so its source can be read."""
    path = directory / "parent_module.py"
    body = textwrap.indent(textwrap.dedent(body).strip(), " " * 8)
    path.write_text(PARENT_SOURCE.format(body=body))
    name = f"child_usage_parent_{directory.name}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module.Parent


@pytest.mark.parametrize("case", sorted(BLOCKS_USES))
def test_each_use_of_a_container_child_gets_its_verdict(case, tmp_path, monkeypatch):
    verdict, body = BLOCKS_USES[case]
    assert child_usage(parent_class(body, tmp_path, monkeypatch)())["blocks"] == verdict


@pytest.mark.parametrize("case", sorted(BLOCKS_USES))
def test_fusing_the_parent_keeps_what_it_computes(case, tmp_path, monkeypatch):
    """Whatever the verdict, the fused parent computes what it did; where its code only calls
    the container or its elements, their BNs are folded."""
    verdict, body = BLOCKS_USES[case]
    torch.manual_seed(0)
    model = randomise_bn_stats(parent_class(body, tmp_path, monkeypatch)()).eval()
    fused, report = fuse_with_report(model)

    assert_equivalent(model, fused, torch.randn(2, 3, 4, 4))
    folded = {site.bn for site in report.sites if site.folded}
    expected = {"blocks.0.1", "blocks.1.1"} if verdict != OTHER else set()
    if case in EVERY_CHILD_CALLED:  # `skipped`, another name for blocks[1], is a child too
        expected.add("skipped.1")
    assert folded == expected


class UsesChildrenInEveryWay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.called = nn.Conv2d(4, 4, 1)
        self.indexed = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.looped = nn.ModuleList([nn.Conv2d(4, 4, 1)])
        self.counted = nn.ModuleList([nn.Conv2d(4, 4, 1)])
        self.checked = nn.Conv2d(4, 4, 1)
        self.read = nn.Conv2d(4, 4, 1)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.indexed[0](self.called(x))
        for layer in self.looped:
            x = layer(x)
        if len(self.counted) > 1 or self.checked is None:
            x = x * 2
        return self.checked(x) + self.read.weight.sum()


def test_child_usage_classifies_each_kind_of_use():
    assert child_usage(UsesChildrenInEveryWay()) == {
        "called": CALLED,
        "indexed": ELEMENTS_CALLED,
        "looped": ELEMENTS_CALLED,
        "counted": ELEMENTS_CALLED,
        "checked": CALLED,
        "read": OTHER,
        "unused": OTHER,
    }


class CallsInAHelper(UsesChildrenInEveryWay):
    """A subclass whose own method reads a child its base only calls."""

    def helper(self, x):
        return x * self.called.weight.sum()


def test_uses_in_every_class_of_the_hierarchy_count():
    assert child_usage(CallsInAHelper())["called"] == OTHER


class SequentialWithAHead(nn.Sequential):
    """A subclass of a torch.nn container: its own methods are read, torch's are not."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(super().forward(x))


def test_torch_nn_base_classes_are_not_read():
    assert child_usage(SequentialWithAHead()) == {"0": OTHER, "1": OTHER, "head": CALLED}


def _same_name_in_two_functions() -> tuple[type, type]:
    def calls() -> type:
        class Parent(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.child = nn.Conv2d(1, 1, 1)

            def forward(self, x):
                return self.child(x)

        return Parent

    def reads() -> type:
        class Parent(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.child = nn.Conv2d(1, 1, 1)

            def forward(self, x):
                return x * self.child.weight

        return Parent

    return calls(), reads()


def test_classes_with_the_same_name_are_told_apart_by_where_they_are_defined():
    calling, reading = _same_name_in_two_functions()

    assert child_usage(calling()) == {"child": CALLED}
    assert child_usage(reading()) == {"child": OTHER}


def test_a_class_defined_twice_in_its_file_is_left_alone(tmp_path, monkeypatch):
    """The live class is the second definition, which reads into its child; ``inspect`` would
    read the first, which only calls it. Which definition runs cannot be told from the text."""
    calls = PARENT_SOURCE.format(body="        return self.blocks(x)")
    reads = "        return self.blocks(x) + self.blocks[0][1].bias.view(1, -1, 1, 1)"
    redefined = "class Parent" + PARENT_SOURCE.format(body=reads).split("class Parent", 1)[1]
    path = tmp_path / "twice.py"
    path.write_text(calls + "\n\n" + redefined)
    spec = importlib.util.spec_from_file_location("child_usage_twice", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "child_usage_twice", module)
    spec.loader.exec_module(module)

    assert child_usage(module.Parent())["blocks"] == OTHER


def test_child_of_a_class_without_source_is_left_alone():
    namespace: dict = {"nn": nn}
    exec(  # no file and no linecache entry: the source cannot be read back
        "class NoSource(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.child = nn.Conv2d(1, 1, 1)\n"
        "    def forward(self, x):\n"
        "        return self.child(x)\n",
        namespace,
    )

    assert child_usage(namespace["NoSource"]()) == {"child": OTHER}
