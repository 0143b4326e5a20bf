"""Mutants in the bookkeeping: the folds are right, but what the fuser hands back is not.

The returned model, the caller's model and the report are all part of the contract: a fuser that
edits the caller's model, leaves dead BatchNorm calls in the graph, or reports sites wrongly is
broken even when some output is numerically right.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

from torch import fx, nn

from fuser.copying import _copy
from fuser.fold_pass import _FoldPass, fold_batch_norms
from fuser.fuse import _deep_copy, _fuse_with_report
from fuser.patterns import BatchNormCall
from fuser.report import OUTPUT_SIDE, SiteReport

from ._patching import Fused, fuse_patched

__all__ = [
    "buffers_changed_while_tracing_kept",
    "dead_batch_norm_left_in_graph",
    "example_inputs_changed",
    "folded_constants_left_behind",
    "fuser_runs_counted_in_module_state",
    "graph_module_fused_in_place",
    "inference_mode_leaks_into_fused_model",
    "input_model_mutated",
    "parameters_shared_with_caller",
    "recompile_forgotten",
    "report_call_index_always_zero",
    "report_input_side_as_output_side",
    "report_lists_only_folded_sites",
    "report_path_prefix_dropped",
]


def input_model_mutated(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the caller's model is traced and folded without a deep copy; ``fx.GraphModule`` shares
    the caller's submodules, so the caller's convs get the folded weights (and the caller's model,
    still running its BNs, now applies every folded BN twice). Caught by: the input model is
    untouched.
    """
    patches = {"fuser.fuse.deep_copy": lambda module: module}
    return fuse_patched(model, example_inputs, patches)


def buffers_changed_while_tracing_kept(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: a module whose code changes a buffer in place (``self.calls.add_(1)``) is rightly
    left untraced, but the change the trace ran on the fuser's copy is not put back, so the
    fused model starts with the trace's run counted (and a BatchNorm whose statistics the
    model's code changes would start from statistics the caller's model does not have). Needs a
    counting block whose chain is a Sequential nested an even number of levels
    (``Chain.counts_in_buffer``). Caught by: the fused model matches the original (its count
    right after fusing).
    """
    patches = {"fuser.tracing._TensorSnapshot.restore": lambda snapshot: None}
    return fuse_patched(model, example_inputs, patches)


def fuser_runs_counted_in_module_state(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: the fuser's own runs of its working copy on the example inputs (recording what each
    submodule is called with, shape propagation, the trace check) put back buffers and the RNG
    but not the modules' attributes, so a module counting its calls (or keeping its last
    features) starts the fused model with the fuser's runs counted. Needs a counting block and
    example inputs. Caught by: the fused model matches the original (its count right after
    fusing).
    """
    patches = {"fuser.shapes.restore_attributes": lambda saved: None}
    return fuse_patched(model, example_inputs, patches)


