"""The fold math: pure tensor functions, no graphs.

An eval-mode BatchNorm is a per-channel affine map ``y = scale * x + shift``. Folding it into a
neighbouring layer rewrites that layer's weight and bias so the layer alone computes the pair.
Keeping the math apart from the graph rewriting is deliberate: this is where numeric bugs live, and
it is tested exhaustively against a direct formula.

Every fold scales the layer's weight elementwise by a per-channel factor, so a fold returns a
``FoldedLayer``: the weight as it was, the float64 factor, and the new bias in float64. Its exact
value is the float64 product ``weight.double() * factor``; ``round_scaled`` rounds that product once
to the weight's dtype (bit for bit what the float64 formula then a cast gives) without ever holding
a float64 copy of the whole weight, which on a large layer costs more than the arithmetic.

Weight layouts:
- ``conv``: ``(out, in / groups, *kernel)``
- ``conv_transpose``: ``(in, out / groups, *kernel)``
- ``linear``: ``(out, in)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    # Formed in place in fresh float64 copies: the values of the textbook formula
    # (rsqrt(var + eps) * gamma, -mean * scale + beta), bit for bit, in half the operations a
    # small BN's time is made of. The narrower operands widen exactly as they are read.
    scale = running_var.detach().to(torch.float64, copy=True).add_(eps).rsqrt_()
    if weight is not None:
        scale.mul_(weight.detach())
    shift = running_mean.detach().to(torch.float64, copy=True).mul_(scale).neg_()
    if bias is not None:
        shift.add_(bias.detach())
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


@dataclass(frozen=True)
class FoldedLayer:
    """A layer with a BN folded in: weight ``weight * factor`` (elementwise, float64) and ``bias``.

    ``weight`` is the layer's weight, untouched; ``factor`` (float64) broadcasts against it and has
    either one row or as many rows as the weight (so the product can be formed row block by row
    block); ``bias`` is the new bias, float64.
    """

    weight: Tensor
    factor: Tensor
    bias: Tensor

    def float64(self) -> tuple[Tensor, Tensor]:
        """The folded weight and bias in float64: the formula itself."""
        return self.weight.detach().double() * self.factor, self.bias


def fold_into_output(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    layer: str,
    groups: int = 1,
) -> FoldedLayer:
    """The layer computing ``BN(layer(x))``: the BN scales each output channel."""
    w = weight.detach()
    if layer in ("conv", "linear"):
        factor = _channel_view(scale, w.ndim, 0)
    elif layer == "conv_transpose":
        # Output channel (g, j) lives at weight[g * in_per_group : (g + 1) * in_per_group, j]:
        # each row (input channel) of group g is scaled by that group's slice of ``scale``.
        in_channels, out_per_group = w.shape[0], w.shape[1]
        factor = (
            scale.reshape(groups, 1, out_per_group)
            .expand(groups, in_channels // groups, out_per_group)
            .reshape(in_channels, out_per_group, *([1] * (w.ndim - 2)))
        )
    else:
        raise ValueError(f"no output-side fold for layer kind {layer!r}")
    if bias is None:  # 0 * scale + shift, when the scale is finite (else the fold is refused)
        return FoldedLayer(weight, factor, shift)
    return FoldedLayer(weight, factor, bias.detach().double() * scale + shift)


def fold_into_input(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    layer: str,
    groups: int = 1,
) -> FoldedLayer:
    """The layer computing ``layer(BN(x))``: the BN scales each input channel.

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

    shift_w = per_output_channel(shift)
    b = _zero_bias_if_missing(bias, out_channels, w)
    new_bias = b + (w * shift_w).sum(dim=tuple(range(1, w.ndim)))
    return FoldedLayer(weight, per_output_channel(scale), new_bias)


#: Elements of the weight scaled per step of ``round_scaled`` and ``scale_in_place``: a 512 KiB
#: float64 buffer, reused, where a float64 copy of a large weight would be fresh memory the kernel
#: must fault in page by page. The size is what keeps each block's three passes (widen into the
#: buffer, multiply, round back) in a core's L2 cache with the weight rows they read and write: 2 MiB
#: blocks (``1 << 18``) ran 1.5x slower on the 2 MiB-per-core L2 of the machine measured
#: (docs/benchmarks.md, section 2).
ROUNDING_BLOCK = 1 << 16


def round_scaled(
    weight: Tensor, factor: Tensor, dtype: torch.dtype, *, layer: str = "conv", groups: int = 1
) -> tuple[Tensor, Tensor]:
    """``(weight.double() * factor).to(dtype)``, bit for bit, and the largest magnitude of the
    product in each output channel of the layer.

    The product is formed in float64 and rounded once, a block of rows at a time through one
    reused float64 buffer. The result has the weight's shape, device and memory format. The second
    tensor (float64, one entry per output channel, NaN where the channel holds a NaN) decides
    whether the product fits ``dtype``: its largest entry must not overflow (``overflow_reason``),
    and no channel may sink below the normal range (``underflow_reason``). ``layer`` and
    ``groups`` say where the output channels are (a transposed conv's are along dim 1).
    """
    w = weight.detach()
    result = torch.empty_like(w, dtype=dtype)
    if not w.numel():
        return result, torch.zeros(0, dtype=torch.float64, device=w.device)
    transposed = layer == "conv_transpose"
    maxima: list[Tensor] = []
    _scale_into(result, w, factor, maxima, per_column=transposed)
    largest = torch.cat(maxima)
    if transposed:  # rows are input channels: (group, its inputs, its outputs) -> output channels
        largest = largest.reshape(groups, -1, largest.shape[-1]).amax(dim=1).flatten()
    return result, largest


