"""Mutants in the matcher: the real fuser folding a site it must leave, or leaving one it must fold.

Folding a site that must stay is a soundness bug (the output changes: caught by "fused output
matches the original"); leaving a foldable site is a completeness bug (the output is right, but a
BatchNorm the README promises to remove is still there and the report disagrees with the oracle:
caught by the completeness properties).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import types
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import fx, nn

import fuser.child_usage as child_usage
import fuser.patterns as patterns
from fuser.fold_math import FoldedLayer, fold_into_input
from fuser.fold_pass import _FoldPass
from fuser.in_place import _updates_statistics
from fuser.patterns import (
    BatchNormCall,
    LayerCall,
    describe_batch_norm,
    describe_layer,
    is_batch_norm_module,
    normalized_args,
    value_users,
)
from fuser.run_time_writes import _changed_by_torch_code
from fuser.shapes import attributes_of, changed_state

from ._patching import Fused, fuse_patched

__all__ = [
    "augmented_assignment_out_of_place",
    "autocast_traced_through",
    "bn_hooks_ignored",
    "bn_subclass_matched_by_isinstance",
    "buffer_writes_traced_through",
    "code_handed_a_fold_tensor_ignored",
    "computed_bn_affine_taken_as_absent",
    "computed_layer_bias_taken_as_absent",
    "container_writes_traced_through",
    "frozen_batch_norm_not_recognised",
    "frozen_batch_norm_rank_ignored",
    "frozen_batch_norm_refused_in_training_mode",
    "frozen_state_reads_through_plain_objects_traced",
    "frozen_state_reads_traced",
    "functional_bn_not_recognised",
    "functional_training_bn_folded",
    "global_module_hooks_ignored",
    "grad_mode_changes_traced_through",
    "held_method_objects_ignored",
    "held_object_writes_ignored",
    "in_place_changes_ignored",
    "input_side_into_transposed_conv",
    "input_side_through_zero_padding",
    "input_side_with_several_users",
    "layer_hooks_ignored",
    "layer_tensors_read_around_a_running_module_ignored",
    "linear_rank_unchecked",
    "loop_element_uses_unchecked",
    "metadata_users_block_folds",
    "missing_running_stats_taken_as_identity",
    "module_hook_reading_it_ignored",
    "module_level_state_reads_traced",
    "module_state_writes_traced_through",
    "other_rank_unchecked_when_called",
    "other_users_of_layer_output_ignored",
    "parametrized_batch_norm_folded_with_stored_tensors",
    "pass_through_calls_not_looked_through",
    "pass_through_readers_ignored",
    "replaced_forward_ignored",
    "state_set_around_setattr_ignored",
    "sync_batch_norm_taken_for_a_subclass",
    "tensors_held_by_code_running_as_written_ignored",
    "torch_batch_norm_not_recognised",
    "trace_fidelity_unchecked",
    "training_mode_bn_folded",
]


# --- rule 2: the output side ------------------------------------------------------------------
#
# The wrong checks are made by wrapping the real pass, not by copying it: a copy would drift from
# the fuser as it evolves and end up carrying other differences than the one bug it names.


def _value_users_seen_as(readers_of: Callable[[fx.Node], list[fx.Node] | None]):
    """A ``value_users`` that answers ``readers_of(node)`` when that is not None."""

    def users(node: fx.Node) -> list[fx.Node]:
        readers = readers_of(node)
        return value_users(node) if readers is None else readers

    return users


_fold_output_side = _FoldPass._fold_output_side
_fold_input_side = _FoldPass._fold_input_side


def _fold_output_side_seeing_only_the_bn(self: _FoldPass, call: BatchNormCall, *args, **kwargs):
    """The output-side fold, with the layer output's readers taken to be just this BN."""
    only_the_bn = _value_users_seen_as(lambda node: [call.node] if node is call.input else None)
    with mock.patch("fuser.fold_pass.value_users", only_the_bn):
        return _fold_output_side(self, call, *args, **kwargs)


