"""Mutants in the fold math: the real fuser with one numeric formula wrong.

Every one of these changes the fused model's output on some network the suite draws, so the
soundness property ``fused output matches the original`` (float64 reference) should catch each.
Notation: an eval-mode BN is ``y = scale * x + shift`` with ``scale = gamma / sqrt(var + eps)`` and
``shift = beta - mean * scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fuser.fold_math import FoldedLayer, bn_scale_shift, fold_into_input, fold_into_output

from ._patching import Fused, fuse_patched

__all__ = [
    "beta_ignored",
    "eps_ignored",
    "gamma_beta_swapped",
    "input_side_groups_interleaved",
    "input_side_shift_through_folded_weight",
    "layer_bias_dropped",
    "non_affine_bn_treated_as_identity",
    "running_mean_sign_flipped",
    "transposed_conv_groups_ignored",
    "transposed_conv_scaled_on_input_axis",
    "variance_instead_of_std",
]

_SCALE_SHIFT = "fuser.fold_pass.bn_scale_shift"
_FOLD_OUTPUT = "fuser.fold_pass.fold_into_output"
_FOLD_INPUT = "fuser.fold_pass.fold_into_input"


def _kernel_view(vector: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vector.reshape(shape)


def eps_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: ``scale = gamma / sqrt(var)``, the BN's ``eps`` left out.

    Invisible with eps=1e-5 and var near 1 (the defaults); the suite draws eps up to 1 and running
    variances down to 1e-4. Caught by: fused output matches the original.
    """

    def scale_shift(running_mean, running_var, eps, weight=None, bias=None):
        return bn_scale_shift(running_mean, running_var, 0.0, weight, bias)

    return fuse_patched(model, example_inputs, {_SCALE_SHIFT: scale_shift})


