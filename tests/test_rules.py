"""One small hand-written model per rule of the README's foldability definition, and per reason a
BatchNorm is left. Each test checks the report (folded or left, side, reason) and that the fused
model computes what the original does (against a float64 reference)."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from compat import requires_cpu_float16
from helpers import (
    assert_equivalent,
    assert_folded,
    assert_left,
    randomise_bn_stats,
    remaining_batch_norms,
)
from torch import nn
from torchvision.models.video.resnet import Conv3DSimple
from torchvision.ops.misc import FrozenBatchNorm2d

from fuser import fuse_with_report
from fuser.report import INPUT_SIDE, OUTPUT_SIDE
from strategies.properties import dead_state


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics, eval mode."""
    return randomise_bn_stats(model, seed=seed).eval()


def fused_and_checked(model: nn.Module, *inputs: torch.Tensor, example_inputs=None):
    """Fuse ``model`` and check the fused model against the original, and that it keeps nothing
    its graphs never use; return (fused, report)."""
    fused, report = fuse_with_report(model, example_inputs=example_inputs)
    assert_equivalent(model, fused, *inputs)
    assert dead_state(fused) is None, dead_state(fused)
    return fused, report


class Chain(nn.Module):
    """``layers`` applied in order, named as given (``Chain(conv=..., bn=...)``)."""

    def __init__(self, **layers: nn.Module):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- rule 2: output side, module layers ----------------------------------------------------------

CONV_THEN_BN = {
    "conv1d": (lambda: Chain(conv=nn.Conv1d(3, 4, 3), bn=nn.BatchNorm1d(4)), (2, 3, 9)),
    "conv2d": (
        lambda: Chain(conv=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4)),
        (2, 3, 7, 7),
    ),
    "conv3d": (
        lambda: Chain(conv=nn.Conv3d(2, 4, 2, bias=False), bn=nn.BatchNorm3d(4)),
        (2, 2, 4, 4, 4),
    ),
    "conv2d-depthwise-reflect": (
        lambda: Chain(
            conv=nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"),
            bn=nn.BatchNorm2d(4),
        ),
        (2, 4, 6, 6),
    ),
    "conv_transpose1d": (
        lambda: Chain(conv=nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), bn=nn.BatchNorm1d(6)),
        (2, 4, 5),
    ),
    "conv_transpose2d-depthwise": (
        lambda: Chain(
            conv=nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4, output_padding=1, dilation=2),
            bn=nn.BatchNorm2d(4),
        ),
        (2, 4, 5, 5),
    ),
    "conv_transpose3d": (
        lambda: Chain(
            conv=nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=False),
            bn=nn.BatchNorm3d(6),
        ),
        (1, 4, 3, 3, 3),
    ),
}


@pytest.mark.parametrize(("build", "input_shape"), CONV_THEN_BN.values(), ids=CONV_THEN_BN.keys())
def test_batchnorm_module_after_a_conv_module_folds_into_it_on_the_output_side(build, input_shape):
    model = prepared(build())
    fused, report = fused_and_checked(model, image(*input_shape))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_batchnorm_subclass_that_keeps_forward_is_a_batchnorm():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = prepared(Chain(conv=nn.Conv2d(3, 4, 1), bn=MyBatchNorm(4)))
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_frozen_batchnorm_folds():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=FrozenBatchNorm2d(4)))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_sync_batchnorm_folds_in_eval_mode_on_cpu():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.SyncBatchNorm(4)))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_frozen_batchnorm_with_wider_buffers_than_its_layer_is_left():
    """FrozenBatchNorm2d computes ``x * scale + shift`` from its buffers, so float32 buffers after
    a bfloat16 conv return float32 (a BatchNorm's output keeps its input's dtype). Folded, the
    output would stay bfloat16; left, the fused model returns what the original does."""
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=FrozenBatchNorm2d(4))).bfloat16()
    model.bn.float()
    x = image(2, 3, 6, 6).bfloat16()
    fused, report = fused_and_checked(model, x)
    assert_left(report, "bn", because=("torch.float32 buffers", "torch.bfloat16 output"))
    with torch.no_grad():
        assert fused(x).dtype == model(x).dtype == torch.float32


class AutocastBlock(nn.Module):
    """Runs ``inner`` under CPU autocast (bfloat16), as a mixed-precision block does."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x)


def test_frozen_batchnorm_inside_an_autocast_region_is_left_and_a_batchnorm_folds():
    """Under autocast the conv returns bfloat16; a FrozenBatchNorm2d's float32 buffers turn that
    into float32, a BatchNorm2d keeps it bfloat16. So only the BatchNorm2d folds, and the fused
    block returns the dtype the original does."""
    frozen = AutocastBlock(Chain(conv=nn.Conv2d(3, 4, 3), bn=FrozenBatchNorm2d(4)))
    plain = AutocastBlock(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))
    x = image(2, 3, 6, 6)
    for block, folds, dtype in ((frozen, False, torch.float32), (plain, True, torch.bfloat16)):
        model = prepared(block)
        fused, report = fused_and_checked(model, x)
        assert report.site("inner.bn").folded is folds, report
        with torch.no_grad():
            assert fused(x).dtype == model(x).dtype == dtype
    _, report = fuse_with_report(prepared(frozen))
    assert_left(report, "inner.bn", because=("torch.autocast region",))


def test_conv3d_subclass_that_keeps_forward_folds_like_torchvision_conv3dsimple():
    model = prepared(Chain(conv=Conv3DSimple(2, 4), bn=nn.BatchNorm3d(4)))
    fused, report = fused_and_checked(model, image(1, 2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_conv_subclass_that_overrides_forward_is_not_folded_into():
    class DoubledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = prepared(Chain(conv=DoubledConv(3, 4, 1), bn=nn.BatchNorm2d(4)))
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert not report.site("bn").folded, report


def test_conv_subclass_that_overrides_conv_forward_is_not_folded_into():
    class ScaledWeightConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight * 3, bias)

    model = prepared(Chain(conv=ScaledWeightConv(3, 4, 1), bn=nn.BatchNorm2d(4)))
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert not report.site("bn").folded, report


def plus_one(module: nn.Module) -> None:
    """Replace ``module.forward`` on the instance (as monkeypatching, or accelerate's hooks, do)
    with one that adds 1 to what the class's forward returns. A bound method, so that copies of
    the module (the float64 reference is one) call their own class forward."""
    module.forward = types.MethodType(lambda self, x: type(self).forward(self, x) + 1.0, module)


@pytest.mark.parametrize(
    ("replaced", "verdict"),
    [
        (("bn",), "left"),
        (("conv",), "input side into head"),
        (("head",), "output side into conv"),
        (("conv", "head"), "left"),
    ],
)
def test_a_layer_or_batchnorm_whose_forward_is_replaced_on_the_instance_takes_no_fold(
    replaced, verdict
):
    # To FX and to its class it is a Conv2d or a BatchNorm2d; the instance computes something
    # else. Folded anyway (as torch's own fuse does), the fused model was off by gamma/sigma - 1.
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), head=nn.Conv2d(4, 2, 1)))
    for name in replaced:
        plus_one(getattr(model, name))
    _, report = fused_and_checked(model, image(2, 3, 6, 6))
    if verdict == "left":
        assert_left(report, "bn", because=("replaced on the instance",))
    elif verdict == "input side into head":
        assert_folded(report, "bn", side=INPUT_SIDE, into="head")
    else:
        assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")


def test_a_frozen_batchnorm_whose_forward_is_replaced_is_left_and_reported():
    """torchvision's modules are no FX leaves: traced through, the replaced forward would be
    recorded as arithmetic on the buffers, and the report would have no entry for the BN."""
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=FrozenBatchNorm2d(4)))
    plus_one(model.bn)
    _, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_left(report, "bn", because=("replaced on the instance",))


def test_a_model_whose_forward_is_replaced_on_the_instance_runs_that_forward():
    # FX traces type(model).forward: the replacement would silently not run in the fused model.
    # So the model is not traced, and its children (which that code may use any way) are left.
    model = prepared(
        Chain(block=Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)), relu=nn.ReLU())
    )
    plus_one(model)
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert [module.name for module in report.untraced] == ["<model>", "block"], report
    assert "replaced on the instance" in report.untraced[0].error
    assert_left(report, "block.bn", because=("replaced on the instance",))

    inner = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))
    plus_one(inner)  # called by a traced parent: traced through the replacement, and folded
    model = prepared(Chain(block=inner, relu=nn.ReLU()))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "block.bn", side=OUTPUT_SIDE, into="block.conv")
    assert remaining_batch_norms(fused) == []


# --- rule 1 and 2: functional forms --------------------------------------------------------------


class FunctionalConvBatchNorm(nn.Module):
    """F.conv2d then F.batch_norm, all on registered parameters and buffers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(4))
        self.register_buffer("bn_mean", torch.randn(4))
        self.register_buffer("bn_var", torch.rand(4) * 3 + 0.05)
        self.bn_gamma = nn.Parameter(torch.randn(4))
        self.bn_beta = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        return F.batch_norm(
            y, self.bn_mean, self.bn_var, self.bn_gamma, self.bn_beta, training=False, eps=1e-3
        )


