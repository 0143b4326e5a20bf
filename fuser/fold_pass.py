"""The fold pass over one traced graph.

Two linear walks: forward, each BN folds on the output side into the layer that produced its input
(in order, so ``conv -> bn -> bn`` folds both); then backward over what is left, each BN folds on the
input side into its only consumer (in reverse, so ``bn -> bn -> conv`` folds both). Modules and
tensors are looked up live from the GraphModule after every edit, never from a table made before.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from .fold_math import (
    INPUT_SIDE_LAYERS,
    FoldedLayer,
    bn_scale_shift,
    copy_rounded,
    fold_into_input,
    fold_into_output,
    product_fits,
    product_in_one_block,
    round_scaled,
    scale_in_place,
)
from .graph_edit import (
    UsageCounts,
    delete_attr,
    module_objects,
    overflow_reason,
    referenced_objects,
    set_attr,
    tensor_like,
    underflow_reason,
    unique_path,
)
from .in_place import tensors_changed_in_place
from .patterns import (
    BatchNormCall,
    LayerCall,
    describe_batch_norm,
    describe_layer,
    fetch_attr,
    known_rank,
    label,
    normalized_args,
    passed_through,
    set_arg,
    submodule,
    value_users,
)
from .report import INPUT_SIDE, OUTPUT_SIDE, SiteReport
from .run_time_writes import who_may_change
from .sharing import storage_of


def _is_rank_guard(user: fx.Node, rank: int) -> bool:
    """Is ``user`` the ``dim`` read of a ``_guard_rank`` check for ``rank``?"""
    if user.op != "call_method" or user.target != "dim" or len(user.users) != 1:
        return False
    (same,) = user.users
    return (
        same.target is operator.eq
        and same.args == (user, rank)
        and any(check.target is torch._assert for check in same.users)
    )


class _Left(Exception):
    """A site that will not fold, with the reason as its message."""


def _out_of_range(reason: str | None) -> bool:
    """Whether a fold was refused for its values alone (``overflow_reason`` and
    ``underflow_reason``): values that other folds into the same layer change."""
    return reason is not None and ("overflow" in reason or "subnormal" in reason)


@dataclass
class _Outcome:
    into: str | None = None
    side: str | None = None
    reason: str | None = None


def fold_batch_norms(
    gm: fx.GraphModule,
    path: str = "",
    shared: frozenset[int] = frozenset(),
    private_storages: frozenset[int] = frozenset(),
    under_autocast: bool = False,
    changed_as_it_runs: dict[int, str] | None = None,
) -> list[SiteReport]:
    """Fold every foldable BN of ``gm`` in place; report every BN call site, in graph order.

    ``path`` is the qualified name of ``gm`` in the caller's model, prefixed to reported names.
    ``shared`` holds ids of modules and tensors also reachable from outside ``gm`` (the model
    holds them at several places, or they are the caller's): they are never changed in place.
    ``private_storages`` holds the data pointers of weight storages nothing else uses (see
    ``sharing.ModelParts.private_storages``): a layer read by one call only gets its folded weight
    written into them, instead of into a new tensor the size of the weight.
    ``under_autocast``: ``gm`` runs inside a module's ``torch.autocast`` region, where its layers
    return the autocast dtype whatever their weights' dtype.
    ``changed_as_it_runs``: the storages that code running as written (not in any graph: hooks,
    the untraced modules ``gm`` calls, training-mode layers) may change in place, with who may
    (see ``run_time_writes``); a fold reading one is left.
    """
    changed = changed_as_it_runs or {}
    return _FoldPass(gm, path, shared, private_storages, under_autocast, changed).run()


class _FoldPass:
    def __init__(
        self,
        gm: fx.GraphModule,
        path: str,
        shared: frozenset[int],
        private: frozenset[int],
        under_autocast: bool = False,
        changed_as_it_runs: dict[int, str] | None = None,
    ) -> None:
        self.gm = gm
        self.under_autocast = under_autocast
        self.graph = gm.graph
        self.path = path
        self.usage = UsageCounts(gm, shared)
        self.changed_in_place = tensors_changed_in_place(gm)  # read before any fold edits
        self.changed_as_it_runs = changed_as_it_runs or {}
        self.private_storages = private
        self.copied_from: dict[str, str] = {}  # copies' targets -> the caller's names
        self.rank_checked: dict[fx.Node, int] = {}  # BN call -> the rank its fold checks

    def run(self) -> list[SiteReport]:
        nodes = list(self.graph.nodes)
        calls: list[BatchNormCall] = []
        outcomes: dict[fx.Node, _Outcome] = {}
        for node in nodes:
            call = describe_batch_norm(self.gm, node)
            if call is None:
                continue
            calls.append(call)
            if call.not_foldable is not None:
                outcomes[node] = _Outcome(reason=call.not_foldable)
            else:
                outcomes[node] = self._attempt(call, self._fold_output_side, OUTPUT_SIDE)
        for call in reversed(calls):
            outcome = outcomes[call.node]
            if outcome.into is None and call.not_foldable is None:
                input_side = self._attempt(call, self._fold_input_side, INPUT_SIDE)
                if input_side.into is None:
                    input_side.reason = (
                        f"output side: {outcome.reason}; input side: {input_side.reason}"
                    )
                outcomes[call.node] = input_side
        self._retry_out_of_range(calls, outcomes)
        self.graph.lint()
        self.gm.recompile()
        return self._reports(calls, outcomes)

    def _retry_out_of_range(self, calls: list[BatchNormCall], outcomes: dict) -> None:
        """Rule 4, until nothing changes. A fold refused because its weights would leave the
        layer's dtype's range (overflow, or an output channel sunk below its normal numbers) may
        fit once other folds have scaled that layer up or down, and a retried fold that succeeds
        may in turn let another fit; so whole rounds of retries, each side in the order of
        preference, go on until one folds nothing. Stopping earlier would leave folds that the
        finished weights allow, and fusing the fused model again would make them."""
        folded_one = True
        while folded_one:
            folded_one = False
            for call in calls:
                outcome = outcomes[call.node]
                if outcome.into is not None or not _out_of_range(outcome.reason):
                    continue
                for fold, side in (
                    (self._fold_output_side, OUTPUT_SIDE),
                    (self._fold_input_side, INPUT_SIDE),
                ):
                    retried = self._attempt(call, fold, side)
                    if retried.into is not None:
                        outcomes[call.node] = retried
                        folded_one = True
                        break

    def _reports(self, calls: list[BatchNormCall], outcomes: dict) -> list[SiteReport]:
        seen: Counter[str] = Counter()
        reports = []
        for call in calls:
            name = self._qualify(call.name)
            outcome = outcomes[call.node]
            reports.append(
                SiteReport(
                    bn=name,
                    call_index=seen[name],
                    folded=outcome.into is not None,
                    into=outcome.into,
                    side=outcome.side,
                    reason=outcome.reason,
                    rank_checked=self.rank_checked.get(call.node) if outcome.into else None,
                )
            )
            seen[name] += 1
        return reports

    def _qualify(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    @staticmethod
    def _attempt(call: BatchNormCall, fold, side: str) -> _Outcome:
        try:
            return _Outcome(into=fold(call), side=side)
        except _Left as left:
            return _Outcome(reason=str(left))

    # --- matching -------------------------------------------------------------------------

    def _fold_output_side(self, call: BatchNormCall) -> str:
        producer, reader = call.input, call.node
        if producer is None:
            raise _Left("its input is not a graph value")
        # Back through calls that return their input as it is (nn.Identity, eval-mode dropout),
        # each read by nothing but the next: the BN's users then read the folded layer's output.
        while (inner := passed_through(self.gm, producer)) is not None:
            others = [label(user) for user in value_users(producer) if user is not reader]
            if others:
                raise _Left(
                    f"{label(producer)}, which it reads, is also read by {', '.join(others)}"
                )
            producer, reader = inner, producer
        layer = describe_layer(self.gm, producer)
        if isinstance(layer, str):
            raise _Left(f"its input is not a conv/linear output ({layer})")
        others = [label(user) for user in value_users(producer) if user is not reader]
        if others:
            raise _Left(f"the layer's output is also read by {', '.join(others)}")
        if layer.out_channels != call.channels:
            raise _Left(f"{layer.out_channels} layer channels vs {call.channels} BN channels")
        guarded = self._needs_rank_guard(layer, call, producer)
        if call.promotes:
            self._check_output_dtype_kept(layer, call)
        self._check_values(layer, call)
        scale, shift = self._scale_shift(call)
        folded = fold_into_output(
            layer.weight, layer.bias, scale, shift, layer=layer.kind, groups=layer.groups
        )
        into = self._write_layer(layer, folded)
        self._remove_batch_norm(call, replacement=call.input)
        if guarded:
            what = f"the output of layer {into!r}"
            self._guard_rank(producer, layer.batched_rank, producer.next, call, what)
        return into

    def _fold_input_side(self, call: BatchNormCall) -> str:
        users = value_users(call.node)
        if len(users) != 1:
            raise _Left(f"its output has {len(users)} value users, not one layer")
        consumer, value, through = users[0], call.node, []
        # On through calls that return their input as it is, to the one value user of each.
        while passed_through(self.gm, consumer) is value:
            users = value_users(consumer)
            if len(users) != 1:
                raise _Left(
                    f"{label(consumer)}'s output has {len(users)} value users, not one layer"
                )
            through.append(consumer)
            consumer, value = users[0], consumer
        layer = describe_layer(self.gm, consumer)
        if isinstance(layer, str):
            raise _Left(f"its output does not feed a conv/linear ({layer})")
        if layer.kind not in INPUT_SIDE_LAYERS:
            raise _Left("a transposed convolution takes no input-side fold")
        if not self._reads_only_as_input(layer, value):
            raise _Left(f"{label(consumer)} reads it other than as its input")
        if layer.zero_padded:
            raise _Left(
                f"{label(consumer)} zero-pads its input (the padding would not be normalised)"
            )
        if layer.in_channels != call.channels:
            raise _Left(f"{layer.in_channels} layer input channels vs {call.channels} BN channels")
        guarded = self._needs_rank_guard(layer, call, call.node)
        if any(node.op != "get_attr" for node in consumer.all_input_nodes if node is not value):
            raise _Left(f"{label(consumer)} reads other graph values, so it cannot move to the BN")
        self._check_values(layer, call)
        scale, shift = self._scale_shift(call)
        folded = fold_into_input(
            layer.weight, layer.bias, scale, shift, layer=layer.kind, groups=layer.groups
        )
        into = self._write_layer(layer, folded)
        self._move_to_just_after(call.node, [*through, consumer])
        self._remove_batch_norm(call, replacement=call.input)
        if guarded:
            what = f"the input of layer {into!r}"
            self._guard_rank(call.input, layer.batched_rank, consumer, call, what)
        return into

    @staticmethod
    def _move_to_just_after(anchor: fx.Node, nodes: list[fx.Node]) -> None:
        """Run the layer (the last of ``nodes``, after the calls it was looked through to, each
        reading the one before) where the BN ran, so it reads the BN's input before anything
        between them can change that tensor in place (``h = relu_(h)`` after ``y = bn(h)``).

        The layer's other inputs are constants read only by it, so they move along.
        """
        reads = anchor
        for node in nodes:
            reads.append(node)
            reads = node
        consumer = nodes[-1]
        value = nodes[-2] if len(nodes) > 1 else anchor
        for constant in consumer.all_input_nodes:
            if constant is not value:
                consumer.prepend(constant)

    @staticmethod
    def _reads_only_as_input(layer: LayerCall, value: fx.Node) -> bool:
        node = layer.node
        if layer.module_target is not None:
            return node.args == (value,) and not node.kwargs
        args = normalized_args(node, layer.arg_names, {})
        others = [v for name, v in args.items() if name != "input"]
        return args.get("input") is value and value not in others

    def _check_values(self, layer: LayerCall, call: BatchNormCall) -> None:
        """The fold computes with the tensors' values once: the model's code must not change
        them as it runs (``in_place``), and they must have values, on one device."""
        named = {
            "the layer's weight": layer.weight,
            "the layer's bias": layer.bias,
            "the BN's running mean": call.running_mean,
            "the BN's running variance": call.running_var,
            "the BN's weight": call.weight,
            "the BN's bias": call.bias,
        }
        for what, tensor in named.items():
            change = self.changed_in_place.get(id(tensor)) if tensor is not None else None
            if change is not None:
                raise _Left(
                    f"the model's code changes {what} in place as it runs ({change}); a fold "
                    "would compute with its value at fusing time on every call"
                )
            writer = self._changed_as_it_runs(tensor)
            if writer is not None:
                raise _Left(
                    f"code that runs as written may change {what} in place ({writer} holds it); "
                    "a fold would compute with its value at fusing time on every call"
                )
        devices = {t.device for t in named.values() if t is not None}
        if any(device.type == "meta" for device in devices):
            raise _Left(
                "its tensors are on the meta device, which holds no values: the folded weights "
                "could not be computed or proven to fit (load the weights, then fuse)"
            )
        if len(devices) > 1:
            names = ", ".join(sorted(str(device) for device in devices))
            raise _Left(f"the layer's and the BN's tensors are on different devices ({names})")

    def _check_output_dtype_kept(self, layer: LayerCall, call: BatchNormCall) -> None:
        """Rule 6 for a BN whose output takes the dtype its buffers promote its input to
        (``BatchNormCall.promotes``): folded into the layer, its output is the layer's, so the
        fold is left where the two dtypes may differ. They do when the buffers are of a wider
        dtype than the layer's weight (float32 buffers after a bfloat16 conv return float32), and
        inside an autocast region, where the layer returns the autocast dtype."""
        buffers = [call.running_mean, call.running_var, call.weight, call.bias]
        kept = layer.weight.dtype
        for tensor in buffers:
            if tensor is not None:
                kept = torch.promote_types(kept, tensor.dtype)
        if kept != layer.weight.dtype:
            raise _Left(
                f"its {kept} buffers turn the layer's {layer.weight.dtype} output into {kept}; "
                f"folded into the layer, the output would stay {layer.weight.dtype}"
            )
        if self.under_autocast:
            raise _Left(
                "inside a torch.autocast region the layer returns the autocast dtype, which its "
                "buffers turn into theirs; folded into the layer, the output would keep it"
            )

    @staticmethod
    def _needs_rank_guard(layer: LayerCall, call: BatchNormCall, value: fx.Node) -> bool:
        """BN normalises dimension 1: it must be the layer's channel (or feature) dimension.

        The fold is left where shape propagation shows it is not, where the BN refuses the
        layer's batched rank (a BatchNorm2d after a Conv3d runs only on its unbatched output), or
        where the BN normalises dim 1 at another rank only (``BatchNormCall.exact_rank``: a
        FrozenBatchNorm2d after a Linear broadcasts its (N, C) output to (1, C, N, C)).
        True when the fold stays exact only while the layer runs batched because the BN also
        runs on another rank the layer can take: a Conv1d's unbatched ``(C, L)`` output reaches a
        BatchNorm1d as ``(N, C)`` and is normalised along L, and a functional batch norm takes any
        rank. The fused graph then checks the rank on every call (``_guard_rank``)."""
        rank, batched = known_rank(value), layer.batched_rank
        if layer.kind == "linear":
            if rank is None:
                raise _Left("a Linear folds only when its input is proven 2-D: pass example_inputs")
            if rank != 2:
                raise _Left(f"the Linear runs on a {rank}-D tensor; BN normalises another axis")
        elif rank is not None and rank != batched:
            raise _Left(f"the convolution runs unbatched ({rank}-D), so channels are not dim 1")
        if call.exact_rank is not None and batched != call.exact_rank:
            raise _Left(
                f"the BN normalises dim 1 only on {call.exact_rank}-D input, and the layer's "
                f"batched one is {batched}-D"
            )
        accepted = call.accepted_ranks
        if accepted is None:
            return True
        if batched not in accepted:
            ranks = " or ".join(f"{r}-D" for r in sorted(accepted))
            raise _Left(
                f"the BN takes only {ranks} input and the layer's batched one is {batched}-D: "
                "it runs on unbatched input, whose dim 1 is not the channel axis"
            )
        if layer.kind == "linear":  # a Linear runs on any rank
            return any(r != batched for r in accepted)
        return batched - 1 in accepted  # a convolution runs batched or unbatched

    def _guard_rank(
        self, value: fx.Node, rank: int, before: fx.Node, call: BatchNormCall, what: str
    ) -> None:
        """Make the fused graph raise, before ``before`` runs, when ``value`` (``what``: the
        folded layer's input or output) is not ``rank``-D: the fold of ``call`` is exact only at
        that rank (``_needs_rank_guard``), and an error is better than a wrong result. Three
        cheap nodes (``dim``, ``==``, ``torch._assert``), a metadata read that no fold counts as
        a use of the value; one check per value and rank."""
        self.rank_checked[call.node] = rank
        if any(_is_rank_guard(user, rank) for user in value.users):
            return
        message = (
            f"fused model: BatchNorm {self._qualify(call.name)} was folded on the assumption "
            f"that {what} is {rank}-D, with its channels on dim 1; this call makes it another "
            "rank (an unbatched input?), where the BatchNorm would normalise another axis. "
            "Fuse with example_inputs of the rank you call it with to keep that BatchNorm."
        )
        with self.graph.inserting_before(before):
            dims = self.graph.call_method("dim", (value,))
            same = self.graph.call_function(operator.eq, (dims, rank))
            self.graph.call_function(torch._assert, (same, message))

    @staticmethod
    def _scale_shift(call: BatchNormCall) -> tuple[torch.Tensor, torch.Tensor]:
        return bn_scale_shift(call.running_mean, call.running_var, call.eps, call.weight, call.bias)

    # --- rewriting ------------------------------------------------------------------------

    def _write_layer(self, layer: LayerCall, folded: FoldedLayer) -> str:
        """Give the layer call its folded weights; returns the layer's name in the caller's model
        (its module, or a functional layer's weight), even when the fold went into a copy.

        The weight is the float64 product rounded once to the layer's dtype; the fold is left
        when that product or the bias does not fit the dtype."""
        dtype = layer.weight.dtype
        if self._may_scale_in_place(layer, folded) and self._scaled_in_place(layer, folded):
            new_weight = layer.weight
        else:
            weight, channel_largest = round_scaled(
                folded.weight, folded.factor, dtype, layer=layer.kind, groups=layer.groups
            )
            reason = (
                overflow_reason(channel_largest, dtype)
                or overflow_reason(folded.bias, dtype)
                or underflow_reason(channel_largest, dtype)
            )
            if reason is not None:
                raise _Left(reason)
            new_weight = tensor_like(weight, layer.weight, layer.weight)
        new_bias = tensor_like(folded.bias, layer.bias, layer.weight)
        if layer.module_target is not None:
            module = self._exclusive_module(layer.node)
            old = module_objects(module)
            module.weight, module.bias = new_weight, new_bias
            self.usage.release(old)
            self.usage.add(module_objects(module))
            return self._qualify(self._original_name(layer.module_target))
        self._replace_constant(layer, "weight", layer.weight_node, new_weight)
        self._replace_constant(layer, "bias", layer.bias_node, new_bias)
        return self._qualify(self._original_name(layer.weight_node.target))

    def _may_scale_in_place(self, layer: LayerCall, folded: FoldedLayer) -> bool:
        """May the folded weight overwrite the layer's weight? Only a module's own parameter,
        whose storage nothing else uses, in a module only this call reads, and only when the
        fold is certain to succeed: the bias fits (the product is checked by
        ``_scaled_in_place``)."""
        weight = layer.weight
        if layer.module_target is None or type(weight) is not torch.nn.Parameter:
            return False
        if layer.kind == "conv_transpose":  # product_fits reads rows; its outputs are columns
            return False
        if folded.weight is not weight or not weight.numel():
            return False
        if storage_of(weight) not in self.private_storages:
            return False
        module = submodule(self.gm, layer.module_target)
        if module.weight is not weight or not self.usage.only_this_call_reads(module):
            return False
        return overflow_reason(folded.bias, weight.dtype) is None

    @staticmethod
    def _scaled_in_place(layer: LayerCall, folded: FoldedLayer) -> bool:
        """Overwrite the layer's weight with the folded one when the product fits its dtype;
        False, the weight untouched, when it does not or is not proven to (the copying path
        then decides, with the reason). A weight of one rounding block is checked on its exact
        product, by the same rules as a copied one; a larger one by ``product_fits``' bound,
        which never holds the product whole."""
        weight, dtype = layer.weight, layer.weight.dtype
        one_block = product_in_one_block(weight, folded.factor)
        if one_block is None:
            if not product_fits(weight, folded.factor, dtype):
                return False
            scale_in_place(weight, folded.factor)
            return True
        product, channel_largest = one_block
        if overflow_reason(channel_largest, dtype) or underflow_reason(channel_largest, dtype):
            return False
        copy_rounded(weight, product)
        return True

    def _changed_as_it_runs(self, tensor: torch.Tensor | None) -> str | None:
        if tensor is None or not self.changed_as_it_runs:
            return None
        return who_may_change(self.changed_as_it_runs, tensor)

    def _original_name(self, target: str) -> str:
        return self.copied_from.get(target, target)

    def _exclusive_module(self, node: fx.Node):
        """The module this call runs, copied first if anything else reads it."""
        module = submodule(self.gm, node.target)
        if self.usage.only_this_call_reads(module):
            return module
        duplicate = copy.deepcopy(module)
        if any(self.usage.is_shared(part) for part in module_objects(duplicate)):
            raise _Left(
                f"{type(module).__name__}'s __deepcopy__ does not copy it (the copy keeps parts "
                "held elsewhere or by the caller), so it cannot be changed for this call alone"
            )
        new_target = unique_path(self.gm, f"{node.target}_folded")
        self.gm.add_submodule(new_target, duplicate)
        self.copied_from[new_target] = self._original_name(node.target)
        self.usage.release(module_objects(module))
        self.usage.add(module_objects(duplicate))
        old_target, node.target = node.target, new_target
        if self.usage.read_by_no_node(module):  # copied only because it is held elsewhere too
            delete_attr(self.gm, old_target)
        else:  # its tensors still read (``self.conv.weight`` elsewhere in ``forward``)
            self._keep_only_what_is_read(old_target, module)
        return duplicate

    def _replace_constant(self, layer: LayerCall, name: str, old_node, value: torch.Tensor) -> None:
        """Point a functional layer's ``name`` argument at ``value``, in place when it may."""
        if old_node is not None:
            old = fetch_attr(self.gm, old_node.target)
            if self.usage.count(old) == 1 and len(old_node.users) == 1:
                set_attr(self.gm, old_node.target, value)
                self.usage.release([old])
                self.usage.add([value])
                return
        base = old_node.target if old_node is not None else f"{layer.weight_node.target}_bias"
        new_path = unique_path(self.gm, f"{base}_folded".replace(".", "_"))
        if old_node is not None:
            self.copied_from[new_path] = self._original_name(old_node.target)
        if isinstance(value, torch.nn.Parameter):
            self.gm.register_parameter(new_path, value)
        else:
            self.gm.register_buffer(new_path, value)
        with self.graph.inserting_before(layer.node):
            new_node = self.graph.get_attr(new_path)
        self.usage.add([value])
        set_arg(layer.node, layer.arg_names, name, new_node)
        if old_node is not None and not old_node.users:
            self._erase_constant(old_node)

    def _remove_batch_norm(self, call: BatchNormCall, replacement: fx.Node) -> None:
        node = call.node
        inputs = node.all_input_nodes
        released = referenced_objects(self.gm, node)
        node.replace_all_uses_with(replacement)
        self.graph.erase_node(node)
        self.usage.release(released)
        if call.module_target is not None:
            module = submodule(self.gm, call.module_target)
            if self.usage.read_by_no_node(module):
                delete_attr(self.gm, call.module_target)
            else:  # still called, or its tensors still read
                self._keep_only_what_is_read(call.module_target, module)
        for constant in inputs:
            if constant.op == "get_attr" and not constant.users:
                self._erase_constant(constant)

    def _keep_only_what_is_read(self, target: str, module: nn.Module) -> None:
        """A folded BN module no node calls any more, or a layer module whose call now runs a
        folded copy, whose tensors the code still reads (``self.bn.weight`` elsewhere in
        ``forward``), is swapped for a plain module holding just those tensors under the same
        names: its other tensors would stay behind unused. One a node still calls, or a module a
        node calls still holds, has more references than its attribute readers, and stays
        whole."""
        prefix = f"{target}."
        readers = [
            n for n in self.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)
        ]
        if self.usage.references(module) != len(readers):
            return  # also reached otherwise (inside a module a node calls): kept whole
        names = sorted({n.target[len(prefix) :] for n in readers})
        if module._modules or any("." in name for name in names):
            return  # read through a submodule: kept whole
        values = [getattr(module, name) for name in names]
        if not all(isinstance(value, torch.Tensor) for value in values):
            return
        holder = nn.Module()
        for name, value in zip(names, values, strict=True):
            if isinstance(value, nn.Parameter):
                holder.register_parameter(name, value)
            else:
                persistent = name not in module._non_persistent_buffers_set
                holder.register_buffer(name, value, persistent=persistent)
        set_attr(self.gm, target, holder)
        for _ in readers:  # each reader counted the module as the owner on its path
            self.usage.release([module])
            self.usage.add([holder])

    def _erase_constant(self, node: fx.Node) -> None:
        value = fetch_attr(self.gm, node.target)
        released = referenced_objects(self.gm, node)  # the tensor and the modules on its path
        self.graph.erase_node(node)
        self.usage.release(released)
        if self.usage.read_by_no_node(value):
            delete_attr(self.gm, node.target)
