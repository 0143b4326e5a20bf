"""Deliberately broken fusers, small enough to read at a glance, for the gate's own tests.

Each wraps our fuser and adds one bug through the gate's public calling convention
(``fn(model, example_inputs=...)``), so ``pytest --fuser=tests.broken_fusers:NAME`` can run the
suite against it. The broader mutant corpus (one bug inside the fuser's internals each) lives in
``tests/mutants``.
"""

from __future__ import annotations

import copy
import os
import signal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def ignores_eps(model: nn.Module, example_inputs: tuple | None = None) -> nn.Module:
    """Folds as if every BatchNorm module's eps were 0 (a classic hand-written fold bug).
    Caught by: the fused output matches the original."""
    from fuser import fuse

    without_eps = copy.deepcopy(model)
    for module in without_eps.modules():
        if isinstance(module, _BatchNorm):
            module.eps = 0.0
    return fuse(without_eps, example_inputs=example_inputs)


def folds_nothing(model: nn.Module, example_inputs: tuple | None = None) -> nn.Module:
    """Returns an untouched copy: sound, and complete only for networks with nothing to fold.
    Caught by: no foldable BatchNorm remains.

    The copy is made outside ``torch.inference_mode``: one made inside it (the suite fuses some
    networks there) holds inference tensors, which raise once the copy runs with gradients or
    updates a training-mode BatchNorm's statistics, where the original runs fine."""
    with torch.inference_mode(False):
        return copy.deepcopy(model)


def reports_its_layers_as_batch_norms(
    model: nn.Module, example_inputs: tuple | None = None
) -> tuple[nn.Module, object]:
    """Fuses correctly, but its report also lists every conv and linear module as a BatchNorm
    call left unfolded (a matcher that took any module call for a BatchNorm's, then found it
    "overrides forward"). Caught by: the report agrees with the oracle."""
    from fuser import fuse_with_report
    from fuser.report import SiteReport

    fused, report = fuse_with_report(model, example_inputs)
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            reason = f"{type(module).__name__} overrides forward"
            report.sites.append(SiteReport(name, 0, folded=False, reason=reason))
    return fused, report


def crashes(model: nn.Module, example_inputs: tuple | None = None) -> nn.Module:
    """Kills its own process with SIGSEGV, as a fuser's native kernel that segfaults would: no
    exception, no report from the process. Caught by: pytest-xdist reporting the crashed worker,
    and ``CONVBN_FAILURE_LOG`` naming the network (``CONVBN_LAST_NETWORK_DIR``)."""
    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable: SIGSEGV ends the process")