def test_functional_batch_norm_after_functional_conv_folds():
    model = FunctionalConvBatchNorm().eval()
    fused, report = fused_and_checked(model, image(2, 3, 5, 5))
    assert_folded(report, "bn_mean", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


def test_functional_batch_norm_in_training_mode_is_left():
    class TrainingFunctionalBatchNorm(FunctionalConvBatchNorm):
        def forward(self, x):
            y = F.conv2d(x, self.weight, self.bias)
            return F.batch_norm(y, self.bn_mean, self.bn_var, training=True, momentum=0.0)

    model = TrainingFunctionalBatchNorm().eval()
    _, report = fused_and_checked(model, image(4, 3, 5, 5))
    assert_left(report, "bn_mean", because=("train",))


def test_functional_batch_norm_on_computed_statistics_is_left():
    class ComputedStatistics(FunctionalConvBatchNorm):
        def forward(self, x):
            y = F.conv2d(x, self.weight, self.bias)
            mean = self.bn_mean * x.mean()  # depends on the input: not a constant
            return F.batch_norm(y, mean, self.bn_var, training=False)

    model = ComputedStatistics().eval()
    _, report = fused_and_checked(model, image(2, 3, 5, 5))
    assert len(report.sites) == 1, report
    assert report.folded == [], report


def test_statistics_computed_from_buffers_alone_fold_and_a_computed_gamma_does_not():
    """README rule 1: FX hands buffers to the code as tensors, so ``self.bn_var * 0.5`` runs once
    while tracing and is a constant of the traced module, and the call folds (named by its
    running mean, or by that constant where the mean is the computed one); ``self.bn_gamma * 0.5``
    reads a parameter, which FX traces, so it runs on every call."""

    class ComputedFromBuffers(FunctionalConvBatchNorm):
        def forward(self, x):
            y = F.conv2d(x, self.weight, self.bias)
            y = F.batch_norm(y, self.bn_mean, self.bn_var * 0.5, self.bn_gamma, self.bn_beta)
            y = F.batch_norm(y, -self.bn_mean, self.bn_var, self.bn_gamma, self.bn_beta)
            return F.batch_norm(y, self.bn_mean, self.bn_var, self.bn_gamma * 0.5, self.bn_beta)

    model = ComputedFromBuffers().eval()
    fused, report = fused_and_checked(model, image(2, 3, 5, 5))
    scaled_var, negated_mean, scaled_gamma = report.sites
    assert scaled_var.folded and scaled_var.bn == "bn_mean", report
    assert negated_mean.folded and negated_mean.bn.startswith("_tensor_constant"), report
    assert not scaled_gamma.folded and "weight is not a constant" in scaled_gamma.reason, report
    assert len(remaining_batch_norms(fused)) == 1


class TorchBatchNormCalls(FunctionalConvBatchNorm):
    """``torch.batch_norm`` (which ``F.batch_norm`` calls; its affine parameters come first) after
    F.conv2d, then again before a 1x1 conv, on registered parameters and buffers."""

    def __init__(self, training: bool = False):
        super().__init__()
        self.training_flag = training
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        y = torch.batch_norm(
            y, self.bn_gamma, self.bn_beta, self.bn_mean, self.bn_var, False, 0.1, 1e-3, False
        )
        y = torch.relu(y)
        y = torch.batch_norm(
            y, None, None, self.bn_mean, self.bn_var, self.training_flag, 0.0, 1e-3, False
        )
        return self.head(y)


def test_torch_batch_norm_folds_like_functional_batch_norm():
    model = TorchBatchNormCalls().eval()
    fused, report = fused_and_checked(model, image(2, 3, 5, 5))
    assert [site.folded for site in report.sites] == [True, True], report
    assert report.sites[0].side == OUTPUT_SIDE, report
    assert report.sites[1].side == INPUT_SIDE and report.sites[1].into == "head", report
    assert remaining_batch_norms(fused) == []


def test_torch_batch_norm_in_training_mode_is_left():
    model = TorchBatchNormCalls(training=True).eval()
    _, report = fused_and_checked(model, image(4, 3, 5, 5))
    assert [site.folded for site in report.sites] == [True, False], report
    assert "torch.batch_norm is called with training=True" in report.sites[1].reason


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, trimmed: a BN subclass whose forward asserts the rank, calls
    F.batch_norm on its own buffers, then an activation."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(x)


def test_conv_module_then_timm_style_functional_batch_norm_folds():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=BatchNormAct2d(4)))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn.running_mean", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


class FunctionalTransposedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(6))
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        # positional: stride, padding, output_padding, groups, dilation
        return self.bn(F.conv_transpose2d(x, self.weight, self.bias, 2, 1, 1, 2, 2))


def test_functional_transposed_conv_with_positional_groups_and_dilation_folds():
    model = prepared(FunctionalTransposedConv())
    fused, report = fused_and_checked(model, image(2, 4, 5, 5))
    assert_folded(report, "bn", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(F.linear(x, self.weight))


def test_functional_linear_then_batchnorm1d_folds_on_2d_example_inputs():
    model = prepared(FunctionalLinear())
    x = image(3, 4)
    fused, report = fused_and_checked(model, x, example_inputs=(x,))
    assert_folded(report, "bn", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


def test_batchnorm_before_a_functional_grouped_conv_folds_on_the_input_side():
    class BatchNormThenFunctionalConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.weight = nn.Parameter(torch.randn(6, 2, 1, 1))

        def forward(self, x):
            return F.conv2d(self.bn(x), self.weight, None, 1, "same", 1, 2)

    model = prepared(BatchNormThenFunctionalConv())
    fused, report = fused_and_checked(model, image(2, 4, 5, 5))
    assert_folded(report, "bn", side=INPUT_SIDE)
    assert remaining_batch_norms(fused) == []


# --- rule 1: what is not a BatchNorm to fold -----------------------------------------------------


def test_batchnorm_in_training_mode_is_left():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), head=nn.Conv2d(4, 2, 1)))
    model.bn.train()
    _, report = fused_and_checked(model, image(4, 3, 6, 6))
    assert_left(report, "bn", because=("train",))


def test_batchnorm_without_running_statistics_is_left():
    model = prepared(
        Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4, track_running_stats=False))
    )
    _, report = fused_and_checked(model, image(4, 3, 6, 6))
    assert_left(report, "bn", because=("running", "statistic", "stats"))


@pytest.mark.parametrize("hook_kind", ["forward_hook", "forward_pre_hook"])
def test_batchnorm_with_a_hook_is_left_and_the_hook_still_fires(hook_kind):
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))
    calls = []
    if hook_kind == "forward_hook":
        model.bn.register_forward_hook(lambda module, args, output: calls.append("hook"))
    else:
        model.bn.register_forward_pre_hook(lambda module, args: calls.append("hook"))

    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_left(report, "bn", because=("hook",))

    calls.clear()
    fused(image(2, 3, 6, 6))
    assert calls == ["hook"], "the BN's hook did not fire in the fused model"


def test_batchnorm_subclass_calling_super_forward_is_left_and_the_rest_still_folds():
    class LoggingBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x)  # BatchNorm.forward branches on the input's rank

    model = prepared(
        Chain(
            conv1=nn.Conv2d(3, 4, 3),
            bn1=nn.BatchNorm2d(4),
            conv2=nn.Conv2d(4, 4, 1),
            odd=LoggingBatchNorm(4),
            conv3=nn.Conv2d(4, 5, 1),
            bn3=nn.BatchNorm2d(5),
        )
    )
    _, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn1", side=OUTPUT_SIDE, into="conv1")
    assert_folded(report, "bn3", side=OUTPUT_SIDE, into="conv3")
    odd_sites = [site for site in report.sites if site.bn.startswith("odd")]
    assert not any(site.folded for site in odd_sites), report
    assert odd_sites or any(u.name == "odd" for u in report.untraced), (
        f"the report says nothing about the opaque BN subclass 'odd'\n{report}"
    )


