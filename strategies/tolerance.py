"""When is a fused output "the same" as the original's? The tolerance rule, in one place.

Evaluate, on the same inputs:

- ``orig``: the original network in its own dtype;
- ``ref``: a float64 copy of it (the same parameter values, upcast), the reference;
- ``ref~``: that float64 copy with every floating parameter and buffer multiplied by
  ``1 + eps(dtype) * u`` (``u`` uniform in [-1, 1], seeded): the original with each constant off by
  up to one rounding in the network's dtype;
- ``fused``: the fused model in the network's dtype.

Then::

    err_unfused  = max |orig(x) - ref(x)|       rounding of evaluating this network in its dtype
    err_rounding = max |ref~(x) - ref(x)|       effect of rounding every constant once
    allowed      = UNFUSED_MULTIPLE * (err_unfused + err_rounding)
                   + FLOOR_ULPS * eps(dtype) * max |ref(x)|
    pass         iff  max |fused(x) - ref(x)| <= allowed

Why:

- Folding is exact in real arithmetic, so every difference between ``fused`` and ``orig`` is
  rounding, and a correct fold adds exactly two kinds: the folded constants (``w * s`` and the new
  bias) are rounded once to the dtype, and the fused model evaluates a re-associated computation.
  ``err_rounding`` measures the first for this very network (its conditioning: cancellation, large BN
  scales, long accumulations), ``err_unfused`` the second. Both come from the network, never from the
  fuser under test.
- ``err_unfused`` alone is not enough: for float64 networks ``orig`` and ``ref`` run the same kernels on
  the same values, so it is exactly 0; and in float16/bfloat16, kernels accumulate in float32, so it is
  about one output rounding while a rounded folded weight moves the output by one rounding of every
  product. ``err_rounding`` is never structurally zero and scales with the right magnitudes.
- The maxima are taken over the whole output, not per element: per-element errors are samples of
  independent roundings, and one of them being small by luck would make a per-element rule flaky.
- ``UNFUSED_MULTIPLE = 4`` absorbs which roundings happen to align; ``FLOOR_ULPS = 4`` units in the last
  place of the largest output only matters for degenerate networks whose outputs are exactly
  representable. Both constants are fixed and small (see ``docs/tolerance.md`` for the calibration): a
  real bug is orders of magnitude above ``allowed``. Never raise them to make a test pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

UNFUSED_MULTIPLE = 4.0
FLOOR_ULPS = 4.0


@dataclass(frozen=True)
class Comparison:
    """The numbers behind one application of the rule."""

    dtype: torch.dtype
    err_unfused: float
    err_rounding: float
    err_fused: float
    scale: float
    worst_index: tuple[int, ...]

    @property
    def floor(self) -> float:
        return FLOOR_ULPS * torch.finfo(self.dtype).eps * self.scale

    @property
    def allowed(self) -> float:
        return UNFUSED_MULTIPLE * (self.err_unfused + self.err_rounding) + self.floor

    @property
    def ok(self) -> bool:
        return self.err_fused <= self.allowed

    def describe(self) -> str:
        return (
            f"max error {self.err_fused:.3e} vs allowed {self.allowed:.3e} "
            f"(= {UNFUSED_MULTIPLE:g} x (unfused error {self.err_unfused:.3e} + constant-rounding "
            f"error {self.err_rounding:.3e}) + floor {self.floor:.3e}; {self.dtype}, "
            f"max |output| {self.scale:.3g}), worst at output index {self.worst_index}"
        )


def perturb_constants(module: nn.Module, dtype: torch.dtype, seed: int) -> None:
    """Multiply every floating parameter and buffer of ``module`` (in place) by
    ``1 + eps(dtype) * u``, ``u`` uniform in [-1, 1]: one rounding's worth of noise."""
    eps = torch.finfo(dtype).eps
    generator = torch.Generator().manual_seed(seed)
    tensors = [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for tensor in tensors:
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.mul_((1 + eps * (2 * noise - 1)).to(tensor.device, tensor.dtype))


def _max_abs_difference(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (value.detach().double().cpu() - reference).abs()


def compare(
    original: torch.Tensor,
    fused: torch.Tensor,
    reference: torch.Tensor,
    perturbed_reference: torch.Tensor,
) -> Comparison:
    """Apply the rule to one output; all tensors have the same shape, ``original`` the
    network's dtype, the references float64."""
    reference = reference.detach().double().cpu()
    fused_error = _max_abs_difference(fused, reference)
    worst = int(fused_error.argmax()) if fused_error.numel() else 0
    worst_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), reference.shape))

    def largest(errors: torch.Tensor) -> float:
        return float(errors.max()) if errors.numel() else 0.0

    return Comparison(
        dtype=original.dtype,
        err_unfused=largest(_max_abs_difference(original, reference)),
        err_rounding=largest(_max_abs_difference(perturbed_reference, reference)),
        err_fused=largest(fused_error),
        scale=largest(reference.abs()),
        worst_index=worst_index,
    )
