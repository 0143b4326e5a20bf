"""The fold math: pure tensor functions, no graphs.

An eval-mode BatchNorm is a per-channel affine map ``y = scale * x + shift``. Folding it into a
neighbouring layer rewrites that layer's weight and bias so the layer alone computes the pair.
Everything here works in float64 and returns float64; the caller casts back to the layer's dtype
(and decides whether the cast is safe). Keeping the math apart from the graph rewriting is
deliberate: this is where numeric bugs live, and it is tested exhaustively against a direct formula.

Weight layouts:
- ``conv``: ``(out, in / groups, *kernel)``
- ``conv_transpose``: ``(in, out / groups, *kernel)``
- ``linear``: ``(out, in)``
"""

from __future__ import annotations

import torch
from torch import Tensor

OUTPUT_SIDE_LAYERS = ("conv", "conv_transpose", "linear")
INPUT_SIDE_LAYERS = ("conv", "linear")


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm, in float64.

    ``weight``/``bias`` are None for a BN without affine parameters (gamma = 1, beta = 0).
    """
    mean = running_mean.detach().double()
    scale = torch.rsqrt(running_var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _zero_bias_if_missing(bias: Tensor | None, channels: int, like: Tensor) -> Tensor:
    if bias is None:
        return torch.zeros(channels, dtype=torch.float64, device=like.device)
    return bias.detach().double()


def _channel_view(vector: Tensor, ndim: int, dim: int) -> Tensor:
    """Reshape a per-channel vector to broadcast along ``dim`` of an ``ndim``-D weight."""
    shape = [1] * ndim
    shape[dim] = -1
    return vector.reshape(shape)


def fold_into_output(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    layer: str,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of a layer computing ``BN(layer(x))``: the BN scales each output channel."""
    w = weight.detach().double()
    if layer in ("conv", "linear"):
        out_channels = w.shape[0]
        new_weight = w * _channel_view(scale, w.ndim, 0)
    elif layer == "conv_transpose":
        # Output channel (g, j) lives at weight[g * in_per_group : (g + 1) * in_per_group, j].
        in_channels, out_per_group = w.shape[0], w.shape[1]
        out_channels = out_per_group * groups
        grouped = w.reshape(groups, in_channels // groups, out_per_group, *w.shape[2:])
        group_scale = scale.reshape(groups, 1, out_per_group, *([1] * (w.ndim - 2)))
        new_weight = (grouped * group_scale).reshape(w.shape)
    else:
        raise ValueError(f"no output-side fold for layer kind {layer!r}")
    b = _zero_bias_if_missing(bias, out_channels, w)
    return new_weight, b * scale + shift


def fold_into_input(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    layer: str,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of a layer computing ``layer(BN(x))``: the BN scales each input channel.

    ``W (scale * x + shift) + b = (W * scale) x + (W shift + b)``. The shift term is uniform over
    positions only when every tap reads a BN output, so convolutions must not zero-pad (the caller
    checks that).
    """
    if layer not in INPUT_SIDE_LAYERS:
        raise ValueError(f"no input-side fold for layer kind {layer!r}")
    w = weight.detach().double()
    out_channels, in_per_group = w.shape[0], w.shape[1]
    out_per_group = out_channels // groups
    kernel_dims = [1] * (w.ndim - 2)

    def per_output_channel(vector: Tensor) -> Tensor:
        # For output channel o in group g, input channel i of its slice is g * in_per_group + i.
        return (
            vector.reshape(groups, 1, in_per_group)
            .expand(groups, out_per_group, in_per_group)
            .reshape(out_channels, in_per_group, *kernel_dims)
        )

    new_weight = w * per_output_channel(scale)
    shift_w = per_output_channel(shift)
    b = _zero_bias_if_missing(bias, out_channels, w)
    return new_weight, b + (w * shift_w).sum(dim=tuple(range(1, w.ndim)))