# --- rule 2: the layer's other users -------------------------------------------------------------


def test_conv_output_read_by_another_op_is_left():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = prepared(Residual())
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_left(report, "bn", because=("user", "used", "read"))


class ThroughPassThrough(nn.Module):
    """conv -> ``between`` -> bn (output side), or bn -> ``between`` -> unpadded conv (input side),
    ``between`` a list of calls returning their input as it is, in order."""

    def __init__(self, input_side: bool, between: list) -> None:
        super().__init__()
        self.input_side = input_side
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.between = nn.ModuleList(m for m in between if isinstance(m, nn.Module))
        self.calls = between

    def forward(self, x):
        x = self.bn(x) if self.input_side else self.conv(x)
        modules = iter(self.between)
        for call in self.calls:
            x = next(modules)(x) if isinstance(call, nn.Module) else call(x)
        return self.conv(x) if self.input_side else self.bn(x)


def dropout_not_training(x):
    return F.dropout(x, 0.5, training=False)


PASSED_THROUGH = {
    "nn.Identity": lambda: [nn.Identity()],
    "nn.Dropout": lambda: [nn.Dropout(0.5)],
    "nn.Dropout2d, then nn.Identity": lambda: [nn.Dropout2d(0.3), nn.Identity()],
    "F.dropout(training=False)": lambda: [dropout_not_training],
}


@pytest.mark.parametrize("input_side", [False, True], ids=["output side", "input side"])
@pytest.mark.parametrize("between", list(PASSED_THROUGH))
def test_a_fold_looks_through_calls_that_return_their_input(between, input_side):
    """README rules 2 and 3: nn.Identity and dropout not in training mode change no value, so a
    BN with one between it and a layer folds (torch's fuse, which matches adjacent module pairs,
    does not)."""
    model = prepared(ThroughPassThrough(input_side, PASSED_THROUGH[between]()))
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=INPUT_SIDE if input_side else OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


@pytest.mark.parametrize("input_side", [False, True], ids=["output side", "input side"])
def test_a_chain_with_identities_between_folds_fully(input_side):
    """README rule 4 through rule 2 and 3's look-through: ``conv -> id -> bn1 -> dropout -> bn2``
    folds both BNs into the conv, as does ``bn1 -> id -> bn2 -> dropout -> conv``. The first
    output-side fold once handed bn1's users the conv itself, skipping the identity, and bn2
    was left."""
    conv = nn.Conv2d(3, 3, 1)
    ops = [nn.Identity(), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.BatchNorm2d(3)]
    if input_side:
        ops = [nn.BatchNorm2d(3), nn.Identity(), nn.BatchNorm2d(3), nn.Dropout(0.5)]
    layers = [*ops, conv] if input_side else [conv, *ops]
    model = prepared(nn.Sequential(*layers))
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert len(report.folded) == 2, report
    assert remaining_batch_norms(fused) == []


def test_a_fold_does_not_look_through_what_may_change_values_or_is_read_elsewhere():
    """A dropout module in training mode (p=0 here, to compare outputs), a dropout function in
    training mode (its default), a hooked identity, an identity whose output is also read."""

    def dropout_training_by_default(x):
        return F.dropout(x, 0.0)

    class ReadTwice(ThroughPassThrough):
        def forward(self, x):
            y = self.between[0](self.conv(x))
            return self.bn(y) + y

    training = nn.Dropout(0.0).train()
    hooked = nn.Identity()
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    models = {
        "a training-mode dropout module": ThroughPassThrough(False, [training]),
        "F.dropout, training by default": ThroughPassThrough(False, [dropout_training_by_default]),
        "a hooked identity": ThroughPassThrough(False, [hooked]),
        "an identity read twice": ReadTwice(False, [nn.Identity()]),
    }
    for name, model in models.items():
        model = prepared(model)
        if name.startswith("a training"):
            model.between[0].train()
        _, report = fused_and_checked(model, image(2, 3, 4, 4))
        assert not report.site("bn").folded, (name, report)


def test_conv_output_read_only_for_its_metadata_still_folds():
    class ShapeChecks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            torch._assert(y.ndim == 4, "expected 4D")
            torch._assert(y.dim() == 4, "expected 4D")
            torch._assert(y.numel() > 0, "expected elements")
            batch, channels = y.shape[0], y.size(1)
            z = self.bn(y).to(y.dtype).to(y.device)
            return z.reshape(batch, channels, -1)

    model = prepared(ShapeChecks())
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


# --- rule 2 and 3: tensors the model's code changes in place -----------------------------------


class ChangesItsTensors(nn.Module):
    """conv -> bn, or bn -> conv (unpadded), whose forward changes one of the fold's tensors in
    place (or only reads it) after or before using it."""

    def __init__(self, input_side: bool, change) -> None:
        super().__init__()
        self.input_side = input_side
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn.requires_grad_(False)  # a frozen BN, whose affine may change in place
        self.change = change

    def forward(self, x):
        y = self.conv(self.bn(x)) if self.input_side else self.bn(self.conv(x))
        return y + self.change(self)


