"""Module-level state that traced code reads and code running as written changes.

A module that runs as written (untraceable, hooked, kept) may change a module-level list, dict or
object on every call (``SEEN.append(1)``), rebind a module-level name (``global COUNT;
COUNT += 1``) or set a class attribute (``type(self).last = x``); traced code reading it
(``y * len(SEEN)``) reads it once, as the trace found it, and the graph keeps that value
(``fuser/frozen_reads.py`` has the same for module attributes). No source is parsed here: a
function's code object names every global it loads (``co_names``) and the ones it assigns
(``STORE_GLOBAL``, ``STORE_ATTR``), and its nested functions', lambdas' and comprehensions' code
objects sit in its constants. Both sides are followed into the module-level functions they call,
a few calls deep; a name that is also an attribute name only makes the answer more cautious.
"""

from __future__ import annotations

import dis
import functools
import logging
import types
from collections.abc import Iterator

import torch
from torch import nn

from .shapes import restore_shallow_state, shallow_state, shallow_state_changed

#: Module-level values that cannot change, that traced code reads live, or whose changes no
#: output depends on (a logger): what they hold is not state a trace could freeze.
_NOT_STATE = (
    types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, str, bytes, int,
    float, complex, bool, type(None), tuple, frozenset, range, torch.Tensor, torch.dtype,
    torch.device, logging.Logger, logging.LoggerAdapter,
)  # fmt: skip
#: How many module-level function calls deep the globals a function names are followed.
_CALL_DEPTH = 3


#: What a piece of module-level state is known by: ``("value", id)`` for a mutable value (found
#: under any name, in any module that imported it), ``("name", id(namespace), name)`` for a name
#: that code rebinds (``global COUNT; COUNT += 1``: the value is new each time, the name is not),
#: ``("attribute", name)`` for an attribute of a module-level class that code may set (by its
#: name alone: ``type(self).last = x`` does not say which class).
StateKey = tuple


def state_changed_by(running: list[nn.Module]) -> dict[StateKey, nn.Module]:
    """The module-level state the code of the modules in ``running`` (their classes', and their
    hooks') may change, each mapped to the first such module: every mutable value it names,
    every name it rebinds, every attribute name it sets."""
    changed: dict[StateKey, nn.Module] = {}
    for module in running:
        functions = [*_class_functions(type(module)), *_hook_functions(module)]
        for _, key, rebound in _module_level_names(functions):
            if key[0] == "value" or rebound:
                changed.setdefault(key, module)
    return changed


def shared_state_read_by(
    cls: type, changed: dict[StateKey, nn.Module]
) -> tuple[str, nn.Module] | None:
    """``(name, module)`` for module-level state the code of ``cls`` names that the code of
    ``module`` may change (``state_changed_by``), or None."""
    for name, key, _ in _module_level_names(_class_functions(cls)):
        if key in changed:
            return name, changed[key]
    return None


def _class_functions(cls: type) -> list[types.FunctionType]:
    """The functions of ``cls`` (and its bases outside torch) that a call of the module runs:
    ``forward``, and the methods, static and class methods and properties' accessors named in
    the code it runs (``self.helper(x)`` names ``helper``), not ``__init__`` or an
    ``init_weights`` that no call reaches."""
    members: dict[str, list[types.FunctionType]] = {}
    for base in reversed(cls.__mro__):
        if base is object or base.__module__.startswith("torch."):
            continue
        for name, value in vars(base).items():
            members[name] = list(_functions_of(value))  # a subclass's member hides its base's
    reached: list[types.FunctionType] = []
    pending = ["forward"]
    done: set[str] = set()
    while pending:
        name = pending.pop()
        if name in done:
            continue
        done.add(name)
        for function in members.get(name, ()):
            reached.append(function)
            pending += [n for n in _names_used(function.__code__) if n in members]
    return reached


def _functions_of(member: object) -> Iterator[types.FunctionType]:
    """The Python functions a class member runs: a method's, a static or class method's, a
    property's accessors."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        yield from (f for f in (member.fget, member.fset) if isinstance(f, types.FunctionType))
    elif isinstance(member, types.FunctionType):
        yield member


def _hook_functions(module: nn.Module) -> Iterator[types.FunctionType]:
    """The Python functions among the hooks registered on ``module`` itself."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for hook in hooks.values():
            function = getattr(hook, "__func__", hook)
            if isinstance(function, types.FunctionType):
                yield function


