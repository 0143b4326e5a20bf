"""Check a fused model against a float64 run of the model it came from.

Comparing fused with unfused in float32 says only that they differ by "a little"; how little is
right depends on the model. A float64 copy of the unfused model is close to the exact answer, so
both float32 models can be measured against it: the unfused model's error is what float32 costs
this model on this input, and a correct fold may change it by rounding but not by orders of magnitude.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

#: A correct fold reorders float32 rounding; it may make the error larger, by a small factor.
TOLERANCE_FACTOR = 4.0

#: Added to the allowance, relative to the output's magnitude, so that an unfused error of exactly
#: zero (possible on tiny outputs) does not demand a bit-exact fused model: about 8 float32 ulps.
RELATIVE_FLOOR = 1e-6


@dataclass(frozen=True)
class ReferenceCheck:
    """Max absolute errors of the unfused and fused models against the float64 reference."""

    unfused_error: float
    fused_error: float
    reference_scale: float
    allowed: float
    passed: bool
    reason: str | None = None

    def to_dict(self) -> dict:
        """Plain values for JSON; a non-finite error becomes ``None`` (strict JSON has no NaN)."""
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in asdict(self).items()
        }

    def __str__(self) -> str:
        verdict = "passed" if self.passed else f"FAILED ({self.reason})"
        return (
            f"float64 reference check: {verdict}\n"
            f"  unfused max error {self.unfused_error:.3g}, fused max error {self.fused_error:.3g} "
            f"(allowed {self.allowed:.3g}; largest output magnitude {self.reference_scale:.3g})"
        )


def output_tensors(output: object, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a model output, with where it sits: tensors, tuples, lists and dicts nest."""
    if isinstance(output, torch.Tensor):
        return [(path, output)]
    if isinstance(output, Mapping):
        return [
            pair
            for key, value in output.items()
            for pair in output_tensors(value, f"{path}[{key!r}]")
        ]
    if isinstance(output, (tuple, list)):
        return [
            pair
            for index, value in enumerate(output)
            for pair in output_tensors(value, f"{path}[{index}]")
        ]
    return []


def max_abs_error(output: object, reference: object) -> float:
    """The largest absolute difference between two outputs of the same structure, in float64."""
    pairs, reference_pairs = output_tensors(output), output_tensors(reference)
    if [path for path, _ in pairs] != [path for path, _ in reference_pairs]:
        raise ValueError(
            "outputs differ in structure: "
            f"{[path for path, _ in pairs]} vs {[path for path, _ in reference_pairs]}"
        )
    error = 0.0
    for (path, tensor), (_, expected) in zip(pairs, reference_pairs, strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"{path}: shape {tuple(tensor.shape)} vs {tuple(expected.shape)}")
        difference = (tensor.double() - expected.double()).abs()
        error = max(error, difference.max().item() if difference.numel() else 0.0)
    return error


def float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every floating-point parameter and buffer in float64."""
    return copy.deepcopy(model).double()


def check_against_float64(
    original: nn.Module, fused: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> ReferenceCheck:
    """Run the original, the fused model and a float64 copy of the original on ``inputs``.

    Fails when the fused error exceeds ``TOLERANCE_FACTOR`` times the unfused error plus a floor of
    ``RELATIVE_FLOOR`` times the largest reference output, or when any output is not finite (a
    non-finite reference means the check cannot say anything, which is a failure, not a pass).
    """
    reference_model = float64_copy(original)
    with torch.inference_mode():
        reference = reference_model(*(x.double() if x.is_floating_point() else x for x in inputs))
        unfused_output = original(*inputs)
        fused_output = fused(*inputs)

    scale = max((t.double().abs().max().item() for _, t in output_tensors(reference)), default=0.0)
    unfused_error = max_abs_error(unfused_output, reference)
    fused_error = max_abs_error(fused_output, reference)
    allowed = TOLERANCE_FACTOR * unfused_error + RELATIVE_FLOOR * scale

    reason = None
    if not all(torch.isfinite(t).all() for _, t in output_tensors(reference)):
        reason = "the float64 reference output is not finite"
    elif not all(torch.isfinite(t).all() for _, t in output_tensors(unfused_output)):
        reason = "the unfused output is not finite"
    elif not fused_error <= allowed:  # written so that a NaN error fails
        reason = f"fused error {fused_error:.3g} exceeds allowed {allowed:.3g}"
    return ReferenceCheck(
        unfused_error=unfused_error,
        fused_error=fused_error,
        reference_scale=scale,
        allowed=allowed,
        passed=reason is None,
        reason=reason,
    )
