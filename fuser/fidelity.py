"""Does a traced graph compute what its module computes? Checked on the example inputs.

FX records the torch operations a module's code applies to proxies; every decision the code takes in
Python while tracing is frozen into the graph with the answer a proxy gave. Some answers differ from
the ones real values give, and the graph then silently computes something else:
``isinstance(x, torch.Tensor)`` and ``torch.is_tensor(self.scale)`` are False for a proxy, so a
branch taken for every real tensor is left out. Folding such a graph would ship that difference.

Where example inputs are known, the traced graph's output (from shape propagation, which runs it) is
compared with the module's own forward on the same inputs, before anything is folded. Both run the
same operations in the same order, with deterministic cuDNN algorithms, so a faithful trace gives the
same bits; a module that still does not reproduce its own output (other nondeterministic kernels) is
compared within four times its own spread. A graph that differs is not folded
(``fuse._Fuser._faithful_trace`` says what happens instead).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .shapes import copy_inputs, deterministic_kernels, state_preserved

#: A trace may differ from a nondeterministic module by this many times the module's own spread.
NONDETERMINISM_MULTIPLE = 4.0


def run_forward(module: nn.Module, inputs: tuple) -> object:
    """``module``'s own forward (what FX traces: not its hooks, which the fused module keeps) on
    copies of ``inputs``, leaving the module's buffers and the random number generators as they
    were."""
    with state_preserved(module), deterministic_kernels():
        return module.forward(*copy_inputs(inputs))


class ForwardReference:
    """A module's own forward on its example inputs, run once (twice when a trace differs, to
    tell a nondeterministic module from an unfaithful trace), to compare traced graphs against."""

    def __init__(self, module: nn.Module, inputs: tuple) -> None:
        self.module = module
        self.inputs = inputs
        self._expected: object = _NOT_RUN
        self._spread: float | None = None

    def runs(self) -> bool:
        """Whether the inputs run through the module's forward at all."""
        if self._expected is _NOT_RUN:
            try:
                self._expected = run_forward(self.module, self.inputs)
            except Exception:
                self._expected = _FAILED
        return self._expected is not _FAILED

    def mismatch(self, traced: object, traced_error: Exception | None) -> str | None:
        """Why a traced graph that returned ``traced`` (or raised ``traced_error``) on the inputs
        does not compute the module's forward, or None. Inputs the forward rejects too leave
        nothing to compare (None)."""
        if not self.runs():
            return None
        if traced_error is not None:
            first_line = (str(traced_error).splitlines() or [""])[0][:120]
            return (
                "its traced graph raises on example_inputs where its forward runs "
                f"({type(traced_error).__name__}: {first_line})"
            )
        difference = _difference(traced, self._expected)
        if difference == 0:
            return None
        spread = self._own_spread()
        if difference is not None and spread and difference <= NONDETERMINISM_MULTIPLE * spread:
            return None
        measured = f" (max difference {difference:.3g})" if difference is not None else ""
        return (
            "its traced graph computes something else than its forward on example_inputs"
            f"{measured}: its code decides something in Python that FX froze with a proxy's "
            "answer (isinstance(x, torch.Tensor) is False while tracing, for example)"
        )

    def _own_spread(self) -> float | None:
        """How far a second run of the forward lands from the first (0 for deterministic code)."""
        if self._spread is None:
            self._spread = _difference(run_forward(self.module, self.inputs), self._expected)
        return self._spread


_NOT_RUN, _FAILED = object(), object()


def _leaves(output: object, path: str = "output") -> list[tuple[str, object]]:
    """Every value in an output with where it sits. Containers are told apart by their items, not
    their class: FX returns a ``dict`` where the code built an ``OrderedDict``, which holds the same."""
    if isinstance(output, Mapping):
        return [
            pair for key, value in output.items() for pair in _leaves(value, f"{path}[{key!r}]")
        ]
    if isinstance(output, (tuple, list)):
        return [pair for i, value in enumerate(output) for pair in _leaves(value, f"{path}[{i}]")]
    return [(path, output)]


def _equal_values(got: object, want: object) -> bool:
    try:
        return bool(got == want) and type(got) is type(want)
    except Exception:  # a value without a plain equality: not known to be the same
        return False


def _difference(first: object, second: object) -> float | None:
    """The largest absolute difference between corresponding values of two outputs (0 when they
    are the same, NaN equal to NaN); None when they cannot be compared: another structure, dtype,
    shape or device, NaNs in other places, other values that are not floating point."""
    first_leaves, second_leaves = _leaves(first), _leaves(second)
    if [path for path, _ in first_leaves] != [path for path, _ in second_leaves]:
        return None
    largest = 0.0
    for (_, a), (_, b) in zip(first_leaves, second_leaves, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if not _equal_values(a, b):
                return None
            continue
        if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
            return None
        if torch.equal(a, b):
            continue
        if not (a.is_floating_point() or a.is_complex()):
            return None
        a_nan = a.isnan()
        if not torch.equal(a_nan, b.isnan()):
            return None
        differ = (a != b) & ~a_nan
        if differ.any():
            largest = max(largest, float((a[differ] - b[differ]).abs().max()))
    return largest