def variance_instead_of_std(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: divides by ``var + eps`` instead of its square root.

    Invisible when running_var is 1 (the default). Caught by: fused output matches the original.
    """

    def scale_shift(running_mean, running_var, eps, weight=None, bias=None):
        scale = 1.0 / (running_var.detach().double() + eps)
        if weight is not None:
            scale = scale * weight.detach().double()
        shift = -running_mean.detach().double() * scale
        if bias is not None:
            shift = shift + bias.detach().double()
        return scale, shift

    return fuse_patched(model, example_inputs, {_SCALE_SHIFT: scale_shift})


def running_mean_sign_flipped(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: ``shift = beta + mean * scale`` (adds the running mean instead of subtracting it).

    Invisible when running_mean is 0 (the default). Caught by: fused output matches the original.
    """

    def scale_shift(running_mean, running_var, eps, weight=None, bias=None):
        scale, shift = bn_scale_shift(running_mean, running_var, eps, weight, bias)
        return scale, shift + 2 * running_mean.detach().double() * scale

    return fuse_patched(model, example_inputs, {_SCALE_SHIFT: scale_shift})


def gamma_beta_swapped(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: BN ``weight`` and ``bias`` passed in the wrong order (gamma used as beta).

    With the default gamma=1, beta=0 this zeroes the output; with random affine parameters it is
    merely wrong. Caught by: fused output matches the original.
    """

    def scale_shift(running_mean, running_var, eps, weight=None, bias=None):
        return bn_scale_shift(running_mean, running_var, eps, bias, weight)

    return fuse_patched(model, example_inputs, {_SCALE_SHIFT: scale_shift})


def beta_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the BN's affine bias (beta) never reaches the folded bias.

    Invisible when beta is 0 (the default). Caught by: fused output matches the original.
    """

    def scale_shift(running_mean, running_var, eps, weight=None, bias=None):
        return bn_scale_shift(running_mean, running_var, eps, weight, None)

    return fuse_patched(model, example_inputs, {_SCALE_SHIFT: scale_shift})


def non_affine_bn_treated_as_identity(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a BN without affine parameters (``affine=False``, weight and bias None) is taken to be
    the identity ("nothing to fold"), and removed: its normalisation by the running statistics is
    lost. Needs ``affine=False`` BNs in the corpus. Caught by: fused output matches the original.
    """

    def scale_shift(running_mean, running_var, eps, weight=None, bias=None):
        if weight is None and bias is None:
            ones = torch.ones_like(running_mean, dtype=torch.float64)
            return ones, torch.zeros_like(ones)
        return bn_scale_shift(running_mean, running_var, eps, weight, bias)

    return fuse_patched(model, example_inputs, {_SCALE_SHIFT: scale_shift})


def layer_bias_dropped(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: on the output side the new bias is ``shift`` alone; the layer's own bias (which the BN
    also scales: ``b * scale + shift``) is dropped. Needs layers with ``bias=True`` and non-zero
    bias values. Caught by: fused output matches the original.
    """

    def fold(weight, bias, scale, shift, *, layer, groups=1):
        return fold_into_output(weight, None, scale, shift, layer=layer, groups=groups)

    return fuse_patched(model, example_inputs, {_FOLD_OUTPUT: fold})


def transposed_conv_scaled_on_input_axis(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a transposed convolution's weight is scaled along dimension 0, as for a convolution;
    but its layout is ``(in, out / groups, *kernel)``, so dimension 0 is the input channels. Silently
    wrong when in == out channels, a shape error otherwise. Needs ``ConvTranspose -> BN``.
    Caught by: fused output matches the original (or the fuser raising).
    """

    def fold(weight, bias, scale, shift, *, layer, groups=1):
        if layer != "conv_transpose":
            return fold_into_output(weight, bias, scale, shift, layer=layer, groups=groups)
        b = torch.zeros_like(scale) if bias is None else bias.detach().double()
        return FoldedLayer(weight, _kernel_view(scale, weight.ndim, 0), b * scale + shift)

    return fuse_patched(model, example_inputs, {_FOLD_OUTPUT: fold})


def transposed_conv_groups_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a transposed convolution's weight is scaled along dimension 1 as if it held every
    output channel; it holds ``out / groups``. Right for groups=1; for grouped transposed
    convolutions the per-channel scale does not line up (a shape error here; a silent mix-up in
    any variant that slices or tiles the scale to make the shapes fit). Needs a grouped
    ``ConvTranspose -> BN``. Caught by: fused output matches the original (or the fuser raising).
    """

    def fold(weight, bias, scale, shift, *, layer, groups=1):
        if layer != "conv_transpose":
            return fold_into_output(weight, bias, scale, shift, layer=layer, groups=groups)
        b = torch.zeros_like(scale) if bias is None else bias.detach().double()
        return FoldedLayer(weight, _kernel_view(scale, weight.ndim, 1), b * scale + shift)

    return fuse_patched(model, example_inputs, {_FOLD_OUTPUT: fold})


def input_side_groups_interleaved(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: input-side fold into a grouped convolution assumes output channel ``o`` belongs to
    group ``o % groups`` (interleaved) instead of ``o // (out / groups)`` (contiguous), so each
    output channel's weights are scaled by another group's BN channels. Right for groups=1 and for
    depthwise convs with one output per group. Needs ``BN -> grouped conv`` (no zero padding) with
    several outputs per group. Caught by: fused output matches the original.
    """

    def fold(weight, bias, scale, shift, *, layer, groups=1):
        w = weight.detach().double()
        out_channels, in_per_group = w.shape[0], w.shape[1]
        group_of_output = torch.arange(out_channels, device=w.device) % groups
        inputs_of_group = torch.arange(in_per_group, device=w.device)
        channel = group_of_output[:, None] * in_per_group + inputs_of_group[None, :]
        kernel = [1] * (w.ndim - 2)
        per_output_scale = scale[channel].reshape(out_channels, in_per_group, *kernel)
        per_output_shift = shift[channel].reshape(out_channels, in_per_group, *kernel)
        b = w.new_zeros(out_channels) if bias is None else bias.detach().double()
        new_bias = b + (w * per_output_shift).sum(dim=tuple(range(1, w.ndim)))
        return FoldedLayer(weight, per_output_scale, new_bias)

    return fuse_patched(model, example_inputs, {_FOLD_INPUT: fold})


def input_side_shift_through_folded_weight(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: the input-side bias term is computed from the already-scaled weight,
    ``b + sum(W' * shift)`` with ``W' = W * scale``, instead of from the original ``W``
    (a variable reused after it was overwritten). Needs ``BN -> conv/linear`` input-side folds
    with non-unit scale. Caught by: fused output matches the original.
    """

    def fold(weight, bias, scale, shift, *, layer, groups=1):
        folded = fold_into_input(weight, bias, scale, shift, layer=layer, groups=groups)
        new_weight, _ = folded.float64()
        reused = fold_into_input(new_weight, bias, scale, shift, layer=layer, groups=groups)
        return FoldedLayer(weight, folded.factor, reused.bias)

    return fuse_patched(model, example_inputs, {_FOLD_INPUT: fold})
