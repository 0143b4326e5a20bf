"""Build a mutant from our real fuser by swapping one name for the duration of one call.

A mutant should differ from the fuser by exactly one realistic mistake, so most mutants are the real
``fuser.fuse`` with one function (or constant) replaced where it is looked up: ``fuser.fold_pass``
imports ``bn_scale_shift`` by name, so patching ``fuser.fold_math.bn_scale_shift`` would change
nothing; ``fuser.fold_pass.bn_scale_shift`` is the name the pass reads. The patches are undone when
the call returns, so a mutant never leaks into the next test (pytest-xdist runs each worker in its
own process, and Hypothesis runs examples one at a time within a worker).
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

from torch import nn

import fuser
from fuser.report import FusionReport

#: What a mutant returns: the fused model and its report, like ``fuser.fuse_with_report``.
Fused = tuple[nn.Module, FusionReport]


def fuse_patched(model: nn.Module, example_inputs: tuple | None, patches: dict[str, Any]) -> Fused:
    """``fuser.fuse_with_report(model, example_inputs)`` with each ``"module.name": replacement``
    in place.

    Mutants return the ``(fused, report)`` pair, as our fuser does, and the gate accepts it: the
    suite then checks the report against the oracle as well, as it does for ``fuser.fuse``.
    """
    with contextlib.ExitStack() as stack:
        for target, replacement in patches.items():
            stack.enter_context(mock.patch(target, replacement))
        return fuser.fuse_with_report(model, example_inputs)
