"""Shared helpers for the example-based tests: random BN statistics, the float64 equivalence rule,
report assertions, and the seed tutorial's model."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten
from torchvision.ops.misc import FrozenBatchNorm2d

BATCH_NORM_MODULES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default)


def randomise_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``model`` random statistics (in place) and return the model.

    Default statistics (mean 0, var 1, gamma 1, beta 0) make BN an identity and hide fold bugs, so:
    running_var is log-uniform in [1e-2, 1e1], running_mean, gamma and beta are normal (signs mixed).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, BATCH_NORM_MODULES):
                continue
            if module.running_mean is not None:
                module.running_mean.copy_(normal(module.running_mean))
            if module.running_var is not None:
                exponent = torch.rand(module.running_var.shape, generator=generator) * 3 - 2
                module.running_var.copy_(10.0**exponent)
            if module.weight is not None:
                module.weight.copy_(normal(module.weight))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias))
    return model


def _as_float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    return value


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        leaves, _ = tree_flatten(model(*inputs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def equivalence_errors(original: nn.Module, fused: nn.Module, inputs: tuple):
    """(fused error, unfused error, reference scale), each error measured against a float64 copy.

    Each model runs on its own copy of ``inputs``: one that changes its input in place must not
    change what the next one reads."""
    reference = copy.deepcopy(original).to(torch.float64)
    expected = _outputs(reference, copy.deepcopy(tuple(_as_float64(x) for x in inputs)))
    unfused = _outputs(original, copy.deepcopy(inputs))
    fused_out = _outputs(fused, copy.deepcopy(inputs))
    assert len(fused_out) == len(expected), "fused model returns a different number of tensors"

    def max_error(outputs):
        return max(
            (out.to(torch.float64) - ref).abs().max().item()
            for out, ref in zip(outputs, expected, strict=True)
        )

    for out, ref in zip(fused_out, expected, strict=True):
        assert out.shape == ref.shape, f"fused output shape {out.shape} != {ref.shape}"
    scale = max(ref.abs().max().item() for ref in expected)
    return max_error(fused_out), max_error(unfused), scale


def assert_equivalent(original: nn.Module, fused: nn.Module, *inputs: torch.Tensor) -> None:
    """The fused model is as close to a float64 reference as the original is (4x, plus 1e-6 of scale)."""
    fused_err, unfused_err, scale = equivalence_errors(original, fused, inputs)
    allowed = 4 * unfused_err + 1e-6 * scale
    assert fused_err <= allowed, (
        f"fused model is off the float64 reference by {fused_err:.3g} > allowed {allowed:.3g} "
        f"(unfused error {unfused_err:.3g}, output scale {scale:.3g})"
    )


def remaining_batch_norms(model: nn.Module) -> list[str]:
    """Qualified names of BN modules and of functional batch_norm calls still in ``model``."""
    names = [
        name for name, module in model.named_modules() if isinstance(module, BATCH_NORM_MODULES)
    ]
    for prefix, module in model.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            names += [
                f"{prefix}:{node.name}"
                for node in module.graph.nodes
                if node.op == "call_function" and node.target in BATCH_NORM_FUNCTIONS
            ]
    return names


def assert_folded(report, bn: str, *, side: str, into: str | None = None, call_index: int = 0):
    site = report.site(bn, call_index)
    assert site.folded, f"{bn} was left ({site.reason}); expected a fold\n{report}"
    assert site.side == side, f"{bn} folded on the {site.side} side, expected {side}\n{report}"
    if into is not None:
        assert site.into == into, f"{bn} folded into {site.into}, expected {into}\n{report}"


def assert_left(report, bn: str, *, because: tuple[str, ...], call_index: int = 0):
    """The site is left, and its reason mentions one of the words in ``because``."""
    site = report.site(bn, call_index)
    assert not site.folded, f"{bn} was folded into {site.into}; expected it left\n{report}"
    reason = (site.reason or "").lower()
    assert any(word.lower() in reason for word in because), (
        f"{bn} left with reason {site.reason!r}, which mentions none of {because}"
    )


class WrappedBatchNorm(nn.Module):
    """The seed tutorial's BN hidden inside a wrapper module."""

    def __init__(self):
        super().__init__()
        self.mod = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.mod(x)


class TutorialModel(nn.Module):
    """The seed tutorial's model: conv/BN pairs inside nn.Sequential, a wrapped BN, a BN before a conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.bn1 = nn.BatchNorm2d(1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.nested = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 1, 1))
        self.wrapped = WrappedBatchNorm()

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.conv2(x)
        x = self.nested(x)
        x = self.wrapped(x)
        return x


def tutorial_model() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn_stats(TutorialModel()).eval()


def shift_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook that changes what its module returns. Defined at module level, in a module
    that does not import the fuser, so that a model holding it pickles and loads anywhere."""
    return output + 0.5
