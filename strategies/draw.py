"""Hypothesis strategies for network specs.

Structure is drawn before details: the number and kinds of blocks first, then each block's
packaging and op kinds, then each op's options given the shape flowing into it. Every option
shrinks towards the plainest choice (first element of each ``sampled_from``), so a failure shrinks
to one or two small layers. Options are repaired into validity rather than filtered, which keeps
generation fast and shrinking effective.

Every feature listed in issue 3 is drawn with a probability of at least a few percent per op;
``tests/test_strategies.py`` checks each one is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import torch
from hypothesis import strategies as st

from strategies.spec import (
    ADD,
    AMPLIFYING,
    AUTOCAST,
    CAT,
    COMPUTED_ARGUMENTS,
    CONV,
    CONV_TRANSPOSE,
    COUNTS_CALLS,
    FORWARD_HOOK,
    FORWARD_PRE_HOOK,
    FROZEN,
    FUNCTIONAL,
    HOOK_READS_MODULE,
    HOOKED,
    IN_PLACE_FORMS,
    INLINE,
    LINEAR,
    LOOP_CALLS,
    LOOP_INSPECTS,
    METADATA_ATTRIBUTES,
    METADATA_METHODS,
    MODULE,
    NO_GRAD,
    OPAQUE_SUBCLASS,
    PARAMETRIZED,
    REPLACED_FORWARD,
    ROOT_RANK_GUARD,
    ROOT_READERS,
    SEQUENTIAL,
    SHRINKING,
    SYNC,
    TRACED_SUBCLASS,
    TRAINING,
    TWIN,
    TYPE_CHECK,
    UNTRACEABLE,
    WRAPPER,
    Act,
    Block,
    Chain,
    Flatten,
    Layer,
    NetSpec,
    Norm,
    Op,
    Tap,
    TwoCalls,
    readable_layer,
)

MAX_CHANNELS = 8
# Largest spatial extent per dimension, by number of spatial dimensions (kept small for speed).
MAX_SIZE = {1: 8, 2: 6, 3: 4}
PADDING_MODES = ("reflect", "replicate", "circular")  # besides "zeros", drawn half the time
OP_KINDS = ("layer", "norm", "act", "flatten")
# Chains where folds (and their near misses) happen: layer then BN (output side), and BN after
# something that is not a single-user layer, then a layer (input side: whether it folds depends on
# the layer's padding).
OUTPUT_SIDE_TEMPLATES = (
    ("layer", "norm"),
    ("layer", "norm", "norm"),
    ("layer", "norm", "act"),
    ("flatten", "layer", "norm"),
    ("layer", "identity", "norm"),
)
# "input_layer": a layer drawn for an input-side fold (mostly an unpadded conv, often grouped
# with several outputs per group). "residual_layer": a shape-preserving one whose input (the BN's
# output) is also added to or concatenated with the chain's result, as in a pre-activation
# residual block, so the BN has a second reader. "shrinking_norm", "spiked_layer",
# "amplifying_norm": values finite in float16 whose output-side fold would overflow it
# (``Norm.gain`` in strategies/spec.py).
INPUT_SIDE_TEMPLATES = (
    ("act", "norm", "input_layer"),
    ("act", "norm", "norm", "input_layer"),
    ("norm", "input_layer"),
    ("layer", "act", "norm", "input_layer"),
    ("act", "norm", "residual_layer"),
    ("norm", "residual_layer"),
    ("act", "norm", "identity", "input_layer"),
    ("shrinking_norm", "spiked_layer", "amplifying_norm", "act"),
)
# Drawn as often as each family above in float16 networks, where its fold would overflow.
OVERFLOW_TEMPLATE = ("shrinking_norm", "spiked_layer", "amplifying_norm", "act")
RESIDUAL_KINDS = (ADD, CAT)
ACTIVATIONS = ("relu", "tanh", "gelu", "leaky_relu", "hardswish", "identity")
IN_PLACE_ACTIVATIONS = ("relu", "leaky_relu", "hardswish")  # those with ``inplace=True``


@dataclass(frozen=True)
class Shape:
    """The batched tensor flowing between ops: ``(batch, channels, *spatial)``."""

    batch: int
    channels: int
    spatial: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)

    @property
    def numel(self) -> int:
        count = self.batch * self.channels
        for size in self.spatial:
            count *= size
        return count


def reused(factory: Callable[..., st.SearchStrategy]) -> Callable[..., st.SearchStrategy]:
    """Hand out one strategy object per distinct arguments, for a composite drawn many times.

    Each call of a composite makes a new strategy, which Hypothesis validates and labels on its
    first draw: about a fifth of the time spent drawing a network went to that. The strategies
    are the same either way, and so are the networks a seed draws. Unbounded, like the caches
    below: the arguments are shapes and options from small ranges, a few thousand in all.
    """
    return cache(factory)


@cache
def chance(numerator: int, denominator: int) -> st.SearchStrategy[bool]:
    """True with roughly the given probability; shrinks to False."""
    return st.sampled_from((False,) * (denominator - numerator) + (True,) * numerator)


@cache
def one_of_values(values: tuple) -> st.SearchStrategy:
    """``sampled_from`` built once per tuple: building strategies inside every draw costs more
    than drawing from them, and speed is part of what this suite is measured on."""
    return st.sampled_from(values)


@cache
def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """``st.integers`` built once per range (see ``one_of_values``)."""
    return st.integers(low, high)


@cache
def lists_of(values: tuple, min_size: int, max_size: int) -> st.SearchStrategy[list]:
    """``st.lists(st.sampled_from(values))`` built once per shape (see ``one_of_values``)."""
    return st.lists(st.sampled_from(values), min_size=min_size, max_size=max_size)


@cache
def op_kind_sequences(max_ops: int, dtype: str = "float32") -> st.SearchStrategy:
    """The kinds of a chain's ops: an output-side template, an input-side template, or a random
    sequence, about a third each; in float16 networks a quarter each, with the template whose
    fold would overflow float16 as the fourth."""

    def fitting(templates: tuple) -> tuple:
        return tuple(t for t in templates if len(t) <= max_ops)

    families = [
        st.sampled_from(fitting(OUTPUT_SIDE_TEMPLATES)),
        st.sampled_from(fitting(INPUT_SIDE_TEMPLATES)),
        lists_of(OP_KINDS, 1, max_ops),
    ]
    if dtype == "float16" and fitting((OVERFLOW_TEMPLATE,)):
        families.append(st.just(OVERFLOW_TEMPLATE))
    return st.one_of(*families)


BOOLEANS = st.booleans()
EPS_EXPONENTS = st.floats(-5.0, 0.0)


def net_specs(
    *,
    dtypes: tuple[str, ...] = ("float32", "float64"),
    devices: tuple[str, ...] = ("cpu",),
    max_blocks: int = 4,
    max_ops: int = 4,
    untraced_root: bool = False,
) -> st.SearchStrategy[NetSpec]:
    """Random networks of ``1..max_blocks`` blocks (chains of ``1..max_ops`` ops, or a layer
    read twice), on ``(N, C)`` inputs or batched 1-D/2-D/3-D feature maps.

    ``untraced_root``: every network's root runs as written (``NetSpec.root_untraced``): it reads
    what its last block keeps where that block counts its calls, and checks its input's rank
    elsewhere. Not drawn otherwise: an untraced root leaves most of a network's folds, and the
    default networks must hold many (``test_many_sites_are_foldable``)."""
    return _net_specs(dtypes, devices, max_blocks, max_ops, untraced_root)


@st.composite
def _net_specs(draw, dtypes, devices, max_blocks, max_ops, untraced_root) -> NetSpec:
    spatial_dims = draw(one_of_values((2, 1, 3, 0)))
    kinds = draw(lists_of(("chain", "chain", "chain", "two_calls", "head"), 1, max_blocks))
    dtype = draw(one_of_values(dtypes))  # before the chains: float16 ones draw another template
    device = draw(one_of_values(devices))
    batch = draw(integers(2, 3))
    channels = draw(integers(1, MAX_CHANNELS))
    spatial = ()
    if spatial_dims:
        sizes = integers(3, MAX_SIZE[spatial_dims])
        spatial = tuple(draw(sizes) for _ in range(spatial_dims))
    shape = Shape(batch, channels, spatial)
    blocks = []
    for kind in kinds:
        if kind == "chain":
            block, shape = draw(chains(shape, max_ops, dtype))
        elif kind == "head":
            block, shape = draw(heads(shape))
        else:
            block, shape = draw(two_calls(shape))
        blocks.append(block)
    last = blocks[-1]
    unguarded = isinstance(last, Chain) and last.boundary is None
    if untraced_root and unguarded and draw(chance(1, 4)):
        # A root that runs as written reads what a counting last block keeps (``NetSpec``): in
        # one network in four or more, so that each of its three ways of reading stays common.
        blocks[-1] = replace(last, boundary=COUNTS_CALLS)
    elif unguarded and draw(chance(1, 10)):  # its output is the network's: the check can see it
        blocks[-1] = replace(last, boundary=TYPE_CHECK)
    elif dtype == "float32" and unguarded and draw(chance(1, 4)):  # returns bfloat16 (``Chain``)
        blocks[-1] = replace(last, boundary=AUTOCAST)
    elif unguarded and draw(chance(1, 6)):  # its output never requires grad (``Chain``)
        blocks[-1] = replace(last, boundary=NO_GRAD)
    elif unguarded and draw(chance(1, 2)):  # counts its calls on itself (``Chain``)
        blocks[-1] = replace(last, boundary=COUNTS_CALLS)
    blocks = [_with_weight_reads(draw, block) for block in blocks]
    seed = draw(integers(0, 2**16 - 1))
    replaced_forward = draw(chance(1, 24))
    type_checked = any(isinstance(b, Chain) and b.boundary == TYPE_CHECK for b in blocks)
    example_inputs = type_checked or not draw(chance(1, 12))  # ``NetSpec.example_inputs``
    float32_norms = runs_float32_norms(dtype) and draw(chance(1, 3))  # ``NetSpec.float32_norms``
    fused_in_inference_mode = draw(chance(1, 8))  # ``NetSpec.fused_in_inference_mode``
    # Last: choices added here leave the draws above (and the networks a seed gives) as they were.
    blocks = [_with_in_place_changes(draw, block) for block in blocks]
    blocks = [_with_layer_read(block, seed) for block in blocks]
    root_untraced = None
    if untraced_root:
        counted = isinstance(blocks[-1], Chain) and blocks[-1].boundary == COUNTS_CALLS
        root_untraced = draw(one_of_values(ROOT_READERS)) if counted else ROOT_RANK_GUARD
    input_shape = (batch, channels, *spatial)
    return NetSpec(
        input_shape,
        tuple(blocks),
        dtype,
        device,
        seed,
        replaced_forward,
        example_inputs,
        float32_norms,
        fused_in_inference_mode,
        root_untraced,
    )


@cache
def runs_float32_norms(dtype: str) -> bool:
    """Whether this torch runs a BatchNorm with float32 statistics and parameters on ``dtype``
    inputs on the CPU (only half-precision networks keep their BNs float32)."""
    if dtype not in ("bfloat16", "float16"):
        return False
    values = torch.ones(2, 3, 4, dtype=getattr(torch, dtype))
    try:
        for training in (False, True):  # the training-mode property runs them in training mode
            statistics = torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)
            torch.nn.functional.batch_norm(values, *statistics, training=training)
    except RuntimeError:  # an older torch, or one without CPU kernels for the dtype
        return False
    return True


def _with_weight_reads(draw: Callable, block: Block) -> Block:
    """``Norm.weight_read`` on one in three affine module BNs held by the root module itself (an
    inline chain outside any boundary, after the last block's boundary is drawn)."""
    if not (isinstance(block, Chain) and block.packaging == INLINE and block.boundary is None):
        return block
    ops = []
    for op in block.ops:
        readable = isinstance(op, Norm) and op.style == MODULE and op.affine and op.gain is None
        ops.append(replace(op, weight_read=True) if readable and draw(chance(1, 3)) else op)
    return replace(block, ops=tuple(ops))


#: Boundaries whose module the fused model runs as written (``Chain.layer_read``); a
#: ``type_check`` module is traced through when fused without example inputs.
LAYER_READ_BOUNDARIES = (UNTRACEABLE, AUTOCAST, NO_GRAD, COUNTS_CALLS, HOOKED, HOOK_READS_MODULE)


def _with_layer_read(block: Block, seed: int) -> Block:
    """``Chain.layer_read`` on the chains behind such a boundary that hold a layer module, in one
    network in five: those whose weight seed leaves 1 modulo 5. Taken from a value already drawn
    rather than drawn itself: a choice more would move every later draw of the engine, and the
    rates ``test_strategies`` measures with them; the seed shrinks to 0, and the read with it."""
    if not (isinstance(block, Chain) and block.boundary in LAYER_READ_BOUNDARIES):
        return block
    if seed % 5 != 1 or readable_layer(block.ops) is None:
        return block
    return replace(block, layer_read=True)


def _with_in_place_changes(draw: Callable, block: Block) -> Block:
    """``changed_in_place`` on about one in eight layers and affine BNs whose parameters the
    chain's own code calls by name (an inline or wrapper chain: ``Layer.changed_in_place``,
    ``Norm.changed_in_place``), drawn after the structure, so that it shrinks away."""
    if not (isinstance(block, Chain) and block.packaging in (INLINE, WRAPPER)):
        return block
    ops = []
    for op in block.ops:
        tensors = _tensors_changeable_in_place(op)
        if tensors and draw(chance(1, 8)):
            change = (draw(one_of_values(tensors)), draw(one_of_values(IN_PLACE_FORMS)))
            op = replace(op, changed_in_place=change)
        ops.append(op)
    return replace(block, ops=tuple(ops))


def _tensors_changeable_in_place(op: Op) -> tuple[str, ...]:
    """The parameters of a layer or BN that its calling code may negate in place around its call:
    registered parameters only (a parametrized or computed weight is made anew by each call, a
    ``FrozenBatchNorm2d``'s are buffers, which FX runs in place while tracing instead of
    recording), and not those of the float16 gain pairs, whose folds the oracle predicts."""
    if isinstance(op, Layer):
        if op.parametrized or op.computed is not None or op.spiked:
            return ()
        return ("weight", "bias") if op.bias else ("weight",)
    if isinstance(op, Norm):
        parametrized = op.defect == PARAMETRIZED
        if not op.affine or op.module_class == FROZEN or op.gain is not None or parametrized:
            return ()
        return () if op.computed is not None else ("weight", "bias")
    return ()


@reused
@st.composite
def chains(draw, shape: Shape, max_ops: int = 4, dtype: str = "float32") -> tuple[Chain, Shape]:
    """A chain of ops on ``shape``, and the shape it produces."""
    packaging = draw(one_of_values((INLINE, SEQUENTIAL, WRAPPER)))
    if packaging == INLINE:
        boundary = draw(one_of_values((None,) * 7 + (UNTRACEABLE,)))
    elif packaging == WRAPPER:
        boundary = draw(one_of_values((None,) * 6 + (HOOKED, UNTRACEABLE, HOOK_READS_MODULE)))
    else:  # an untraceable guard may also loop over a Sequential (``Chain.loop``): twice as often
        boundary = draw(
            one_of_values((None,) * 6 + (HOOKED, UNTRACEABLE, UNTRACEABLE, HOOK_READS_MODULE))
        )
    categories = draw(op_kind_sequences(max_ops, dtype))
    in_sequential = packaging == SEQUENTIAL
    ops: list[Op] = []
    shapes = []
    residual_input = None  # position of the op whose output a residual_layer's result gets
    for category in categories:
        if category == "flatten" and not shape.spatial:
            category = "act"
        if category == "residual_layer":
            residual_input = len(ops) - 1
        if category in ("layer", "input_layer", "residual_layer", "spiked_layer"):
            op, shape = draw(layers(shape, allow_functional=not in_sequential, purpose=category))
        elif category in ("norm", "shrinking_norm", "amplifying_norm"):
            gain = {"shrinking_norm": SHRINKING, "amplifying_norm": AMPLIFYING}.get(category)
            op = draw(norms(shape, allow_functional=not in_sequential, gain=gain))
        elif category == "act":
            op = draw(activations(allow_functional=not in_sequential))
        elif category == "identity":  # an nn.Identity a fold looks through (README rules 2, 3)
            op = Act("identity")
        else:
            op, shape = draw(flattens(shape))
        ops.append(op)
        shapes.append(shape)
    if not in_sequential:  # functional calls only where a Sequential does not hold the ops
        ops = _with_computed_arguments(draw, ops)
    depth = draw(one_of_values((3, 1, 2, 4))) if in_sequential else 1
    tap = None
    if residual_input is not None and residual_input >= 0 and not in_sequential:
        kind = draw(one_of_values(RESIDUAL_KINDS))
        if kind == CAT and shape.channels > MAX_CHANNELS // 2:
            kind = ADD
        tap = Tap(residual_input, kind)
    elif not in_sequential and draw(chance(1, 2)):
        tap = draw(taps(ops, shapes))
    if tap is not None and tap.kind == CAT:
        shape = replace(shape, channels=2 * shape.channels)
    if tap is not None and _may_shift(tap, ops) and draw(chance(1, 3)):
        tap = replace(tap, shifted=True)
    if tap is not None and tap.kind == ADD and draw(chance(2, 3)):  # torchvision: out += identity
        tap = replace(tap, in_place=True)
    loop = None
    if in_sequential and boundary == UNTRACEABLE:
        loop = draw(one_of_values((None, LOOP_CALLS, LOOP_INSPECTS, LOOP_CALLS, LOOP_INSPECTS)))
        depth = depth if loop is None else max(depth, 2)  # at depth 1 every stage is one op
    return Chain(tuple(ops), packaging, depth, tap, boundary, loop), shape


def _with_computed_arguments(draw: Callable, ops: list[Op]) -> list[Op]:
    """``ops``, where half the layer -> BN pairs that would fold on the output side have a
    functional call computing its weight or bias when it runs (``Layer.computed``,
    ``Norm.computed``; the layer or BN module becomes an ``F.conv*``/``F.linear`` or
    ``F.batch_norm`` call for it). Only there: elsewhere nothing would fold, whatever a fuser
    made of the computed argument."""
    drawn = list(ops)
    for k, j in _neighbours(ops):
        layer, norm = ops[k], ops[j]
        if not (_takes_folds(layer) and _folds_if_its_partner_does(norm)) or not draw(BOOLEANS):
            continue
        sides = tuple(side for side, op in (("layer", layer), ("norm", norm)) if _can_compute(op))
        side = draw(one_of_values(sides)) if sides else None
        if side == "layer":
            # Mostly the bias: a fuser that takes a computed bias for none folds without it,
            # silently; one that takes a computed weight for none has nothing to fold into.
            computed = draw(one_of_values(("bias", "bias", "weight")))
            drawn[k] = replace(layer, functional=True, computed=computed)
        elif side == "norm":
            computed = draw(one_of_values(COMPUTED_ARGUMENTS))
            # The module becomes a call: no class of its own is left (``Norm.module_class``).
            functional = replace(norm, style=FUNCTIONAL, computed=computed, module_class=None)
            drawn[j] = functional
    return drawn


def _neighbours(ops: list[Op]) -> list[tuple[int, int]]:
    """Positions of each op and the next one that is not an ``nn.Identity`` (which a fold looks
    through), when only identities stand between them."""
    pairs = []
    for k in range(len(ops)):
        j = k + 1
        while j < len(ops) and isinstance(ops[j], Act) and ops[j].kind == "identity":
            j += 1
        if j < len(ops):
            pairs.append((k, j))
    return pairs


def _can_compute(op: Op) -> bool:
    """Can ``op`` be a functional call with a computed argument? A layer needs a bias, zero
    padding (``F.conv*`` has no other) and nothing only a module has; a BN needs affine
    parameters and to be a module or functional call."""
    if isinstance(op, Layer):
        module_only = op.hooked or op.replaced_forward or op.call_override or op.parametrized
        return op.bias and op.padding_mode == "zeros" and not (op.spiked or module_only)
    return op.style in (MODULE, FUNCTIONAL) and op.affine


def _folds_if_its_partner_does(op: Op) -> bool:
    """A BN that nothing but its neighbours keeps from folding (no gain: those pairs are tuned)."""
    clean = (MODULE, FUNCTIONAL, TRACED_SUBCLASS)
    return (
        isinstance(op, Norm)
        and op.style in clean
        and op.defect is None
        and op.track_running_stats
        and op.gain is None
    )


def _takes_folds(op: Op) -> bool:
    """A layer that README rule 6 lets take a fold."""
    return isinstance(op, Layer) and not (op.hooked or op.replaced_forward or op.parametrized)


def _between_layer_and_norm(ops: list[Op], k: int) -> bool:
    """Whether the output of ``ops[k]`` is a fold's: a layer's read by a BN, or a BN's read by a
    layer."""
    kinds = tuple(type(op) for op in ops[k : k + 2])
    return kinds in ((Layer, Norm), (Norm, Layer))


def _may_shift(tap: Tap, ops: list[Op]) -> bool:
    """A value tap may be changed in place (``Tap.shifted``) where the tapped tensor is new: a
    layer's or BN's output (an identity or a flatten returns its input or a view of it, which
    may be the network's input), and not in a float16 gain chain, whose values are tuned."""
    fresh = isinstance(ops[tap.after], (Layer, Norm))
    tuned = any(isinstance(op, Norm) and op.gain is not None for op in ops)
    return tap.kind in (ADD, CAT) and fresh and not tuned


@reused
@st.composite
def heads(draw, shape: Shape) -> tuple[Chain, Shape]:
    """A Linear head followed by BatchNorm1d, on a 2-D input (``flatten(1)``) or a 3-D one
    (``flatten(2)``, or an ``(N, C, L)`` map as it is), where it must not fold."""
    packaging = draw(one_of_values((INLINE, SEQUENTIAL, WRAPPER)))
    ops: list[Op] = []
    if shape.spatial:
        three_d = draw(BOOLEANS)
        if not three_d or len(shape.spatial) > 1:
            flatten, shape = draw(flattens(shape, start_dim=2 if three_d else 1))
            ops.append(flatten)
    layer, shape = draw(layers(shape, allow_functional=packaging != SEQUENTIAL))
    ops += [layer, draw(norms(shape, allow_functional=packaging != SEQUENTIAL))]
    depth = draw(one_of_values((3, 1, 2, 4))) if packaging == SEQUENTIAL else 1
    return Chain(tuple(ops), packaging, depth), shape


@st.composite
def taps(draw, ops: list[Op], shapes: list[Shape]) -> Tap:
    """An extra user of one op's output: one that reads values (a residual add or a concat,
    which blocks folds into that op) or one that reads only metadata (which blocks nothing).
    Layer outputs are the likeliest to be tapped."""
    reads_values = draw(BOOLEANS)
    positions = range(len(ops))
    if reads_values:  # the chain's result must keep the tapped shape to be added to it
        positions = [
            k for k in positions if all(isinstance(op, (Norm, Act)) for op in ops[k + 1 :])
        ]
    # Often where a fold would run: a value reader there must block it, a metadata read must
    # not (a fuser taking one for the other folds wrongly, or loses the fold). Value readers
    # there less often: each one blocks a fold, and most sites should be foldable.
    between = [k for k in positions if _between_layer_and_norm(ops, k)]
    if between and draw(chance(1, 2) if reads_values else chance(3, 4)):
        positions = between
    positions = sorted(positions, key=lambda k: not isinstance(ops[k], Layer))
    after = draw(one_of_values(tuple(positions)))
    shape = shapes[after]
    if reads_values:
        concat = shape.channels <= MAX_CHANNELS // 2 and draw(BOOLEANS)
        kinds = (CAT,) if concat else (ADD,)
    elif draw(BOOLEANS):  # drawn in two steps: Hypothesis favours a long tuple's first entries
        kinds = METADATA_ATTRIBUTES
    else:
        kinds = METADATA_METHODS
    kind = draw(one_of_values(kinds))
    expected = {
        "ndim": shape.ndim,
        "dim": shape.ndim,
        "shape": shape.channels,
        "size": shape.channels,
        "numel": shape.numel,
    }.get(kind, 0)
    return Tap(after, kind, expected)


@reused
@st.composite
def two_calls(draw, shape: Shape) -> tuple[TwoCalls, Shape]:
    """A layer module read twice on the same input, each branch followed by norms, the branches
    added. The second read: the module called again (a third of the blocks; half of those through
    a second attribute holding it), a twin module holding its weight Parameter (a sixth), or a
    functional call on its weight (half; a third of those reading it functionally twice)."""
    packaging = draw(one_of_values((INLINE, WRAPPER)))
    second = draw(one_of_values((MODULE, FUNCTIONAL)))
    if second == MODULE and draw(chance(1, 3)):  # another module holding the same weight
        second = TWIN
    layer, out = draw(layers(shape, allow_functional=False))
    if second == TWIN:  # a weight a parametrization computes cannot be tied
        layer = replace(layer, parametrized=False)
    if second == FUNCTIONAL and layer.padding_mode != "zeros":
        layer = replace(layer, padding_mode="zeros")
    if second == FUNCTIONAL and draw(chance(1, 3)):  # one weight read by two functional calls
        layer = replace(
            layer,
            functional=True,
            hooked=False,
            replaced_forward=False,
            call_override=False,
            parametrized=False,
        )
    shared = draw(BOOLEANS)
    first = tuple(draw(st.lists(norms(out), min_size=1, max_size=2)))
    second_norms = None if shared else tuple(draw(st.lists(norms(out), max_size=2)))
    alias = second == MODULE and draw(chance(1, 2))
    return TwoCalls(layer, second, first, second_norms, packaging, alias), out


LAYER_KINDS = {
    "layer": (CONV, CONV, CONV_TRANSPOSE, CONV_TRANSPOSE, LINEAR),
    # Input-side folds go into convs and 2-D Linears; transposed convs and Linears on maps are
    # the near misses.
    "input_layer": (CONV, CONV, CONV, CONV_TRANSPOSE, LINEAR),
    "residual_layer": (CONV,),
    "spiked_layer": (CONV, CONV_TRANSPOSE, LINEAR),
}


@reused
@st.composite
def layers(
    draw, shape: Shape, allow_functional: bool = True, purpose: str = "layer"
) -> tuple[Layer, Shape]:
    """A convolution, transposed convolution or linear layer reading ``shape``.

    ``purpose``: ``layer`` (anything), ``input_layer`` (mostly an unpadded conv, often grouped
    with several outputs per group: what an input-side fold goes into), ``residual_layer`` (its
    output has ``shape``: a conv with ``'same'`` padding and as many outputs as inputs, or a
    square Linear) or ``spiked_layer`` (``Layer.spiked``)."""
    kind = draw(one_of_values(LAYER_KINDS[purpose])) if shape.spatial else LINEAR
    functional = allow_functional and draw(chance(1, 4))
    hooked = not functional and draw(chance(1, 8))
    frozen = draw(chance(1, 8))
    bias = draw(BOOLEANS)
    if kind == LINEAR:
        same_width = purpose == "residual_layer"
        layer, out = draw(_linear(shape, functional, hooked, bias, same_width))
    else:
        layer, out = draw(_convolution(shape, kind, functional, hooked, bias, purpose))
    if purpose == "spiked_layer":
        layer = replace(layer, spiked=True)
    if functional and not bias and draw(BOOLEANS):
        layer = replace(layer, bias_omitted=True)
    if not functional and not hooked and draw(chance(1, 12)):
        layer = replace(layer, replaced_forward=True)
    elif not functional and not hooked and purpose != "spiked_layer" and draw(chance(1, 12)):
        layer = replace(layer, call_override=True)
    elif not functional and not hooked and purpose != "spiked_layer" and draw(chance(1, 24)):
        layer = replace(layer, parametrized=True)  # rarer: it blocks every fold into the layer
    return (replace(layer, frozen=True) if frozen else layer), out


@reused
@st.composite
def _linear(
    draw, shape: Shape, functional: bool, hooked: bool, bias: bool, same_width: bool = False
):
    in_features = shape.spatial[-1] if shape.spatial else shape.channels
    if same_width:
        out_features = in_features
    elif shape.spatial and draw(BOOLEANS):
        # Matching the channel count tempts a fuser to fold a BN over dim 1 per output feature.
        out_features = shape.channels
    else:
        out_features = draw(integers(1, MAX_CHANNELS))
    layer = Layer(
        LINEAR,
        0,
        shape.ndim,
        in_features,
        out_features,
        bias=bias,
        functional=functional,
        hooked=hooked,
    )
    if shape.spatial:
        return layer, replace(shape, spatial=(*shape.spatial[:-1], out_features))
    return layer, replace(shape, channels=out_features)


@reused
@st.composite
def _groups_and_out_channels(draw, in_channels: int, purpose: str = "layer") -> tuple[int, int]:
    """Groups 1, depthwise, or any divisor; output channels a multiple of the groups.

    For an ``input_layer``, groups above 1 with several outputs per group (where an input-side
    fold must map each output channel to its own group's inputs) come first; a
    ``residual_layer`` has as many outputs as inputs."""
    divisors = [g for g in range(1, in_channels + 1) if in_channels % g == 0]
    if purpose == "input_layer":
        style = draw(one_of_values(("several_per_group",) * 2 + ("one", "depthwise", "divisor")))
    else:
        style = draw(one_of_values(("one", "depthwise", "divisor")))
    if style == "several_per_group" and len(divisors) > 1:
        groups = draw(one_of_values(tuple(divisors[1:])))
        return groups, groups * draw(integers(2, max(2, MAX_CHANNELS // groups)))
    groups = {"one": 1, "depthwise": in_channels}.get(style) or draw(one_of_values(tuple(divisors)))
    if purpose == "residual_layer":
        return groups, in_channels
    multiplier = draw(integers(1, max(1, MAX_CHANNELS // groups)))
    return groups, groups * multiplier


def _per_dim(draw, dims: int, values: st.SearchStrategy[int]) -> tuple[int, ...]:
    """Equal in every dimension, or (sometimes) drawn per dimension."""
    if dims > 1 and draw(chance(1, 3)):
        return tuple(draw(values) for _ in range(dims))
    return (draw(values),) * dims


@reused
@st.composite
def _convolution(
    draw,
    shape: Shape,
    kind: str,
    functional: bool,
    hooked: bool,
    bias: bool,
    purpose: str = "layer",
):
    dims = len(shape.spatial)
    groups, out_channels = draw(_groups_and_out_channels(shape.channels, purpose))
    kernel = _per_dim(draw, dims, integers(1, 3))
    stride = _per_dim(draw, dims, integers(1, 2))
    dilation = _per_dim(draw, dims, integers(1, 2))
    if kind == CONV:
        if purpose == "residual_layer":  # keeps the shape: 'same' padding forces stride 1
            padding_style = "same"
        elif purpose == "input_layer":  # mostly unpadded: an input-side fold is allowed
            padding_style = draw(one_of_values(("int", "valid", "same")))
        else:
            padding_style = draw(one_of_values(("int", "same", "valid")))
        # 1 first: the common real-world padding, and where an input-side fold must be refused
        pads = one_of_values((1, 0, 2))
        padding = _per_dim(draw, dims, pads) if padding_style == "int" else padding_style
        mode = "zeros" if functional or draw(BOOLEANS) else draw(one_of_values(PADDING_MODES))
        return _valid_conv(
            shape,
            out_channels,
            groups,
            kernel,
            stride,
            padding,
            dilation,
            mode,
            bias,
            functional,
            hooked,
        )
    padding = _per_dim(draw, dims, integers(0, 2))
    output_padding = tuple(
        draw(integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
    )
    return _valid_conv_transpose(
        shape,
        out_channels,
        groups,
        kernel,
        stride,
        padding,
        dilation,
        output_padding,
        bias,
        functional,
        hooked,
    )


def _valid_conv(
    shape, out_channels, groups, kernel, stride, padding, dilation, mode, bias, functional, hooked
) -> tuple[Layer, Shape]:
    """Repair drawn convolution options into a valid layer (never filtered: shrinks better)."""
    kernel, stride, dilation = list(kernel), list(stride), list(dilation)
    if padding == "same":
        stride = [1] * len(stride)
    out_sizes = []
    for i, size in enumerate(shape.spatial):
        pad = padding[i] if isinstance(padding, tuple) else 0
        if dilation[i] * (kernel[i] - 1) + 1 > size + 2 * pad:
            dilation[i] = 1
            kernel[i] = min(kernel[i], size + 2 * pad)
        if padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            widest = total - total // 2
            out_sizes.append(size)
        else:
            widest = pad
            out_sizes.append((size + 2 * pad - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1)
        if (mode == "reflect" and widest >= size) or (mode == "circular" and widest > size):
            mode = "replicate"
    layer = Layer(
        CONV,
        len(shape.spatial),
        shape.ndim,
        shape.channels,
        out_channels,
        tuple(kernel),
        tuple(stride),
        padding,
        tuple(dilation),
        groups,
        bias,
        mode,
        (),
        functional,
        hooked,
    )
    return layer, Shape(shape.batch, out_channels, tuple(out_sizes))


def _valid_conv_transpose(
    shape,
    out_channels,
    groups,
    kernel,
    stride,
    padding,
    dilation,
    output_padding,
    bias,
    functional,
    hooked,
) -> tuple[Layer, Shape]:
    """Repair transposed-convolution options so the output is non-empty and stays small."""
    limit = MAX_SIZE[len(shape.spatial)]
    kernel, stride, padding = list(kernel), list(stride), list(padding)
    dilation, output_padding = list(dilation), list(output_padding)

    def out_size(i: int) -> int:
        return (
            (shape.spatial[i] - 1) * stride[i]
            - 2 * padding[i]
            + dilation[i] * (kernel[i] - 1)
            + output_padding[i]
            + 1
        )

    out_sizes = []
    for i in range(len(shape.spatial)):
        if out_size(i) > limit:
            stride[i], dilation[i], output_padding[i] = 1, 1, 0
            padding[i] = (kernel[i] - 1) // 2
        if out_size(i) > limit:
            kernel[i], padding[i] = 1, 0
        if out_size(i) < 1:
            padding[i] = 0
        out_sizes.append(out_size(i))
    layer = Layer(
        CONV_TRANSPOSE,
        len(shape.spatial),
        shape.ndim,
        shape.channels,
        out_channels,
        tuple(kernel),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        bias,
        "zeros",
        tuple(output_padding),
        functional,
        hooked,
    )
    return layer, Shape(shape.batch, out_channels, tuple(out_sizes))


@reused
@st.composite
def norms(draw, shape: Shape, allow_functional: bool = True, gain: str | None = None) -> Norm:
    """A BatchNorm call on ``shape``: module, functional or subclass, sometimes unfoldable.
    With a ``gain`` (``Norm.gain``) it is affine, has running statistics and no defect."""
    # An untraceable subclass never folds: at one norm in five or seven it was 15% of all sites,
    # more than any other reason a site stays; one in nine or thirteen leaves room for the
    # computed arguments (``_with_computed_arguments``) and keeps the foldable share above 30%.
    styles = [MODULE] * 6 + [TRACED_SUBCLASS] * 2 + [OPAQUE_SUBCLASS]
    if allow_functional:
        styles += [FUNCTIONAL] * 4
    style = draw(one_of_values(tuple(styles)))
    affine = draw(one_of_values((True, True, True, False)))
    track = style == TRACED_SUBCLASS or draw(one_of_values((True,) * 11 + (False,)))
    eps = 10.0 ** draw(EPS_EXPONENTS)
    momentum = draw(one_of_values((0.1, None, 0.01, 0.5)))
    defect = None
    if style in (MODULE, FUNCTIONAL) and draw(chance(1, 4)):
        module_defects = (TRAINING, FORWARD_HOOK, FORWARD_PRE_HOOK, REPLACED_FORWARD)
        if affine or track:  # a tensor to parametrize: the weight, else the running variance
            module_defects += (PARAMETRIZED,)
        defects = module_defects if style == MODULE else (TRAINING,)
        defect = draw(one_of_values(defects))
    if gain is not None:
        affine, track, defect = True, True, None
    module_class = None  # ``Norm.module_class``
    if style == MODULE and gain is None:
        frozen = (FROZEN,) * 3 if shape.ndim == 4 else ()  # detection backbones' 2-D BN
        module_class = draw(one_of_values((None,) * 6 + (SYNC, *frozen)))
    if module_class == FROZEN:  # always affine, with running statistics
        affine, track = True, True
        if defect is None and draw(BOOLEANS):  # it exists to stay frozen in training mode
            defect = TRAINING
    torch_call = style == FUNCTIONAL and draw(chance(1, 3))
    norm = Norm(shape.ndim, shape.channels, affine, track, eps, momentum, style, defect, gain)
    norm = replace(norm, module_class=module_class) if module_class else norm
    return replace(norm, torch_call=True) if torch_call else norm


@reused
@st.composite
def activations(draw, allow_functional: bool = True) -> Act:
    """An activation or ``nn.Identity``, as a module or a functional call, in place half the
    time where it can be."""
    kind = draw(one_of_values(ACTIVATIONS))
    functional = allow_functional and kind != "identity" and draw(BOOLEANS)
    inplace = kind in IN_PLACE_ACTIVATIONS and draw(BOOLEANS)
    return Act(kind, functional, inplace)


@reused
@st.composite
def flattens(draw, shape: Shape, start_dim: int | None = None) -> tuple[Flatten, Shape]:
    """Flatten to ``(N, features)`` or, from 2-D/3-D maps, to ``(N, C, length)``."""
    if start_dim is None:
        start_dim = draw(one_of_values((1, 2))) if len(shape.spatial) >= 2 else 1
    length = 1
    for size in shape.spatial:
        length *= size
    if start_dim == 1:
        return Flatten(1), Shape(shape.batch, shape.channels * length, ())
    return Flatten(2), Shape(shape.batch, shape.channels, (length,))
