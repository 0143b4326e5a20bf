"""The oracle: which BatchNorm call sites of a spec are foldable, read from the spec alone.

It implements the README's foldability definition independently of ``fuser/`` (which it never
imports), so a matcher bug cannot hide by agreeing with the test. The spec is lowered to a small
dataflow graph (layers, norms, other value readers, metadata-only readers, the output), then the
rules are applied until nothing changes: output-side folds first, input-side folds on what is left
(README rules 2-4). Sharing (rule 5) never blocks a fold, so the graph does not model it.

Rule 6's overflow clause is decided from the spec too: in a float16 network, an amplifying BN
(``Norm.gain``) folded on the output side into the spiked layer before it would put at least
81920 into that layer's weight, so it is left, unless the shrinking BN before that layer has
folded into it on the input side (then the weight is scaled by 2**-12 first, and rule 4's
"until nothing changes" folds it after all). The strategies draw an amplifying BN only right
after a spiked layer and before an activation, so that is the only fold it could take; every
other drawn fold stays far below float16's 65504 unless the network's own values overflow (those
networks are rejected), but a fold in float16 is not otherwise predicted, and the completeness
properties leave float16 out. Nor is rule 6's subnormal clause: whether a shrinking BN folded on
the output side would leave an output channel's weights all below float16's normal range depends
on the drawn values, not only on the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from strategies.naming import chain_names, site_name, staircase, two_calls_names
from strategies.spec import (
    ADD,
    AMPLIFYING,
    AUTOCAST,
    CAT,
    CONV,
    COUNTS_CALLS,
    FORWARD_HOOK,
    FORWARD_PRE_HOOK,
    FROZEN,
    FUNCTIONAL,
    GUARDED,
    HOOK_READS_MODULE,
    INLINE,
    LINEAR,
    LOOP_INSPECTS,
    METADATA_TAPS,
    MODULE,
    OPAQUE_SUBCLASS,
    PARAMETRIZED,
    REPLACED_FORWARD,
    ROOT_READS_STATE,
    SHRINKING,
    TRACED_SUBCLASS,
    TRAINING,
    TWIN,
    WRAPPER,
    Act,
    Chain,
    Layer,
    NetSpec,
    Norm,
    Op,
    TwoCalls,
    twin_of,
)

OUTPUT_SIDE = "output"
INPUT_SIDE = "input"
OVERFLOW = "the folded weights would overflow float16"


@dataclass(frozen=True)
class Site:
    """One BatchNorm call site and the oracle's verdict on it.

    ``bn`` and ``call_index`` follow ``fuser/report.py``; ``bn`` is ``None`` for a functional call
    without running statistics (the report names those by graph node). ``into`` names the layer
    it folds into (its module, or the weight tensor of a functional layer). ``seen`` is False for
    a call no fuser can report: in code that runs as written, where only modules are known, a
    call that is not a BatchNorm module's (a functional call, or a subclass's own forward), or a
    module's second call (``_is_module_call``).
    """

    bn: str | None
    call_index: int
    foldable: bool
    side: str | None
    into: str | None
    reason: str
    seen: bool = True

    def describe(self) -> str:
        name = self.bn or "<functional batch_norm without running stats>"
        site = f"{name} (call {self.call_index})"
        if self.foldable:
            return f"{site}: foldable into {self.into} ({self.side} side)"
        return f"{site}: not foldable ({self.reason})"


@dataclass(eq=False)
class _Node:
    """A value in the lowered graph. ``kind``: input, layer, norm, value (any other op reading
    values), metadata (reads only shape facts) or output."""

    kind: str
    inputs: list[_Node] = field(default_factory=list)
    layer: Layer | None = None
    layer_name: str | None = None
    norm: Norm | None = None
    bn: str | None = None
    call_index: int = 0
    candidate_reason: str | None = None
    folded_side: str | None = None
    folded_into: str | None = None
    shrunk: bool = False  # a layer that took a shrinking BN's input-side fold
    under_autocast: bool = False  # run inside a module's torch.autocast region
    seen: bool = True  # see Site.seen


class _Graph:
    """The lowered spec: nodes in execution order."""

    def __init__(self, dtype: str = "float32", ranks_proven: bool = True) -> None:
        self.dtype = dtype
        self.ranks_proven = ranks_proven  # the fuser has example inputs (README rule 2)
        self.nodes: list[_Node] = []
        self.calls: dict[str, int] = {}

    def add(self, node: _Node) -> _Node:
        self.nodes.append(node)
        return node

    def norm(self, norm: Norm, qualname: str, value: _Node, opaque: str | None = None) -> _Node:
        """A norm call; ``opaque`` says why it runs where the fuser cannot look."""
        bn = site_name(qualname, norm)
        index = self.calls.get(bn, 0) if bn is not None else 0
        if bn is not None:
            self.calls[bn] = index + 1
        node = self.add(
            _Node(
                "norm",
                [value],
                norm=norm,
                bn=bn,
                call_index=index,
                candidate_reason=_unfoldable_reason(norm) or opaque,
                seen=opaque is None or _is_module_call(norm, index),
            )
        )
        if norm.style == TRACED_SUBCLASS:
            return self.add(_Node("value", [node]))  # the ReLU inside its forward
        return node

    def layer(self, layer: Layer, name: str, value: _Node) -> _Node:
        """A call of the layer module ``name``; a functional call on its weight is named by that
        weight (``name.weight``), as the fuser's report names it.

        A layer whose class overrides ``__call__`` (``Layer.call_override``) is traced through:
        a functional call on its weight, reading the ``F.pad`` of its input when its
        ``padding_mode`` is not zeros, then the shift its ``__call__`` adds."""
        if layer.call_override:
            if layer.padding_mode != "zeros":
                value = self.add(_Node("value", [value]))
            traced = replace(layer, functional=True, call_override=False)
            return self.add(_Node("value", [self.layer(traced, name, value)]))
        layer_name = f"{name}.weight" if layer.functional else name
        return self.add(_Node("layer", [value], layer=layer, layer_name=layer_name))

    def value_users(self, node: _Node) -> list[_Node]:
        return [user for user in self.nodes if node in user.inputs and user.kind != "metadata"]

    def bypass(self, node: _Node) -> None:
        """Remove a folded norm: its readers now read its input."""
        replacement = node.inputs[0]
        for user in self.nodes:
            user.inputs = [replacement if value is node else value for value in user.inputs]
        self.nodes.remove(node)


def _unfoldable_reason(norm: Norm) -> str | None:
    """README rule 1: why this call is not a foldable BatchNorm at all, or ``None``."""
    if norm.style == OPAQUE_SUBCLASS:
        return "BatchNorm subclass whose forward FX cannot trace (runs opaque)"
    if norm.defect == TRAINING and norm.module_class != FROZEN:  # frozen: its statistics always
        return "training mode"
    if not norm.track_running_stats:
        return "no running statistics"
    if norm.defect in (FORWARD_HOOK, FORWARD_PRE_HOOK):
        return f"has a {norm.defect.replace('_', ' ')}"
    if norm.defect == REPLACED_FORWARD:
        return "its forward is replaced on the instance"
    if norm.defect == PARAMETRIZED:
        return "a parametrization computes its tensors on every call"
    if norm.computed is not None:
        return f"its {norm.computed} is computed when it runs, not a module constant"
    if norm.changed_in_place is not None:  # rule 6: a fold would keep its value at fusing time
        return f"the model's code changes its {norm.changed_in_place[0]} in place as it runs"
    return None


def _is_module_call(norm: Norm, call_index: int) -> bool:
    """Can a fuser report this call in code it does not trace? It knows the BatchNorm modules
    there (whatever their defects), not their functional calls, nor how often a module is
    called: one entry, call 0, stands for all of a module's calls."""
    return norm.style == MODULE and call_index == 0


