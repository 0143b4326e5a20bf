"""Which of a graph's constant tensors its code changes in place.

A fold reads a layer's weight and bias and a BatchNorm's statistics and affine once, when fusing.
If the model's code changes one of them in place as it runs (``self.conv.bias.data.add_(1)``,
``self.bn.weight.mul_(0.9)`` on a frozen parameter), the original computes with the new values on
every later call, and a folded layer never would: the fold is left. FX records such a change as
a ``get_attr`` of the tensor, maybe a view of it (``.data``, ``.view``, indexing), then an in-place
operation on that. (A buffer is not a proxy while tracing, so a change to one runs during the
trace instead, and ``tracing`` keeps its module untraced.)

An operation whose name ends in ``_`` counts as a change (``requires_grad_`` too: erring towards
leaving a fold), and so do ``x[i] = y``, ``x op= y``, ``out=``, ``inplace=True``, and the running
statistics handed to a batch or instance norm that updates them (``F.batch_norm(x, mean, var,
training=True)``: a BN sharing them in eval mode reads new ones on every call). The ways of
taking a view listed below are followed, with the methods that may return the tensor itself
(``.to()``, ``.contiguous()``); a result of any other operation is a new tensor.

The same vocabulary tells, without running the graph, which values are tensors for certain (the
module's own tensors and single-tensor views of them, and what torch's layers and functions return),
so that their ``op=`` can be written as the in-place method it runs
(``tensor_augmented_assignments_as_methods``).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .patterns import (
    BATCH_NORM_ARGS,
    TORCH_BATCH_NORM_ARGS,
    fetch_attr,
    has_hooks,
    normalized_args,
    own_call_code,
    submodule,
)
from .run_time_writes import runs_known_code
from .tracing import AUGMENTED_ASSIGNMENTS

#: Methods and attributes that may return the tensor itself or a view sharing its memory.
_ALIASING_METHODS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "t", "transpose",
        "permute", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "detach",
        "as_strided", "unfold", "diagonal", "split", "chunk", "unbind", "tensor_split", "movedim",
        "moveaxis", "swapaxes", "swapdims", "contiguous", "to", "type", "type_as", "float",
        "double", "half", "bfloat16", "cpu", "cuda", "__getitem__", "view_as_real",
    }
)  # fmt: skip
_ALIASING_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})
_ALIASING_FUNCTIONS = frozenset(
    function
    for function in (getattr(torch, name, None) for name in _ALIASING_METHODS)
    if callable(function) and not isinstance(function, torch.dtype)
) | {operator.getitem}
#: ``x op= y`` recorded as the operator (``tracing._augmented_assignments_recorded``), and
#: ``x[i] = y``.
_IN_PLACE_OPERATORS = frozenset(AUGMENTED_ASSIGNMENTS.values()) | {operator.setitem}


_INSTANCE_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats")
_INSTANCE_NORM_ARGS += ("momentum",)
_TORCH_INSTANCE_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var")
_TORCH_INSTANCE_NORM_ARGS += ("use_input_stats", "momentum")
#: Functions that update the running statistics handed to them, unless their flag is False or
#: their momentum 0 (batch statistics used, running ones kept): (argument names in order, the
#: flag, its default).
_STATISTICS_UPDATES: dict[Any, tuple[tuple[str, ...], str, bool | None]] = {
    F.batch_norm: (BATCH_NORM_ARGS, "training", False),
    torch.batch_norm: (TORCH_BATCH_NORM_ARGS, "training", None),
    F.instance_norm: (_INSTANCE_NORM_ARGS, "use_input_stats", True),
    torch.instance_norm: (_TORCH_INSTANCE_NORM_ARGS, "use_input_stats", None),
}


def tensors_changed_in_place(gm: fx.GraphModule) -> dict[int, str]:
    """``id`` of each tensor a ``get_attr`` of ``gm`` reads that the graph may change in place,
    with the node that changes it (for the reason a fold is left)."""
    changed: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        change = _first_change(gm, node)
        if change is None:
            continue
        try:
            value = fetch_attr(gm, node.target)
        except AttributeError:
            continue
        if isinstance(value, torch.Tensor):
            changed.setdefault(id(value), change)
    return changed


def _first_change(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The name of a node that may change ``node``'s tensor in place, following its views."""
    seen = {node}
    pending = [node]
    while pending:
        value = pending.pop()
        for user in value.users:
            if _changes_first_argument(user) and _first_argument(user) is value:
                return user.name
            if _writes_to(user, value) or _updates_statistics(user, value):
                return user.name
            if _hands_to_code_run_as_written(gm, user, value):
                return f"{user.name}, code run as written that is handed it"
            if user not in seen and _may_alias(user, value):
                seen.add(user)
                pending.append(user)
    return None


