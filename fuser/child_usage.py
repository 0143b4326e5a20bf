"""How an untraceable module's own code uses its children, read from its source.

When FX cannot trace a module, its code runs as it is, and the fuser may only swap a child for its
fused version if that code does nothing with the child but call it. A parent that indexes a
``Sequential`` (``self.block[0](x)``), iterates it, or reads its attributes (``self.block.conv``)
would crash on the swapped-in GraphModule or, worse, silently reach a folded layer. So the parent's
methods (all but ``__init__``, which only runs at construction) are parsed, and every use of
``self.NAME`` is classified. Code that reaches its children other than by name (``self.modules()``,
``self.parameters()``, ``getattr(self, name)``, ``self`` handed to a function) would see the fused
children wherever they are, so a class with such code keeps all of them as they are, unless all it
does is call its own children (``for m in self.children(): x = m(x)``): it calls the fused ones
just as well, in the same order.

``attribute_chains`` reads the same source for traced modules (``fuser/frozen_reads.py``): what
their code reads of a child that runs as written would be frozen by a trace. There reflection is
harmless where it only calls what it finds, or sits in a method ``forward`` never reaches.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
from collections import defaultdict
from dataclasses import dataclass

from torch import nn

CALLED = "called"  # only ever ``self.name(...)``: the child may be replaced
ELEMENTS_CALLED = "elements called"  # only ``self.name[i](...)`` or a loop calling each element
OTHER = "other"  # anything else, or no source: leave the child as it is
NEUTRAL = "neutral"  # ``is None`` checks: true of the fused module exactly when of the original

_ITERATION_WRAPPERS = frozenset({"enumerate", "reversed", "zip", "list", "iter"})
#: The key under which a class's uses of all its children, reached by reflection, are kept (no
#: attribute can be named so).
EVERY_CHILD = "<every child>"


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
    every_child = uses.get(EVERY_CHILD, set())
    return {
        name: _verdict(uses.get(name, set()) | every_child) for name, _ in module.named_children()
    }


#: How a method reaches past one child: the attribute names (and constant indices) read after
#: ``self.NAME`` (``("seen",)`` for ``self.child.seen``; ``()`` for ``self.child`` itself), and
#: whether the last is called.
Chain = tuple[tuple[str | int, ...], bool]


def attribute_chains(cls: type, entry: str = "forward") -> dict[str, frozenset[Chain]] | None:
    """For each ``self.NAME`` the methods of ``cls`` (and of its non-torch bases) use other than
    by calling its elements, the attribute chains they read through it (``((), True)`` where it
    is called: a module runs live, a function or lambda runs inline in the trace); None where no
    use is known: no source, or the code that runs from ``entry`` (``forward`` when the module
    is called; a method or property that another module's traced code reaches through it) and
    the methods it reaches through ``self`` reaching children by reflection other than to call
    them (``for layer in self.children(): x = layer(x)`` is such a call). An ``entry`` other than
    ``forward`` that no class in the source defines (a function assigned in the class body) is
    code unknown too."""
    chains: dict[str, set[Chain]] = defaultdict(set)
    reflective: set[str] = set()
    reaches: dict[str, set[str]] = defaultdict(set)
    for base in cls.__mro__:
        if base in (nn.Module, object) or base.__module__.startswith("torch."):
            continue
        text = _source_text(base)
        found = _reads_by_class(text).get(base.__qualname__) if text else None
        if found is None:
            return None
        for name, reads in found.chains.items():
            chains[name] |= reads
        reflective |= found.reflective
        for method, names in found.reaches.items():
            reaches[method] |= names
    if entry != "forward" and entry not in reaches:
        return None
    if _reached_from(entry, reaches) & reflective:
        return None
    return {name: frozenset(reads) for name, reads in chains.items()}


@dataclass(frozen=True)
class _ClassReads:
    """What one class's methods (all but ``__init__``) read: the chains of ``attribute_chains``,
    the methods reaching children by reflection other than to call them, and for each method
    the names it reads through ``self`` or ``super()`` (the methods it may call)."""

    chains: dict[str, frozenset[Chain]]
    reflective: frozenset[str]
    reaches: dict[str, frozenset[str]]


def _reached_from(start: str, reaches: dict[str, set[str]]) -> set[str]:
    """``start`` and the methods it reaches, through ``self.NAME`` and ``super().NAME``."""
    reached, pending = set(), [start]
    while pending:
        method = pending.pop()
        if method not in reached:
            reached.add(method)
            pending += reaches.get(method, ())
    return reached


def _source_text(cls: type) -> str | None:
    """The text of the file defining ``cls``, through ``linecache``, or None."""
    try:
        filename = inspect.getsourcefile(cls)
    except (OSError, TypeError):
        return None
    if filename is None:  # no file, and no lines cached for it
        return None
    module = inspect.getmodule(cls)
    return "".join(linecache.getlines(filename, module.__dict__ if module else None)) or None


@functools.lru_cache(maxsize=256)
def _reads_by_class(text: str) -> dict[str, _ClassReads | None]:
    """``_uses_by_class``'s companion: for every class in ``text``, the chains of every use it
    would call ``OTHER`` and how its methods reach each other; None for a class defined twice."""
    classes: dict[str, _ClassReads | None] = {}
    parsed = _parsed(text)
    parents = parsed.parents
    for qualname, node in parsed.classes:
        if qualname in classes:
            classes[qualname] = None
            continue
        chains: dict[str, set[Chain]] = defaultdict(set)
        reflective, reaches = set(), {}
        for method in _methods(node):
            for use in ast.walk(method):
                name = _self_attribute(use)
                if name is None:
                    continue
                kind = _classify_use(use, parents, method)
                if kind == CALLED:  # a module runs live; other code runs inline in the trace
                    chains[name].add(((), True))
                elif kind == OTHER and not _children_only_called(use, parents, method):
                    chains[name].add(_chain(use, parents))
            if _reflects_beyond_calls(method, parents):
                reflective.add(method.name)
            reaches[method.name] = reaches.get(method.name, frozenset()).union(
                _names_read_through_self(method)
            )
        classes[qualname] = _ClassReads(
            {name: frozenset(reads) for name, reads in chains.items()},
            frozenset(reflective),
            reaches,
        )
    return classes


def _children_only_called(use: ast.Attribute, parents: dict, method: ast.AST) -> bool:
    """``for m in self.NAME.children(): x = m(x)`` (or ``values()``, ``named_children()``,
    ``items()``): the loop only calls what it reaches, and reads nothing of it."""
    member = parents.get(use)
    return (
        isinstance(member, ast.Attribute)
        and member.value is use
        and member.attr in _CHILD_ITERATORS
        and _reflection_only_calls(member, parents, method)
    )


def _names_read_through_self(method: ast.AST):
    """The ``NAME`` of every ``self.NAME`` and ``super().NAME`` in ``method``."""
    for node in ast.walk(method):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        is_super = (
            isinstance(owner, ast.Call)
            and isinstance(owner.func, ast.Name)
            and owner.func.id == "super"
        )
        if is_super or (isinstance(owner, ast.Name) and owner.id == "self"):
            yield node.attr


#: Reflective members yielding modules, and those yielding ``(name, module)`` pairs: code that
#: only calls what they yield reads no module's state.
_MODULE_ITERATORS = frozenset({"children", "modules", "values"})
_NAMED_MODULE_ITERATORS = frozenset({"named_children", "named_modules", "items"})
#: Those of them yielding a module's own children only.
_CHILD_ITERATORS = frozenset({"children", "values", "named_children", "items"})
#: Members yielding a module's parameters and buffers themselves, which FX reads live.
_TENSOR_ITERATORS = frozenset({"parameters", "buffers", "named_parameters", "named_buffers"})
#: Members reaching past a module's own children, or into their tensors: where children are
#: swapped for fused ones, what they yield changes (``_uses_by_class``).
_PAST_THE_CHILDREN = _TENSOR_ITERATORS | {"modules", "named_modules", "get_submodule"}


def _reflects_beyond_calls(method: ast.AST, parents: dict, children_only: bool = False) -> bool:
    """Whether ``method`` reaches modules by reflection (``_reflects_on_self``) and may do more
    with them than call them: ``for layer in self.children(): x = layer(x)``,
    ``getattr(self, name)(x)`` and a loop over the parameters do not; anything else does.
    ``children_only``: nor may it reach past its own children (``_PAST_THE_CHILDREN``)."""
    for node in ast.walk(method):
        if not (isinstance(node, ast.Name) and node.id == "self"):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            if parent.attr in _REFLECTIVE_MEMBERS and not _reflection_only_calls(
                parent, parents, method
            ):
                return True
            if children_only and parent.attr in _PAST_THE_CHILDREN:
                return True
        elif _is_called_getattr(parent, node, parents) or _is_harmless_call(parent, node):
            continue
        elif not _loop_only_calls(node, parents, method):  # ``for m in self``
            return True
    return False


def _reflection_only_calls(member: ast.Attribute, parents: dict, method: ast.AST) -> bool:
    call = parents.get(member)
    if not (isinstance(call, ast.Call) and call.func is member):
        return False  # ``self._modules``, or the bound method handed on
    if member.attr in _TENSOR_ITERATORS:
        return True
    if member.attr in ("get_submodule", "__getattr__"):  # ``self.get_submodule(name)(x)``
        outer = parents.get(call)
        return isinstance(outer, ast.Call) and outer.func is call
    if member.attr in _MODULE_ITERATORS:
        return _loop_only_calls(call, parents, method)
    if member.attr in _NAMED_MODULE_ITERATORS:  # ``for name, module in self.named_children()``
        loop = parents.get(call)
        if not (isinstance(loop, ast.For) and loop.iter is call):
            return False
        target = loop.target
        if not (isinstance(target, ast.Tuple) and len(target.elts) == 2):
            return False
        module = target.elts[1]
        names = {module.id} if isinstance(module, ast.Name) else set()
        return _loop_only_calls_elements(loop, names, method, parents)
    return False


def _loop_only_calls(node: ast.AST, parents: dict, method: ast.AST) -> bool:
    """``node`` is iterated by a loop that only calls each element (``_loop_over``)."""
    loop = _loop_over(node, parents)
    return loop is not None and _loop_only_calls_elements(*loop, method, parents)


def _is_called_getattr(parent: ast.AST | None, node: ast.AST, parents: dict) -> bool:
    """``getattr(self, name)(x)``: the attribute found is called, and nothing else."""
    outer = parents.get(parent)
    return (
        isinstance(parent, ast.Call)
        and isinstance(parent.func, ast.Name)
        and parent.func.id == "getattr"
        and parent.args[:1] == [node]
        and isinstance(outer, ast.Call)
        and outer.func is parent
    )


def _chain(use: ast.Attribute, parents: dict) -> Chain:
    """The names read after ``use``, an element taken by a constant index as an int or str
    (``self.model[2].body`` gives ``(2, "body")``; ``"[i]"`` for any other index, which the
    reader cannot follow)."""
    names: list = []
    node = use
    while True:
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute):
            names.append(parent.attr)
        elif isinstance(parent, ast.Subscript) and parent.value is node:
            index = parent.slice
            constant = isinstance(index, ast.Constant) and type(index.value) in (int, str)
            names.append(index.value if constant else "[i]")
            if not constant:
                break
        else:
            break
        node = parent
    parent = parents.get(node)
    return tuple(names), isinstance(parent, ast.Call) and parent.func is node


def _uses_in_class(cls: type) -> dict[str, frozenset[str]] | None:
    """How the methods of ``cls`` use each ``self.NAME``, or None without source.

    The file is read through ``linecache`` (as ``inspect`` does) and parsed once per distinct
    text; ``inspect.getsource`` would parse the whole file again for every class it looks up.
    """
    text = _source_text(cls)
    return _uses_by_class(text).get(cls.__qualname__) if text else None


@functools.lru_cache(maxsize=256)
def _uses_by_class(text: str) -> dict[str, dict[str, frozenset[str]] | None]:
    """Qualified class name -> attribute name -> kinds of use, for every class in ``text``
    (``EVERY_CHILD``: what reflection does with all of them); None for a class whose code
    reaches its children other than by name (``_reflects_on_self``) beyond calling its own
    children, and for a name defined more than once (in two branches of an ``if``, or redefined): which
    definition the live class is cannot be told from the text (``inspect.getsource`` takes the
    first; a redefinition is the second)."""
    classes: dict[str, dict[str, frozenset[str]] | None] = {}
    parsed = _parsed(text)
    parents = parsed.parents
    for qualname, node in parsed.classes:
        if qualname in classes:
            classes[qualname] = None
            continue
        methods = _methods(node)
        reflective = [method for method in methods if _reflects_on_self(method, parents)]
        if any(_reflects_beyond_calls(m, parents, children_only=True) for m in reflective):
            classes[qualname] = None
            continue
        uses: dict[str, set[str]] = defaultdict(set)
        if reflective:  # ``for m in self.children(): x = m(x)``: every child is called
            uses[EVERY_CHILD].add(CALLED)
        for method in methods:
            _classify_method(method, parents, uses)
        classes[qualname] = {name: frozenset(kinds) for name, kinds in uses.items()}
    return classes


#: ``nn.Module`` members that reach children, their parameters or buffers other than by the
#: child's name: code using them would see the fused children (``self.parameters()`` sums the
#: folded weights, ``self.modules()`` no longer finds the BN), so no use of a child is known.
_REFLECTIVE_MEMBERS = frozenset(
    {
        "modules",
        "named_modules",
        "children",
        "named_children",
        "parameters",
        "named_parameters",
        "buffers",
        "named_buffers",
        "state_dict",
        "get_submodule",
        "get_parameter",
        "get_buffer",
        "apply",
        "_modules",
        "_parameters",
        "_buffers",
        "__dict__",
        "__getattr__",
        "__getattribute__",
        "items",  # a ModuleDict's
        "values",
    }
)


def _reflects_on_self(method: ast.AST, parents: dict) -> bool:
    """Whether ``method`` uses ``self`` other than by reading a named attribute: through a
    reflective ``nn.Module`` member, or ``self`` itself handed on (``getattr(self, name)``,
    ``vars(self)``, ``helper(self)``, ``self[0]``, ``for m in self``). ``super(Cls, self)``,
    ``type(self)``, ``isinstance(self, ...)`` and text (``repr(self)``, ``print(self)``) are no
    such use: they reach no child's values."""
    for node in ast.walk(method):
        if not (isinstance(node, ast.Name) and node.id == "self"):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            if parent.attr in _REFLECTIVE_MEMBERS:
                return True
        elif not _is_harmless_call(parent, node):
            return True
    return False


#: Builtins that, handed ``self``, read nothing a fused child would answer differently.
_HARMLESS_BUILTINS = frozenset({"super", "type", "isinstance", "id", "repr", "str", "print"})


def _is_harmless_call(node: ast.AST | None, argument: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _HARMLESS_BUILTINS
        and argument in node.args
    )


def parent_map(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    """Each node under ``tree`` -> the node it sits in (``ast`` keeps no parent links)."""
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


@dataclass(frozen=True)
class _ParsedSource:
    """A file's text parsed once for both readings of it (``_uses_by_class``, ``_reads_by_class``):
    (qualified name, ClassDef) for every class, and the parent of every node in it (which is
    the same node whether the map is made for the file, a class or a method)."""

    classes: list[tuple[str, ast.ClassDef]]
    parents: dict[ast.AST, ast.AST]


@functools.lru_cache(maxsize=8)
def _parsed(text: str) -> _ParsedSource:
    """``text`` parsed; no classes if it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return _ParsedSource([], {})
    return _ParsedSource(list(_class_definitions(tree, "")), parent_map(tree))


#: The nodes a class definition can sit in: statements, and the parts of ``try`` and ``match``
#: that hold them. Expressions hold none (a lambda's body is an expression), so they are skipped.
_STATEMENT_HOLDERS = (ast.stmt, ast.excepthandler, ast.match_case)


def _class_definitions(node: ast.AST, prefix: str):
    """(qualified name, ClassDef) for every class under ``node``, in source order."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, _STATEMENT_HOLDERS):
            continue
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


def _classify_method(method: ast.AST, parents: dict, uses: dict[str, set[str]]) -> None:
    for node in ast.walk(method):
        name = _self_attribute(node)
        if name is not None:
            uses[name].add(_classify_use(node, parents, method))


def _classify_use(node: ast.Attribute, parents: dict, method: ast.AST) -> str:
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
    loop = _loop_over(node, parents)
    if loop is not None and _loop_only_calls_elements(*loop, method, parents):
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


def _loop_over(node: ast.AST, parents: dict) -> tuple[ast.For, set[str]] | None:
    """The ``for`` loop iterating ``node``, directly or through ``enumerate``/``zip``/..., and
    the names it binds to ``node``'s elements (not ``enumerate``'s index, nor what ``zip``
    takes from its other arguments)."""
    parent = parents.get(node)
    wrapper, position = None, 0
    if (
        isinstance(parent, ast.Call)
        and isinstance(parent.func, ast.Name)
        and parent.func.id in _ITERATION_WRAPPERS
        and node in parent.args
    ):
        wrapper, position = parent.func.id, parent.args.index(node)
        node, parent = parent, parents.get(parent)
    if not (isinstance(parent, ast.For) and parent.iter is node):
        return None
    target = parent.target
    if wrapper == "enumerate":  # (index, element)
        parts = target.elts[1:2] if isinstance(target, ast.Tuple) and position == 0 else []
    elif wrapper == "zip":  # one element of each argument
        parts = target.elts[position : position + 1] if isinstance(target, ast.Tuple) else []
    else:
        parts = [target]
    return parent, {part.id for part in parts if isinstance(part, ast.Name)}


def _loop_only_calls_elements(
    loop: ast.For, elements: set[str], method: ast.AST, parents: dict
) -> bool:
    """The loop binds its elements to plain names, calls them, and does nothing else with them.

    Not even compare them: ``block is self.skipped`` or ``block in self.frozen`` is true of the
    original element and false of its fused replacement. Nor may the method read an element
    name after the loop, where it still holds the last element (``for`` does not scope it).
    """
    element_calls = 0  # stays 0 for a target unpacked further or bound to an attribute
    for node in _walk_body(loop):
        if isinstance(node, ast.Name) and node.id in elements:
            parent = parents.get(node)
            if not (isinstance(parent, ast.Call) and parent.func is node):
                return False
            element_calls += 1
    return element_calls > 0 and not _read_outside(elements, loop, method, parents)


def _walk_body(loop: ast.For):
    for statement in loop.body:
        yield from ast.walk(statement)


def _read_outside(names: set[str], loop: ast.For, method: ast.AST, parents: dict) -> bool:
    """Whether ``method`` reads one of ``names`` outside ``loop``'s body where no other binding
    (another loop's, a comprehension's, a nested function's argument) shadows it."""
    inside = set(_walk_body(loop))
    for node in ast.walk(method):
        if (
            isinstance(node, ast.Name)
            and node.id in names
            and isinstance(node.ctx, ast.Load)
            and node not in inside
            and not _bound_around(node, parents, loop, method)
        ):
            return True
    return False


def _bound_around(node: ast.Name, parents: dict, loop: ast.For, method: ast.AST) -> bool:
    """Whether a construct inside ``method``, other than ``loop``, binds ``node``'s name afresh
    around it (the method's own arguments do not: after the loop the name is the element)."""
    child, ancestor = node, parents.get(node)
    while ancestor is not None and ancestor is not method:
        if ancestor is not loop and node.id in _names_bound_around(ancestor, child):
            return True
        child, ancestor = ancestor, parents.get(ancestor)
    return False


def _names_bound_around(ancestor: ast.AST, child: ast.AST) -> set[str]:
    """The names ``ancestor`` binds for the code in ``child``, one of its parts: a loop's
    variables in its body, a comprehension's, a nested function's or lambda's arguments."""
    if isinstance(ancestor, ast.For) and any(child is part for part in ancestor.body):
        return _target_names(ancestor.target)
    if isinstance(ancestor, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        return set().union(*(_target_names(g.target) for g in ancestor.generators))
    if isinstance(ancestor, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return {a.arg for a in ast.walk(ancestor.args) if isinstance(a, ast.arg)}
    return set()


def _target_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