CHANGES = {
    "layer bias, .data.add_": lambda m: m.conv.bias.data.add_(0.5).sum() * 0,
    "layer weight, a row through .data[0]": lambda m: m.conv.weight.data[0].mul_(0.5).sum() * 0,
    "bn weight, mul_": lambda m: m.bn.weight.mul_(0.9).sum() * 0,
    "bn bias, +=": lambda m: m.bn.bias.__iadd__(0.25).sum() * 0,
    "bn weight, a torch.flatten view of .data": lambda m: (
        torch.flatten(m.bn.weight.data).mul_(0.9).sum() * 0
    ),
}


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no inputs", "example_inputs"])
@pytest.mark.parametrize("input_side", [False, True], ids=["output side", "input side"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_fold_whose_tensors_the_model_changes_in_place_is_left(input_side, change, with_inputs):
    # Folded, the layer would compute with the values at fusing time on every later call,
    # where the original computes with the changed ones. With example inputs, the fuser's own
    # runs of its copy (shape propagation, the trace check) must not change them either: the
    # fused model starts where the caller's model is, not three calls ahead.
    model = prepared(ChangesItsTensors(input_side, CHANGES[change]))
    fused, report = fuse_with_report(model, (image(2, 3, 4, 4),) if with_inputs else None)
    assert_left(report, "bn", because=("in place",))
    for _ in range(3):
        assert_equivalent(model, fused, image(2, 3, 4, 4))


def nudge_wrapped(tensor: torch.Tensor) -> torch.Tensor:
    """Adds to ``tensor`` in place; FX calls it whole (``torch.fx.wrap``), its code untraced."""
    tensor.data.add_(0.25)
    return tensor.sum() * 0


torch.fx.wrap("nudge_wrapped")


class NudgesHandedTensor(nn.Module):
    """Untraceable (a branch on the tensor it is handed), and adds to that tensor in place."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() >= 0:
            tensor.data.add_(0.25)
        return tensor.sum() * 0


class HandsItsTensorOn(nn.Module):
    """conv -> bn, or bn -> conv (unpadded), whose forward hands one of the fold's tensors (the
    conv's bias, or the frozen BN's weight) to code that runs as written: a ``torch.fx.wrap``
    function, an untraceable module, or a torch layer (``nn.Hardtanh``) with ``inplace`` set or
    not, handed its ``.data``."""

    def __init__(self, input_side: bool, tensor: str, handed_to: str) -> None:
        super().__init__()
        self.input_side, self.tensor, self.handed_to = input_side, tensor, handed_to
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn.requires_grad_(False)
        self.nudger = NudgesHandedTensor()
        self.clamp = nn.Hardtanh(-0.1, 0.1, inplace=handed_to == "nn.Hardtanh(inplace=True)")

    def forward(self, x):
        tensor = self.conv.bias if self.tensor == "layer bias" else self.bn.weight
        if self.handed_to == "a torch.fx.wrap function":
            nudged = nudge_wrapped(tensor)
        elif self.handed_to == "an untraceable module":
            nudged = self.nudger(tensor)
        else:
            nudged = self.clamp(tensor.data).sum() * 0
        y = self.conv(self.bn(x)) if self.input_side else self.bn(self.conv(x))
        return y + nudged


HANDED_TO = ("a torch.fx.wrap function", "an untraceable module", "nn.Hardtanh(inplace=True)")


@pytest.mark.parametrize("input_side", [False, True], ids=["output side", "input side"])
@pytest.mark.parametrize("tensor", ["layer bias", "bn weight"])
@pytest.mark.parametrize("handed_to", HANDED_TO)
def test_a_fold_whose_tensor_is_handed_to_code_that_changes_it_is_left(
    handed_to, tensor, input_side
):
    """The code runs in no graph (FX records one call), so no in-place operation shows; before,
    each folded, and the fused model drifted from the original call by call (0.82 off by the
    third call for the wrapped function, 0.63 for the module, 0.12 for the clamp)."""
    model = prepared(HandsItsTensorOn(input_side, tensor, handed_to))
    fused, report = fuse_with_report(model, (image(2, 3, 4, 4),))
    assert_left(report, "bn", because=("handed it",))
    for _ in range(3):
        assert_equivalent(model, fused, image(2, 3, 4, 4))


def test_a_fold_whose_tensor_a_torch_layer_only_reads_still_folds():
    """nn.Hardtanh without ``inplace`` returns a new tensor: the fold goes into a copy of the conv,
    whose bias the clamp still reads."""
    model = prepared(HandsItsTensorOn(False, "layer bias", "nn.Hardtanh()"))
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")


READS = {
    "a mean": lambda m: m.conv.weight.data.mean() * 0,
    # New tensors computed from the weight, then changed in place: the weight stays as it is.
    "a mean, then changed in place": lambda m: m.conv.weight.data.mean().add_(1) * 0,
    "a torch.mul product, then changed in place": lambda m: (
        torch.mul(m.conv.weight.data, 0.5).add_(1).sum() * 0
    ),
}


@pytest.mark.parametrize("read", list(READS))
def test_a_fold_whose_tensors_the_model_only_reads_still_folds(read):
    # The fold goes into a copy of the conv; the original stays for the read, holding only the
    # weight it reads (its bias would be dead state).
    model = prepared(ChangesItsTensors(False, READS[read]))
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert dict(fused.conv.named_parameters()).keys() == {"weight"}


class Nudger:
    """A plain object whose method adds to the tensor it holds, or to the bias of the layer it
    holds, as a forward hook."""

    def __init__(self, held: torch.Tensor | nn.Module) -> None:
        self.held = held

    def nudge(self, module, args, output) -> None:
        tensor = self.held.bias if isinstance(self.held, nn.Module) else self.held
        tensor.data.add_(0.1)


class NudgesUntraceably(nn.Module):
    """Untraceable (a branch on values), and adds to a conv's bias on every call, holding the
    bias or the conv: as a plain attribute (no parameter, buffer or child), or registered (a
    parameter of its own tied to the conv's, or the conv as its child too)."""

    def __init__(self, conv: nn.Conv2d, holds: str) -> None:
        super().__init__()
        self.holds_bias = holds.endswith("bias")
        if holds == "plain bias":
            self.__dict__["bias"] = conv.bias
        elif holds == "registered bias":
            self.register_parameter("bias", conv.bias)
        elif holds == "plain conv":
            self.__dict__["conv"] = conv
        else:
            self.conv = conv

    def forward(self, x):
        if x.sum() > -1e9:
            bias = self.bias if self.holds_bias else self.conv.bias
            bias.data.add_(0.1)
        return x


def _nudged_by_an_untraceable_module(holds: str) -> nn.Module:
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    return Chain(nudge=NudgesUntraceably(conv, holds), conv=conv, bn=bn)


class StatisticsUpdatedElsewhere(nn.Module):
    """conv -> eval-mode BN, whose running statistics a norm updating its own also uses."""

    def __init__(self, other: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.other = other
        if other in ("BatchNorm2d", "InstanceNorm2d"):
            norm = getattr(nn, other)(3, track_running_stats=True).train()
            norm.running_mean, norm.running_var = self.bn.running_mean, self.bn.running_var
            self.norm = norm

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.other == "F.batch_norm":
            mean, var = self.bn.running_mean, self.bn.running_var
            return y + F.batch_norm(x, mean, var, training=True, momentum=0.5)
        return y + self.norm(x)


def _hooked_by_a_nudger(holds: str) -> nn.Module:
    model = Chain(conv=nn.Conv2d(3, 3, 1), bn=nn.BatchNorm2d(3), act=nn.ReLU())
    held = model.conv.bias if holds == "bias" else model.conv
    model.act.register_forward_hook(Nudger(held).nudge)
    return model


def _tied_to_an_embedding_with_max_norm() -> nn.Module:
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)
            self.embed = nn.Embedding(6, 4, max_norm=0.5)
            self.embed.weight = self.fc.weight  # tied, as language models tie their heads

        def forward(self, x):
            return self.bn(self.fc(x)) + self.embed(torch.arange(6)).sum()

    return Tied()


CHANGED_AS_IT_RUNS = {
    "a hook's object holds the layer bias": (
        functools.partial(_hooked_by_a_nudger, "bias"),
        (2, 3, 4, 4),
    ),
    "a hook's object holds the layer": (
        functools.partial(_hooked_by_a_nudger, "layer"),
        (2, 3, 4, 4),
    ),
    **{
        f"an untraceable module holds the layer ({holds})": (
            functools.partial(_nudged_by_an_untraceable_module, holds),
            (2, 3, 4, 4),
        )
        for holds in ("plain bias", "registered bias", "plain conv", "child conv")
    },
    "a training-mode BatchNorm2d shares the running statistics": (
        lambda: StatisticsUpdatedElsewhere("BatchNorm2d"),
        (2, 3, 4, 4),
    ),
    "a training-mode InstanceNorm2d shares the running statistics": (
        lambda: StatisticsUpdatedElsewhere("InstanceNorm2d"),
        (2, 3, 4, 4),
    ),
    "F.batch_norm(training=True) shares the running statistics": (
        lambda: StatisticsUpdatedElsewhere("F.batch_norm"),
        (2, 3, 4, 4),
    ),
    "an Embedding with max_norm shares the Linear weight": (
        _tied_to_an_embedding_with_max_norm,
        (3, 4),
    ),
}


@pytest.mark.parametrize("case", list(CHANGED_AS_IT_RUNS))
def test_a_fold_whose_tensors_code_running_as_written_may_change_is_left(case):
    """Rule 6, for code no graph holds: a hook, an untraceable module, a norm updating running
    statistics it shares with the BN. Folded, the layer kept its values at fusing time (bug 16):
    within three calls 0.27 off (a nudged bias), 0.47 (an embedding renormalising the weight it
    ties), 2.0 to 6.5 (running statistics updated by a training-mode norm)."""
    make, shape = CHANGED_AS_IT_RUNS[case]
    model = prepared(make())
    if isinstance(model, StatisticsUpdatedElsewhere) and model.other != "F.batch_norm":
        model.norm.train()
    example = (image(*shape),) if "Embedding" in case else None  # a Linear folds on 2-D only
    fused, report = fuse_with_report(model, example)
    assert_left(report, "bn", because=("runs as written", "in place"))
    for seed in range(3):
        x = image(*shape, seed=seed)
        torch.testing.assert_close(fused(x), model(x))


def test_a_hook_closing_over_the_callers_tensor_leaves_the_fold_of_its_copy():
    """``copy.deepcopy`` keeps functions as they are: the fused model's hook still closes over
    the caller's bias and changes it, so the fold into the copy's conv must be left too (the
    caller's tensors are matched to the copy's). The two models cannot agree over calls here
    whatever a fuser does, as with any deep copy of this model, so only the report is checked."""
    model = prepared(Chain(conv=nn.Conv2d(3, 3, 1), bn=nn.BatchNorm2d(3), act=nn.ReLU()))
    bias = model.conv.bias

    def nudge(module, args, output):
        bias.data.add_(0.1)

    model.act.register_forward_hook(nudge)
    _, report = fuse_with_report(model)
    assert_left(report, "bn", because=("a hook of act",))


@pytest.mark.parametrize("reads_the_model", [False, True], ids=["a list", "the model too"])
def test_a_hook_changing_no_tensor_of_a_fold_leaves_it_folded(reads_the_model):
    """A hook holding a list it appends to, or the model too, whose code names no in-place
    change: the fold is made."""
    model = prepared(Chain(conv=nn.Conv2d(3, 3, 1), bn=nn.BatchNorm2d(3), act=nn.ReLU()))
    seen: list[object] = []

    def record(module, args, output):
        seen.append((output.shape, model.conv.out_channels) if reads_the_model else output.shape)

    model.act.register_forward_hook(record)
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert seen, "the hook never ran"


# --- rule 2: Linear needs proven 2-D outputs ------------------------------------------------------


def linear_then_bn() -> nn.Module:
    return prepared(Chain(fc=nn.Linear(4, 5), bn=nn.BatchNorm1d(5)))


def test_linear_then_batchnorm1d_folds_on_2d_example_inputs():
    model = linear_then_bn()
    x = image(3, 4)
    fused, report = fused_and_checked(model, x, example_inputs=(x,))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="fc")
    assert remaining_batch_norms(fused) == []


def test_linear_then_batchnorm1d_on_3d_example_inputs_is_left():
    model = linear_then_bn()  # on (N, 5, 4) the BN normalises dim 1, not the Linear's features
    x = image(3, 5, 4)
    _, report = fused_and_checked(model, x, example_inputs=(x,))
    assert_left(report, "bn", because=("2-d", "3-d", "rank", "axis"))


def test_linear_then_batchnorm1d_without_example_inputs_is_left_for_want_of_them():
    model = linear_then_bn()
    _, report = fused_and_checked(model, image(3, 4))
    assert_left(report, "bn", because=("example input", "example_input"))


def test_batchnorm_whose_channel_count_differs_from_the_conv_is_left():
    model = prepared(Chain(conv=nn.Conv1d(4, 5, 1), bn=nn.BatchNorm1d(7)))
    # unbatched: the conv's (5, 7) output is read by BN1d as (N=5, C=7)
    _, report = fused_and_checked(model, image(4, 7))
    assert_left(report, "bn", because=("channel",))


def test_unbatched_conv1d_then_batchnorm1d_is_left_given_example_inputs():
    model = prepared(Chain(conv=nn.Conv1d(4, 5, 1), bn=nn.BatchNorm1d(5)))
    x = image(4, 5)  # unbatched: the conv's (5, 5) output is read by BN1d as (N=5, C=5)
    _, report = fused_and_checked(model, x, example_inputs=(x,))
    assert not report.site("bn").folded, report


#: Folds whose BatchNorm also runs on a rank the layer can take other than its batched one, each
#: with an input of each rank on which the original runs: (model, batched input, other input,
#: the BN's report name). The other input (an unbatched one, or a Linear's 3-D one) makes the BN
#: normalise an axis that is not the layer's channels, so the fold is exact only on the first.
OTHER_RANK_RUNS_TOO = {
    "conv1d -> BatchNorm1d": (
        lambda: Chain(conv=nn.Conv1d(4, 5, 1), bn=nn.BatchNorm1d(5)),
        (2, 4, 5),
        (4, 5),  # the conv's (5, 5) output is read by BN1d as (N=5, C=5): it normalises L
        "bn",
    ),
    "conv_transpose1d -> BatchNorm1d": (
        lambda: Chain(conv=nn.ConvTranspose1d(4, 5, 1), bn=nn.BatchNorm1d(5)),
        (2, 4, 5),
        (4, 5),
        "bn",
    ),
    "F.conv2d -> F.batch_norm": (FunctionalConvBatchNorm, (2, 3, 4, 5), (3, 4, 5), "bn_mean"),
    "conv2d -> SyncBatchNorm": (
        lambda: Chain(conv=nn.Conv2d(3, 4, 1), bn=nn.SyncBatchNorm(4)),
        (2, 3, 4, 5),
        (3, 4, 5),
        "bn",
    ),
    "conv2d -> FrozenBatchNorm2d": (  # unbatched, its broadcast adds a batch dimension
        lambda: Chain(conv=nn.Conv2d(3, 4, 1), bn=FrozenBatchNorm2d(4)),
        (2, 3, 4, 5),
        (3, 4, 5),
        "bn",
    ),
    "BatchNorm1d -> conv1d (input side)": (
        lambda: Chain(bn=nn.BatchNorm1d(4), conv=nn.Conv1d(4, 3, 1)),
        (2, 4, 6),
        (4, 4),  # BN1d reads the unbatched (4, 4) input as (N=4, C=4)
        "bn",
    ),
    "Linear -> BatchNorm1d, given 2-D example inputs": (
        lambda: Chain(fc=nn.Linear(4, 5), bn=nn.BatchNorm1d(5)),
        (3, 4),
        (3, 5, 4),  # the Linear's (3, 5, 5) output is normalised along dim 1, not its features
        "bn",
    ),
}


@pytest.mark.parametrize(
    ("case", "with_inputs"),
    [
        (case, with_inputs)
        for case in OTHER_RANK_RUNS_TOO
        for with_inputs in (False, True)
        if with_inputs or not case.startswith("Linear")  # a Linear folds only given them
    ],
    ids=lambda value: {False: "no inputs", True: "example_inputs"}.get(value, value),
)
def test_a_fold_exact_only_at_one_rank_makes_the_fused_model_refuse_the_other(case, with_inputs):
    """Without example inputs, or with batched ones, such a BN folds; called with the other
    rank, the fused model must not return what the layer alone computes (before: 2.7 off on the
    conv1d case). It raises, naming the BN and what to do, where a fold cannot be right."""
    build, batched_shape, other_shape, bn = OTHER_RANK_RUNS_TOO[case]
    model = prepared(build())
    batched, other = image(*batched_shape), image(*other_shape, seed=2)
    model(other)  # the original runs on it
    examples = (batched,) if with_inputs else None
    fused, report = fused_and_checked(model, batched, example_inputs=examples)
    assert report.site(bn).folded, report
    assert report.site(bn).rank_checked == batched.ndim, report
    with pytest.raises(AssertionError, match=f"BatchNorm {bn} was folded .* unbatched input"):
        fused(other)
    assert_equivalent(model, fused, batched)  # and still runs where it is exact
    again, _ = fused_and_checked(fused, batched, example_inputs=examples)
    checks = [n for n in again.graph.nodes if n.target is torch._assert]
    assert len(checks) == 1, again.code  # fusing the fused model adds no second check


@pytest.mark.parametrize(
    ("build", "input_shape"),
    [CONV_THEN_BN["conv2d"], CONV_THEN_BN["conv3d"], CONV_THEN_BN["conv_transpose3d"]],
    ids=["BatchNorm2d", "BatchNorm3d", "BatchNorm3d after a transposed conv"],
)
def test_a_batchnorm_refusing_the_unbatched_rank_folds_without_a_rank_check(build, input_shape):
    """BatchNorm2d and 3d raise on an unbatched input themselves, so their folds are exact on
    every input the original runs on, and the fused graph stays the plain layer call."""
    model = prepared(build())
    fused, report = fused_and_checked(model, image(*input_shape))
    assert report.site("bn").folded, report
    assert report.site("bn").rank_checked is None, report
    assert not [n for n in fused.graph.nodes if n.target is torch._assert], fused.code


def test_a_batchnorm_refusing_the_layers_batched_rank_is_left():
    """A BatchNorm2d after a Conv3d runs only on the conv's unbatched 4-D output (C, D, H, W),
    and normalises its D axis: no fold is right for any input the original runs on."""
    model = prepared(Chain(conv=nn.Conv3d(2, 4, 1), bn=nn.BatchNorm2d(4)))
    _, report = fused_and_checked(model, image(2, 4, 3, 3))
    assert_left(report, "bn", because=("unbatched",))


#: A FrozenBatchNorm2d after a layer whose batched output is not 4-D, on an input the original
#: runs on: its (1, C, 1, 1) buffers broadcast against dims -3 and on, so it scales another axis
#: than dim 1, or returns another shape. (layer, input shape, channels.)
FROZEN_AT_ANOTHER_RANK = {
    "Linear, (N, C) -> (1, C, N, C)": (lambda: nn.Linear(4, 5), (3, 4), 5),
    "Conv1d, N == C: (N, C, L) read as (1, N, C, L)": (lambda: nn.Conv1d(4, 5, 1), (5, 4, 6), 5),
    "Conv3d, D == C: its depth axis scaled": (lambda: nn.Conv3d(2, 4, 1), (2, 2, 4, 3, 3), 4),
}


@pytest.mark.parametrize("case", list(FROZEN_AT_ANOTHER_RANK))
def test_a_frozen_batchnorm_after_a_layer_not_4d_is_left(case):
    """FrozenBatchNorm2d computes ``x * scale + shift`` with (1, C, 1, 1) buffers: it normalises
    dim 1 and keeps the shape only on 4-D input. Folded after a Linear on 2-D example inputs,
    the fused model returned (3, 5) where the original returns (1, 5, 3, 5)."""
    build, shape, channels = FROZEN_AT_ANOTHER_RANK[case]
    model = prepared(Chain(layer=build(), bn=FrozenBatchNorm2d(channels)))
    x = image(*shape)
    for examples in (None, (x,)):
        _, report = fused_and_checked(model, x, example_inputs=examples)
        unproven = examples is None and case.startswith("Linear")  # its rank, first
        assert_left(report, "bn", because=("example_inputs",) if unproven else ("4-d",))


# --- rule 3: input side ---------------------------------------------------------------------------

UNPADDED_CONVS = {
    "conv1d-stride-dilation-groups": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2),
        nn.BatchNorm1d,
        (2, 4, 11),
    ),
    "conv2d-padding-0": (lambda: nn.Conv2d(4, 5, 3), nn.BatchNorm2d, (2, 4, 6, 6)),
    "conv2d-same-1x1": (lambda: nn.Conv2d(4, 5, 1, padding="same"), nn.BatchNorm2d, (2, 4, 5, 5)),
    "conv2d-valid-depthwise": (
        lambda: nn.Conv2d(4, 4, 3, padding="valid", groups=4),
        nn.BatchNorm2d,
        (2, 4, 6, 6),
    ),
    "conv2d-reflect": (
        lambda: nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d,
        (2, 4, 6, 6),
    ),
    "conv2d-replicate-groups": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate", groups=2, stride=2),
        nn.BatchNorm2d,
        (2, 4, 7, 7),
    ),
    "conv3d-circular": (
        lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.BatchNorm3d,
        (1, 2, 4, 4, 4),
    ),
}


