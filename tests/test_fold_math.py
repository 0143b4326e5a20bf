"""The fold math against a direct float64 formula.

Each test computes BN(layer(x)) or layer(BN(x)) in float64 with plain torch ops, folds the BN into the
layer's parameters with ``fuser.fold_math``, runs the folded layer in float64, and compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fuser.fold_math import (
    ROUNDING_BLOCK,
    bn_scale_shift,
    copy_rounded,
    fold_into_input,
    fold_into_output,
    product_fits,
    product_in_one_block,
    round_scaled,
    scale_in_place,
)
from fuser.graph_edit import overflow_reason, underflow_reason

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
F64 = torch.float64


@dataclass(frozen=True)
class BatchNormStats:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def scale_shift(self):
        return bn_scale_shift(self.running_mean, self.running_var, self.eps, self.weight, self.bias)

    def apply_float64(self, x: torch.Tensor) -> torch.Tensor:
        """The BN formula itself, in float64, on channel dimension 1."""
        shape = [1, -1] + [1] * (x.dim() - 2)

        def per_channel(t):
            return t.to(F64).reshape(shape)

        y = (x - per_channel(self.running_mean)) / torch.sqrt(
            per_channel(self.running_var) + self.eps
        )
        if self.weight is not None:
            y = y * per_channel(self.weight)
        if self.bias is not None:
            y = y + per_channel(self.bias)
        return y


def random_bn(channels: int, *, affine: bool = True, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def normal():
        return torch.randn(channels, generator=generator).to(dtype)

    log_var = torch.rand(channels, generator=generator) * 3 - 2
    return BatchNormStats(
        running_mean=normal(),
        running_var=(10.0**log_var).to(dtype),
        eps=1e-3,
        weight=normal() if affine else None,
        bias=normal() if affine else None,
    )


def random(*shape, seed: int = 1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def assert_close_float64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == F64, f"folded layer computed in {actual.dtype}, expected float64"
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * max(scale, 1.0))


def assert_float64_parameters(weight, bias):
    assert weight.dtype == F64, f"folded weight is {weight.dtype}, expected float64"
    assert bias is not None, "a fold always produces a bias"
    assert bias.dtype == F64, f"folded bias is {bias.dtype}, expected float64"


# --- bn_scale_shift ------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "weight-and-bias-None"])
def test_scale_and_shift_reproduce_batch_norm(affine):
    bn = random_bn(6, affine=affine)
    x = random(5, 6, dtype=F64)
    scale, shift = bn.scale_shift()
    assert scale.dtype == F64 and shift.dtype == F64
    assert_close_float64(x * scale + shift, bn.apply_float64(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_scale_and_shift_are_float64_whatever_the_statistics_dtype(dtype):
    bn = random_bn(4, dtype=dtype)
    scale, shift = bn.scale_shift()
    assert scale.dtype == F64 and shift.dtype == F64
    x = random(3, 4, dtype=F64)
    assert_close_float64(x * scale + shift, bn.apply_float64(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "weight-and-bias-None"])
def test_scale_and_shift_are_the_textbook_formula_bit_for_bit_and_leave_the_bn_untouched(
    dtype, affine
):
    """``bn_scale_shift`` computes in place in float64 copies: the same values as the formula
    written out, and never in the BN's own tensors (a float64 BN's ``.double()`` is itself)."""
    bn = random_bn(6, affine=affine, dtype=dtype, seed=7)
    tensors = [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]
    before = [t.clone() for t in tensors]
    scale, shift = bn.scale_shift()
    expected_scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if affine:
        expected_scale = expected_scale * bn.weight.double()
    expected_shift = -bn.running_mean.double() * expected_scale
    if affine:
        expected_shift = expected_shift + bn.bias.double()
    assert torch.equal(_bits(scale), _bits(expected_scale))
    assert torch.equal(_bits(shift), _bits(expected_shift))
    for original, now in zip(before, tensors, strict=True):
        assert torch.equal(_bits(original), _bits(now)), "bn_scale_shift changed a BN tensor"


# --- output side: BN(layer(x)) -------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCase:
    dims: int
    in_channels: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    output_padding: int = 0  # transposed convs only

    def input(self, batch: int = 2, size: int = 7):
        return random(batch, self.in_channels, *([size] * self.dims), dtype=F64)


CONV_CASES = {
    "conv1d": ConvCase(1, 4, 6, padding=1),
    "conv1d-groups-stride-dilation": ConvCase(1, 4, 6, stride=2, dilation=2, groups=2, padding=2),
    "conv2d": ConvCase(2, 3, 5, padding=1),
    "conv2d-depthwise": ConvCase(2, 4, 4, groups=4, stride=2, padding=1),
    "conv2d-depthwise-multiplier": ConvCase(2, 3, 6, groups=3, dilation=2),
    "conv3d": ConvCase(3, 2, 3, kernel=2, padding=1),
    "conv3d-groups-stride": ConvCase(3, 4, 6, groups=2, stride=2),
}

CONV_TRANSPOSE_CASES = {
    "conv_transpose1d": ConvCase(1, 4, 6, padding=1),
    "conv_transpose1d-groups-stride-output_padding": ConvCase(
        1, 4, 6, groups=2, stride=2, output_padding=1
    ),
    "conv_transpose2d": ConvCase(2, 3, 5),
    "conv_transpose2d-depthwise-stride-dilation": ConvCase(
        2, 4, 4, groups=4, stride=2, dilation=2, padding=1, output_padding=1
    ),
    "conv_transpose2d-groups-3": ConvCase(2, 6, 9, groups=3, stride=3, output_padding=2),
    "conv_transpose3d": ConvCase(3, 2, 3, kernel=2),
    "conv_transpose3d-groups-stride-output_padding": ConvCase(
        3, 4, 6, kernel=2, groups=2, stride=2, output_padding=1
    ),
}

# Layer bias and BN weight/bias each may be None; one variant of each is enough to cover both.
BIAS_VARIANTS = pytest.mark.parametrize(
    ("has_bias", "affine"),
    [(True, True), (False, True), (True, False)],
    ids=["with-biases", "layer-bias-None", "bn-weight-and-bias-None"],
)


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
@BIAS_VARIANTS
def test_folding_after_a_conv_matches_batch_norm_of_the_conv(case, has_bias, affine):
    conv = CONV[case.dims]
    weight = random(case.out_channels, case.in_channels // case.groups, *[case.kernel] * case.dims)
    bias = random(case.out_channels, seed=2) if has_bias else None
    bn = random_bn(case.out_channels, affine=affine)
    geometry = dict(
        stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups
    )
    x = case.input()

    expected = bn.apply_float64(conv(x, f64(weight), f64(bias), **geometry))
    folded_weight, folded_bias = fold_into_output(
        weight, bias, *bn.scale_shift(), layer="conv", groups=case.groups
    ).float64()

    assert_float64_parameters(folded_weight, folded_bias)
    assert folded_weight.shape == weight.shape
    assert_close_float64(conv(x, folded_weight, folded_bias, **geometry), expected)


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES.values(), ids=CONV_TRANSPOSE_CASES.keys())
@BIAS_VARIANTS
def test_folding_after_a_transposed_conv_matches_batch_norm_of_it(case, has_bias, affine):
    conv_transpose = CONV_TRANSPOSE[case.dims]
    weight = random(case.in_channels, case.out_channels // case.groups, *[case.kernel] * case.dims)
    bias = random(case.out_channels, seed=2) if has_bias else None
    bn = random_bn(case.out_channels, affine=affine)
    geometry = dict(
        stride=case.stride,
        padding=case.padding,
        output_padding=case.output_padding,
        dilation=case.dilation,
        groups=case.groups,
    )
    x = case.input(size=5)

    expected = bn.apply_float64(conv_transpose(x, f64(weight), f64(bias), **geometry))
    folded_weight, folded_bias = fold_into_output(
        weight, bias, *bn.scale_shift(), layer="conv_transpose", groups=case.groups
    ).float64()

    assert_float64_parameters(folded_weight, folded_bias)
    assert folded_weight.shape == weight.shape
    assert_close_float64(conv_transpose(x, folded_weight, folded_bias, **geometry), expected)


@BIAS_VARIANTS
def test_folding_after_a_linear_matches_batch_norm_of_the_linear(has_bias, affine):
    weight = random(7, 5)
    bias = random(7, seed=2) if has_bias else None
    bn = random_bn(7, affine=affine)
    x = random(4, 5, seed=3, dtype=F64)

    expected = bn.apply_float64(F.linear(x, f64(weight), f64(bias)))
    folded_weight, folded_bias = fold_into_output(
        weight, bias, *bn.scale_shift(), layer="linear"
    ).float64()

    assert_float64_parameters(folded_weight, folded_bias)
    assert_close_float64(F.linear(x, folded_weight, folded_bias), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_folding_after_a_conv_is_float64_whatever_the_layer_dtype(dtype):
    weight, bias = random(3, 2, 3, 3, dtype=dtype), random(3, seed=2, dtype=dtype)
    bn = random_bn(3, dtype=dtype)
    x = random(2, 2, 6, 6, seed=3, dtype=F64)

    expected = bn.apply_float64(F.conv2d(x, f64(weight), f64(bias)))
    folded_weight, folded_bias = fold_into_output(
        weight, bias, *bn.scale_shift(), layer="conv"
    ).float64()

    assert_float64_parameters(folded_weight, folded_bias)
    assert_close_float64(F.conv2d(x, folded_weight, folded_bias), expected)


# --- input side: layer(BN(x)) --------------------------------------------------------------------

INPUT_SIDE_CASES = {
    "conv1d": ConvCase(1, 4, 6),
    "conv1d-groups-stride-dilation": ConvCase(1, 4, 6, stride=2, dilation=2, groups=2),
    "conv2d": ConvCase(2, 3, 5),
    "conv2d-depthwise-stride": ConvCase(2, 4, 4, groups=4, stride=2),
    "conv2d-groups-multiplier": ConvCase(2, 6, 4, groups=2, dilation=2),
    "conv3d": ConvCase(3, 2, 3, kernel=2),
    "conv3d-groups": ConvCase(3, 4, 6, groups=2, stride=2),
}
PADDING_MODES = ["none", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("case", INPUT_SIDE_CASES.values(), ids=INPUT_SIDE_CASES.keys())
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@BIAS_VARIANTS
def test_folding_before_an_unpadded_conv_matches_the_conv_of_batch_norm(
    case, padding_mode, has_bias, affine
):
    conv = CONV[case.dims]
    weight = random(case.out_channels, case.in_channels // case.groups, *[case.kernel] * case.dims)
    bias = random(case.out_channels, seed=2) if has_bias else None
    bn = random_bn(case.in_channels, affine=affine)
    geometry = dict(stride=case.stride, dilation=case.dilation, groups=case.groups)
    x = case.input()

    def pad(t):
        # Non-zero padding modes commute with a per-channel affine map, so BN folds through them.
        return t if padding_mode == "none" else F.pad(t, [1] * (2 * case.dims), mode=padding_mode)

    expected = conv(pad(bn.apply_float64(x)), f64(weight), f64(bias), **geometry)
    folded_weight, folded_bias = fold_into_input(
        weight, bias, *bn.scale_shift(), layer="conv", groups=case.groups
    ).float64()

    assert_float64_parameters(folded_weight, folded_bias)
    assert folded_weight.shape == weight.shape
    assert_close_float64(conv(pad(x), folded_weight, folded_bias, **geometry), expected)


@BIAS_VARIANTS
def test_folding_before_a_linear_matches_the_linear_of_batch_norm(has_bias, affine):
    weight = random(7, 5)
    bias = random(7, seed=2) if has_bias else None
    bn = random_bn(5, affine=affine)
    x = random(4, 5, seed=3, dtype=F64)

    expected = F.linear(bn.apply_float64(x), f64(weight), f64(bias))
    folded_weight, folded_bias = fold_into_input(
        weight, bias, *bn.scale_shift(), layer="linear"
    ).float64()

    assert_float64_parameters(folded_weight, folded_bias)
    assert folded_weight.shape == weight.shape
    assert_close_float64(F.linear(x, folded_weight, folded_bias), expected)


def test_folding_leaves_its_inputs_untouched():
    weight, bias = random(6, 2, 3, 3), random(6, seed=2)
    bn = random_bn(6)
    scale, shift = bn.scale_shift()
    before = [t.clone() for t in (weight, bias, scale, shift)]

    fold_into_output(weight, bias, scale, shift, layer="conv", groups=2)
    fold_into_input(random(4, 3, 1, 1), None, scale[:3], shift[:3], layer="conv")

    for original, now in zip(before, (weight, bias, scale, shift), strict=True):
        assert torch.equal(original, now), "a fold function modified its input in place"


# --- rounding the folded weight: round_scaled ----------------------------------------------------

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _folds_of_every_layout(dtype):
    """One fold of each kind and layout, with weights of ``dtype``: (name, FoldedLayer)."""
    bn6, bn4 = random_bn(6, seed=3), random_bn(4, seed=4)
    yield (
        "conv",
        fold_into_output(random(6, 2, 3, 3, dtype=dtype), None, *bn6.scale_shift(), layer="conv"),
    )
    yield (
        "conv3d",
        fold_into_output(
            random(6, 4, 2, 2, 2, dtype=dtype), None, *bn6.scale_shift(), layer="conv"
        ),
    )
    yield (
        "linear",
        fold_into_output(random(6, 5, dtype=dtype), None, *bn6.scale_shift(), layer="linear"),
    )
    yield (
        "conv_transpose-groups",
        fold_into_output(
            random(4, 3, 3, 3, dtype=dtype),
            None,
            *bn6.scale_shift(),
            layer="conv_transpose",
            groups=2,
        ),
    )
    yield (
        "input-side-conv-groups",
        fold_into_input(
            random(6, 2, 1, 1, dtype=dtype), None, *bn4.scale_shift(), layer="conv", groups=2
        ),
    )
    yield (
        "input-side-linear",
        fold_into_input(random(3, 4, dtype=dtype), None, *bn4.scale_shift(), layer="linear"),
    )


@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64])
@pytest.mark.parametrize("block", [ROUNDING_BLOCK, 7, 1], ids=["one-block", "blocks", "row-by-row"])
def test_rounded_weight_is_bit_identical_to_the_float64_formula_then_a_cast(
    dtype, block, monkeypatch
):
    monkeypatch.setattr("fuser.fold_math.ROUNDING_BLOCK", block)
    for name, folded in _folds_of_every_layout(dtype):
        exact, _ = folded.float64()
        rounded, extremes = round_scaled(folded.weight, folded.factor, dtype)
        assert rounded.dtype == dtype and rounded.shape == folded.weight.shape, name
        assert torch.equal(_bits(rounded), _bits(exact.to(dtype))), name
        assert extremes.abs().max().item() == exact.abs().max().item(), name


@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64])
@pytest.mark.parametrize("block", [ROUNDING_BLOCK, 7, 1], ids=["one-block", "blocks", "row-by-row"])
def test_scaling_in_place_gives_the_rounded_weight_bit_for_bit(dtype, block, monkeypatch):
    monkeypatch.setattr("fuser.fold_math.ROUNDING_BLOCK", block)
    for name, folded in _folds_of_every_layout(dtype):
        rounded, _ = round_scaled(folded.weight, folded.factor, dtype)
        weight = folded.weight.clone()
        storage = weight.untyped_storage().data_ptr()
        scale_in_place(weight, folded.factor)
        assert torch.equal(_bits(weight), _bits(rounded)), name
        assert weight.untyped_storage().data_ptr() == storage, name


@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64])
def test_a_product_in_one_block_is_the_float64_product_and_rounds_to_round_scaleds_weight(dtype):
    """The small in-place fold's product: exact, with each row's largest magnitude (a conv's or
    linear's output channels, as ``round_scaled`` reports them), and ``copy_rounded`` writes
    ``round_scaled``'s weight bit for bit into the weight's own storage."""
    for name, folded in _folds_of_every_layout(dtype):
        if name.startswith("conv_transpose"):  # rows are not its output channels: never asked
            continue
        exact, _ = folded.float64()
        before = folded.weight.clone()
        product, largest = product_in_one_block(folded.weight, folded.factor)
        assert torch.equal(_bits(folded.weight), _bits(before)), f"{name}: weight changed"
        assert torch.equal(_bits(product), _bits(exact)), name
        assert torch.equal(largest, exact.abs().flatten(1).amax(dim=1)), name
        rounded, channel_largest = round_scaled(folded.weight, folded.factor, dtype)
        assert torch.equal(largest, channel_largest), name
        weight = folded.weight.clone()
        storage = weight.untyped_storage().data_ptr()
        copy_rounded(weight, product)
        assert torch.equal(_bits(weight), _bits(rounded)), name
        assert weight.untyped_storage().data_ptr() == storage, name


def test_a_product_in_one_block_marks_a_row_holding_a_nan_and_leaves_the_weight_untouched():
    weight = torch.tensor([[1.0, float("nan")], [2.0, -3.0]])
    before = weight.clone()
    _, largest = product_in_one_block(weight, torch.tensor([[2.0], [0.5]], dtype=F64))
    assert largest[0].isnan() and largest[1].item() == 1.5
    assert torch.equal(_bits(weight), _bits(before))


def test_no_product_in_one_block_for_a_weight_of_several_blocks_or_none(monkeypatch):
    """A weight larger than one rounding block is never widened whole (``product_fits`` and
    ``scale_in_place`` take it block by block)."""
    factor = torch.ones(4, 1, dtype=F64)
    assert product_in_one_block(random(4, 3), factor) is not None
    assert product_in_one_block(torch.empty(0, 3), factor[:0]) is None
    monkeypatch.setattr("fuser.fold_math.ROUNDING_BLOCK", 6)  # two rows of three a block
    assert product_in_one_block(random(4, 3), factor) is None
    assert product_in_one_block(random(2, 3), factor[:2]) is not None


def test_scaling_in_place_keeps_the_memory_format():
    weight = random(8, 3, 5, 5).to(memory_format=torch.channels_last)
    factor = torch.linspace(0.5, 2.0, 8, dtype=F64).reshape(-1, 1, 1, 1)
    expected = (weight.double() * factor).float()
    stride = weight.stride()
    scale_in_place(weight, factor)
    assert weight.stride() == stride and torch.equal(weight, expected)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_rounding_happens_once_from_float64_not_through_a_rounded_factor(dtype):
    """Weights and a scale where rounding the scale to the weight's dtype first (as torch's fuse
    does) gives another result: the float64 product must be rounded once."""
    weight = random(64, 32, 3, 3, seed=5, dtype=dtype)
    scale = torch.rand(64, dtype=F64, generator=torch.Generator().manual_seed(6)) * 3 + 0.1
    factor = scale.reshape(-1, 1, 1, 1)
    rounded, _ = round_scaled(weight, factor, dtype)
    exact = (weight.double() * factor).to(dtype)
    twice = weight * factor.to(dtype)
    assert torch.equal(_bits(rounded), _bits(exact))
    assert not torch.equal(_bits(rounded), _bits(twice)), "test data too easy: no double rounding"


def test_rounded_weight_keeps_the_memory_format_and_leaves_the_weight_untouched():
    weight = random(8, 3, 5, 5).to(memory_format=torch.channels_last)
    before = weight.clone()
    scale = torch.linspace(0.5, 2.0, 8, dtype=F64)
    rounded, _ = round_scaled(weight, scale.reshape(-1, 1, 1, 1), torch.float32)
    assert rounded.stride() == weight.stride()
    assert torch.equal(rounded, (weight.double() * scale.reshape(-1, 1, 1, 1)).float())
    assert torch.equal(weight, before)


#: The layout of each of ``_folds_of_every_layout``'s folds: (layer kind, groups).
LAYOUTS = {
    "conv": ("conv", 1),
    "conv3d": ("conv", 1),
    "linear": ("linear", 1),
    "conv_transpose-groups": ("conv_transpose", 2),
    "input-side-conv-groups": ("conv", 2),
    "input-side-linear": ("linear", 1),
}


def _largest_per_output_channel(exact: torch.Tensor, layer: str, groups: int) -> torch.Tensor:
    if layer != "conv_transpose":
        return exact.abs().flatten(1).amax(dim=1)
    by_group = exact.abs().reshape(groups, exact.shape[0] // groups, exact.shape[1], -1)
    return by_group.amax(dim=(1, 3)).flatten()  # output channel g * out_per_group + j


@pytest.mark.parametrize("block", [ROUNDING_BLOCK, 1], ids=["one-block", "row-by-row"])
def test_round_scaled_gives_each_output_channels_largest_magnitude(block, monkeypatch):
    monkeypatch.setattr("fuser.fold_math.ROUNDING_BLOCK", block)
    for name, folded in _folds_of_every_layout(torch.float32):
        layer, groups = LAYOUTS[name]
        exact, _ = folded.float64()
        _, largest = round_scaled(
            folded.weight, folded.factor, torch.float32, layer=layer, groups=groups
        )
        assert torch.equal(largest, _largest_per_output_channel(exact, layer, groups)), name


TINY16 = torch.finfo(torch.float16).tiny


@pytest.mark.parametrize(
    ("largest", "dtype", "sunk"),
    [
        ([1.0, TINY16, 0.0], torch.float16, 0),  # the smallest normal float16 is fine, zero too
        ([1.0, TINY16 / 2, 2e-7], torch.float16, 2),
        ([1e-30], torch.float16, 1),
        ([1e-30], torch.float32, 0),
        ([1e-30], torch.bfloat16, 0),  # float32's range
        ([], torch.float16, 0),
    ],
)
def test_underflow_reason_counts_the_channels_whose_weights_are_all_subnormal(largest, dtype, sunk):
    reason = underflow_reason(torch.tensor(largest, dtype=F64), dtype)
    if sunk:
        assert reason is not None and f"{sunk} output channel(s)" in reason, reason
    else:
        assert reason is None, reason


@pytest.mark.parametrize(
    ("weight", "factor", "fits"),
    [
        ([[1.0, 0.0], [1.0, 2e-9]], [1.0, 1e-4], True),  # each row's largest product is normal
        ([[1.0, 0.0], [1.0, 0.5]], [1.0, 1e-5], False),  # row 1 sinks to 1e-5
        ([[1.0, 0.0], [0.0, 0.0]], [1.0, 1e-9], True),  # an all-zero row stays exactly zero
        ([[1.0, 0.0], [3.0, 1.0]], [1.0, 0.0], True),  # a row scaled to zero too
    ],
)
def test_product_fits_also_proves_no_output_channel_sinks_below_the_normal_range(
    weight, factor, fits
):
    weight = torch.tensor(weight, dtype=F64)
    factor = torch.tensor(factor, dtype=F64).reshape(-1, 1)
    assert product_fits(weight, factor, torch.float16) is fits
    assert product_fits(weight, factor, torch.float32) is True


def test_product_fits_bounds_a_factor_per_input_channel_by_its_smallest_entry():
    """An input-side factor differs along a row: the row's largest weight times the smallest
    factor bounds the row's largest product from below, and a zero factor proves nothing."""
    weight = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    assert product_fits(weight, torch.tensor([[1.0, 1e-4]], dtype=F64), torch.float16)
    assert not product_fits(weight, torch.tensor([[1.0, 1e-5]], dtype=F64), torch.float16)
    assert not product_fits(weight, torch.tensor([[1.0, 0.0]], dtype=F64), torch.float16)