def _takes_folds(layer: Layer) -> bool:
    """Rule 6: a hooked layer, one whose forward is replaced, one whose weight a
    parametrization computes, or one whose weight or bias the model's code changes in place,
    takes no fold on either side; rule 2: nor does a functional layer whose weight or bias is
    computed when it runs."""
    refused = layer.hooked or layer.replaced_forward or layer.parametrized or layer.computed
    return not (refused or layer.changed_in_place)


UNTRACED_CALLER = "called from the forward of a module FX cannot trace"


def _lower(spec: NetSpec) -> _Graph:
    """The spec as one graph. A root that runs as written (``NetSpec.root_untraced``) calls its
    own layers and norms (inline blocks') one by one: each is fused alone, so nothing folds among
    them; a wrapper block is its child, fused on its own."""
    graph = _Graph(spec.dtype, ranks_proven=spec.example_inputs)
    value = graph.add(_Node("input"))
    for index, block in enumerate(spec.blocks):
        if isinstance(block, Chain):
            value = _lower_chain(graph, index, block, value, spec.root_untraced)
        elif spec.root_untraced is None:
            value = _lower_two_calls(graph, index, block, value)
        elif block.packaging == INLINE:
            value = _lower_two_calls(graph, index, block, value, UNTRACED_CALLER)
        else:  # a wrapper: its own graph, one opaque call in the root's
            inner_output = _lower_two_calls(graph, index, block, graph.add(_Node("input")))
            graph.add(_Node("output", [inner_output]))
            value = graph.add(_Node("value", [value]))
    graph.add(_Node("output", [value]))
    return graph


