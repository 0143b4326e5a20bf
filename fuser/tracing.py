"""Symbolic tracing that keeps every module the fuser must not look inside as one call.

Leaves (kept as ``call_module`` nodes) are: the layers and BatchNorms the fuser folds, torch.nn's own
modules (FX's default), modules with hooks (tracing through a module drops its hooks, which would
silently change the model), and modules FX cannot trace. The last are found only when a trace fails:
the smallest untraceable submodules become opaque leaves so that the rest of the model still traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .patterns import (
    batch_norm_module_behaves_as_base,
    has_hooks,
    is_batch_norm_module,
    layer_kind_of_module,
)
from .report import UntracedModule


def is_foldable_layer_or_batch_norm(module: nn.Module) -> bool:
    if layer_kind_of_module(module) is not None:
        return True
    return is_batch_norm_module(module) and batch_norm_module_behaves_as_base(module)


class FoldTracer(fx.Tracer):
    """FX's tracer with the fuser's leaf rules; ``opaque`` holds ids of untraceable modules."""

    def __init__(self, opaque: set[int] | frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque or has_hooks(m) or is_foldable_layer_or_batch_norm(m):
            return True
        if isinstance(m, torch.jit.ScriptModule):  # compiled code: FX cannot look inside
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, opaque: set[int] | frozenset[int] = frozenset()) -> fx.GraphModule:
    tracer = FoldTracer(opaque)
    with _attributes_restored(module):
        graph = tracer.trace(module)
        # Made before the restore: it copies the constants tracing stored on the root.
        return fx.GraphModule(tracer.root, graph, type(module).__name__)


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def _attributes_restored(module: nn.Module) -> Iterator[None]:
    """Undo what running ``forward`` on proxies did to the modules' attributes.

    Tracing runs user code, and user code caches things: torchvision's ``MultiScaleRoIAlign``
    stores its scales on first call, so a trace (even a failed one) leaves proxies behind that
    break the next real call. Every module's attributes are put back as they were.
    """
    saved = [
        (
            m,
            dict(m.__dict__),
            [(d, dict(d)) for d in (m.__dict__.get(k) for k in _MODULE_DICTS) if d is not None],
        )
        for m in module.modules()
        if not isinstance(m, torch.jit.ScriptModule)  # compiled: tracing never runs its code
    ]
    try:
        yield
    finally:
        for m, attributes, inner in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for original, contents in inner:
                original.clear()
                original.update(contents)


def _try_trace(module: nn.Module, opaque: set[int]) -> fx.GraphModule | str:
    """The traced module, or a one-line description of why tracing failed."""
    try:
        return trace(module, opaque)
    except Exception as error:  # tracing runs user code: any failure means "not traceable"
        return _describe(error)


def is_library_leaf(module: nn.Module) -> bool:
    """torch.nn's own modules (and containers), which FX keeps as calls and never looks inside."""
    return fx.Tracer().is_leaf_module(module, "")


def is_leaf(module: nn.Module) -> bool:
    """Would the tracer keep this module as a single call even if it could trace it?"""
    return FoldTracer().is_leaf_module(module, "")


def _describe(error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"[:300]


@dataclass
class TraceOutcome:
    """A traced module, or the error that stopped it; plus what had to stay opaque."""

    graph_module: fx.GraphModule | None
    error: str | None = None
    opaque: set[int] = field(default_factory=set)
    untraced: list[UntracedModule] = field(default_factory=list)


def trace_with_opaque_submodules(module: nn.Module, path: str) -> TraceOutcome:
    """Trace ``module``; if that fails, make its smallest untraceable submodules opaque and retry.

    Costs one trace when the model traces; the search runs only after a failure.
    """
    outcome = TraceOutcome(None)
    traced = _make_traceable(module, path, outcome)
    if isinstance(traced, str):
        outcome.error = traced
    else:
        outcome.graph_module = traced
    return outcome


def _make_traceable(module: nn.Module, path: str, outcome: TraceOutcome) -> fx.GraphModule | str:
    """``module`` traced once its untraceable children are opaque, or why it still fails."""
    traced = _try_trace(module, outcome.opaque)
    if not isinstance(traced, str):
        return traced
    for name, child in module.named_children():
        if is_leaf(child) or id(child) in outcome.opaque:
            continue
        child_path = f"{path}.{name}" if path else name
        found_before = len(outcome.untraced)
        child_traced = _make_traceable(child, child_path, outcome)
        if isinstance(child_traced, str):
            # The whole child runs opaque; what is inside it is searched again when it is fused.
            del outcome.untraced[found_before:]
            outcome.opaque.add(id(child))
            outcome.untraced.append(UntracedModule(child_path, child_traced))
    return _try_trace(module, outcome.opaque)