@pytest.mark.parametrize(
    ("build_conv", "batch_norm", "input_shape"), UNPADDED_CONVS.values(), ids=UNPADDED_CONVS.keys()
)
def test_batchnorm_before_a_conv_without_zero_padding_folds_on_the_input_side(
    build_conv, batch_norm, input_shape
):
    model = prepared(Chain(bn=batch_norm(input_shape[1]), conv=build_conv()))
    fused, report = fused_and_checked(model, image(*input_shape))
    assert_folded(report, "bn", side=INPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


@pytest.mark.parametrize(
    "build_conv",
    [lambda: nn.Conv2d(4, 5, 3, padding=1), lambda: nn.Conv2d(4, 5, 3, padding="same")],
    ids=["padding-1", "same-3x3"],
)
def test_batchnorm_before_a_zero_padded_conv_is_left(build_conv):
    model = prepared(Chain(bn=nn.BatchNorm2d(4), conv=build_conv()))
    _, report = fused_and_checked(model, image(2, 4, 5, 5))
    assert_left(report, "bn", because=("pad",))


def test_batchnorm_before_a_transposed_conv_is_left():
    model = prepared(Chain(bn=nn.BatchNorm2d(4), conv=nn.ConvTranspose2d(4, 3, 3, stride=2)))
    _, report = fused_and_checked(model, image(2, 4, 5, 5))
    assert not report.site("bn").folded, report


def test_batchnorm_before_a_linear_on_2d_inputs_folds_on_the_input_side():
    model = prepared(Chain(bn=nn.BatchNorm1d(4), fc=nn.Linear(4, 3)))
    x = image(5, 4)
    fused, report = fused_and_checked(model, x, example_inputs=(x,))
    assert_folded(report, "bn", side=INPUT_SIDE, into="fc")
    assert remaining_batch_norms(fused) == []


def test_batchnorm_before_a_linear_without_example_inputs_is_left():
    model = prepared(Chain(bn=nn.BatchNorm1d(4), fc=nn.Linear(4, 3)))
    _, report = fused_and_checked(model, image(5, 4))
    assert_left(report, "bn", because=("example input", "example_input"))


def test_batchnorm_before_a_linear_on_3d_inputs_is_left():
    model = prepared(Chain(bn=nn.BatchNorm1d(4), fc=nn.Linear(4, 3)))
    x = image(5, 4, 4)  # BN normalises dim 1, the Linear mixes the last dim
    _, report = fused_and_checked(model, x, example_inputs=(x,))
    assert_left(report, "bn", because=("2-d", "3-d", "rank", "axis"))


def test_batchnorm_whose_channel_count_differs_from_the_next_conv_is_left():
    model = prepared(Chain(bn=nn.BatchNorm1d(6), conv=nn.Conv1d(5, 3, 1)))
    # BN1d reads (5, 6) as (N=5, C=6); the conv reads it unbatched as (C=5, L=6)
    _, report = fused_and_checked(model, image(5, 6))
    assert_left(report, "bn", because=("channel",))


def test_input_side_fold_stays_right_when_the_batchnorm_input_is_then_changed_in_place():
    class InPlaceAfterBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.act = nn.ReLU(inplace=True)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            h = self.stem(x)
            y = self.bn(h)
            h = self.act(h)  # overwrites the BN's input before the conv reads the BN's output
            return self.conv(y) + h

    model = prepared(InPlaceAfterBatchNorm())
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=INPUT_SIDE, into="conv")


