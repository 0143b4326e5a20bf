"""How an untraceable module's own code uses its children, read from its source.

When FX cannot trace a module, its code runs as it is, and the fuser may only swap a child for its
fused version if that code does nothing with the child but call it. A parent that indexes a
``Sequential`` (``self.block[0](x)``), iterates it, or reads its attributes (``self.block.conv``)
would crash on the swapped-in GraphModule or, worse, silently reach a folded layer. So the parent's
methods (all but ``__init__``, which only runs at construction) are parsed, and every use of
``self.NAME`` is classified.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
from collections import defaultdict

from torch import nn

CALLED = "called"  # only ever ``self.name(...)``: the child may be replaced
ELEMENTS_CALLED = "elements called"  # only ``self.name[i](...)`` or a loop calling each element
OTHER = "other"  # anything else, or no source: leave the child as it is
NEUTRAL = "neutral"  # ``is None`` checks: true of the fused module exactly when of the original

_ITERATION_WRAPPERS = frozenset({"enumerate", "reversed", "zip", "list", "iter"})


def child_usage(module: nn.Module) -> dict[str, str]:
    """For each child name of ``module``, how its own (non-torch) code uses it."""
    uses: dict[str, set[str]] = defaultdict(set)
    for cls in type(module).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch.nn"):
            continue
        class_uses = _uses_in_class(cls)
        if class_uses is None:  # no source to read: assume the worst
            return {name: OTHER for name, _ in module.named_children()}
        for name, kinds in class_uses.items():
            uses[name] |= kinds
    return {name: _verdict(uses.get(name, set())) for name, _ in module.named_children()}


def _uses_in_class(cls: type) -> dict[str, frozenset[str]] | None:
    """How the methods of ``cls`` use each ``self.NAME``, or None without source.

    The file is read through ``linecache`` (as ``inspect`` does) and parsed once per distinct
    text; ``inspect.getsource`` would parse the whole file again for every class it looks up.
    """
    try:
        filename = inspect.getsourcefile(cls) or inspect.getfile(cls)
    except (OSError, TypeError):
        return None
    module = inspect.getmodule(cls)
    text = "".join(linecache.getlines(filename, module.__dict__ if module else None))
    return _uses_by_class(text).get(cls.__qualname__) if text else None


@functools.lru_cache(maxsize=256)
def _uses_by_class(text: str) -> dict[str, dict[str, frozenset[str]]]:
    """Qualified class name -> attribute name -> kinds of use, for every class in ``text``
    (the first definition of a name wins, as for ``inspect.getsource``)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    classes: dict[str, dict[str, frozenset[str]]] = {}
    for qualname, node in _class_definitions(tree, ""):
        if qualname not in classes:
            uses: dict[str, set[str]] = defaultdict(set)
            for method in _methods(node):
                _classify_method(method, uses)
            classes[qualname] = {name: frozenset(kinds) for name, kinds in uses.items()}
    return classes


def _class_definitions(node: ast.AST, prefix: str):
    """(qualified name, ClassDef) for every class under ``node``, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            qualname = prefix + child.name
            yield qualname, child
            yield from _class_definitions(child, qualname + ".")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _class_definitions(child, f"{prefix}{child.name}.<locals>.")
        else:
            yield from _class_definitions(child, prefix)


def _verdict(kinds: set[str]) -> str:
    kinds = kinds - {NEUTRAL}
    if kinds == {CALLED}:
        return CALLED
    if kinds and kinds <= {CALLED, ELEMENTS_CALLED}:
        return ELEMENTS_CALLED
    return OTHER


def _methods(tree: ast.AST) -> list[ast.FunctionDef]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__init__"
    ]


def _self_attribute(node: ast.AST) -> str | None:
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    ):
        return node.attr
    return None


def _classify_method(method: ast.AST, uses: dict[str, set[str]]) -> None:
    parents = {
        child: parent for parent in ast.walk(method) for child in ast.iter_child_nodes(parent)
    }
    for node in ast.walk(method):
        name = _self_attribute(node)
        if name is not None:
            uses[name].add(_classify_use(node, parents))


def _classify_use(node: ast.Attribute, parents: dict) -> str:
    parent = parents.get(node)
    if isinstance(parent, ast.Call) and parent.func is node:
        return CALLED
    if _is_len_call(parent, node):  # counting elements is untouched by fusing them
        return ELEMENTS_CALLED
    if _is_none_check(parent):  # ``self.head is None``: a fused module is just as much not None
        return NEUTRAL
    if isinstance(parent, ast.Subscript) and parent.value is node:
        grandparent = parents.get(parent)
        if isinstance(grandparent, ast.Call) and grandparent.func is parent:
            return ELEMENTS_CALLED
        return OTHER
    loop = _enclosing_loop(node, parents)
    if loop is not None and _loop_only_calls_elements(loop, node):
        return ELEMENTS_CALLED
    return OTHER


def _is_none_check(parent: ast.AST | None) -> bool:
    return (
        isinstance(parent, ast.Compare)
        and all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops)
        and any(isinstance(c, ast.Constant) and c.value is None for c in parent.comparators)
    )


def _is_len_call(parent: ast.AST | None, node: ast.AST) -> bool:
    return (
        isinstance(parent, ast.Call)
        and isinstance(parent.func, ast.Name)
        and parent.func.id == "len"
        and parent.args == [node]
    )


def _enclosing_loop(node: ast.AST, parents: dict) -> ast.For | None:
    """The ``for`` loop iterating ``node``, directly or through ``enumerate``/``zip``/..."""
    parent = parents.get(node)
    if isinstance(parent, ast.Call) and node in parent.args:
        func = parent.func
        if isinstance(func, ast.Name) and func.id in _ITERATION_WRAPPERS:
            node, parent = parent, parents.get(parent)
    if isinstance(parent, ast.For) and parent.iter is node:
        return parent
    return None


def _loop_only_calls_elements(loop: ast.For, container: ast.AST) -> bool:
    """Every loop variable bound to an element is only ever called in the loop body."""
    targets = [loop.target] if isinstance(loop.target, ast.Name) else []
    if isinstance(loop.target, ast.Tuple):
        targets = [t for t in loop.target.elts if isinstance(t, ast.Name)]
    names = {t.id for t in targets}
    body = ast.Module(body=loop.body, type_ignores=[])
    parents = {child: parent for parent in ast.walk(body) for child in ast.iter_child_nodes(parent)}
    element_calls = 0
    for node in ast.walk(body):
        if isinstance(node, ast.Name) and node.id in names:
            parent = parents.get(node)
            if isinstance(parent, ast.Call) and parent.func is node:
                element_calls += 1
            elif not _is_index_like(node, parent):
                return False
    return element_calls > 0


def _is_index_like(node: ast.Name, parent: ast.AST | None) -> bool:
    """Uses of an ``enumerate`` index (``i``) that do not touch the element: comparisons, arithmetic."""
    return isinstance(parent, (ast.Compare, ast.BinOp, ast.Subscript)) and not (
        isinstance(parent, ast.Subscript) and parent.value is node
    )
