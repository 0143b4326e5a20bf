"""Networks that run on inputs of two ranks, and the second input.

A convolution runs on a batched ``(N, C, *spatial)`` input and on an unbatched ``(C, *spatial)``
one; a Linear on any rank. A BatchNorm normalises dimension 1 whatever the rank: a
``BatchNorm1d`` reads a Conv1d's unbatched ``(C, L)`` output as ``(N, C)`` and normalises its L
axis, a functional batch norm or a ``SyncBatchNorm`` takes any rank, and a ``BatchNorm1d`` after
a Linear on ``(N, L, F)`` normalises L. A fold into the layer scales its channels, so it is
exact at the batched rank only. The default strategy never calls a model at a second rank; here
every network is ``W`` channels wide with its first spatial size ``W`` (a Linear's input
``(N, W)``, ``(N, W, W)`` at the other rank) and layers that keep both, so the original runs
at both ranks and a fused model must match it at both, or refuse the other
(``properties.check_other_rank_refused_or_honoured``).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from strategies.draw import (
    BOOLEANS,
    EPS_EXPONENTS,
    MAX_CHANNELS,
    MAX_SIZE,
    PADDING_MODES,
    activations,
    integers,
    lists_of,
    one_of_values,
)
from strategies.spec import (
    CONV,
    CONV_TRANSPOSE,
    FROZEN,
    FUNCTIONAL,
    LINEAR,
    MODULE,
    SYNC,
    Act,
    Chain,
    Layer,
    NetSpec,
    Norm,
)

#: The layer kind of a network and the dimensions of its feature maps.
FORMS = {"conv1d": (CONV, 1), "conv_transpose1d": (CONV_TRANSPOSE, 1), "linear": (LINEAR, 0)}
FORMS |= {f"conv{dims}d, functional norms": (CONV, dims) for dims in (1, 2, 3)}
#: How the first two ops of a chain meet: a fold on either side, the rest of the chain drawn.
OPENINGS = (("layer", "norm"), ("norm", "layer"))


@st.composite
def two_rank_specs(draw, dtypes: tuple[str, ...] = ("float32", "float64")) -> NetSpec:
    """One chain of layers, norms and activations ``W`` channels wide, opening with a layer
    and a norm in either order, on an input whose first spatial size (a Linear's features) is
    ``W`` too."""
    form = draw(one_of_values(tuple(FORMS)))
    kind, dims = FORMS[form]
    width = draw(integers(2, MAX_CHANNELS))
    spatial = ()
    if dims:
        spatial = (width, *(draw(integers(2, MAX_SIZE[dims])) for _ in range(dims - 1)))
    ndim = 2 + dims
    kinds = (*draw(one_of_values(OPENINGS)), *draw(lists_of(("layer", "norm", "act"), 0, 3)))
    ops: list[Layer | Norm | Act] = []
    for op_kind in kinds:
        if op_kind == "layer":
            ops.append(draw(_layers(kind, dims, width)))
        elif op_kind == "norm":
            ops.append(draw(_norms(ndim, width, functional_only="functional" in form)))
        else:
            ops.append(draw(activations()))
    return NetSpec(
        input_shape=(draw(integers(2, 3)), width, *spatial),
        blocks=(Chain(tuple(ops)),),
        dtype=draw(one_of_values(dtypes)),
        seed=draw(integers(0, 2**16 - 1)),
        example_inputs=kind == LINEAR or draw(BOOLEANS),  # a Linear folds only given them
    )


@st.composite
def _layers(draw, kind: str, dims: int, width: int) -> Layer:
    """A layer from ``width`` to ``width`` channels keeping every spatial size: a kernel of 1,
    or of 3 padded by 1 (in any padding mode a convolution has)."""
    bias = draw(BOOLEANS)
    if kind == LINEAR:
        return Layer(LINEAR, 0, 2, width, width, bias=bias, functional=draw(BOOLEANS))
    kernel, padding = draw(one_of_values(((1, 0), (3, 1))))
    groups = draw(one_of_values((1, width)))
    if kind == CONV_TRANSPOSE:
        functional, mode, output_padding = False, "zeros", (0,) * dims
    else:
        functional = draw(BOOLEANS)
        modes = ("zeros",) if functional or not padding else ("zeros", *PADDING_MODES)
        mode, output_padding = draw(one_of_values(modes)), ()
    return Layer(
        kind,
        dims,
        dims + 2,
        width,
        width,
        kernel_size=(kernel,) * dims,
        stride=(1,) * dims,
        padding=(padding,) * dims,
        dilation=(1,) * dims,
        groups=groups,
        bias=bias,
        padding_mode=mode,
        output_padding=output_padding,
        functional=functional,
    )


@st.composite
def _norms(draw, ndim: int, width: int, functional_only: bool) -> Norm:
    """A norm that runs at both ranks: ``BatchNorm1d`` (batched ranks 2 and 3 only),
    ``SyncBatchNorm`` (any rank), ``FrozenBatchNorm2d`` (4-D; its broadcast turns an unbatched
    input batched) or ``F.batch_norm``; with ``functional_only`` none of the rank-checking
    ``BatchNorm1d``."""
    classes: tuple[str | None, ...] = (SYNC,) if functional_only else (None, None, SYNC)
    if ndim == 4:
        classes += (FROZEN,)
    style = draw(one_of_values((FUNCTIONAL, MODULE)))
    module_class = draw(one_of_values(classes)) if style == MODULE else None
    affine = module_class == FROZEN or draw(BOOLEANS)
    return Norm(
        ndim,
        width,
        affine=affine,
        eps=10.0 ** draw(EPS_EXPONENTS),
        style=style,
        module_class=module_class,
    )


def other_rank_inputs(spec: NetSpec, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The network's input at its other rank, drawn from ``spec.seed``: unbatched for a
    convolutional network, ``(N, W, W)`` for a Linear one."""
    (x,) = inputs
    shape = (*x.shape[:1], x.shape[1], x.shape[1]) if x.ndim == 2 else tuple(x.shape[1:])
    generator = torch.Generator().manual_seed(spec.seed + 1)
    other = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (other.to(dtype=x.dtype, device=x.device),)