def test_output_side_is_preferred_when_both_sides_could_fold():
    model = prepared(
        Chain(conv1=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4), conv2=nn.Conv2d(4, 2, 1))
    )
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv1")
    assert remaining_batch_norms(fused) == []


def test_batchnorm_folds_on_the_input_side_when_the_layer_output_has_other_readers():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.conv2 = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv1(x)
            return self.conv2(self.bn(y)) + y

    model = prepared(Branch())
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=INPUT_SIDE, into="conv2")
    assert remaining_batch_norms(fused) == []


def test_batchnorm_whose_output_is_read_twice_is_left():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.conv(y) + y

    model = prepared(TwoReaders())
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert not report.site("bn").folded, report


# --- rule 4: chains -------------------------------------------------------------------------------


def test_conv_bn_bn_chain_folds_both_into_the_conv_on_the_output_side():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn1=nn.BatchNorm2d(4), bn2=nn.BatchNorm2d(4)))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn1", side=OUTPUT_SIDE, into="conv")
    assert_folded(report, "bn2", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_bn_bn_conv_chain_folds_both_into_the_conv_on_the_input_side():
    model = prepared(Chain(bn1=nn.BatchNorm2d(3), bn2=nn.BatchNorm2d(3), conv=nn.Conv2d(3, 4, 3)))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn1", side=INPUT_SIDE, into="conv")
    assert_folded(report, "bn2", side=INPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


def test_batchnorms_on_both_sides_of_one_conv_both_fold_into_it():
    model = prepared(Chain(bn1=nn.BatchNorm2d(3), conv=nn.Conv2d(3, 4, 3), bn2=nn.BatchNorm2d(4)))
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert_folded(report, "bn1", side=INPUT_SIDE, into="conv")
    assert_folded(report, "bn2", side=OUTPUT_SIDE, into="conv")
    assert remaining_batch_norms(fused) == []


# --- rule 5: shared layers are copied, never skipped ----------------------------------------------


def test_conv_module_called_twice_folds_each_call_with_its_own_batchnorm():
    class CalledTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(3)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            x = self.bn1(self.conv(x))
            return self.bn2(self.conv(x))

    model = prepared(CalledTwice())
    fused, report = fused_and_checked(model, image(2, 3, 5, 5))
    assert report.site("bn1").folded and report.site("bn2").folded, report
    assert remaining_batch_norms(fused) == []


def test_conv_whose_weight_is_also_read_functionally_folds_into_a_copy():
    class TiedWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            tied = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
            return self.bn(self.conv(x)) + tied

    model = prepared(TiedWeights())
    fused, report = fused_and_checked(model, image(2, 3, 5, 5))
    assert_folded(report, "bn", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


def test_functional_weight_shared_by_two_convs_folds_each_with_its_own_batchnorm():
    class SharedFunctionalWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))
            self.bn1 = nn.BatchNorm2d(3)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn1(F.conv2d(x, self.weight))
            b = self.bn2(F.conv2d(x * 2, self.weight))
            return a + b

    model = prepared(SharedFunctionalWeight())
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn1", side=OUTPUT_SIDE)
    assert_folded(report, "bn2", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


def test_two_conv_modules_sharing_one_weight_each_fold_their_own_batchnorm():
    class TiedConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.conv2.weight = self.conv1.weight

        def forward(self, x):
            return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    model = prepared(TiedConvs())
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn1", side=OUTPUT_SIDE)
    assert_folded(report, "bn2", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


class BatchNormCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)


def test_batchnorm_module_called_twice_folds_at_each_call_site():
    class BothAfterConvs(BatchNormCalledTwice):
        def forward(self, x):
            return self.bn(self.conv1(x)) + self.bn(self.conv2(x))

    model = prepared(BothAfterConvs())
    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv1", call_index=0)
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv2", call_index=1)
    assert remaining_batch_norms(fused) == []


def test_batchnorm_module_called_twice_folds_one_call_and_keeps_itself_for_the_other():
    class OneAfterAConv(BatchNormCalledTwice):
        def forward(self, x):
            return self.bn(self.conv1(x)) * self.bn(x)

    model = prepared(OneAfterAConv())
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv1", call_index=0)
    assert not report.site("bn", call_index=1).folded, report


def test_batchnorm_whose_weight_is_also_read_elsewhere_folds_and_keeps_that_read_working():
    class ReadsBatchNormWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) * self.bn.weight.reshape(1, -1, 1, 1)

    model = prepared(ReadsBatchNormWeight())
    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")


def test_batchnorm_called_directly_and_inside_its_hooked_parent_folds_at_both_and_stays_inside():
    """``self.inner.bn`` folded where the root calls it directly must stay in ``inner``, which
    runs it too (a hooked module, fused on its own): nothing of it may be swapped or dropped."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.inner.bn(self.conv(x)) + self.inner(x)

    model = prepared(Outer())
    model.inner.register_forward_hook(lambda module, args, output: output * 2.0)
    _, report = fused_and_checked(model, image(2, 3, 4, 4), example_inputs=(image(2, 3, 4, 4),))
    sites = [site for site in report.sites if site.bn == "inner.bn"]
    assert sorted((site.folded, site.into) for site in sites) == [
        (True, "conv"),
        (True, "inner.conv"),
    ], report
    # Two calls in two graphs (the root's, and inner's fused on its own): numbered across both.
    assert [site.call_index for site in sites] == [0, 1], report
    assert report.site("inner.bn", 1).into == "inner.conv", report


class Doubled(nn.Module):
    """A parametrization without a right inverse: the conv's weight cannot be assigned."""

    def forward(self, weight):
        return weight * 2


@pytest.mark.parametrize("parametrize", ["weight_norm", "no-right-inverse"])
def test_conv_with_a_parametrized_weight_is_folded_correctly_or_left_never_an_error(parametrize):
    model = Chain(conv=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4))
    if parametrize == "weight_norm":
        nn.utils.parametrizations.weight_norm(model.conv)
    else:
        nn.utils.parametrize.register_parametrization(model.conv, "weight", Doubled())
    model = prepared(model)

    _, report = fused_and_checked(model, image(2, 3, 4, 4))
    site = report.site("bn")
    assert site.folded or site.reason, report