def _lower_chain(
    graph: _Graph, index: int, chain: Chain, value: _Node, root_untraced: str | None = None
) -> _Node:
    """A chain behind a boundary is fused on its own: it becomes a separate graph (its own input
    and output) and, in the enclosing graph, a single opaque call. Behind a guarded boundary
    (untraceable, autocast, type check) an inline chain's ops are children of the guard module,
    each fused alone: nothing folds. Nothing folds either inside a module whose hook reads it,
    nor in one whose layer weight the root's code reads (``layer_read``). A guard looping over
    its Sequential child fuses each stage of it on its own. Under a root that runs as written,
    an inline chain's ops are the root's children, each fused alone, a Sequential or wrapper
    chain is fused on its own, and a counting block whose state the root's code reads is left
    whole (one the root only calls, asking a keeper for its state, is fused on its own)."""
    if chain.boundary is None and (root_untraced is None or chain.packaging == INLINE):
        return _lower_chain_ops(
            graph, index, chain, value, UNTRACED_CALLER if root_untraced else None
        )
    if chain.loop is not None and not chain.layer_read:
        _lower_stages(graph, index, chain)
        return graph.add(_Node("value", [value]))
    opaque = None
    if chain.boundary in GUARDED and chain.packaging == INLINE:
        opaque = UNTRACED_CALLER
    if chain.boundary == HOOK_READS_MODULE:  # its hook would be handed the fused module
        opaque = "inside a module whose hook reads it"
    if (
        chain.boundary == COUNTS_CALLS
        and chain.packaging == WRAPPER
        and not chain.counts_with_held_method
    ):
        # object.__setattr__(self, ...): code handed `self` may reach the wrapper it holds.
        opaque = "inside a module whose code hands itself to a function"
    if chain.layer_read:  # a fold inside would change the weight the root module's code reads
        opaque = "inside a module run as written, whose layer weight the model's code reads"
    if chain.boundary == COUNTS_CALLS and root_untraced == ROOT_READS_STATE:
        opaque = "inside a module the untraced root's code uses other than by calling it"
    start = len(graph.nodes)
    inner_output = _lower_chain_ops(graph, index, chain, graph.add(_Node("input")), opaque)
    if chain.boundary == AUTOCAST:  # what the chain lowered to runs inside it
        for node in graph.nodes[start:]:
            node.under_autocast = True
    graph.add(_Node("output", [inner_output]))
    return graph.add(_Node("value", [value]))