def other_users_of_layer_output_ignored(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a BN is folded into the layer before it even when that layer's output is also read
    elsewhere (a residual add, a concat): the other reader now sees BN-scaled values. Needs value
    taps on layer outputs, or a layer read twice. Caught by: fused output matches the original.
    """
    patches = {"fuser.fold_pass._FoldPass._fold_output_side": _fold_output_side_seeing_only_the_bn}
    return fuse_patched(model, example_inputs, patches)


def metadata_users_block_folds(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (completeness): every user of a node counts as a reader of its values, so a shape
    assert (``torch._assert(x.ndim == 4)``, ``x.shape[1]``, as in timm) on a conv output blocks
    the fold. Sound but incomplete. Needs metadata-only taps. Caught by: the completeness
    properties (a foldable BN is left; the report disagrees with the oracle).
    """

    def every_user(node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    return fuse_patched(model, example_inputs, {"fuser.fold_pass.value_users": every_user})


def pass_through_calls_not_looked_through(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug (completeness): a BN folds only into a layer it is next to, as torch's fuse matches
    adjacent module pairs, so an ``nn.Identity`` (or an eval-mode dropout) between them, which
    changes no value, keeps it. Sound but incomplete. Needs an identity between a layer and a
    BN. Caught by: the completeness properties."""
    patches = {"fuser.fold_pass.passed_through": lambda gm, node: None}
    return fuse_patched(model, example_inputs, patches)


def pass_through_readers_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a fold looks through an ``nn.Identity`` whose output something else reads too (a
    residual add after it, a second layer): counting only the first of its readers, the fuser
    folds, and the other reader sees the BN's values where it read the layer's (output side),
    or the layer's un-normalised input (input side). Needs an identity between a layer and a BN
    with another reader. Caught by: fused output matches the original."""

    def first_reader_of_a_pass_through(node: fx.Node) -> list[fx.Node] | None:
        gm = node.graph.owning_module
        if gm is None or patterns.passed_through(gm, node) is None:
            return None
        return value_users(node)[:1]

    patches = {"fuser.fold_pass.value_users": _value_users_seen_as(first_reader_of_a_pass_through)}
    return fuse_patched(model, example_inputs, patches)


def linear_rank_unchecked(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a Linear is assumed to run on ``(N, features)``, so a BN after a Linear on a 3-D input
    ``(N, C, L)`` is folded per output feature while it normalises dimension 1. Needs Linear
    layers on 3-D inputs whose out_features equal the BN's channels. Caught by: fused output
    matches the original.
    """

    def check_convolution_rank_only(layer: LayerCall, call: BatchNormCall, value: fx.Node) -> bool:
        return layer.kind != "linear" and needs_rank_guard(layer, call, value)

    needs_rank_guard = _FoldPass._needs_rank_guard
    patches = {
        "fuser.fold_pass._FoldPass._needs_rank_guard": staticmethod(check_convolution_rank_only)
    }
    return fuse_patched(model, example_inputs, patches)


def other_rank_unchecked_when_called(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a fold whose BN also runs on another rank the layer takes is made as any other, with
    no check of the rank in the fused graph: a BatchNorm1d reads a Conv1d's unbatched ``(C, L)``
    output as ``(N, C)`` and normalises its L axis (a functional batch norm or a SyncBatchNorm
    takes any rank, a BatchNorm1d after a Linear a 3-D input), while the folded conv scales its
    channels. Needs a network called at two ranks (``strategies/two_ranks.py``). Caught by:
    other_rank_refused_or_honoured."""

    def never_guarded(layer: LayerCall, call: BatchNormCall, value: fx.Node) -> bool:
        needs_rank_guard(layer, call, value)  # the folds it leaves are still left
        return False

    needs_rank_guard = _FoldPass._needs_rank_guard
    patches = {"fuser.fold_pass._FoldPass._needs_rank_guard": staticmethod(never_guarded)}
    return fuse_patched(model, example_inputs, patches)


# --- rule 3: the input side -------------------------------------------------------------------


def input_side_through_zero_padding(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: ``BN -> conv`` is folded on the input side even when the conv zero-pads its input: the
    padded border sees 0, not ``shift``, so border outputs get a bias they should not. Needs a BN
    before a zero-padded conv. Caught by: fused output matches the original.
    """

    def describe_without_padding_check(gm: fx.GraphModule, node: fx.Node) -> LayerCall | str:
        layer = describe_layer(gm, node)
        return layer if isinstance(layer, str) else dataclasses.replace(layer, zero_padded=False)

    patches = {"fuser.fold_pass.describe_layer": describe_without_padding_check}
    return fuse_patched(model, example_inputs, patches)


def _fold_into_input_or_transposed(weight, bias, scale, shift, *, layer, groups=1):
    """Input-side fold extended to transposed convs: weight ``(in, out / groups, *kernel)`` is
    scaled per input channel (dim 0); each output channel's bias gains the sum of its taps times
    the shift of their input channels. Exact only where every output position sees every tap."""
    if layer != "conv_transpose":
        return fold_into_input(weight, bias, scale, shift, layer=layer, groups=groups)
    w = weight.detach().double()
    in_channels, out_per_group = w.shape[0], w.shape[1]
    kernel = [1] * (w.ndim - 1)
    taps = (w * shift.reshape(-1, *kernel)).sum(dim=tuple(range(2, w.ndim)))  # (in, out/groups)
    per_output = taps.reshape(groups, in_channels // groups, out_per_group).sum(dim=1).flatten()
    b = w.new_zeros(per_output.shape) if bias is None else bias.detach().double()
    return FoldedLayer(weight, scale.reshape(-1, *kernel), b + per_output)


def input_side_into_transposed_conv(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: ``BN -> ConvTranspose`` is folded on the input side. The weight part is exact, but the
    bias part is not: border outputs (and, with stride > 1, whole phases of outputs) see fewer
    than all kernel taps, so the folded shift is not uniform over positions (README rule 3).
    Needs a BN before a transposed conv. Caught by: fused output matches the original.
    """
    patches = {
        "fuser.fold_pass.INPUT_SIDE_LAYERS": ("conv", "conv_transpose", "linear"),
        "fuser.fold_pass.fold_into_input": _fold_into_input_or_transposed,
    }
    return fuse_patched(model, example_inputs, patches)


def _fold_input_side_into_first_reader(self: _FoldPass, call: BatchNormCall, *args, **kwargs):
    """The input-side fold, with the BN output's readers cut down to the first one."""
    first_only = _value_users_seen_as(
        lambda node: value_users(node)[:1] if node is call.node else None
    )
    with mock.patch("fuser.fold_pass.value_users", first_only):
        return _fold_input_side(self, call, *args, **kwargs)


def input_side_with_several_users(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: on the input side the BN folds into its first reader without checking it is the only
    reader; every other reader then sees the un-normalised input. Needs a BN whose output is read
    by a layer and by something else (a layer called twice on it, a residual). Caught by: fused
    output matches the original.
    """
    patches = {"fuser.fold_pass._FoldPass._fold_input_side": _fold_input_side_into_first_reader}
    return fuse_patched(model, example_inputs, patches)


# --- rule 1: what is a foldable BatchNorm -----------------------------------------------------


_module_batch_norm_problem = patterns._module_batch_norm_problem
_functional_batch_norm_problem = patterns._functional_batch_norm_problem


@contextlib.contextmanager
def _training_flag_read_as_false(module: nn.Module) -> Iterator[None]:
    training = module.training
    module.training = False
    try:
        yield
    finally:
        module.training = training


def _module_problem_ignoring_training(module: nn.Module) -> str | None:
    """The real check, reading a training flag that is always False."""
    with _training_flag_read_as_false(module):
        return _module_batch_norm_problem(module)


def _changed_by_torch_code_ignoring_training(module: nn.Module, torch_layer: bool):
    """What ``run_time_writes`` says torch's code changes, reading a training flag that is
    always False: a fuser blind to a submodule's training mode is blind to it there too."""
    with _training_flag_read_as_false(module):
        return list(_changed_by_torch_code(module, torch_layer))


def _module_problem_ignoring_hooks(module: nn.Module) -> str | None:
    """The real check, blind to hooks."""
    with mock.patch("fuser.patterns.has_hooks", return_value=False):
        return _module_batch_norm_problem(module)


@contextlib.contextmanager
def _initial_statistics_if_missing(module: nn.Module) -> Iterator[None]:
    """Give a BN without running statistics PyTorch's initial ones (mean 0, variance 1) while
    the matcher reads it; the model itself is left as it was."""
    missing = is_batch_norm_module(module) and module.running_mean is None
    if missing:
        module.running_mean = torch.zeros(module.num_features)
        module.running_var = torch.ones(module.num_features)
    try:
        yield
    finally:
        if missing:
            module.running_mean = module.running_var = None


def training_mode_bn_folded(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: only the top-level ``model.training`` is checked; a BN submodule left in training mode
    (it normalises with batch statistics) is folded with its running statistics. Needs a
    training-mode BN inside an eval-mode model. Caught by: fused output matches the original.
    """
    patches = {
        "fuser.patterns._module_batch_norm_problem": _module_problem_ignoring_training,
        # The BN's own statistics, which its training-mode calls update, block a fold there too.
        "fuser.run_time_writes._changed_by_torch_code": _changed_by_torch_code_ignoring_training,
    }
    return fuse_patched(model, example_inputs, patches)


def functional_training_bn_folded(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: ``F.batch_norm(..., training=True)`` on registered running statistics is folded as if it
    were an eval-mode call (the ``training`` argument is never read). Needs functional BNs with
    ``training=True``. Caught by: fused output matches the original.
    """

    def problem_ignoring_training(gm: fx.GraphModule, args: dict, label: str) -> str | None:
        return _functional_batch_norm_problem(gm, {**args, "training": False}, label)

    def updates_ignoring_training(node: fx.Node, value: fx.Node) -> bool:
        batch_norm = node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)
        return not batch_norm and _updates_statistics(node, value)

    patches = {
        "fuser.patterns._functional_batch_norm_problem": problem_ignoring_training,
        # The statistics the call updates, which block its own fold there too (``in_place``).
        "fuser.in_place._updates_statistics": updates_ignoring_training,
    }
    return fuse_patched(model, example_inputs, patches)


def _computed(value: object) -> bool:
    """An argument node that is no module constant: a value computed when the call runs."""
    return isinstance(value, fx.Node) and value.op != "get_attr"


def computed_bn_affine_taken_as_absent(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: an ``F.batch_norm`` call's weight and bias are read only where they are module
    constants (``get_attr`` nodes); one computed when the call runs (``self.weight * 0.5``) is
    taken as absent, as if the BN had no affine parameters, and the call is folded with gamma 1
    and beta 0. Needs functional BNs whose weight or bias is computed. Caught by: fused output
    matches the original.
    """

    def problem_ignoring_computed_affine(gm: fx.GraphModule, args: dict, label: str) -> str | None:
        absent = {name: None for name in ("weight", "bias") if _computed(args.get(name))}
        return _functional_batch_norm_problem(gm, {**args, **absent}, label)

    patches = {"fuser.patterns._functional_batch_norm_problem": problem_ignoring_computed_affine}
    return fuse_patched(model, example_inputs, patches)


def computed_layer_bias_taken_as_absent(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a functional layer's bias is read only where it is a module constant; one computed
    when the call runs (``F.conv2d(x, w, self.bias * 0.5)``) is taken as absent, so a fold gives
    the layer a bias of its own that leaves the computed one out. Needs functional layers with a
    computed bias followed by a foldable BN. Caught by: fused output matches the original.
    """

    def args_without_computed_bias(node: fx.Node, names: tuple, defaults: dict) -> dict:
        args = normalized_args(node, names, defaults)  # the real one, not the patched name
        return {**args, "bias": None} if _computed(args.get("bias")) else args

    def describe_ignoring_computed_bias(gm: fx.GraphModule, node: fx.Node) -> LayerCall | str:
        with mock.patch("fuser.patterns.normalized_args", args_without_computed_bias):
            return describe_layer(gm, node)

    patches = {"fuser.fold_pass.describe_layer": describe_ignoring_computed_bias}
    return fuse_patched(model, example_inputs, patches)


def bn_hooks_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a BN module with a forward hook or forward pre-hook is folded; the BN call disappears
    and its hooks (which change values) never run. Needs hooked BNs. Caught by: fused output
    matches the original.
    """
    patches = {"fuser.patterns._module_batch_norm_problem": _module_problem_ignoring_hooks}
    return fuse_patched(model, example_inputs, patches)


#: ``torch.nn.utils.parametrize`` as a matcher blind to parametrizations sees it.
_NOTHING_PARAMETRIZED = types.SimpleNamespace(is_parametrized=lambda module, name=None: False)


def parametrized_batch_norm_folded_with_stored_tensors(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a BN module whose tensors a parametrization computes on every call is folded, with
    the tensors it stores (``parametrizations.weight.original``, where a fuser reading the state
    dict finds them) instead of those the parametrization computes. Needs parametrized BNs
    (``Norm.defect`` ``parametrized``: the stored tensor holds the channels reversed). Caught by:
    fused output matches the original.
    """

    def describe_with_stored_tensors(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
        with mock.patch("fuser.patterns.parametrize", _NOTHING_PARAMETRIZED):
            call = describe_batch_norm(gm, node)
        if call is None or call.module_target is None or call.not_foldable is not None:
            return call
        module = patterns.submodule(gm, call.module_target)
        for name in ("running_mean", "running_var", "weight", "bias"):
            if torch.nn.utils.parametrize.is_parametrized(module, name):
                setattr(call, name, module.parametrizations[name].original)
        return call

    patches = {"fuser.fold_pass.describe_batch_norm": describe_with_stored_tensors}
    return fuse_patched(model, example_inputs, patches)


def layer_hooks_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a conv/linear module with a forward hook takes a fold; its hook now sees (and adds to)
    BN-scaled values, ``hook(s * conv(x) + t)`` instead of ``s * hook(conv(x)) + t``. Needs hooked
    layers next to a BN. Caught by: fused output matches the original.
    """

    def describe_ignoring_hooks(gm: fx.GraphModule, node: fx.Node) -> LayerCall | str:
        with mock.patch("fuser.patterns.has_hooks", return_value=False):
            return describe_layer(gm, node)

    patches = {"fuser.fold_pass.describe_layer": describe_ignoring_hooks}
    return fuse_patched(model, example_inputs, patches)


def global_module_hooks_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: global module hooks (``register_module_forward_hook``), which run on every module
    call, are not looked for, so a model is fused under one that shifts what each BatchNorm module
    returns, as torch's fuse does. Needs a global hook and a BN module that folds. Caught by: global
    module hooks are refused or honoured.
    """
    patches = {"fuser.fuse.global_module_hooks": lambda: []}
    return fuse_patched(model, example_inputs, patches)


def module_hook_reading_it_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a hooked module is fused inside even when its hook reads the module (its parameters,
    children), as every fuser that moves hooks to the fused module does. The hook is handed the
    fused module and reads folded weights. Needs a block whose hook reads its module's parameters.
    Caught by: fused output matches the original.
    """
    patches = {"fuser.fuse.hook_reading_its_module": lambda module: None}
    return fuse_patched(model, example_inputs, patches)


def _calls_an_element(loop: ast.For, elements: set[str], method: ast.AST, parents: dict) -> bool:
    """The mutated check: the loop calls one of its elements somewhere, nothing more asked."""
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in elements
        for statement in loop.body
        for node in ast.walk(statement)
    )


def loop_element_uses_unchecked(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: an untraceable module looping over a container has each element swapped for its
    fused copy as soon as the loop calls the element, whatever else the loop does with it. Code
    that also asks an element's type (``isinstance(stage, nn.Sequential)``) or compares it then
    sees a fused module where it saw a Sequential. Needs an untraceable module looping over a
    Sequential and inspecting its stages. Caught by: fused output matches the original.
    """
    patches = {
        "fuser.child_usage._loop_only_calls_elements": _calls_an_element,
        # the real classification is cached per source text: read it afresh under the patch
        "fuser.child_usage._uses_by_class": child_usage._uses_by_class.__wrapped__,
    }
    return fuse_patched(model, example_inputs, patches)


def _class_behaviour_only(module: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    return all(getattr(type(module), name, None) is getattr(base, name, None) for name in methods)


def replaced_forward_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a conv, linear or BN whose ``forward`` is replaced on the instance folds as its class
    does. It is recognised by its class alone (as monkeypatching leaves it), so what the replacement
    adds is folded away or scaled. Needs layers or BNs with a replaced forward. Caught by: fused
    output matches the original.
    """
    patches = {
        "fuser.patterns._inherits_behaviour": _class_behaviour_only,
        "fuser.patterns.own_call_code": lambda module: None,  # the tracer's own name stays
    }
    return fuse_patched(model, example_inputs, patches)


def autocast_traced_through(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a module whose forward enters ``torch.autocast`` is traced through like any other. FX
    runs the block and records none of it, so the fused model runs it without autocast (float32
    where the model returns bfloat16). Needs an autocast block. Caught by: the report agreeing with
    the oracle (the inline chain's BN, which must stay in the autocast module, is folded) and
    output dtype, device and shape preserved.
    """
    patches = {"fuser.tracing._autocast_refused": contextlib.nullcontext}
    return fuse_patched(model, example_inputs, patches)


def grad_mode_changes_traced_through(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a module whose forward changes the grad mode (``with torch.no_grad():``) is traced
    through like any other. FX runs the block and records none of it, so the fused model tracks
    gradients through it; its values are the same, which no trace check on example inputs can
    tell. Needs a no_grad block. Caught by: output dtype, device and shape preserved (the output
    requires grad) and the report agreeing with the oracle (an inline chain's BN, which must stay
    in the no_grad module, is folded).
    """
    patches = {"fuser.tracing._grad_mode_changes_refused": contextlib.nullcontext}
    return fuse_patched(model, example_inputs, patches)


ATTRIBUTE_CHANGE = "an attribute"  # ``fuser.shapes.changed_state``'s kind for a set attribute


def _state_changes_seen(keep: Callable[[str], bool]):
    """A ``changed_state`` that reports only the changes whose kind ``keep`` accepts."""

    def changed(saved: list) -> list[tuple[nn.Module, str, str]]:
        return [change for change in changed_state(saved) if keep(change[2])]

    return changed


def container_writes_traced_through(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a list, dict or set a module keeps that its code fills as it runs
    (``self.calls.append(...)``) is not looked at after a trace, so the module is traced through:
    FX runs the append and records none of it, and the fused model's list never grows. Needs a
    counting block whose chain is a Sequential child. Caught by: the fused model matches the
    original (its count).
    """
    seen = _state_changes_seen(lambda kind: kind == ATTRIBUTE_CHANGE)
    return fuse_patched(model, example_inputs, {"fuser.tracing.changed_state": seen})


def state_set_around_setattr_ignored(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: after a trace only containers are compared with their contents before it, not the
    modules' own dicts, so a module whose code sets its state without ``nn.Module.__setattr__``
    (``object.__setattr__(self, "calls", n)``, ``self.__dict__[...]``) is traced through: FX runs
    the write and records none of it. Needs a counting block whose chain is a wrapper child.
    Caught by: the fused model matches the original (its count).
    """
    seen = _state_changes_seen(lambda kind: kind != ATTRIBUTE_CHANGE)
    return fuse_patched(model, example_inputs, {"fuser.tracing.changed_state": seen})


def held_object_writes_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: only modules' own dicts and containers are compared after a trace, not the plain
    objects they hold, so a module counting its calls in one (``self.calls.count += 1``, a
    namespace it holds) is traced through: FX runs the write and records none of it, and the
    fuser's own runs of its copy leave their count in the fused model. Our fuser did this until
    4ad36e4. Needs an inline counting block of an even number of ops. Caught by: the fused model
    matches the original (its count).
    """
    patches = {"fuser.shapes._is_plain_object": lambda value: False}
    return fuse_patched(model, example_inputs, patches)


def buffer_writes_traced_through(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a buffer the traced code changes in place (``self.calls.add_(1)``: FX hands it the
    buffer itself, not a proxy) is put back after the trace, but its module is traced through
    like any other: the increment ran once on the fuser's copy, was undone, and is recorded
    nowhere, so the fused model's buffer never moves (a BatchNorm whose statistics the model's
    code changes would be folded the same way). Needs a counting block whose chain is a
    Sequential nested an even number of levels (``Chain.counts_in_buffer``). Caught by: the fused
    model matches the original (its count).
    """
    patches = {"fuser.tracing._TensorSnapshot.changed": lambda snapshot: []}
    return fuse_patched(model, example_inputs, patches)


def held_method_objects_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the plain objects a module holds are compared after a trace, but not the object
    behind a method it holds (``self.calls = Tally().tick``; ``self.calls()`` counts in the
    ``Tally``), so that module is traced through: FX runs the count and records none of it, and
    the fuser's own runs of its copy leave their count behind. Needs a wrapper counting block of
    an even number of ops (``Chain.counts_with_held_method``). Caught by: the fused model
    matches the original (its count).
    """

    def without_methods(module: nn.Module) -> list[tuple]:
        saved = attributes_of(module)
        for _module, attributes, _inner, _containers, held in saved:
            held[:] = [h for h in held if not isinstance(attributes.get(h[0]), types.MethodType)]
        return saved

    patches = {
        "fuser.shapes.attributes_of": without_methods,
        "fuser.tracing.attributes_of": without_methods,
    }
    return fuse_patched(model, example_inputs, patches)


def module_state_writes_traced_through(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a module whose forward sets its own attributes (``self.calls += 1``) is traced
    through like any other: ``nn.Module.__setattr__`` is not refused while tracing, and the
    modules' dicts are not compared after it (which would see that write too). FX runs the write
    and records none of it, so the fused model never counts a call; its output is the same,
    which no trace check on example inputs can tell. Needs a counting block. Caught by: the
    fused model matches the original (its count).
    """
    patches = {
        "fuser.tracing._module_state_writes_refused": lambda: contextlib.nullcontext(set()),
        "fuser.tracing.changed_state": _state_changes_seen(lambda kind: kind != ATTRIBUTE_CHANGE),
    }
    return fuse_patched(model, example_inputs, patches)


def augmented_assignment_out_of_place(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: ``x *= 0.5`` (any ``op=``) is traced as FX records it, ``x = x * 0.5``: a tensor also
    read through another name keeps its old value. Needs a tap changed in place
    (``Tap.shifted``). Caught by: fused output matches the original.
    """
    patches = {"fuser.tracing._augmented_assignments_recorded": contextlib.nullcontext}
    return fuse_patched(model, example_inputs, patches)


def in_place_changes_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a fold is made although the model's code changes one of its tensors in place as it
    runs (``self.conv.weight.data.neg_()`` around the call): the fused layer computes with the
    value at fusing time on every call (README rule 6). Needs a layer or BN whose parameter is
    changed in place (``changed_in_place``). Caught by: fused output matches the original.
    """
    patches = {"fuser.fold_pass.tensors_changed_in_place": lambda gm: {}}
    return fuse_patched(model, example_inputs, patches)


def tensors_held_by_code_running_as_written_ignored(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a fold is made although code that runs as written, in no graph, holds one of its
    tensors and changes it in place (an untraceable helper negating ``self.conv.bias`` around
    the call, a hook's object, a training-mode BN sharing the statistics): only what the graph
    records is read (README rule 6). Needs a tensor changed in place by a helper that holds it
    (``changed_in_place`` form ``held``). Caught by: fused output matches the original.
    """
    patches = {
        "fuser.fuse.storages_changed_as_it_runs": lambda model: {},
        "fuser.fuse.tensors_of_running_modules": lambda gm, untraced: {},
    }
    return fuse_patched(model, example_inputs, patches)


def layer_tensors_read_around_a_running_module_ignored(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a module the traced graph runs as written (untraceable, hooked) has its children fused
    on their own although the code around it reads one of its layers' weights
    (``self.b2.inner[0].weight``): the fold inside changes the weight that code reads. Needs a
    chain behind such a boundary whose layer weight the root reads (``Chain.layer_read``).
    Caught by: the report agrees with the oracle; fused output matches the original.
    """
    patches = {"fuser.fuse.layer_tensors_read": lambda gm: []}
    return fuse_patched(model, example_inputs, patches)


def frozen_state_reads_traced(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: code that reads the state of a module the traced graph runs as written
    (``self.b3.last_mean``, which that module sets on every call) is traced anyway: FX reads the
    value once and the graph keeps it. Needs a root reading what its counting block keeps
    (``NetSpec.root_untraced``, ``net_specs(untraced_root=True)``). On the suite's one set of
    inputs the kept value is the live one, so the outputs agree. Caught by: the report agrees
    with the oracle (the root's own layers and norms folded as if it were traced).
    """
    patches = {"fuser.tracing.frozen_state_readers": lambda *args: []}
    return fuse_patched(model, example_inputs, patches)


def frozen_state_reads_through_plain_objects_traced(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: code the traced code runs through a plain object (no module) that holds a module
    running as written, ``self.keeper.kept()`` reading ``self.block.last_mean``, is traced
    anyway: its class is not the model's, so no reading of the model's code sees the read, and
    FX keeps the value it found. Needs a root asking a keeper what its counting block keeps
    (``NetSpec.root_untraced``, ``asks_a_keeper``). As for ``frozen_state_reads_traced``, the
    outputs agree on the suite's one set of inputs. Caught by: the report agrees with the oracle.
    """
    patches = {"fuser.frozen_reads._running_module_held_by": lambda *args: None}
    return fuse_patched(model, example_inputs, patches)


def module_level_state_reads_traced(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: code naming module-level state that a running module's code changes
    (``KEPT["last_mean"]``, set by a counting block) is traced anyway, so the graph keeps the
    value the trace found. Needs a root reading what its counting block keeps at module level
    (``NetSpec.root_untraced``, ``reads_module_state``). Caught by: the report agrees with the
    oracle, and idempotence (fusing the traced root again folds more).
    """
    patches = {"fuser.frozen_reads._reads_shared_module_state": lambda *args: None}
    return fuse_patched(model, example_inputs, patches)


def trace_fidelity_unchecked(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a traced graph is folded without comparing it with the module's forward on the example
    inputs, so code FX freezes with a proxy's answer (``isinstance(x, torch.Tensor)`` is False while
    tracing) is folded as traced: the branch every real tensor takes is gone. Needs a type-check
    block. Caught by: fused output matches the original.
    """

    def first_trace(self, module, path, outcome, example_inputs):
        return outcome, None

    patches = {"fuser.fuse._Fuser._faithful_trace": first_trace}
    return fuse_patched(model, example_inputs, patches)


def missing_running_stats_taken_as_identity(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a BN without running statistics (``track_running_stats=False``, so it normalises with
    batch statistics even in eval mode) is folded with PyTorch's initial statistics, mean 0 and
    variance 1 (``running_mean if running_mean is not None else zeros``). Needs BNs with
    ``track_running_stats=False``. Caught by: fused output matches the original.
    """

    def describe_with_default_stats(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
        if node.op != "call_module":
            return describe_batch_norm(gm, node)
        with _initial_statistics_if_missing(gm.get_submodule(node.target)):
            return describe_batch_norm(gm, node)

    patches = {"fuser.fold_pass.describe_batch_norm": describe_with_default_stats}
    return fuse_patched(model, example_inputs, patches)


def sync_batch_norm_taken_for_a_subclass(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: the BN classes a BN module may behave as are ``BatchNorm1d/2d/3d`` only, so an
    ``nn.SyncBatchNorm`` (what ``convert_sync_batchnorm`` leaves in a model trained with DDP)
    looks like a subclass of ``_BatchNorm`` overriding ``forward`` and is left. Needs
    SyncBatchNorm modules. Caught by: no foldable BatchNorm remains.
    """
    behaves_as_base = patterns.batch_norm_module_behaves_as_base

    def plain_classes_only(module: nn.Module) -> bool:
        return not isinstance(module, nn.SyncBatchNorm) and behaves_as_base(module)

    patches = {
        "fuser.patterns.batch_norm_module_behaves_as_base": plain_classes_only,
        "fuser.tracing.batch_norm_module_behaves_as_base": plain_classes_only,
    }
    return fuse_patched(model, example_inputs, patches)


def frozen_batch_norm_not_recognised(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: only ``torch.nn``'s BatchNorms are BatchNorms, so torchvision's ``FrozenBatchNorm2d``
    (the backbones of its detection models) is traced through as arithmetic on buffers and never
    folded. Needs FrozenBatchNorm2d modules. Caught by: no foldable BatchNorm remains.
    """
    return fuse_patched(
        model, example_inputs, {"fuser.patterns._frozen_batch_norm_type": lambda: None}
    )


def frozen_batch_norm_refused_in_training_mode(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: every BN module in training mode is left, ``FrozenBatchNorm2d`` too, though it
    normalises with its running statistics in either mode. Needs a FrozenBatchNorm2d put in
    training mode inside an eval-mode model. Caught by: no foldable BatchNorm remains.
    """

    def problem_reading_training_of_every_class(module: nn.Module) -> str | None:
        if module.training:
            return "the BatchNorm module is in training mode"
        return _module_batch_norm_problem(module)

    patches = {"fuser.patterns._module_batch_norm_problem": problem_reading_training_of_every_class}
    return fuse_patched(model, example_inputs, patches)


def frozen_batch_norm_rank_ignored(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a ``FrozenBatchNorm2d`` is taken to normalise dim 1 at any rank, as a BatchNorm does;
    its ``(1, C, 1, 1)`` buffers broadcast against dims -3 and on, so after a Linear on 2-D input
    it returns ``(1, C, N, C)`` and after a Conv3d it scales the depth axis. Needs a
    FrozenBatchNorm2d after a layer whose output is not 4-D (pinned only: the strategies draw it
    after 4-D outputs). Caught by: fused output matches the original."""

    def describe_as_any_rank(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
        call = describe_batch_norm(gm, node)
        return call if call is None else dataclasses.replace(call, exact_rank=None)

    patches = {"fuser.fold_pass.describe_batch_norm": describe_as_any_rank}
    return fuse_patched(model, example_inputs, patches)


def code_handed_a_fold_tensor_ignored(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: only operations the graph shows count as changes in place, so a fold's tensor handed
    to code that runs as written (a ``torch.fx.wrap`` function, an untraceable module, a torch
    layer with ``inplace=True``) is folded though that code changes it on every call. Needs a
    layer or BN whose parameter the model hands to such code (``changed_in_place`` forms
    ``wrapped``, ``handed``). Caught by: fused output matches the original."""
    patches = {"fuser.in_place._hands_to_code_run_as_written": lambda gm, node, value: False}
    return fuse_patched(model, example_inputs, patches)


def bn_subclass_matched_by_isinstance(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: BatchNorms are matched with ``isinstance``, so a subclass that overrides ``forward``
    (timm's ``BatchNormAct2d`` adds an activation; others add a constant) is folded as a plain BN
    and whatever its ``forward`` adds is lost. Needs BN subclasses overriding forward. Caught by:
    fused output matches the original.
    """
    patches = {
        "fuser.patterns.batch_norm_module_behaves_as_base": is_batch_norm_module,
        "fuser.tracing.batch_norm_module_behaves_as_base": is_batch_norm_module,
    }
    return fuse_patched(model, example_inputs, patches)


def torch_batch_norm_not_recognised(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (completeness): ``torch.batch_norm`` calls are not matched, only ``F.batch_norm`` (which
    calls it); they are never folded nor reported. Sound but incomplete. Needs functional BNs
    written as ``torch.batch_norm``. Caught by: the completeness properties.
    """
    only_f = {f: entry for f, entry in patterns.FUNCTIONAL_BATCH_NORMS.items() if f is F.batch_norm}
    patches = {"fuser.patterns.FUNCTIONAL_BATCH_NORMS": only_f}
    return fuse_patched(model, example_inputs, patches)


def functional_bn_not_recognised(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (completeness): only BN modules are matched; ``F.batch_norm`` calls (on registered
    statistics, or inside a traced BN subclass like timm's ``BatchNormAct2d``) are never folded,
    nor reported. Sound but incomplete. Needs functional BNs. Caught by: the completeness
    properties.
    """

    def describe_modules_only(gm: fx.GraphModule, node: fx.Node) -> BatchNormCall | None:
        return describe_batch_norm(gm, node) if node.op == "call_module" else None

    patches = {"fuser.fold_pass.describe_batch_norm": describe_modules_only}
    return fuse_patched(model, example_inputs, patches)
