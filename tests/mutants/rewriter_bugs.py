"""Mutants in the rewriter: the right site, the right numbers, written to the wrong place.

These are the bugs of editing a shared, live object graph: writing into a module other call sites
still run, reading weights from a table made before the edits, losing a dtype on the way back.
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import torch
from torch import fx, nn

from fuser.fold_pass import _FoldPass, _Left
from fuser.graph_edit import fetch_attr, submodule
from fuser.patterns import BatchNormCall, LayerCall, describe_layer

from ._patching import Fused, fuse_patched

__all__ = [
    "chain_folds_only_first",
    "float16_overflow_unchecked",
    "float16_underflow_unchecked",
    "folded_weights_in_promoted_dtype",
    "folded_weights_left_float64",
    "functional_layer_new_bias_not_passed",
    "hooks_lost_on_copy",
    "hooks_lost_on_save",
    "in_place_activations_made_out_of_place",
    "layer_output_augmented_assignments_left_as_operators",
    "own_tensor_augmented_assignments_left_as_operators",
    "range_refusals_retried_once",
    "requires_grad_dropped",
    "shared_module_folded_in_place",
    "shared_parameter_scaled_in_place",
    "stale_parameter_table",
    "tied_weight_replaced_in_place",
]


def shared_module_folded_in_place(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a layer module called at two sites (or whose weight is also read by a functional call)
    is folded in place, so the other site runs with this site's BN folded in. The fold must go
    into a copy used by this site only (README rule 5). Needs a layer read twice. Caught by: fused
    output matches the original.
    """

    def module_of(self: _FoldPass, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    patches = {"fuser.fold_pass._FoldPass._exclusive_module": module_of}
    return fuse_patched(model, example_inputs, patches)


def shared_parameter_scaled_in_place(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a layer's weight is scaled where it lies whenever its module is called at this site
    only and no functional call reads the weight, without asking whether another module holds
    the same Parameter (``twin.weight = layer.weight``). ``copy.deepcopy`` keeps that Parameter
    one object, so the other layer runs with this site's BN folded into its weight. Needs two
    layer modules tied by their weight (``TwoCalls`` with ``second="twin"``). Caught by: fused
    output matches the original.
    """
    may_scale_in_place = _FoldPass._may_scale_in_place

    def asks_only_calls_and_reads(self: _FoldPass, layer: LayerCall, folded) -> bool:
        if layer.module_target is not None:
            module = submodule(self.gm, layer.module_target)
            calls = [
                node
                for node in self.graph.nodes
                if node.op == "call_module" and submodule(self.gm, node.target) is module
            ]
            reads = [
                node
                for node in self.graph.nodes
                if node.op == "get_attr" and fetch_attr(self.gm, node.target) is layer.weight
            ]
            if len(calls) == 1 and not reads:  # then every other condition, as the real one
                with mock.patch.object(self.usage, "only_this_call_reads", return_value=True):
                    return may_scale_in_place(self, layer, folded)
        return may_scale_in_place(self, layer, folded)

    patches = {"fuser.fold_pass._FoldPass._may_scale_in_place": asks_only_calls_and_reads}
    return fuse_patched(model, example_inputs, patches)


def tied_weight_replaced_in_place(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a functional layer's weight attribute is overwritten with the folded weight even when
    another node (the module that owns the weight) still reads it: tied weights must be copied.
    Needs ``F.conv*(x, self.conv.weight, ...)`` next to an unfolded call of ``self.conv``. Caught
    by: fused output matches the original.
    """
    replace_constant = _FoldPass._replace_constant

    def replace_in_place(self: _FoldPass, *args, **kwargs) -> None:
        # The real rewrite, with every tensor counted as read by this one call only.
        with mock.patch.object(self.usage, "count", return_value=1):
            replace_constant(self, *args, **kwargs)

    patches = {"fuser.fold_pass._FoldPass._replace_constant": replace_in_place}
    return fuse_patched(model, example_inputs, patches)


def functional_layer_new_bias_not_passed(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a functional layer called with ``bias=None`` gets a folded bias computed, but the call
    is never given it (only existing constants are replaced), so the BN's shift is lost. Needs
    ``F.conv*``/``F.linear`` without bias followed by a BN. Caught by: fused output matches the
    original.
    """
    replace_constant = _FoldPass._replace_constant

    def replace_existing_only(self: _FoldPass, layer: LayerCall, name: str, old_node, value):
        if old_node is not None:
            replace_constant(self, layer, name, old_node, value)

    patches = {"fuser.fold_pass._FoldPass._replace_constant": replace_existing_only}
    return fuse_patched(model, example_inputs, patches)


def stale_parameter_table(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (the seed tutorial's chain bug, in this fuser's shape): layer weights are read from
    ``dict(gm.named_parameters())`` built before the first rewrite, so the second fold into the
    same layer starts from the original weights and the first fold is lost. Needs two folds into
    one layer: ``conv -> bn -> bn``, ``bn -> bn -> conv``, or ``bn -> conv -> bn``. Caught by: fused
    output matches the original.
    """
    tables: dict[fx.GraphModule, dict[str, torch.Tensor]] = {}

    def describe_from_table(gm: fx.GraphModule, node: fx.Node) -> LayerCall | str:
        table = tables.setdefault(gm, dict(gm.named_parameters()))
        layer = describe_layer(gm, node)
        if isinstance(layer, str) or layer.module_target is None:
            return layer
        target = layer.module_target
        layer.weight = table.get(f"{target}.weight", layer.weight)
        layer.bias = table.get(f"{target}.bias", layer.bias)
        return layer

    patches = {"fuser.fold_pass.describe_layer": describe_from_table}
    return fuse_patched(model, example_inputs, patches)


def chain_folds_only_first(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (completeness): a layer that has taken one fold is marked done, as a one-pass
    ``(conv, bn)`` pattern matcher would, so in ``conv -> bn -> bn`` (or ``bn -> bn -> conv``) only
    one BN folds; README rule 4 says chains fold fully. Sound but incomplete. Needs BN chains.
    Caught by: the completeness properties.
    """
    fold_output_side = _FoldPass._fold_output_side
    fold_input_side = _FoldPass._fold_input_side
    done: set[fx.Node] = set()

    def once(fold, layer_node_of):
        def fold_once(self: _FoldPass, call: BatchNormCall, *args, **kwargs) -> str:
            layer_node = layer_node_of(call)
            if layer_node in done:
                raise _Left("the layer has already taken a fold")
            into = fold(self, call, *args, **kwargs)
            done.add(layer_node)
            return into

        return fold_once

    def consumer(call: BatchNormCall) -> Any:
        users = list(call.node.users)
        return users[0] if users else None

    patches = {
        "fuser.fold_pass._FoldPass._fold_output_side": once(fold_output_side, lambda c: c.input),
        "fuser.fold_pass._FoldPass._fold_input_side": once(fold_input_side, consumer),
    }
    return fuse_patched(model, example_inputs, patches)


def _tensor_like(
    value: torch.Tensor,
    like: torch.Tensor | None,
    reference: torch.Tensor,
    *,
    cast: bool = True,
    requires_grad: bool | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``graph_edit.tensor_like`` with the dtype cast or the requires_grad flag optionally lost,
    or another ``dtype`` than the template's."""
    template = like if like is not None else reference
    dtype = dtype or (template.dtype if cast else value.dtype)
    result = value.to(dtype=dtype, device=template.device)
    if isinstance(template, nn.Parameter):
        flag = template.requires_grad if requires_grad is None else requires_grad
        return nn.Parameter(result, requires_grad=flag)
    return result


def folded_weights_left_float64(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the folded weights, computed in float64, are never cast back to the layer's dtype, so a
    float32 model gets float64 parameters (and fails, or silently runs in float64). Needs float32
    (or float16/bfloat16) models. Caught by: output dtype preserved / fused output matches the
    original (a dtype mismatch raises in the conv).
    """

    def float64_product(weight, factor, dtype, **_):
        product = weight.detach().double() * factor
        return product, product

    def keep_float64(value, like, reference):
        return _tensor_like(value, like, reference, cast=False)

    patches = {
        "fuser.fold_pass.round_scaled": float64_product,
        "fuser.fold_pass.tensor_like": keep_float64,
    }
    return fuse_patched(model, example_inputs, patches)


def folded_weights_in_promoted_dtype(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: the folded weight and bias keep the dtype PyTorch promotes a product of the layer's
    and the BN's tensors to (``w * (gamma * torch.rsqrt(var + eps))``), never cast back to the
    layer's dtype: float32 for a half-precision layer next to a float32 BN, as mixed-precision
    training leaves a model (torch's own fuse casts back for this reason). Elsewhere that is
    the layer's dtype. Needs half-precision networks with float32 BNs. Caught by: fused output
    matches the original (the layer raises on half inputs with float32 parameters).
    """
    statistics_dtype: dict[str, torch.dtype] = {}
    real_scale_shift = _FoldPass._scale_shift  # read before the patch replaces it

    def scale_shift(call: BatchNormCall) -> tuple[torch.Tensor, torch.Tensor]:
        statistics_dtype["last fold"] = call.running_var.dtype
        return real_scale_shift(call)

    def promoted_like(value: torch.Tensor, like, reference: torch.Tensor) -> torch.Tensor:
        template = like if like is not None else reference
        dtype = torch.promote_types(template.dtype, statistics_dtype["last fold"])
        return _tensor_like(value, like, reference, dtype=dtype)

    patches = {
        "fuser.fold_pass._FoldPass._scale_shift": staticmethod(scale_shift),
        "fuser.fold_pass.tensor_like": promoted_like,
    }
    return fuse_patched(model, example_inputs, patches)


def requires_grad_dropped(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: folded parameters are created with ``requires_grad=False`` (as ``torch.no_grad()``
    habits suggest), so fine-tuning the fused model silently freezes every folded layer; the README
    promises ``requires_grad`` is kept. Caught by: a check that every parameter keeps its
    ``requires_grad`` (output values are unchanged).
    """

    def frozen(value, like, reference):
        return _tensor_like(value, like, reference, requires_grad=False)

    return fuse_patched(model, example_inputs, {"fuser.fold_pass.tensor_like": frozen})


def float16_overflow_unchecked(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: folded weights are cast to float16 without checking they fit (max 65504): a BN with a
    tiny running variance makes ``weight * gamma / sqrt(var + eps)`` overflow to inf. Needs float16
    models with small running variances. Caught by: fused output matches the original (inf/nan).
    """

    def finiteness_only(value: torch.Tensor, dtype: torch.dtype) -> str | None:
        return None if torch.isfinite(value).all() else "the folded weights are not finite"

    patches = {"fuser.fold_pass.overflow_reason": finiteness_only}
    return fuse_patched(model, example_inputs, patches)


def range_refusals_retried_once(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (ours until f3449d4): a fold refused for its values is retried once, on the output side
    and only for overflow, so a fold refused because another fold had scaled its layer down into
    float16's subnormals stays refused after a retried fold scales the layer back up, and fusing
    the fused model folds it (README rule 4: until nothing changes). Needs float16 chains of
    shrinking and amplifying BNs around a spiked layer. Caught by: idempotent.
    """

    def one_output_side_round(self: _FoldPass, calls: list[BatchNormCall], outcomes: dict) -> None:
        for call in calls:
            outcome = outcomes[call.node]
            if outcome.into is None and "overflow" in (outcome.reason or ""):
                retried = self._attempt(call, self._fold_output_side, "output")
                if retried.into is not None:
                    outcomes[call.node] = retried

    patches = {"fuser.fold_pass._FoldPass._retry_out_of_range": one_output_side_round}
    return fuse_patched(model, example_inputs, patches)


def float16_underflow_unchecked(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: folds are checked for overflow only: a BN that shrinks (scale 2**-12) folded into a
    layer makes a whole output channel's float16 weights subnormal (1e-7 keeps a bit or two), an
    error a later amplifying layer makes visible. Needs float16 networks with a shrinking BN
    whose output-side fold sinks a channel. Caught by: fused output matches the original.
    """

    def overflow_bound_only(weight: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype):
        w = weight.detach()
        if not w.numel() or not factor.numel():
            return False
        bound = (w.abs().max().double() * factor.abs().max()).item()
        return math.isfinite(bound) and bound <= torch.finfo(dtype).max

    patches = {
        "fuser.fold_pass.underflow_reason": lambda channel_largest, dtype: None,
        "fuser.fold_pass.product_fits": overflow_bound_only,
    }
    return fuse_patched(model, example_inputs, patches)


def own_tensor_augmented_assignments_left_as_operators(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: fused without example inputs, ``op=`` on the module's own tensors
    (``flipped = self.conv.weight.data; flipped *= -1``) keeps FX's ``operator.imul``, which runs
    in place but is saved as ``flipped *= -1`` code that ``torch.load`` traces again out of place:
    the loaded model no longer changes the weight. Needs an augmented in-place change
    (``changed_in_place``) in a network fused without example inputs (pinned:
    ``weight_negated_in_place_through_data_then_saved``). Caught by: survives copy and save.
    """
    patches = {"fuser.in_place._state_tensors": lambda gm: set()}
    return fuse_patched(model, example_inputs, patches)


def layer_output_augmented_assignments_left_as_operators(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: fused without example inputs, ``op=`` on what a torch layer returns (``y =
    self.fc(x); y += tap``) keeps FX's ``operator.iadd``, saved as ``y += tap`` and traced again
    by ``torch.load`` as ``y = y + tap``: under autocast a bfloat16 output plus a float32 tap
    becomes float32 once loaded. Needs an in-place tap on a layer's output in a network fused
    without example inputs (pinned: ``augmented_assignment_on_a_layer_output_under_autocast_
    without_inputs``). Caught by: survives copy and save.
    """
    patches = {"fuser.in_place._torch_tensor_results": lambda gm, state: set(state)}
    return fuse_patched(model, example_inputs, patches)


def in_place_activations_made_out_of_place(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: the rewrite loses ``inplace=True`` (as a fuser that rebuilds activation modules with
    their default arguments, or functionalizes the graph, does): every activation now returns a
    new tensor. Network needs: an in-place activation whose input is also read elsewhere, a
    tapped tensor or the network's own input. Caught by: the fused output matches the original
    (the tap reads the activated tensor no more), or the fused model changes its input otherwise
    than the original.
    """
    fused, report = fuse_patched(model, example_inputs, {})
    for module in fused.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.kwargs.get("inplace") is True:
                    node.kwargs = {**node.kwargs, "inplace": False}
            module.recompile()
    return fused, report


def hooks_lost_on_save(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the fused GraphModules pickle as FX's do: ``torch.load`` rebuilds each from its code
    with empty hook dicts, so a hooked container, whose forward hook the fuser moves onto its
    GraphModule, runs without it once the fused model is saved and loaded. Every output before
    saving is right. Network needs: a hooked container that is traced (``boundary="hooked"``).
    Caught by: the fused model survives copy and save.
    """
    fused, report = fuse_patched(model, example_inputs, {})
    for module in fused.modules():
        if isinstance(module, fx.GraphModule):  # each has a class of its own (FX makes one)
            type(module).__reduce__ = fx.GraphModule.__reduce__
    return fused, report


def hooks_lost_on_copy(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the fused GraphModules deep-copy as FX's do, which rebuilds each and keeps only its
    state-dict hooks, so ``copy.deepcopy`` of the fused model (an EMA copy, a copy before
    quantization) runs a hooked container without its forward hook. Network needs: a hooked
    container that is traced (``boundary="hooked"``). Caught by: the fused model survives copy
    and save.
    """
    fused, report = fuse_patched(model, example_inputs, {})
    for module in fused.modules():
        if isinstance(module, fx.GraphModule):  # each has a class of its own (FX makes one)
            type(module).__deepcopy__ = fx.GraphModule.__deepcopy__
    return fused, report
