"""The fuser the properties run against: any callable, found by ``package.module:function``.

This is what makes the suite a gate for other people's fusers (``pytest --fuser=...``). A fuser is
called as ``fn(model)``, or ``fn(model, example_inputs=inputs)`` when it has that parameter. If it
returns ``(module, report)``, or a separate ``fuse_with_report`` is given, the report is checked
against the oracle too; otherwise completeness is judged from the fused model alone.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def load_callable(target: str) -> Callable:
    """Import ``package.module:function`` (``function`` may be dotted, e.g. ``Class.method``)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected 'package.module:function', got {target!r}")
    value = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{target} is not callable")
    return value


def _accepts_example_inputs(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "example_inputs" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


@dataclass(frozen=True)
class FuserUnderTest:
    """A fuser callable plus, when it has one, the function that also returns its report."""

    name: str
    fuse_fn: Callable
    report_fn: Callable | None = None

    @classmethod
    def from_target(cls, target: str, report_target: str | None = None) -> FuserUnderTest:
        report_fn = load_callable(report_target) if report_target else None
        return cls(target, load_callable(target), report_fn)

    def _call(self, fn: Callable, model: nn.Module, inputs: tuple[torch.Tensor, ...] | None):
        """``fn(model, example_inputs=inputs)``, or ``fn(model)`` without inputs or when ``fn``
        takes none."""
        if inputs is not None and _accepts_example_inputs(fn):
            return fn(model, example_inputs=inputs)
        return fn(model)

    def fuse(
        self, model: nn.Module, inputs: tuple[torch.Tensor, ...] | None
    ) -> tuple[nn.Module, object | None]:
        """The fused module (from ``fuse_fn``) and its report when ``fuse_fn`` returns one."""
        result = self._call(self.fuse_fn, model, inputs)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
            return result
        return result, None

    def fuse_with_report(
        self, model: nn.Module, inputs: tuple[torch.Tensor, ...] | None
    ) -> tuple[nn.Module, object | None]:
        """Like ``fuse``, through ``report_fn`` when there is one."""
        if self.report_fn is None:
            return self.fuse(model, inputs)
        fused, report = self._call(self.report_fn, model, inputs)
        return fused, report