def _module_level_names(functions) -> Iterator[tuple[str, StateKey, bool]]:
    """``(name, key, rebound)`` for each module-level name the functions use, directly or through
    the module-level functions they call (``_CALL_DEPTH`` deep): its ``("name", ...)`` key, and
    also its ``("value", id)`` key where it holds a mutable value; ``rebound`` where the code
    assigns or deletes it."""
    for function, namespace, used in _functions_reached(functions):
        rebound = _names_rebound(function.__code__)
        for name in used:
            value = namespace.get(name, _ABSENT)
            if isinstance(value, types.FunctionType):
                continue
            if value is _ABSENT and name not in rebound:
                continue  # an attribute name, or a builtin
            yield name, ("name", id(namespace), name), name in rebound
            if value is not _ABSENT and not isinstance(value, _NOT_STATE):
                yield name, ("value", id(value)), name in rebound
            if isinstance(value, type) and not value.__module__.startswith(("torch", "builtins")):
                for attribute in used & _class_attributes(value):  # ``Counter.last``
                    yield f"{name}.{attribute}", ("attribute", attribute), False
        for attribute in _attributes_stored(function.__code__):  # ``type(self).last = x``
            yield f".{attribute}", ("attribute", attribute), True


def _functions_reached(functions) -> Iterator[tuple[types.FunctionType, dict, set[str]]]:
    """``(function, its module's namespace, the names it uses)`` for the functions and the
    module-level functions they call, ``_CALL_DEPTH`` deep (torch's own are not followed)."""
    seen: set[int] = set()
    pending = [(function, 0) for function in functions]
    while pending:
        function, depth = pending.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        namespace = function.__globals__
        used = _names_used(function.__code__)
        yield function, namespace, used
        if depth < _CALL_DEPTH:
            for name in used:
                value = namespace.get(name)
                if isinstance(value, types.FunctionType) and not _from_torch(value):
                    pending.append((value, depth + 1))


class ModuleLevelSnapshot:
    """The module-level state the code of a module tree names (mutable values it names, and names
    its code rebinds), taken before a trace, to see and undo what running ``forward`` on proxies
    did to it. FX runs ``KEPT["last"] = x.mean()`` and records none of it: traced, the fused
    model would never set it, and the caller's dict would keep a proxy of the trace. Contents are
    compared by identity (``shapes.shallow_state``: a dict's items, a list's elements, an object's
    attributes), in the value and in the lists, dicts, sets and objects it holds directly
    (``KEPT["history"].append(x)``)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.writers: dict[tuple, list[tuple[nn.Module, str]]] = {}
        self.values: dict[int, tuple[object, object]] = {}  # id -> (value, shallow_state)
        self.holder: dict[int, int] = {}  # a held container's id -> its module-level value's
        self.names: dict[tuple[int, str], tuple[dict, object]] = {}  # rebound names
        reached: dict[type, list] = {}  # modules of one class run the same code
        for module in root.modules():
            if isinstance(module, torch.jit.ScriptModule):  # compiled: no Python code
                continue
            cls = type(module)
            if cls not in reached:
                reached[cls] = list(_functions_reached(_class_functions(cls)))
            for function, namespace, used in reached[cls]:
                for name in used & _names_rebound(function.__code__):
                    key = (id(namespace), name)
                    self.names.setdefault(key, (namespace, namespace.get(name, _ABSENT)))
                    self.writers.setdefault(("name", *key), []).append((module, name))
                writes = _may_write_into(function.__code__)
                for name in used:
                    value = namespace.get(name, _ABSENT)
                    contents = _state_of(value)
                    if contents is not None:
                        self._take(value, contents)
                        if writes:
                            key = ("value", id(value))
                            self.writers.setdefault(key, []).append((module, name))

    def _take(self, value: object, contents: list | dict | set) -> None:
        """Snapshot a module-level value and the containers it holds directly."""
        if id(value) in self.values:
            return
        self.values[id(value)] = (value, contents)
        for held in contents.values() if isinstance(contents, dict) else contents:
            inner = _state_of(held)
            if inner is not None and id(held) not in self.values:
                self.values[id(held)] = (held, inner)
                self.holder[id(held)] = id(value)

    def changed(self) -> list[tuple[nn.Module, str, str]]:
        """``(module, name, what)`` for each changed piece of state and each module whose code
        may have changed it (names it, and rebinds it or writes into something: ``KEPT[k] =``,
        ``.append``), for ``tracing._refuse_unrecorded_state_changes``; the traced module itself
        where no such code is known."""
        keys = [
            ("value", self.holder.get(k, k))
            for k, (v, c) in self.values.items()
            if shallow_state_changed(v, c)
        ]
        keys += [
            ("name", *k) for k, (ns, v) in self.names.items() if ns.get(k[1], _ABSENT) is not v
        ]
        changed = []
        for key in dict.fromkeys(keys):
            writers = self.writers.get(key) or [(self.root, self._name_of(key))]
            changed += [
                (module, f"module-level {name}", "module-level state")
                for module, name in dict.fromkeys(writers)
            ]
        return changed

    def _name_of(self, key: tuple) -> str:  # for a change no known code writes
        return key[2] if key[0] == "name" else type(self.values[key[1]][0]).__name__

    def restore(self) -> None:
        for value, contents in self.values.values():
            if shallow_state_changed(value, contents):
                restore_shallow_state(value, contents)
        for (_, name), (namespace, saved) in self.names.items():
            if saved is _ABSENT:
                namespace.pop(name, None)
            else:
                namespace[name] = saved


#: Methods that change the list, dict or set they are called on.
_MUTATING_METHODS = frozenset(
    {"append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault",
     "add", "discard", "sort", "reverse", "__setitem__", "__delitem__"}
)  # fmt: skip
#: Instructions that write into an object: ``d[k] = v``, ``del d[k]``, ``o.a = v``.
_WRITING_INSTRUCTIONS = ("STORE_SUBSCR", "DELETE_SUBSCR", "STORE_ATTR", "DELETE_ATTR")


@functools.lru_cache(maxsize=4096)
def _may_write_into(code: types.CodeType) -> bool:
    """Whether ``code`` (or the code nested in it) may change an object it names: it writes an
    item or attribute, or calls a method that changes a list, dict or set. Code that only reads
    a module-level dict is then not blamed for what another module's code wrote into it."""
    if _names_used(code) & _MUTATING_METHODS:
        return True
    return any(True for _ in _names_taken_by(code, _WRITING_INSTRUCTIONS))


