"""The oracle on hand-written networks, one README foldability rule at a time.

The oracle is the yardstick of every completeness property, so it gets its own example-based
tests; each case is small enough to check against the README by reading it.
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch
from compat import requires_cpu_float16
from helpers import assert_equivalent

from fuser import fuse_with_report
from strategies import Act, Chain, Layer, NetSpec, Norm, Tap, TwoCalls, build, foldable_sites
from strategies.spec import IN_PLACE_FORMS

MAP = (2, 3, 5, 5)  # a batched 2-D feature map with 3 channels


def conv(cin: int = 3, cout: int = 3, padding=(1, 1), **options) -> Layer:
    options.setdefault("kernel_size", (3, 3))
    return Layer(
        kind="conv",
        spatial_dims=2,
        input_ndim=4,
        in_channels=cin,
        out_channels=cout,
        stride=(1, 1),
        padding=padding,
        dilation=(1, 1),
        **options,
    )


def conv_transpose(cin: int = 3, cout: int = 3) -> Layer:
    return Layer(
        kind="conv_transpose",
        spatial_dims=2,
        input_ndim=4,
        in_channels=cin,
        out_channels=cout,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        output_padding=(0, 0),
    )


def linear(fin: int, fout: int, input_ndim: int = 2) -> Layer:
    return Layer(
        kind="linear", spatial_dims=0, input_ndim=input_ndim, in_channels=fin, out_channels=fout
    )


def bn(channels: int = 3, input_ndim: int = 4, **options) -> Norm:
    return Norm(input_ndim=input_ndim, num_features=channels, **options)


def verdicts(*blocks, input_shape=MAP) -> list[tuple[str | None, int, str | None]]:
    """(site, call index, side or None) for every BN call site, in execution order."""
    sites = foldable_sites(NetSpec(input_shape=input_shape, blocks=tuple(blocks)))
    return [(site.bn, site.call_index, site.side if site.foldable else None) for site in sites]


def test_conv_then_bn_folds_on_the_output_side():
    assert verdicts(Chain((conv(), bn()))) == [("b0_bn1", 0, "output")]


def test_conv_bn_bn_chain_folds_both_into_the_conv():
    assert verdicts(Chain((conv(), bn(), bn()))) == [
        ("b0_bn1", 0, "output"),
        ("b0_bn2", 0, "output"),
    ]


@pytest.mark.parametrize(
    ("layer", "side"),
    [
        (conv(padding=(0, 0)), "input"),
        (conv(padding="valid"), "input"),
        (conv(padding=(1, 1)), None),  # zero padding: the shift would not reach the border
        (conv(padding=(1, 0)), None),
        (conv(padding=(1, 1), padding_mode="reflect"), "input"),
        (conv(padding=(1, 1), padding_mode="circular"), "input"),
        (conv(padding="same"), None),
        (conv(padding="same", kernel_size=(1, 1)), "input"),
        (conv_transpose(), None),  # transposed convolutions never take an input-side fold
    ],
)
def test_bn_before_a_layer_folds_on_the_input_side_only_without_zero_padding(layer, side):
    assert verdicts(Chain((bn(), layer))) == [("b0_bn0", 0, side)]


def test_bn_bn_conv_folds_both_on_the_input_side():
    blocks = Chain((conv(), Act("relu"), bn(), bn(), conv(padding="valid")))
    assert verdicts(blocks) == [("b0_bn2", 0, "input"), ("b0_bn3", 0, "input")]


def test_output_side_is_preferred_over_input_side():
    assert verdicts(Chain((conv(), bn(), conv(padding="valid")))) == [("b0_bn1", 0, "output")]


def test_linear_folds_only_on_two_dimensional_inputs():
    assert verdicts(Chain((linear(4, 6), bn(6, 2))), input_shape=(2, 4)) == [
        ("b0_bn1", 0, "output")
    ]
    assert verdicts(Chain((bn(4, 2), linear(4, 6))), input_shape=(2, 4)) == [("b0_bn0", 0, "input")]
    # On (N, C, L) a Linear acts on L while BatchNorm1d normalises C: never foldable.
    three_d = Chain((linear(5, 3, input_ndim=3), bn(3, 3)))
    assert verdicts(three_d, input_shape=(2, 3, 5)) == [("b0_bn1", 0, None)]
    assert verdicts(Chain((bn(3, 3), linear(5, 4, input_ndim=3))), input_shape=(2, 3, 5)) == [
        ("b0_bn0", 0, None)
    ]


def test_without_example_inputs_no_linear_folds_and_convs_still_do():
    # README rule 2: a Linear's rank is proven only by shape propagation over example inputs.
    def sites(*blocks, input_shape):
        spec = NetSpec(input_shape=input_shape, blocks=blocks, example_inputs=False)
        return [(site.bn, site.side if site.foldable else None) for site in foldable_sites(spec)]

    assert sites(Chain((linear(4, 6), bn(6, 2))), input_shape=(2, 4)) == [("b0_bn1", None)]
    assert sites(Chain((bn(4, 2), linear(4, 6))), input_shape=(2, 4)) == [("b0_bn0", None)]
    assert sites(Chain((conv(), bn())), input_shape=MAP) == [("b0_bn1", "output")]


def test_a_value_reader_of_the_conv_output_blocks_the_fold():
    residual = Chain((conv(), bn()), tap=Tap(after=0, kind="add"))
    assert verdicts(residual) == [("b0_bn1", 0, None)]
    concat = Chain((conv(), bn()), tap=Tap(after=0, kind="cat"))
    assert verdicts(concat) == [("b0_bn1", 0, None)]


def test_a_tap_changed_in_place_is_an_op_between_and_still_reads_the_value():
    # ``tap = x; x *= 0.5``: the halving sits between the tapped op and the next (no fold across
    # it), and the tap still reads the tapped op's output (no input-side fold of a tapped BN).
    shifted = Tap(after=0, kind="add", shifted=True)
    assert verdicts(Chain((conv(), bn()), tap=shifted)) == [("b0_bn1", 0, None)]
    after_bn = Chain((conv(), bn(), conv(padding="valid")), tap=replace(shifted, after=1))
    assert verdicts(after_bn) == [("b0_bn1", 0, "output")]
    before_layer = Chain((bn(), conv(padding="valid")), tap=shifted)
    assert verdicts(before_layer) == [("b0_bn0", 0, None)]


@pytest.mark.parametrize("kind", ["ndim", "shape", "size", "dim", "numel"])
def test_metadata_readers_do_not_block_the_fold(kind):
    assert verdicts(Chain((conv(), bn()), tap=Tap(after=0, kind=kind, expected=1))) == [
        ("b0_bn1", 0, "output")
    ]


def test_an_op_between_the_layer_and_the_bn_blocks_the_fold_but_an_identity_does_not():
    """README rules 2 and 3 look through ``nn.Identity`` (and eval-mode dropout, not drawn), on
    both sides, unless something else reads its output."""
    assert verdicts(Chain((conv(), Act("relu", functional=True), bn()))) == [("b0_bn2", 0, None)]
    assert verdicts(Chain((conv(), Act("identity"), bn()))) == [("b0_bn2", 0, "output")]
    identity_tapped = Chain((conv(), Act("identity"), bn()), tap=Tap(after=1, kind="add"))
    assert verdicts(identity_tapped) == [("b0_bn2", 0, None)]
    after_a_relu = (Act("relu"), bn(), Act("identity"), Act("identity"), conv(padding=(0, 0)))
    assert verdicts(Chain(after_a_relu)) == [("b0_bn1", 0, "input")]


@pytest.mark.parametrize(
    "norm",
    [
        bn(defect="training"),
        bn(defect="forward_hook"),
        bn(defect="forward_pre_hook"),
        bn(defect="replaced_forward"),
        bn(track_running_stats=False),
        bn(style="opaque_subclass"),
        bn(style="functional", defect="training"),
    ],
)
def test_batch_norms_that_must_not_fold(norm):
    [(_, _, side)] = verdicts(Chain((conv(), norm)))
    assert side is None


def test_functional_and_traceable_subclass_sites_are_named_by_running_mean():
    blocks = Chain((conv(), bn(style="functional"))), Chain((conv(), bn(style="traced_subclass")))
    assert verdicts(*blocks) == [
        ("b0_bn1.running_mean", 0, "output"),
        ("b1_bn1.running_mean", 0, "output"),
    ]
    assert verdicts(Chain((conv(), bn(style="functional", track_running_stats=False)))) == [
        (None, 0, None)
    ]


def test_functional_layers_fold_like_modules():
    assert verdicts(Chain((conv(functional=True), bn()))) == [("b0_bn1", 0, "output")]
    assert verdicts(Chain((bn(), conv(padding="valid", functional=True)))) == [
        ("b0_bn0", 0, "input")
    ]


def test_a_hooked_layer_takes_no_fold():
    assert verdicts(Chain((conv(hooked=True), bn()))) == [("b0_bn1", 0, None)]
    assert verdicts(Chain((bn(), conv(padding="valid", hooked=True)))) == [("b0_bn0", 0, None)]


def test_a_parametrized_layer_takes_no_fold_and_the_fuser_agrees():
    """weight_norm computes the weight on every call: README rule 6 leaves it, and a functional
    read of that weight (tied) reads a computed tensor, no constant to fold into."""
    blocks = [
        Chain((conv(parametrized=True), bn())),
        Chain((bn(), conv(padding="valid", parametrized=True))),
        TwoCalls(conv(parametrized=True), "functional", (bn(),), (bn(),)),
    ]
    for block in blocks:
        sides = [side for _, _, side in verdicts(block)]
        assert sides == [None] * len(sides)
        model, inputs = build(NetSpec(input_shape=MAP, blocks=(block,)))
        fused, report = fuse_with_report(model, inputs)
        assert not any(site.folded for site in report.sites)
        assert_equivalent(model, fused, *inputs)


@pytest.mark.parametrize("form", IN_PLACE_FORMS)
@pytest.mark.parametrize("tensor", ["weight", "bias"])
def test_a_tensor_changed_in_place_blocks_its_folds_and_the_fuser_agrees(tensor: str, form: str):
    """README rule 6: a fold would compute with the tensor's value at fusing time, where the
    model's code negates it around the call. A changed BN folds nowhere; a changed layer takes no
    fold, so its BN folds into the next layer if it can, as beside a hooked layer."""
    change = (tensor, form)
    cases = [
        (Chain((conv(), bn(changed_in_place=change))), [None]),
        (Chain((bn(changed_in_place=change), conv(padding="valid"))), [None]),
        (Chain((conv(changed_in_place=change), bn())), [None]),
        (Chain((conv(changed_in_place=change), bn(), conv(padding="valid"))), ["input"]),
        (Chain((conv(), bn(), conv(padding="valid", changed_in_place=change))), ["output"]),
    ]
    for block, sides in cases:
        assert [side for _, _, side in verdicts(block)] == sides
        model, inputs = build(NetSpec(input_shape=MAP, blocks=(block,)))
        fused, report = fuse_with_report(model)  # no example inputs: nothing runs the model
        assert [site.side if site.folded else None for site in report.sites] == sides, report
        assert_equivalent(model, fused, *inputs)
        assert_equivalent(model, pickle.loads(pickle.dumps(fused)), *inputs)


@pytest.mark.parametrize("computed", ["weight", "bias"])
def test_a_computed_argument_takes_no_fold_and_the_fuser_agrees(computed: str):
    """README rules 1 and 2 fold only module constants: a functional layer or ``F.batch_norm``
    whose weight or bias is computed when it runs (``w.bias * 0.5``) is left, and a BN module
    next to such a layer stays too."""
    functional_bn = bn(style="functional", computed=computed)
    blocks = [
        Chain((conv(), functional_bn)),
        Chain((conv(functional=True, computed=computed), bn())),
        Chain((conv(functional=True, computed=computed), bn(style="functional"))),
    ]
    for block in blocks:
        assert [side for _, _, side in verdicts(block)] == [None]
        model, inputs = build(NetSpec(input_shape=MAP, blocks=(block,)))
        fused, report = fuse_with_report(model, inputs)
        assert [site.folded for site in report.sites] == [False]
        assert "not a constant of the module" in report.sites[0].reason
        assert_equivalent(model, fused, *inputs)
    plain = verdicts(Chain((conv(functional=True), bn(style="functional"))))
    assert [side for _, _, side in plain] == ["output"]  # the same pair without it folds


@pytest.mark.parametrize("module_class", ["SyncBatchNorm", "FrozenBatchNorm2d"])
def test_sync_and_frozen_batch_norms_fold_as_batch_norms_and_the_fuser_agrees(module_class: str):
    """README rule 1: both are BatchNorms. A FrozenBatchNorm2d in training mode still normalises
    with its running statistics, so it still folds; a SyncBatchNorm in training mode does not."""
    frozen = module_class == "FrozenBatchNorm2d"
    for defect in (None, "training", "forward_hook"):
        block = Chain((conv(), bn(module_class=module_class, defect=defect)))
        folds = defect is None or (defect == "training" and frozen)
        assert [side for _, _, side in verdicts(block)] == ["output" if folds else None]
        model, inputs = build(NetSpec(input_shape=MAP, blocks=(block,)))
        fused, report = fuse_with_report(model, inputs)
        assert [site.folded for site in report.sites] == [folds], (defect, report)
        if folds or defect != "training":  # a training SyncBatchNorm updates its statistics
            assert_equivalent(model, fused, *inputs)


def test_shared_and_tied_layers_fold_at_every_call_site():
    shared_bn = TwoCalls(conv(), second="module", first_norms=(bn(),), second_norms=None)
    assert verdicts(shared_bn) == [("b0_bn_a0", 0, "output"), ("b0_bn_a0", 1, "output")]
    tied = TwoCalls(
        conv(),
        second="functional",
        first_norms=(bn(),),
        second_norms=(bn(), bn()),
        packaging="wrapper",
    )
    assert verdicts(tied) == [
        ("b0.bn_a0", 0, "output"),
        ("b0.bn_b0", 0, "output"),
        ("b0.bn_b1", 0, "output"),
    ]


@pytest.mark.parametrize("packaging", ["inline", "wrapper"])
def test_twin_layers_tied_by_their_weight_fold_into_copies_at_both_sites(packaging):
    """Two modules holding one weight Parameter: each site folds, into a weight of its own."""
    twins = TwoCalls(conv(), "twin", (bn(),), (bn(),), packaging=packaging)
    prefix = "b0_" if packaging == "inline" else "b0."
    sites = foldable_sites(NetSpec(input_shape=MAP, blocks=(twins,)))
    assert [(site.bn, site.into) for site in sites] == [
        (prefix + "bn_a0", prefix + "conv"),
        (prefix + "bn_b0", prefix + "conv_twin"),
    ]
    model, inputs = build(NetSpec(input_shape=MAP, blocks=(twins,)))
    layer, twin = model.get_submodule(prefix + "conv"), model.get_submodule(prefix + "conv_twin")
    assert twin.weight is layer.weight and twin.bias is not layer.bias
    fused, report = fuse_with_report(model, inputs)
    assert [site.folded for site in report.sites] == [True, True], report
    assert_equivalent(model, fused, *inputs)


def test_sequential_staircase_names():
    chain = Chain((conv(), bn(), bn()), packaging="sequential", depth=3)
    assert verdicts(chain) == [("b0.1.0", 0, "output"), ("b0.1.1.0", 0, "output")]


def test_a_hooked_container_is_fused_on_its_own():
    outside_then_inside = (
        Chain((conv(),)),
        Chain((bn(), conv(), bn()), "wrapper", boundary="hooked"),
    )
    assert verdicts(*outside_then_inside) == [("b1.bn0", 0, None), ("b1.bn2", 0, "output")]


@pytest.mark.parametrize("boundary", ["untraceable", "autocast", "no_grad", "counts_calls"])
def test_behind_an_untraceable_module_only_children_fused_on_their_own_fold(boundary):
    # A module entering torch.autocast, changing the grad mode or setting its own attributes is
    # one FX must not trace through (README).
    inline = Chain((conv(), bn()), boundary=boundary)
    assert verdicts(inline) == [("b0.bn1", 0, None)]
    sequential = Chain((conv(), bn()), "sequential", boundary=boundary)
    assert verdicts(sequential) == [("b0.inner.1", 0, "output")]
    wrapper = Chain((conv(), bn()), "wrapper", boundary=boundary)
    # A wrapper of two ops: a counting module counts with a method of a plain object it holds
    # (Chain.counts_with_held_method), handing its `self` to nothing.
    assert verdicts(wrapper) == [("b0.inner.bn1", 0, "output")]
    # Of three: it counts with object.__setattr__(self, ...), and code handed `self` could reach
    # its child, which stays as it is (README, children of untraced modules).
    wrapper = Chain((conv(), bn(), Act("relu")), "wrapper", boundary=boundary)
    inside = None if boundary == "counts_calls" else "output"
    assert verdicts(wrapper) == [("b0.inner.bn1", 0, inside)]


@pytest.mark.parametrize(
    "loop, depth, expected",
    [
        ("calls", 2, [None, "output", "output"]),  # stages: bn, then Sequential(conv, bn, bn)
        ("calls", 1, [None, None, None]),  # every op a stage of its own
        ("inspects", 2, [None, None, None]),  # isinstance(stage, ...): every stage left whole
    ],
)
def test_a_guard_looping_over_its_sequential_fuses_each_stage_on_its_own(loop, depth, expected):
    chain = Chain(
        (bn(), conv(), bn(), bn()), "sequential", depth, boundary="untraceable", loop=loop
    )
    assert [side for _, _, side in verdicts(chain)] == expected
    spec = NetSpec(input_shape=MAP, blocks=(chain,))
    model, inputs = build(spec)
    fused, report = fuse_with_report(model, inputs)
    assert [site.folded for site in report.sites] == [side is not None for side in expected]
    assert_equivalent(model, fused, *inputs)


def test_a_model_whose_forward_is_replaced_folds_nothing():
    # Not traced (FX would trace its class's forward), and its children are left whole.
    blocks = (Chain((conv(), bn())), Chain((conv(), bn()), "sequential"))
    spec = NetSpec(MAP, blocks, replaced_forward=True)
    assert [(site.bn, site.foldable) for site in foldable_sites(spec)] == [
        ("b0_bn1", False),
        ("b1.1", False),
    ]
    assert all(site.foldable for site in foldable_sites(replace(spec, replaced_forward=False)))


@pytest.mark.parametrize(
    ("layer", "before", "after"),
    [
        (conv(padding=(0, 0)), "input", None),
        (conv(padding=(1, 1), padding_mode="reflect"), None, None),  # the BN feeds F.pad
        (conv(padding=(1, 1)), None, None),  # zero-pads its input
        (conv_transpose(), None, None),
    ],
    ids=["unpadded conv", "reflect-padded conv", "zero-padded conv", "transposed conv"],
)
def test_a_layer_whose_class_overrides_call_is_a_functional_call_then_a_shift(layer, before, after):
    """FX traces through it (``Layer.call_override``): a BN before it may fold into its weight
    (named as a functional layer's), a BN after it reads the shift, not the layer."""
    chain = Chain((bn(), replace(layer, call_override=True), bn()))
    into = "b0_conv1.weight" if before else None
    sites = foldable_sites(NetSpec(MAP, (chain,)))
    assert [(site.side if site.foldable else None, site.into) for site in sites] == [
        (before, into),
        (after, None),
    ]
    model, inputs = build(NetSpec(MAP, (chain,)))
    _, report = fuse_with_report(model, example_inputs=inputs)
    assert [(site.side if site.folded else None, site.into) for site in report.sites] == [
        (before, into),
        (after, None),
    ]


def _overflowing_chain(padding=(1, 1)) -> Chain:
    """``shrinking BN -> spiked conv -> amplifying BN -> act`` (``Norm.gain``)."""
    spiked = conv(padding=padding, spiked=True)
    return Chain((bn(gain="shrinking"), spiked, bn(gain="amplifying"), Act("relu")))


def test_an_amplifying_bn_after_a_spiked_layer_is_left_in_float16_only():
    """Rule 6: the fold would overflow float16; in float32 it is an ordinary output-side fold
    (the zero-padded conv takes no input-side fold)."""
    chain = _overflowing_chain()
    sites = foldable_sites(NetSpec(input_shape=MAP, blocks=(chain,), dtype="float16"))
    assert [(site.bn, site.side if site.foldable else None) for site in sites] == [
        ("b0_bn0", None),
        ("b0_bn2", None),
    ]
    assert "overflow float16" in sites[1].reason
    assert verdicts(chain) == [("b0_bn0", 0, None), ("b0_bn2", 0, "output")]


def test_an_overflowing_fold_fits_once_the_shrinking_bn_has_folded_into_the_layer():
    """Rule 4, until nothing changes: the shrinking BN folds on the input side into the unpadded
    spiked conv, which scales its weight by about 2**-12; the amplifying BN then fits."""
    chain = _overflowing_chain(padding=(0, 0))
    spec = NetSpec(input_shape=MAP, blocks=(chain,), dtype="float16")
    sites = foldable_sites(spec)
    assert [(site.bn, site.side if site.foldable else None) for site in sites] == [
        ("b0_bn0", "input"),
        ("b0_bn2", "output"),
    ]


@requires_cpu_float16
@pytest.mark.parametrize("padding", [(1, 1), (0, 0)])
@pytest.mark.parametrize("seed", range(3))
def test_the_overflow_clause_agrees_with_the_fuser(padding, seed: int):
    """The clause is the oracle's only float16 prediction (completeness leaves float16 out), so
    it is checked against our fuser here: the float16 network itself is finite, and the fuser
    folds exactly the sites the oracle folds."""
    chain = _overflowing_chain(padding)
    spec = NetSpec(input_shape=MAP, blocks=(chain,), dtype="float16", seed=seed)
    model, inputs = build(spec)
    with torch.no_grad():
        assert torch.isfinite(model(*inputs)).all()
    _, report = fuse_with_report(model, example_inputs=inputs)
    assert [(site.bn, site.side if site.foldable else None) for site in foldable_sites(spec)] == [
        (site.bn, site.side if site.folded else None) for site in report.sites
    ]