def inference_mode_leaks_into_fused_model(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug: the fuser works in whatever autograd mode its caller is in, so a model fused inside
    ``torch.inference_mode()`` gets inference tensors (the working copy and every folded weight),
    which autograd refuses, and which cannot be changed in place outside inference mode: the
    fused model raises where the original runs with gradients (as torch's fuse does), or holds a
    BatchNorm left in training mode, whose running statistics it updates in place. Needs a network
    fused inside inference mode. Caught by: output signature preserved, or the first property that
    runs such a fused model.
    """
    return _fuse_with_report(model, example_inputs)  # the real fuser, without leaving the mode


def parameters_shared_with_caller(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: to save the time and memory of copying every weight, the working copy keeps the
    caller's parameters (a deep copy in which each parameter stands for itself), trusting that no
    fold writes into a tensor the caller holds; and none does: folds into shared tensors go into
    new ones. The caller's model stays bitwise as it was and every output is right, but the fused
    model's unfolded layers hold the caller's tensors, so a ``load_state_dict`` or an optimizer
    step on the fused model changes the caller's. Caught by: the input model is untouched (the
    fused model shares no memory with it).
    """

    def copy_keeping_parameters(module: nn.Module) -> nn.Module:
        return _copy(module, {id(parameter): parameter for parameter in module.parameters()})

    return fuse_patched(model, example_inputs, {"fuser.fuse.deep_copy": copy_keeping_parameters})


def graph_module_fused_in_place(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: a model that is already a ``GraphModule`` (a fused model fused again, or one its
    author traced) is taken to be the fuser's own and worked on without a copy: whatever the
    fuse changes is changed in the caller's GraphModule, and what it returns holds the caller's
    tensors. Every output is right, and
    the strategies' networks are never GraphModules, so the caller's model the suite checks is
    untouched. Caught by: idempotent (fusing the fused model again must leave it untouched).
    """

    def copy_unless_graph_module(module: nn.Module) -> nn.Module:
        return module if isinstance(module, fx.GraphModule) else _deep_copy(module)

    return fuse_patched(model, example_inputs, {"fuser.fuse._deep_copy": copy_unless_graph_module})


def example_inputs_changed(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the fuser runs the model (the faithful-trace check, shape propagation, recording
    children's inputs) on the caller's example inputs themselves, not on copies: a network that
    changes its input in place changes the caller's tensors while it is fused. Output values are
    right. Network needs: an in-place activation before anything that makes a new tensor, with
    example inputs. Caught by: the input model is untouched (its example inputs too), and often
    first by the completeness properties: our faithful-trace check then runs the graph on inputs
    the model's own run changed, finds that they differ, and leaves the model untraced.
    """
    unchanged = {"fuser.shapes.copy_inputs": tuple, "fuser.fidelity.copy_inputs": tuple}
    return fuse_patched(model, example_inputs, unchanged)


def dead_batch_norm_left_in_graph(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (completeness): a folded BN's users are rerouted to the layer output
    (``replace_all_uses_with``) but the BN node is never erased, so the BN still runs on every
    forward (its result unused) while the report says folded. Output values are right. Caught by:
    the completeness properties (a BatchNorm call is left for a foldable site).
    """

    def reroute_only(self: _FoldPass, call: BatchNormCall, replacement: fx.Node) -> None:
        call.node.replace_all_uses_with(replacement)

    patches = {"fuser.fold_pass._FoldPass._remove_batch_norm": reroute_only}
    return fuse_patched(model, example_inputs, patches)


def folded_constants_left_behind(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: constants a fold no longer needs are never erased: a functional layer's old weight
    and bias when the folded ones go under new names, a functional BN's statistics and affine
    parameters. Their ``get_attr`` nodes stay in the graph with no users, and the tensors stay in
    the fused model (its ``state_dict`` and its memory). Output values are right. Network needs: a
    functional BN folded, or a functional layer whose weight is also read elsewhere. Caught by:
    the fused model keeps no dead state.
    """
    patches = {"fuser.fold_pass._FoldPass._erase_constant": lambda self, node: None}
    return fuse_patched(model, example_inputs, patches)


def recompile_forgotten(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug: the graph is edited but ``gm.recompile()`` is never called, so the GraphModule keeps the
    ``forward`` generated for the graph as traced, which still calls the deleted BN modules (or,
    where a BN survived, applies it on top of already-folded weights). Caught by: fused output
    matches the original (the fused model raises or is wrong).

    (Our tracer leaves code generation to the fold pass, so the mutant first generates the code
    FX's own GraphModule constructor would have: that is the stale ``forward`` it keeps.)
    """

    def fold_without_recompile(gm, *args, **kwargs):
        gm.recompile()  # the traced graph's code, as fx.GraphModule(root, graph) generates it
        with mock.patch.object(fx.GraphModule, "recompile", lambda self: None):
            return fold_batch_norms(gm, *args, **kwargs)

    return fuse_patched(
        model, example_inputs, {"fuser.fuse.fold_batch_norms": fold_without_recompile}
    )


def report_input_side_as_output_side(
    model: nn.Module, example_inputs: tuple | None = None
) -> Fused:
    """Bug (report): every fold is reported as an output-side fold (a copy-pasted side constant).
    The fused model is right. Caught by: the report agrees with the oracle (side of each fold).
    """
    return fuse_patched(model, example_inputs, {"fuser.fold_pass.INPUT_SIDE": OUTPUT_SIDE})


def report_lists_only_folded_sites(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (report): a graph's report keeps only the sites it folded (a report read as "what was
    done"), so a BN that was left has no entry and no reason: the user who asks why it still runs
    learns nothing. The fused model is right. Caught by: the report agrees with the oracle (every
    BN call the oracle lists has an entry, unless it runs where no fuser can see it).
    """
    reports = _FoldPass._reports

    def folded_only(self: _FoldPass, calls, outcomes) -> list[SiteReport]:
        return [site for site in reports(self, calls, outcomes) if site.folded]

    return fuse_patched(model, example_inputs, {"fuser.fold_pass._FoldPass._reports": folded_only})


def report_call_index_always_zero(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (report): sites are numbered per graph node rather than per BN (the count of a BN's
    calls is never advanced when the report's sites are numbered), so a BN module called twice
    reports two sites both named ``(bn, call_index=0)`` and its second call cannot be looked up.
    The fused model is right. Needs a BN called at two sites. Caught by: the report agrees with
    the oracle.
    """

    def numbered_per_node(sites: list[SiteReport]) -> list[SiteReport]:
        return [dataclasses.replace(site, call_index=0) for site in sites]

    patches = {"fuser.fuse._numbered_across_graphs": numbered_per_node}
    return fuse_patched(model, example_inputs, patches)


def report_path_prefix_dropped(model: nn.Module, example_inputs: tuple | None = None) -> Fused:
    """Bug (report): sites inside a submodule fused on its own (the children of an untraceable or
    hooked module) are named relative to that submodule (``bn1``) instead of the caller's model
    (``layer1.0.bn1``). The fused model is right. Needs BNs inside a module the fuser must enter
    separately. Caught by: the report agrees with the oracle (site names).
    """

    def fold_unqualified(gm: fx.GraphModule, path: str = "", *args, **kwargs):
        return fold_batch_norms(gm, "", *args, **kwargs)

    return fuse_patched(model, example_inputs, {"fuser.fuse.fold_batch_norms": fold_unqualified})
