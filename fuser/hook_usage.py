"""Whether a module's hooks could see what fusing changes inside it, read from their source.

A hooked module stays one call and is fused on its own, and its hooks move to the fused module:
they fire as before, but are handed the fused module. A hook that only reads what flows through
it (``args``, ``output``) cannot tell the difference. One that reads its module's children,
parameters or buffers (``module.block[1].running_mean``, ``sum(module.parameters())``) would see
folded weights and BNs that are gone, and return something else, silently. So each hook's code
is read, as ``child_usage`` reads an untraceable parent's: the module may be fused inside only if
every hook uses its module argument for nothing but values the fused module carries unchanged
(``module.training`` and plain public attributes such as ``module.scale``). A hook whose code
cannot be read (a ``functools.partial``, a callable object, a builtin) counts as reading it.

A hook that is a method of a module of the model (``self.register_forward_hook(self.check)``) is
bound to the working copy, whose modules the fused model shares and fusing changes; if it reads
that module's state through ``self``, the module is kept whole too.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
import textwrap
import tokenize
from collections.abc import Callable

from torch import fx, nn

from .child_usage import parent_map
from .patterns import has_hooks

#: The hook dicts of a module that fire on its calls, and what to call each kind in a reason.
HOOK_KINDS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}


def hook_reading_its_module(module: nn.Module) -> str | None:
    """Why fusing inside ``module`` could change what a hook computes, or None: one of its own
    hooks reads the module it is handed, or a hook anywhere inside it is a method of a module
    inside it and reads that module's state (fusing changes the modules the fused one shares
    with the model it was traced from)."""
    if not any(has_hooks(m) for m in module.modules()):  # most models: one plain walk
        return None
    inside = {id(m) for m in module.modules()}
    for path, hooked in module.named_modules():
        for attribute, kind in HOOK_KINDS.items():
            for hook in (getattr(hooked, attribute, None) or {}).values():
                why = _reads_module(hook, hooked if hooked is module else None, inside)
                if why is not None:
                    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
                    where = f"the {kind} {name} of {path}" if path else f"its {kind} {name}"
                    return f"{where} {why}"
    return None


def _reads_module(hook: Callable, module: nn.Module | None, inside: set[int]) -> str | None:
    """What ``hook`` reads that fusing may change: of ``module`` (the module it is handed; None
    to skip), or of the object it is a method of, when that is a module in ``inside``."""
    function, owner = (hook.__func__, hook.__self__) if inspect.ismethod(hook) else (hook, None)
    owner_inside = isinstance(owner, nn.Module) and id(owner) in inside
    if module is None and not owner_inside:
        return None
    if not inspect.isfunction(function):
        return "cannot be read (not a Python function)"
    positional = [
        parameter.name
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    module_at = 0 if owner is None else 1
    if len(positional) <= module_at:  # ``*args``: where the module goes cannot be followed
        return "takes its module in *args"
    node = _function_node(function)
    if node is None:
        return "has no source that can be read"
    # name in the hook's code -> (what it is, whether reading an attribute of it is safe)
    watched = {}
    if module is not None:
        watched[positional[module_at]] = (
            "its module",
            lambda name: _carried_unchanged(module, name),
        )
    if owner_inside:
        watched[positional[0]] = ("the module it is a method of", lambda name: _plain(owner, name))
    parents = parent_map(node)
    for use in ast.walk(node):
        if isinstance(use, ast.Name) and use.id in watched:
            what, safe = watched[use.id]
            parent = parents.get(use)
            attribute = parent.attr if isinstance(parent, ast.Attribute) else None
            if attribute is None or not safe(attribute):
                read = use.id if attribute is None else f"{use.id}.{attribute}"
                return f"reads {what} ({read})"
    return None


#: Values fusing never changes: a module attribute holding one reads the same after fusing.
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None))


def _plain(owner: nn.Module, attribute: str) -> bool:
    """Whether ``owner.attribute`` is a value held by the module itself (not a method or
    property) that reaches nothing fusing changes: plain values (the ``training`` flag is one),
    and lists, tuples, sets and dicts of them (an empty dict a hook collects outputs in)."""
    return attribute in vars(owner) and _holds_only_plain_values(vars(owner)[attribute])


def _holds_only_plain_values(value: object, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN_VALUES):
        return True
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:  # a module, a tensor, or an object that may hold either
        return False
    return depth < 4 and all(_holds_only_plain_values(item, depth + 1) for item in items)


def _carried_unchanged(module: nn.Module, attribute: str) -> bool:
    """Whether the fused module has ``attribute`` with the value ``module`` has: the training
    flag (fused as it was) and the plain public values ``fuse`` copies over (not names a
    GraphModule has of its own)."""
    public = not attribute.startswith("_") and not hasattr(fx.GraphModule, attribute)
    return public and _plain(module, attribute)


def _function_node(function: Callable) -> ast.AST | None:
    """The ``def`` or ``lambda`` node of ``function``, or None if it cannot be found for sure."""
    if function.__name__ == "<lambda>":
        return _lambda_node(function)
    try:
        lines, _ = inspect.getsourcelines(function)
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # no file, or lines that
        return None  # inspect cannot cut a block from
    tree = _parsed(textwrap.dedent("".join(lines)))
    if tree is None:
        return None
    candidates = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name == function.__name__
    ]
    return candidates[0] if len(candidates) == 1 else None


def _lambda_node(function: Callable) -> ast.AST | None:
    """A lambda is found in its whole file: the lines ``inspect`` gives for one written inside
    a longer expression (``register_forward_hook(\n    lambda m, a, o: ...)``) do not parse
    alone. It is taken to be the lambda starting on its first line with its argument names, if
    that line holds only one such lambda."""
    try:
        filename = inspect.getsourcefile(function)
    except TypeError:
        return None
    if filename is None:
        return None
    tree = _parsed("".join(linecache.getlines(filename, function.__globals__)))
    if tree is None:
        return None
    code = function.__code__
    arguments = list(code.co_varnames[: code.co_argcount])
    candidates = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Lambda)
        and node.lineno == code.co_firstlineno
        and [a.arg for a in (*node.args.posonlyargs, *node.args.args)] == arguments
    ]
    return candidates[0] if len(candidates) == 1 else None


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError):
        return None