def _lower_stages(graph: _Graph, index: int, chain: Chain) -> None:
    """The stages of a Sequential an untraceable guard loops over (``Chain.loop``), each its own
    graph: an op alone in a stage is called as the guard's code runs, like a guarded inline
    chain's, and a loop that asks the stages' types leaves every one of them whole."""
    names = chain_names(index, chain)
    paths = staircase(len(chain.ops), chain.depth)
    stages: dict[int, list[int]] = {}
    for position, path in enumerate(paths):
        stages.setdefault(path[0], []).append(position)
    for positions in stages.values():
        opaque = None
        if chain.loop == LOOP_INSPECTS:
            opaque = "in a Sequential whose elements an untraceable module's code inspects"
        elif len(paths[positions[0]]) == 1:  # the stage is the op itself, not a nested Sequential
            opaque = UNTRACED_CALLER
        value = graph.add(_Node("input"))
        for position in positions:
            value = _lower_op(graph, chain.ops[position], names[position], value, opaque)
        graph.add(_Node("output", [value]))


def _lower_op(graph: _Graph, op: Op, name: str | None, value: _Node, opaque: str | None) -> _Node:
    if isinstance(op, Layer):
        return graph.layer(op, name, value)
    if isinstance(op, Norm):
        return graph.norm(op, name, value, opaque)
    if isinstance(op, Act) and op.kind == "identity":
        return value  # rules 2 and 3 look through it: what reads its output reads its input
    return graph.add(_Node("value", [value]))


def _lower_chain_ops(
    graph: _Graph, index: int, chain: Chain, value: _Node, opaque: str | None = None
) -> _Node:
    tapped = None
    for position, (op, name) in enumerate(zip(chain.ops, chain_names(index, chain), strict=True)):
        value = _lower_op(graph, op, name, value, opaque)
        if chain.tap is not None and chain.tap.after == position:
            if chain.tap.kind in METADATA_TAPS:
                graph.add(_Node("metadata", [value]))
            else:
                tapped = value
            if chain.tap.shifted:  # ``x *= 0.5``: an op reading the tapped value, in place
                value = graph.add(_Node("value", [value]))
    if chain.tap is not None and chain.tap.kind in (ADD, CAT):
        value = graph.add(_Node("value", [value, tapped]))
    return value


def _lower_two_calls(
    graph: _Graph, index: int, block: TwoCalls, value: _Node, opaque: str | None = None
) -> _Node:
    names = two_calls_names(index, block)
    first = graph.layer(block.layer, names.layer, value)
    for norm, name in zip(block.first_norms, names.first_norms, strict=True):
        first = graph.norm(norm, name, first, opaque)
    second_layer = block.layer
    if block.second == FUNCTIONAL:  # reads the module's weight; the module's hooks do not run
        second_layer = replace(
            block.layer, functional=True, hooked=False, replaced_forward=False, call_override=False
        )
    elif block.second == TWIN:  # a module of its own; sharing its weight does not stop a fold
        second_layer = twin_of(block.layer)
    second = graph.layer(second_layer, names.second_layer, value)
    second_norms = block.first_norms if block.second_norms is None else block.second_norms
    for norm, name in zip(second_norms, names.second_norms, strict=True):
        second = graph.norm(norm, name, second, opaque)
    return graph.add(_Node("value", [first, second]))


def _takes_output_fold(graph: _Graph, norm_node: _Node) -> bool:
    """Rule 2: the norm reads a layer's output, and nothing else reads that output's values."""
    producer = norm_node.inputs[0]
    if producer.kind != "layer" or not _takes_folds(producer.layer):
        return False
    if graph.value_users(producer) != [norm_node]:
        return False
    layer = producer.layer
    if layer.kind == LINEAR and not (layer.input_ndim == 2 and graph.ranks_proven):
        return False
    if norm_node.norm.module_class == FROZEN and norm_node.under_autocast:
        return False  # rule 6: its float32 output would become the autocast dtype
    if not _normalises_dim_1(norm_node.norm):
        return False
    return layer.out_channels == norm_node.norm.num_features