class CountedScale(nn.Module):
    """A parametrization that scales by how often it has been read: the tensor a module reads
    differs on every call, as a parametrization's result may."""

    def __init__(self):
        super().__init__()
        self.register_buffer("reads", torch.zeros(()))

    def forward(self, stored):
        self.reads += 1
        return stored * self.reads


@pytest.mark.parametrize(
    ("make_bn", "tensor"),
    [
        (lambda: nn.BatchNorm2d(4), "weight"),
        (lambda: nn.BatchNorm2d(4), "running_var"),
        (lambda: nn.BatchNorm2d(4, affine=False), "running_mean"),
        (lambda: FrozenBatchNorm2d(4), "bias"),
    ],
    ids=["weight", "running_var", "running_mean-no-affine", "frozen-bias"],
)
@pytest.mark.parametrize("side", [OUTPUT_SIDE, INPUT_SIDE])
def test_a_batchnorm_whose_tensors_a_parametrization_computes_is_left(make_bn, tensor, side):
    """README rule 1: a parametrized BN's weight, bias or statistics are computed on every call,
    so none is a module constant. Folded with what they were at fusing time, this BN came out
    3.6 off the original on the second call and 7.1 on the third (bug 15)."""
    conv = nn.Conv2d(4, 4, 1)
    model = Chain(bn=make_bn(), conv=conv) if side == INPUT_SIDE else Chain(conv=conv, bn=make_bn())
    model = prepared(model)
    nn.utils.parametrize.register_parametrization(model.bn, tensor, CountedScale())

    fused, report = fuse_with_report(model)
    x = image(2, 4, 3, 3)
    for _ in range(3):  # left, the BN runs as written: bit for bit, on every call
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert_left(report, "bn", because=("parametrized",))


def test_conv_and_batchnorm_inside_a_hooked_container_fold_and_the_hook_still_fires():
    class HookedBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.block(x))

    model = prepared(HookedBlock())
    seen = []
    model.block.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    x = image(2, 3, 4, 4)

    fused, report = fused_and_checked(model, x)
    assert_folded(report, "block.1", side=OUTPUT_SIDE)  # neither the conv nor the BN has hooks
    assert remaining_batch_norms(fused) == []

    seen.clear()
    fused(x)
    assert len(seen) == 1, "the container's hook did not fire exactly once in the fused model"
    torch.testing.assert_close(seen[0], model.block(x))


def test_conv_shared_by_two_hooked_containers_folds_into_copies():
    class SharedAcrossHookedBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            shared = nn.Conv2d(3, 3, 1)
            self.block1 = nn.Sequential(shared, nn.BatchNorm2d(3))
            self.block2 = nn.Sequential(shared, nn.BatchNorm2d(3))

        def forward(self, x):
            return self.block1(x) + self.block2(x)

    model = prepared(SharedAcrossHookedBlocks())
    model.block1.register_forward_hook(lambda module, args, output: None)
    model.block2.register_forward_hook(lambda module, args, output: None)

    fused, report = fused_and_checked(model, image(2, 3, 4, 4))
    assert_folded(report, "block1.1", side=OUTPUT_SIDE)
    assert_folded(report, "block2.1", side=OUTPUT_SIDE)
    assert remaining_batch_norms(fused) == []


def test_conv_held_under_two_names_folds_into_copies_and_leaves_no_original_behind():
    """The same module registered twice (``self.alias = self.conv``) is held at two places, so no
    fold changes it in place: each call folds into a copy. The original, then read by no node,
    must not stay in the fused model (its weights in memory and in ``state_dict``)."""

    class HeldTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn_a = nn.BatchNorm2d(4)
            self.bn_b = nn.BatchNorm2d(4)
            self.alias = self.conv

        def forward(self, x):
            return self.bn_a(self.conv(x)) + self.bn_b(self.alias(x))

    model = prepared(HeldTwice())
    fused, report = fused_and_checked(model, image(2, 3, 5, 5), example_inputs=(image(2, 3, 5, 5),))
    assert_folded(report, "bn_a", side=OUTPUT_SIDE, into="conv")
    assert_folded(report, "bn_b", side=OUTPUT_SIDE, into="conv")
    assert not any(name.endswith("conv.weight") for name in fused.state_dict()), fused
    assert model.alias is model.conv


# --- rule 6: never wrong --------------------------------------------------------------------------


def test_conv_with_a_forward_hook_is_not_folded_into_and_its_hook_sees_the_unfolded_output():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))
    seen = []
    model.conv.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    x = image(2, 3, 6, 6)

    fused, report = fused_and_checked(model, x)
    assert_left(report, "bn", because=("hook",))

    seen.clear()
    fused(x)
    expected = F.conv2d(x, model.conv.weight, model.conv.bias)
    assert len(seen) == 1, "the conv's hook did not fire exactly once in the fused model"
    torch.testing.assert_close(seen[0], expected)