def test_an_empty_weight_rounds_to_an_empty_weight_that_fits():
    rounded, extremes = round_scaled(torch.zeros(0, 3), torch.ones(0, 1, dtype=F64), torch.float16)
    assert rounded.shape == (0, 3) and overflow_reason(extremes, torch.float16) is None


FLOAT16_MAX = 65504.0


@pytest.mark.parametrize(
    ("weight", "factor", "fits"),
    [
        ([1.0, -2.0], [3.0, 1.0], True),  # bound 2 * 3: the largest weight times the largest factor
        ([FLOAT16_MAX / 2, 1.0], [2.0, 0.5], True),  # bound exactly the limit
        ([FLOAT16_MAX / 2, 1.0], [2.0 + 2**-10, 0.0], False),  # the bound is above; the product too
        ([FLOAT16_MAX, 1.0], [0.5, 2.0], False),  # fits, but the bound cannot prove it
        ([float("nan"), 1.0], [1.0, 1.0], False),
        ([float("inf"), 1.0], [0.0, 1.0], False),
        ([1.0, 1.0], [float("nan"), 1.0], False),
        ([], [], False),
    ],
)
def test_product_fits_only_when_its_bound_proves_it(weight, factor, fits):
    weight = torch.tensor(weight, dtype=F64).reshape(-1, 1)
    factor = torch.tensor(factor, dtype=F64).reshape(-1, 1)
    assert product_fits(weight, factor, torch.float16) is fits


