"""The tolerance rule's measurements (``strategies/tolerance.py``) on networks whose rounding is
known: what the property suite's verdicts rest on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strategies.tolerance import (
    NOISE_SAMPLES,
    RoundingNoise,
    _batch_statistics_call,
    measure_reference,
    rounding_noise_output,
)


def far_from_zero_batch(offset: float = 1.47, spread: float = 0.02) -> torch.Tensor:
    """Two samples of one channel, ``offset`` from zero and ``spread`` apart (float32 values,
    held in float64, so that a float32 copy sees exactly these inputs): a batch mean that rounds
    at ``eps * offset`` while the normalized values have ``spread / 2`` to work with."""
    values = torch.tensor([[offset + spread / 2], [offset - spread / 2]], dtype=torch.float32)
    return values.double()


class BatchStatisticsNorm(nn.Module):
    """One batch norm on the batch's own statistics (no running statistics), called as ``style``."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1, track_running_stats=False).double()
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "module":
            return self.bn(x)
        if self.style == "functional":
            return F.batch_norm(x, None, None, self.bn.weight, self.bn.bias, True, 0.1, 1e-5)
        return torch.batch_norm(x, self.bn.weight, self.bn.bias, None, None, True, 0.1, 1e-5, False)


@pytest.mark.parametrize("style", ["module", "functional", "torch"])
def test_the_rounding_of_a_batch_mean_is_in_the_rounding_estimate(style: str) -> None:
    """Normalizing values 1.47 from zero and 0.02 apart, the rounding of the batch mean moves both
    outputs by up to ``eps * 1.47 / 0.01``: about 150 roundings of an output of size 1. A float32
    run shows it (here 46 roundings; GPU float64 kernels showed it in a fused network whose
    allowance, from one rounding of the batch norm's result, was 8x too small); the estimate must
    too."""
    model, x = BatchStatisticsNorm(style), far_from_zero_batch()
    eps = torch.finfo(torch.float32).eps
    with torch.no_grad():
        output = model(x)
        float32_output = copy.deepcopy(model).float()(x.float())
    float32_error = float((float32_output.double() - output).abs().max())
    reference = measure_reference(model.float(), (x.float(),), seed=0)
    assert float32_error > 20 * eps  # the effect is real, not a property of the estimate
    assert reference.err_rounding > 20 * eps * float(output.abs().max())
    assert reference.err_rounding > float32_error


def test_a_batch_norm_on_running_statistics_is_one_rounding() -> None:
    """An eval-mode batch norm subtracts a constant (perturbed with the other constants), so the
    call is rounded once, as any operation."""
    bn = nn.BatchNorm1d(1).double().eval()
    x = far_from_zero_batch()
    arguments = (x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, 1e-5)
    assert _batch_statistics_call(F.batch_norm, arguments, {}) is None
    assert _batch_statistics_call(F.batch_norm, arguments[:5], {"training": True}) is not None
    torch_arguments = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, 1e-5, 0)
    assert _batch_statistics_call(torch.batch_norm, torch_arguments, {}) is None


def test_the_step_by_step_batch_norm_computes_the_batch_norm() -> None:
    """Without noise (a zero step) the step-by-step evaluation is the batch norm itself."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, generator=generator, dtype=torch.float64) + 3.0
    model = BatchStatisticsNorm("module")
    with torch.no_grad():
        nn.init.uniform_(model.bn.weight, -2, 2)
        nn.init.uniform_(model.bn.bias, -1, 1)
        expected = model(x)
        noise = RoundingNoise(torch.float64, seed=0)
        noise.step = 0.0
        with noise:
            stepwise = model(x)
    torch.testing.assert_close(stepwise, expected, rtol=1e-14, atol=1e-14)


def test_rounding_noise_leaves_the_reference_as_it_was() -> None:
    """Each draw of ``ref~`` perturbs the constants in place and puts them back: the next draw,
    and the caller, see the reference's own values."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double().eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x = (torch.randn(2, 3, dtype=torch.float64),)
    first = rounding_noise_output(model, x, torch.float32, seed=5)
    again = rounding_noise_output(model, x, torch.float32, seed=5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(first, again)


class NegatesItsWeightThroughAView(nn.Module):
    """Negates its layer's weight in place around the call, through ``.data`` and a view of it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2).double()
        self.how = how

    def negate(self) -> None:
        if self.how == ".data":
            self.fc.weight.data.neg_()
        else:
            self.fc.weight.data.view(-1).neg_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.negate()
        y = self.fc(x)
        self.negate()
        return y


@pytest.mark.parametrize("how", [".data", "a view of .data"])
def test_a_view_is_not_rounded_so_changes_through_it_reach_the_tensor(how: str) -> None:
    """A view computes nothing, and a rounded copy of it would take the in-place change meant for
    the weight: the noisy run would compute with the weight's sign the other way, its error the
    whole output, and the allowance with it (an allowance of 1.7 let a wrong fold through)."""
    model = NegatesItsWeightThroughAView(how).eval()
    x = (torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),)
    with torch.no_grad():
        exact = model(*x)
    noisy = rounding_noise_output(model, x, torch.float32, seed=3)
    step = torch.finfo(torch.float32).eps
    assert float((noisy - exact).abs().max()) < 20 * step * float(exact.abs().max())


def test_the_rounding_estimate_is_the_largest_of_several_draws() -> None:
    """One draw of a random effect can be near zero by luck, which a network whose output varies
    with one number (two samples through a batch-statistics norm) turns into an allowance near
    zero; the estimate is the largest of ``NOISE_SAMPLES`` draws."""
    model, x = BatchStatisticsNorm("module"), far_from_zero_batch()
    reference = measure_reference(model, (x,), seed=3)
    output = reference.output
    draws = [
        float((rounding_noise_output(model, (x,), torch.float64, 3 + 2 * k) - output).abs().max())
        for k in range(NOISE_SAMPLES)
    ]
    scale = torch.finfo(torch.float64).eps / 2.0**-24
    assert NOISE_SAMPLES > 1
    assert reference.err_rounding == pytest.approx(max(draws) * scale, rel=1e-12)