@requires_cpu_float16
def test_fold_whose_weight_would_overflow_float16_is_left():
    model = Chain(conv=nn.Conv2d(3, 4, 1, bias=False), bn=nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.conv.weight.fill_(1000.0)
        model.bn.weight.fill_(100.0)  # folded weight 1e5 > float16 max 65504
    model.half()
    x = image(2, 3, 4, 4).half() * 1e-3

    _, report = fused_and_checked(model, x)
    assert_left(report, "bn", because=("overflow", "float16", "fp16", "range"))


@requires_cpu_float16
def test_fold_whose_bias_would_overflow_float16_is_left():
    model = Chain(conv=nn.Conv2d(3, 4, 1, bias=False), bn=nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.conv.weight.fill_(300.0)  # folded weight 3e4 fits float16
        model.bn.running_mean.fill_(900.0)  # the conv's output is close to the mean ...
        model.bn.weight.fill_(100.0)  # ... but the folded bias is -9e4 < float16 min
    model.half()
    x = (1 + image(2, 3, 4, 4) * 1e-3).half()

    _, report = fused_and_checked(model, x)
    assert_left(report, "bn", because=("overflow", "float16", "fp16", "range"))


def shrinking_chain(
    channels_scaled: int, head_pads: bool = True, transposed: bool = False
) -> nn.Module:
    """conv (weights of 0.01 or less) -> BN whose scale is 2**-12 in the first
    ``channels_scaled`` channels (1 elsewhere) -> a conv amplifying channel 0 by 2**12, as a BN
    that shrinks its input before an amplifying layer does. On inputs of about 100 every
    activation stays in float16's normal range; the product 0.01 * 2**-12 of a fold does not.
    A zero-padded head takes no input-side fold (rule 3). ``transposed``: a ``ConvTranspose2d``,
    whose output channels are its weight's columns; only column 0 is small, every row also holds
    a 0.5, so the rows' largest magnitudes say nothing of channel 0's."""
    head = nn.Conv2d(4, 2, 3, padding=1) if head_pads else nn.Conv2d(4, 2, 1)
    conv = nn.ConvTranspose2d(3, 4, 1) if transposed else nn.Conv2d(3, 4, 1)
    model = Chain(conv=conv, bn=nn.BatchNorm2d(4), head=head).eval()
    with torch.no_grad():
        if transposed:  # weight (in, out, 1, 1)
            model.conv.weight.fill_(0.5)
            model.conv.weight[:, 0] = torch.linspace(-0.01, 0.01, 3).reshape(3, 1, 1)
        else:
            model.conv.weight.copy_(torch.linspace(-0.01, 0.01, 12).reshape(4, 3, 1, 1))
        model.conv.bias.fill_(0.005)
        model.bn.running_var.fill_(1.0 - model.bn.eps)  # sqrt(var + eps) = 1
        model.bn.weight.fill_(1.0)
        model.bn.weight[:channels_scaled] = 2.0**-12
        model.bn.bias.fill_(2.0**-12)
        model.head.weight.zero_()
        model.head.weight[:, 0, -1, -1] = 2.0**12
        model.head.bias.zero_()
    return model


def large_image() -> torch.Tensor:
    return 100 * image(2, 3, 4, 4)


@requires_cpu_float16
def test_fold_whose_weights_would_sink_below_float16s_normal_range_is_left():
    """Folded into the conv, the BN's 2**-12 would make a whole output channel's weights
    subnormal in float16 (below 6.1e-5, where a weight keeps a few bits): the head's 2**12 would
    then amplify an error the unfused model, whose activations stay normal, does not make."""
    model = shrinking_chain(channels_scaled=1).half()
    _, report = fused_and_checked(model, large_image().half())
    assert_left(report, "bn", because=("subnormal", "float16"))
    assert "1 output channel" in report.site("bn").reason, report


@requires_cpu_float16
def test_transposed_conv_fold_that_would_sink_one_output_channel_is_left():
    """The subnormal check reads a transposed conv's output channels (its weight's columns), not
    its rows: every row here holds a 0.5, which a conv's row-by-row bound would take for each
    channel's largest weight, and channel 0's column of 0.01 or less times 2**-12 is subnormal."""
    model = shrinking_chain(channels_scaled=1, transposed=True).half()
    _, report = fused_and_checked(model, large_image().half())
    assert_left(report, "bn", because=("subnormal", "float16"))


@requires_cpu_float16
def test_a_bn_whose_output_side_fold_would_sink_folds_on_the_input_side_where_it_can():
    """Into the head, the BN's 2**-12 meets the head's 2**12: the weights stay normal."""
    model = shrinking_chain(channels_scaled=1, head_pads=False).half()
    _, report = fused_and_checked(model, large_image().half())
    assert_folded(report, "bn", side=INPUT_SIDE, into="head")


@requires_cpu_float16
def test_fold_that_leaves_every_channel_a_normal_weight_is_taken_in_float16():
    """Only channels whose weights would all be subnormal count: a channel scaled to zero is
    exact, and float32 has room for 2**-12 * 0.01."""
    model = shrinking_chain(channels_scaled=0).half()
    _, report = fused_and_checked(model, large_image().half())
    assert report.site("bn").folded, report
    model = shrinking_chain(channels_scaled=4)
    _, report = fused_and_checked(model, large_image())
    assert report.site("bn").folded, report
    zeroed = shrinking_chain(channels_scaled=1).half()
    with torch.no_grad():
        zeroed.bn.weight[0] = 0.0
    _, report = fused_and_checked(zeroed, large_image().half())
    assert report.site("bn").folded, report


@requires_cpu_float16
def test_range_refusals_are_retried_until_a_round_folds_nothing():
    """README rule 4 in float16. ``amplify`` (2**12) cannot fold into ``fc`` at first: the spike of
    16 would become 65536, above float16's 65504. ``shrink`` (2**-12) folds into ``fc`` on the
    input side; ``first`` (0.25) then cannot, as the second output channel's weights would be
    subnormal (about 3e-5). Retried, ``amplify`` now fits and scales ``fc`` back up, which lets
    ``first`` fold in turn: all three fold in one fuse, and a second fuse has nothing left."""
    model = Chain(
        first=nn.BatchNorm1d(2),
        shrink=nn.BatchNorm1d(2),
        fc=nn.Linear(2, 2),
        amplify=nn.BatchNorm1d(2),
    ).eval()
    with torch.no_grad():
        for bn, scale in ((model.first, 0.25), (model.shrink, 2.0**-12), (model.amplify, 2.0**12)):
            bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) = 1
            bn.weight.fill_(scale)
            bn.bias.zero_()
        model.fc.weight.copy_(torch.tensor([[16.0, 0.25], [0.5, -0.5]]))
        model.fc.bias.zero_()
    model.half()
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(4, 2).half()

    fused, report = fused_and_checked(model, x, example_inputs=(x,))
    assert_folded(report, "amplify", side=OUTPUT_SIDE, into="fc")
    assert_folded(report, "shrink", side=INPUT_SIDE, into="fc")
    assert_folded(report, "first", side=INPUT_SIDE, into="fc")
    _, again = fuse_with_report(fused, (x,))
    assert not again.folded, again


@requires_cpu_float16
def test_float16_fold_within_range_folds_and_stays_accurate():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))).half()
    fused, report = fused_and_checked(model, image(2, 3, 6, 6).half())
    assert_folded(report, "bn", side=OUTPUT_SIDE, into="conv")
    assert fused.conv.weight.dtype == torch.float16


# --- numerics: what the fused parameters keep -----------------------------------------------------


def test_fused_conv_weights_keep_the_channels_last_memory_format():
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))
    model.to(memory_format=torch.channels_last)
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert report.site("bn").folded, report
    for name, parameter in fused.named_parameters():
        if parameter.dim() == 4:
            assert parameter.is_contiguous(memory_format=torch.channels_last), name


def test_fused_parameters_keep_requires_grad():
    model = prepared(
        Chain(
            frozen=nn.Conv2d(3, 4, 3),
            bn1=nn.BatchNorm2d(4),
            trainable=nn.Conv2d(4, 5, 1),
            bn2=nn.BatchNorm2d(5),
        )
    )
    model.frozen.requires_grad_(False)
    fused, report = fused_and_checked(model, image(2, 3, 6, 6))
    assert report.site("bn1").folded and report.site("bn2").folded, report

    requires_grad = {name: p.requires_grad for name, p in fused.named_parameters()}
    frozen = [name for name, flag in requires_grad.items() if not flag]
    trainable = [name for name, flag in requires_grad.items() if flag]
    assert sorted(frozen) == ["frozen.bias", "frozen.weight"], requires_grad
    assert sorted(trainable) == ["trainable.bias", "trainable.weight"], requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_parameters_keep_their_dtype_and_device(dtype):
    model = prepared(Chain(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))).to(dtype)
    fused, report = fused_and_checked(model, image(2, 3, 6, 6).to(dtype))
    assert report.site("bn").folded, report
    for name, tensor in [*fused.named_parameters(), *fused.named_buffers()]:
        assert tensor.dtype == dtype, f"{name} is {tensor.dtype}, expected {dtype}"
        assert tensor.device == model.conv.weight.device, name