@pytest.mark.parametrize(
    ("value", "factor"),
    [
        (FLOAT16_MAX, 1.0),  # the largest float16 fits exactly
        (FLOAT16_MAX, 1.0 + 2**-20),  # just above: rounds back to 65504 in float16, still refused
        (65519.0, 1.0),  # rounds to 65504 in float16: refused, the product is above the limit
        (65520.0, 1.0),  # rounds to inf in float16
        (32752.0, 2.0),
        (1.0, 1e300),
        (1e-30, 1e-300),  # float64 underflow to zero
        (float("inf"), 1.0),
        (float("inf"), 0.0),  # inf * 0 = NaN
        (0.0, float("inf")),  # 0 * inf = NaN
        (float("nan"), 1.0),
        (-70000.0, 1.0),  # the magnitude counts, not the signed value
        (-70000.0, -0.5),
    ],
)
@pytest.mark.parametrize("block", [ROUNDING_BLOCK, 1], ids=["one-block", "row-by-row"])
def test_overflow_verdict_from_the_extremes_is_the_verdict_on_the_float64_product(
    value, factor, block, monkeypatch
):
    monkeypatch.setattr("fuser.fold_math.ROUNDING_BLOCK", block)
    weight = torch.tensor([[0.5, -2.0, 3.0], [1.0, value, -4.0], [0.25, 1.0, 0.0]], dtype=F64)
    factors = torch.tensor([1.5, factor, 1.0], dtype=F64).reshape(-1, 1)
    exact = weight * factors
    for dtype in LOW_PRECISION:
        _, extremes = round_scaled(weight, factors, dtype)
        assert overflow_reason(extremes, dtype) == overflow_reason(exact, dtype), (dtype, value)
        if product_fits(weight, factors, dtype):  # the in-place fold's proof: never a false yes
            assert overflow_reason(exact, dtype) is None, (dtype, value, factor)
    if value == FLOAT16_MAX and factor == 1.0:
        assert overflow_reason(extremes, torch.float16) is None
    if abs(value * factor) > FLOAT16_MAX:
        assert overflow_reason(extremes, torch.float16) is not None