def _normalises_dim_1(norm: Norm) -> bool:
    """Rules 2 and 3: a FrozenBatchNorm2d broadcasts (1, C, 1, 1) buffers, so it normalises dim 1
    (and keeps its input's shape) on 4-D input only."""
    return norm.module_class != FROZEN or norm.input_ndim == 4


def _output_fold_overflows(graph: _Graph, norm_node: _Node) -> bool:
    """Rule 6: an amplifying BN folded into a spiked layer overflows float16 (``Norm.gain``)."""
    producer = norm_node.inputs[0]
    return (
        graph.dtype == "float16"
        and norm_node.norm.gain == AMPLIFYING
        and producer.layer is not None
        and producer.layer.spiked
        and not producer.shrunk  # scaled by 2**-12 first, the fold fits
    )


def _pads_with_zeros(layer: Layer) -> bool:
    if layer.padding_mode != "zeros" or layer.padding == "valid":
        return False
    if layer.padding == "same":
        return any(size != 1 for size in layer.kernel_size)
    return any(pad != 0 for pad in layer.padding)


def _takes_input_fold(graph: _Graph, norm_node: _Node) -> _Node | None:
    """Rule 3: the norm's only value reader is a layer reading it as input; that layer."""
    users = graph.value_users(norm_node)
    if len(users) != 1 or users[0].kind != "layer" or not _takes_folds(users[0].layer):
        return None
    layer = users[0].layer
    if not _normalises_dim_1(norm_node.norm):
        return None
    if layer.kind == CONV and not _pads_with_zeros(layer):
        return users[0] if layer.in_channels == norm_node.norm.num_features else None
    if layer.kind == LINEAR and layer.input_ndim == 2 and graph.ranks_proven:
        return users[0] if layer.in_channels == norm_node.norm.num_features else None
    return None


def _fold_until_stable(graph: _Graph, side: str) -> None:
    """Rule 4: apply one side's rule until nothing changes (chains fold fully)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.kind != "norm" or node.candidate_reason is not None:
                continue
            if side == OUTPUT_SIDE and _takes_output_fold(graph, node):
                if _output_fold_overflows(graph, node):
                    node.candidate_reason = OVERFLOW
                    continue
                into = node.inputs[0].layer_name
            elif side == INPUT_SIDE and (consumer := _takes_input_fold(graph, node)):
                into = consumer.layer_name
                consumer.shrunk = consumer.shrunk or node.norm.gain == SHRINKING
            else:
                continue
            node.folded_side, node.folded_into = side, into
            graph.bypass(node)
            changed = True


def foldable_sites(spec: NetSpec) -> list[Site]:
    """Every BatchNorm call site of the spec in execution order, with the oracle's verdict."""
    graph = _lower(spec)
    norms = [node for node in graph.nodes if node.kind == "norm"]
    _fold_until_stable(graph, OUTPUT_SIDE)
    _fold_until_stable(graph, INPUT_SIDE)
    for node in norms:  # an input-side fold may have made a fold that would overflow fit
        if node.candidate_reason == OVERFLOW:
            node.candidate_reason = None
    _fold_until_stable(graph, OUTPUT_SIDE)
    sites = []
    for node in norms:
        if node.folded_side is not None:
            reason = f"{node.folded_side}-side fold"
        else:
            reason = node.candidate_reason or "no layer to fold into on either side"
        sites.append(
            Site(
                node.bn,
                node.call_index,
                node.folded_side is not None,
                node.folded_side,
                node.folded_into,
                reason,
                node.seen,
            )
        )
    if spec.replaced_forward:  # the model is not traced, and its children are left whole
        reason = "the model's forward is replaced on the instance"
        return [
            Site(
                site.bn,
                site.call_index,
                False,
                None,
                None,
                reason,
                _is_module_call(node.norm, site.call_index),
            )
            for site, node in zip(sites, norms, strict=True)
        ]
    return sites