def _state_of(value: object) -> list | dict | set | None:
    """``shapes.shallow_state`` of a mutable module-level value (a list, dict or set, or a plain
    object that is not callable), or None for a value that is not state."""
    if isinstance(value, (*_NOT_STATE, nn.Module)) or value is _ABSENT or callable(value):
        return None
    return shallow_state(value)


_ABSENT = object()


def _from_torch(function: types.FunctionType) -> bool:
    """Torch's own functions: the state they keep (caches, registries) is not the model's."""
    return (function.__module__ or "").startswith("torch")


@functools.lru_cache(maxsize=4096)
def _names_used(code: types.CodeType) -> frozenset[str]:
    """Every name ``code`` and the code nested in it (functions, lambdas, comprehensions) load,
    store or delete as globals, or read as attributes."""
    nested = (_names_used(c) for c in code.co_consts if isinstance(c, types.CodeType))
    return frozenset(code.co_names).union(*nested)


def _class_attributes(cls: type) -> set[str]:
    """The names ``cls`` and its bases outside torch (but ``object``) define in their class
    bodies."""
    return {
        name
        for base in cls.__mro__
        if base is not object and not base.__module__.startswith("torch")
        for name in vars(base)
    }


@functools.lru_cache(maxsize=4096)
def _attributes_stored(code: types.CodeType) -> frozenset[str]:
    """The attribute names ``code`` (and the code nested in it) assigns or deletes, on any
    object: ``self.calls += 1``, ``type(self).last = x``."""
    return frozenset(_names_taken_by(code, ("STORE_ATTR", "DELETE_ATTR")))


@functools.lru_cache(maxsize=4096)
def _names_rebound(code: types.CodeType) -> frozenset[str]:
    """The module-level names ``code`` (and the code nested in it) assigns or deletes."""
    return frozenset(_names_taken_by(code, ("STORE_GLOBAL", "DELETE_GLOBAL")))


def _names_taken_by(code: types.CodeType, opnames: tuple[str, ...]) -> Iterator[str]:
    """The names that ``code``'s instructions (and the nested code's) of the kinds ``opnames``
    take."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in opnames:
            yield instruction.argval
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names_taken_by(constant, opnames)
