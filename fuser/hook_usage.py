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
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
import textwrap
from collections.abc import Callable

import torch
from torch import fx, nn

#: The hook dicts of a module that fire on its calls, and what to call each kind in a reason.
HOOK_KINDS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}


def hook_reading_its_module(module: nn.Module) -> str | None:
    """Why fusing inside ``module`` could change what one of its hooks computes, or None."""
    for attribute, kind in HOOK_KINDS.items():
        for hook in (getattr(module, attribute, None) or {}).values():
            why = _reads_module(hook, module)
            if why is not None:
                return f"its {kind} {getattr(hook, '__qualname__', repr(hook))} {why}"
    return None


def _reads_module(hook: Callable, module: nn.Module) -> str | None:
    function, bound = (hook.__func__, True) if inspect.ismethod(hook) else (hook, False)
    if not inspect.isfunction(function):
        return "cannot be read (not a Python function)"
    positional = [
        parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) <= int(bound):  # ``*args``: where the module goes cannot be followed
        return "takes its module in *args"
    name = positional[int(bound)].name
    node = _function_node(function)
    if node is None:
        return "has no source that can be read"
    parents = {child: parent for parent in ast.walk(node) for child in ast.iter_child_nodes(parent)}
    for use in ast.walk(node):
        if isinstance(use, ast.Name) and use.id == name:
            parent = parents.get(use)
            attribute = parent.attr if isinstance(parent, ast.Attribute) else None
            if attribute is None or not _carried_unchanged(module, attribute):
                what = name if attribute is None else f"{name}.{attribute}"
                return f"reads its module ({what})"
    return None


def _carried_unchanged(module: nn.Module, attribute: str) -> bool:
    """Whether the fused module has ``attribute`` with the value ``module`` has: the training
    flag, and the plain public attributes ``fuse`` copies over (not modules or tensors, which
    fusing changes, nor names a GraphModule has of its own)."""
    if attribute == "training":
        return True
    if attribute.startswith("_") or attribute not in vars(module):
        return False
    value = vars(module)[attribute]
    return not isinstance(value, (nn.Module, torch.Tensor)) and not hasattr(
        fx.GraphModule, attribute
    )


def _function_node(function: Callable) -> ast.AST | None:
    """The ``def`` or ``lambda`` node of ``function``, or None if it cannot be found for sure."""
    if function.__name__ == "<lambda>":
        return _lambda_node(function)
    try:
        lines, _ = inspect.getsourcelines(function)
    except (OSError, TypeError):
        return None
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