def product_fits(weight: Tensor, factor: Tensor, dtype: torch.dtype) -> bool:
    """True when ``weight.double() * factor`` certainly fits ``dtype``, for a layer whose output
    channels are the weight's rows (a conv or linear): the largest magnitude of the weight times
    that of the factor does not overflow, and in every row not scaled to zero the row's largest
    magnitude times the smallest factor it can meet stays in the normal range. One pass over the
    weight in its own dtype, cheaper than forming the product; False (not proven) on NaN,
    infinity, a large bound, or a row that might sink below the normal range."""
    w = weight.detach()
    if not w.numel() or not factor.numel():
        return False
    row_largest = _largest_magnitude(w.reshape(w.shape[0], -1), (1,)).double()
    magnitude = factor.abs()
    bound = (row_largest.max() * magnitude.max()).item()
    if not (math.isfinite(bound) and bound <= torch.finfo(dtype).max):
        return False
    if factor.shape[0] == w.shape[0] and factor[0].numel() == 1:  # one factor per row: exact
        row_factor = magnitude.reshape(-1)
        row_smallest = row_largest * row_factor
        scaled = (row_largest > 0) & (row_factor > 0)
    else:  # a lower bound of each row's largest product
        row_smallest = row_largest * magnitude.min()
        scaled = row_largest > 0
    return bool((row_smallest[scaled] >= torch.finfo(dtype).tiny).all())


def product_in_one_block(weight: Tensor, factor: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(weight.double() * factor, the largest magnitude in each row of it)`` for a weight of
    one rounding block (every weight off the CPU); None for a larger one, whose float64 product
    is never held whole (``round_scaled``).

    For a conv or linear the rows are the output channels, so the second tensor is the
    ``channel_largest`` that ``round_scaled`` returns, and ``copy_rounded`` of the product is its
    rounded weight: a small layer's in-place fold forms the product once, checks it exactly and
    writes it, in fewer operations than ``product_fits``' bound and ``scale_in_place`` take."""
    w = weight.detach()
    if w.ndim < 2 or not w.numel() or _rows_per_block(w) < w.shape[0]:
        return None
    with torch.no_grad():
        product = w.to(torch.float64, copy=True).mul_(factor)
        largest = product.abs().amax(dim=tuple(range(1, w.ndim)))  # NaN where a row has one
    return product, largest


def copy_rounded(weight: Tensor, product: Tensor) -> None:
    """Overwrite ``weight`` with ``product`` rounded once to its dtype."""
    with torch.no_grad():
        weight.detach().copy_(product)


def scale_in_place(weight: Tensor, factor: Tensor) -> None:
    """Replace ``weight`` by ``(weight.double() * factor).to(weight.dtype)``, bit for bit as
    ``round_scaled`` gives it, without allocating a second weight-sized tensor.

    The caller owns the weight's storage outright and has proved the product fits
    (``product_fits``): nothing is checked here, and a fold refused afterwards could not undo it.
    Each block of rows is read whole into the float64 buffer before it is written back.
    """
    w = weight.detach()
    if w.numel():
        _scale_into(w, w, factor, None)


def _scale_into(
    result: Tensor, w: Tensor, factor: Tensor, maxima: list[Tensor] | None, per_column: bool = False
) -> None:
    """Write the rounded product into ``result`` (which may be ``w``), block by block; unless
    ``maxima`` is None, append the largest magnitude of the product in each row of each block
    (in each row and column with ``per_column``, for a transposed conv)."""
    rows = w.shape[0]
    step = _rows_per_block(w)
    reduced = tuple(range(2 if per_column else 1, w.ndim))
    with torch.no_grad():
        if step >= rows:  # one block: the fewest calls, which is what a small layer's time is
            product = w.to(torch.float64, copy=True).mul_(factor)
            result.copy_(product)
            if maxima is not None:
                maxima.append(_largest_magnitude(product, reduced))
            return
        row_factor = factor.shape[0] == rows and factor.ndim == w.ndim
        buffer = torch.empty((step, *w.shape[1:]), dtype=torch.float64, device=w.device)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = buffer[: stop - start]
            block.copy_(w[start:stop])
            block.mul_(factor[start:stop] if row_factor else factor)
            result[start:stop].copy_(block)
            if maxima is not None:
                maxima.append(_largest_magnitude(block, reduced))


def _rows_per_block(w: Tensor) -> int:
    """Rows of ``w`` scaled per step on the CPU (``ROUNDING_BLOCK``); all of them elsewhere."""
    rows = w.shape[0]
    if w.device.type != "cpu":
        return rows
    return max(1, ROUNDING_BLOCK // max(1, w.numel() // rows))


def _largest_magnitude(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``values.abs().amax(dims)`` (NaN where a NaN is), without an absolute copy of
    ``values``: ``amax`` and ``amin`` along a dimension each run at the speed of one read, where
    ``aminmax`` along one runs 20x slower."""
    return torch.maximum(values.amax(dim=dims), -values.amin(dim=dims))