def _hands_to_code_run_as_written(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` runs code the graph does not show with ``value`` among its arguments,
    code that may change it in place: a Python function FX calls whole (``torch.fx.wrap``), not
    torch's own; or a module that runs as written (untraceable, hooked, of a class torch does
    not know), or a torch layer with ``inplace=True`` handed it first. What that code does is
    not read: a function only reading a layer's weight leaves its fold too."""
    if value not in node.all_input_nodes:
        return False
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        torch_code = module == "torch" or module.startswith(("torch.", "torchvision."))
        return hasattr(node.target, "__code__") and not torch_code
    if node.op != "call_module":
        return False
    try:
        module = submodule(gm, node.target)
    except AttributeError:
        return True
    if has_hooks(module) or not runs_known_code(module):
        return True
    return getattr(module, "inplace", False) is True and _first_argument(node) is value


def _first_argument(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _changes_first_argument(node: fx.Node) -> bool:
    """``x.add_(y)``, ``torch.relu_(x)``, ``nn.init.zeros_(x)``, ``x[i] = y``, ``x += y``,
    ``F.relu(x, inplace=True)``: operations that change their first argument."""
    if node.op == "call_method":
        return _in_place_name(node.target) or node.target == "__setitem__"
    if node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        return _in_place_name(getattr(node.target, "__name__", ""))
    return False


def _in_place_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("__")


def _writes_to(node: fx.Node, value: fx.Node) -> bool:
    """An ``out=`` argument is written whatever the operation."""
    return node.op in ("call_function", "call_method") and node.kwargs.get("out") is value


def _updates_statistics(node: fx.Node, value: fx.Node) -> bool:
    """``value`` is the running mean or variance of a norm call that updates them as it runs."""
    entry = _STATISTICS_UPDATES.get(node.target) if node.op == "call_function" else None
    if entry is None:
        return False
    names, flag, default = entry
    args = normalized_args(node, names, {flag: default})
    if args[flag] is False or args.get("momentum") == 0:
        return False
    return value is args.get("running_mean") or value is args.get("running_var")


def _may_alias(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node``'s result may share ``value``'s memory (a tuple of views included)."""
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS and _first_argument(node) is value
    if node.op != "call_function" or _first_argument(node) is not value:
        return False
    if node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in _ALIASING_ATTRIBUTES
    return node.target in _ALIASING_FUNCTIONS


#: Aliasing methods that return a tuple of views of a tensor.
_VIEW_TUPLE_METHODS = frozenset({"split", "chunk", "unbind", "tensor_split"})
#: Of the aliasing methods, those that return one tensor when called on a tensor (``type()``
#: without arguments returns a string).
_SINGLE_VIEW_METHODS = _ALIASING_METHODS - _VIEW_TUPLE_METHODS - {"type"}

# The in-place method a tensor's ``op=`` runs, under the name TorchScript knows: it rejects
# ``x.__iadd__(y)`` and the other arithmetic dunders (shifts and bitwise ones it accepts, and they
# stay dunders: ``bitwise_left_shift_`` refuses the float tensors ``<<=`` takes).
_SCRIPTABLE_IN_PLACE = {
    "__iadd__": "add_",
    "__isub__": "sub_",
    "__imul__": "mul_",
    "__itruediv__": "div_",
    "__ifloordiv__": "floor_divide_",
    "__imod__": "remainder_",
    "__ipow__": "pow_",
}


def tensor_augmented_assignments_as_methods(gm: fx.GraphModule) -> None:
    """Write ``operator.iadd(x, y)`` as ``x.add_(y)`` (each ``op=`` as its in-place method) where
    ``x`` is known to be a tensor.

    Both run the same in-place operation; they differ when the model is pickled. A GraphModule is
    saved as its code and traced again by FX's own tracer on load, which has no in-place
    operators: ``x += y`` (the code FX writes for ``operator.iadd``) loads as ``x = x + y``, and a
    view of ``x``, the caller's tensor or the module's own parameter no longer changes. A method
    call loads as the method call, and the named methods also script (``_SCRIPTABLE_IN_PLACE``).
    Numbers have no such methods, so only tensors are rewritten: values that shape propagation
    saw produce one (``meta["type"]``), and, with or without it, the module's own tensors and
    their views (``_state_tensors``: ``self.w.data *= -1``) and what torch's layers and functions
    return (``_torch_tensor_results``: ``y = self.fc(x); y += x``, which loaded as ``y = y + x``
    returned float32 where it returned bfloat16 under autocast). The others keep the operator,
    which is exact until pickled. So does ``x @= w``: a tensor has no in-place matmul (no
    ``__imatmul__``), and Python runs ``x = x @ w``, which is also what the saved code loads as.
    """
    methods = {
        function: _SCRIPTABLE_IN_PLACE.get(name, name)
        for name, function in AUGMENTED_ASSIGNMENTS.items()
        if hasattr(torch.Tensor, name)
    }
    known = _torch_tensor_results(gm, _state_tensors(gm))
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in methods:
            continue
        target = node.args[0]
        value_type = target.meta.get("type") if isinstance(target, fx.Node) else None
        seen_tensor = isinstance(value_type, type) and issubclass(value_type, torch.Tensor)
        if seen_tensor or target in known:
            node.op, node.target = "call_method", methods[node.target]


def _torch_tensor_results(gm: fx.GraphModule, state_tensors: set[fx.Node]) -> set[fx.Node]:
    """``state_tensors`` and the other nodes whose value is a tensor whenever the graph runs,
    without shape propagation: calls of torch.nn layers and of torch.nn.functional functions that
    torch annotates as returning a tensor (``nn.Linear``, ``F.relu``: on anything else they
    raise), unhooked and running their class's ``forward``; ``nn.Identity`` passes on what it is
    given, and ``x op= y`` gives ``x`` (or, for ``@=``, ``x @ y``), so they count only on a known
    tensor."""
    known = set(state_tensors)
    augmented = set(AUGMENTED_ASSIGNMENTS.values())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in augmented:
            if node.args and node.args[0] in known:
                known.add(node)
        elif node.op == "call_module":
            try:
                module = submodule(gm, node.target)
            except AttributeError:
                continue
            if has_hooks(module) or own_call_code(module) is not None:
                continue
            if isinstance(module, nn.Identity):
                if node.args and node.args[0] in known:
                    known.add(node)
            elif _annotated_tensor(type(module).forward, "torch.nn.modules."):
                known.add(node)
        elif node.op == "call_function" and _annotated_tensor(node.target, "torch.nn.functional"):
            known.add(node)
    return known


def _annotated_tensor(function: object, torch_module: str) -> bool:
    """Whether ``function`` is torch's own (defined in ``torch_module``) and annotated to return
    a tensor."""
    if not (getattr(function, "__module__", None) or "").startswith(torch_module):
        return False
    returned = getattr(function, "__annotations__", {}).get("return")
    return returned is torch.Tensor or returned in ("Tensor", "torch.Tensor")


def _state_tensors(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that hold a tensor whatever the inputs: a ``get_attr`` of one of the module's
    tensors, a single-tensor view of such a node (``.data``, ``.view(-1)``, indexing), and an
    element of a tuple of its views (``.chunk(2)[0]``)."""
    known: set[fx.Node] = set()
    tuples: set[fx.Node] = set()  # tuples of views of known tensors
    for node in gm.graph.nodes:  # in order: a node's arguments come before it
        first = _first_argument(node)
        if not isinstance(first, fx.Node):  # a get_attr; or a list, which may hold a slice
            first = None
        if node.op == "get_attr":
            try:
                if isinstance(fetch_attr(gm, node.target), torch.Tensor):
                    known.add(node)
            except AttributeError:
                pass
        elif first in known:
            if _single_view(node):
                known.add(node)
            elif node.op == "call_method" and node.target in _VIEW_TUPLE_METHODS:
                tuples.add(node)
        elif first in tuples and _takes_one_element(node):
            known.add(node)
    return known


def _takes_one_element(node: fx.Node) -> bool:
    """``t[i]`` with a constant integer ``i``: one element of a tuple ``t``."""
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and len(node.args) == 2
        and type(node.args[1]) is int
    )


def _single_view(node: fx.Node) -> bool:
    """Whether ``node`` applied to a tensor returns one tensor (that may share its memory)."""
    if node.op == "call_method":
        return node.target in _SINGLE_VIEW_METHODS
    if node.op != "call_function":
        return False
    if node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in _ALIASING_ATTRIBUTES
    return node.target is operator.getitem
