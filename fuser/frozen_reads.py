"""Traced code that reads the state of a module that runs as written.

A module the traced graph calls as it is (untraceable, kept, hooked or compiled) runs its own
code on every call of the fused model, and that code may change its state: a list it appends to,
a count its hook keeps. While tracing, such a module is not run at all, so traced code that reads
its state (``y * len(self.child.seen)``) reads it once, as the trace found it, and the graph keeps
that value for good: the fused model computes something else from its second call on (or from
its first, when the trace's rollback put back what a failed trace had changed). Nothing is seen
by running the model without example inputs, so the reading module's source is read instead
(``child_usage.attribute_chains``): a module whose code reaches a running module's state, other
than its parameters and buffers (which FX reads live) or by calling it, is not traced either; its
code then runs as written and reads the state as it is. So is a module holding a running module
whose code has no source, or reaches its children by reflection other than to call them
(``for m in self.children(): y = y * len(m.seen)``) in ``forward`` or a method ``forward``
reaches through ``self``: what it reads is not known. Code the traced code runs through another
module is followed too: a method, property or ``__getattr__`` of that module's class
(``self.block.rescale(y)`` runs ``rescale`` inline in the trace) is read as ``forward`` is, and
nn.Module's reflection on it (``self.block.children()``) counts as reading every module in it.
Code and values that are no module are not read: a function, lambda or partial the traced code
calls, or a plain object whose attribute or method it reads, is a reader wherever it holds
(in its closure, defaults, attributes or elements) a running module, or a module outside the
traced tree, whose state the trace cannot vouch for; so is an object that a running module holds
or whose method is its hook (``self.recorder.last``). Module-level state shared with a running
module's code (a list it appends to, a name it rebinds) is ``fuser/global_state.py``'s.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import fx, nn

from .child_usage import _REFLECTIVE_MEMBERS, _TENSOR_ITERATORS, attribute_chains
from .global_state import StateKey, shared_state_read_by, state_changed_by
from .shapes import _EMPTY_CELL, _cell_contents


def frozen_state_readers(
    root: nn.Module, traced: set[int], runs_as_written: set[int]
) -> list[tuple[nn.Module, str]]:
    """``(module, why)`` for the outermost modules traced through (``traced``: ids, with the
    root) whose code reads the state of a module in ``runs_as_written`` (ids)."""
    if not runs_as_written:
        return []
    running_modules = [m for m in root.modules() if id(m) in runs_as_written]
    running = _Running(
        runs_as_written,
        {id(m) for m in root.modules()},
        _objects_of_running_code(running_modules),
    )
    changed = state_changed_by(running_modules)
    shared_by_class: dict[type, str | None] = {}
    readers = []
    for module in root.modules():
        if id(module) not in traced:
            continue
        cls = type(module)
        if cls not in shared_by_class:
            shared_by_class[cls] = _reads_shared_module_state(module, changed)
        why = _reads_running_state(module, running) or shared_by_class[cls]
        if why is not None:
            readers.append((module, why))
    return _outermost(readers)


def _reads_shared_module_state(module: nn.Module, changed: dict[StateKey, nn.Module]) -> str | None:
    """Why the code of ``module``'s class may read module-level state that the code of a running
    module may change (``fuser/global_state.py``), or None."""
    if isinstance(module, fx.GraphModule) or not changed:
        return None
    shared = shared_state_read_by(type(module), changed)
    if shared is None:
        return None
    name, other = shared
    return (
        f"its code names the module-level {name}, which the code of {type(other).__name__} "
        "(running as written) may change"
    )


@dataclass(frozen=True)
class _Running:
    """The modules of the traced tree that run as written (ids), and all its modules (ids): a
    module the trace reaches outside the tree, through a function's closure (``copy.deepcopy``
    keeps functions as they are, so a lambda in the fuser's copy still holds the caller's
    modules), may run as written too, as far as this trace can tell."""

    ids: set[int]
    in_model: set[int]
    objects: set[int]  # ``_objects_of_running_code``

    def __contains__(self, module_id: int) -> bool:
        return module_id in self.ids


def _outermost(readers: list[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str]]:
    """The readers inside no other reader: an outer one runs as written, inner ones with it."""
    inner = {id(m) for reader, _ in readers for m in reader.modules() if m is not reader}
    return [(module, why) for module, why in readers if id(module) not in inner]


def _reads_running_state(
    module: nn.Module,
    runs_as_written: _Running,
    entry: str = "forward",
    checking: set[tuple[int, str]] | None = None,
) -> str | None:
    """Why ``module``'s own code, run from ``entry`` (see ``attribute_chains``), may read what a
    running module changes, or None. ``checking``: the (module id, entry) pairs being checked
    further up, whose code reaching itself again adds nothing."""
    if isinstance(module, fx.GraphModule):  # generated code: calls and live tensor reads only
        return None
    checking = set() if checking is None else checking
    checking.add((id(module), entry))
    chains = attribute_chains(type(module), entry)
    if chains is None:  # no source, or reflection beyond calls: what it reads is not known
        running = _first_running_in(module, runs_as_written)
        if running is None:
            return None
        return (
            "its code has no source, or reaches its children by reflection (self.children(), "
            f"getattr(self, name)) other than to call them, and {running} runs as written"
        )
    for name, reads in chains.items():
        for names, called in reads:
            why = _chain_reads_running_state(
                module, (name, *names), called, runs_as_written, checking
            )
            if why is not None:
                return why
    return None


def _chain_reads_running_state(
    module: nn.Module,
    names: tuple[str | int, ...],
    called: bool,
    runs_as_written: _Running,
    checking: set[tuple[int, str]],
) -> str | None:
    current: object = module
    read = "self"
    for name in names:
        step = name if name == "[i]" else f".{name}" if isinstance(name, str) else f"[{name}]"
        if isinstance(current, nn.Module) and id(current) in runs_as_written:
            key = str(name)  # a Sequential's element 0 is its child "0"
            live = key in current._parameters or key in current._buffers
            if not live and key not in current._modules:
                return f"its code reads {read}{step}, and {read} runs as written"
        elif isinstance(current, nn.Module) and isinstance(name, str) and current is not module:
            # (the reader's own members are its class's code, read from ``entry`` already)
            why = _code_reached_reads_running_state(current, name, runs_as_written, checking)
            if why is not None:
                return f"its code reaches {read}{step} ({why})"
        elif not isinstance(current, nn.Module) and isinstance(name, str):
            held = _running_module_held_by(current, runs_as_written)
            if held is not None:  # its methods, or the element read, may read that module
                return f"its code reads {read}{step}, and {read} (no module) reaches {held}"
        if name == "[i]":  # an index the text does not give: any element
            current = _any_running_element(current, runs_as_written)
            if current is None:
                return None
        else:
            try:
                current = current[name] if isinstance(name, int) else getattr(current, name)
            except Exception:  # set later, or a property that fails: the read is not known
                return None
        read += step
    if isinstance(current, nn.Module):
        running = None if called else _first_running_in(current, runs_as_written)
        if running is not None:
            return f"its code uses {read} other than by calling it, and {running} runs as written"
        return None
    if isinstance(current, types.MethodType) and isinstance(current.__self__, nn.Module):
        return None  # a module's method: its code was read at the last step
    held = _running_module_held_by(current, runs_as_written)
    if held is not None:  # a function's closure, a plain object handed on: what it reads is unknown
        return f"its code uses {read} (no module), which reaches {held}"
    return None


def _code_reached_reads_running_state(
    module: nn.Module, name: str, runs_as_written: _Running, checking: set[tuple[int, str]]
) -> str | None:
    """Why the code that reading ``module.NAME`` runs inline in the trace may read what a running
    module changes, or None: a method or property of its class (``self.block.rescale(y)``: its
    code is traced as the caller's), its ``__getattr__``, or nn.Module's reflection
    (``self.block.children()``, ``self.block._modules``), whose modules the trace reads once.
    A child, tensor or plain value is read, not run (the chain goes on through it)."""
    state = module.__dict__
    if name in _REFLECTIVE_MEMBERS and name not in _TENSOR_ITERATORS:
        running = _first_running_in(module, runs_as_written)
        if running is None:
            return None
        return f"reflection over its modules, and {running} runs as written"
    if name in state or any(name in state[d] for d in ("_modules", "_parameters", "_buffers")):
        return None
    owner = next((cls for cls in type(module).__mro__ if name in cls.__dict__), None)
    if owner is None:  # not found: the class's own __getattr__, if it has one, runs
        name = "__getattr__"
        owner = next(cls for cls in type(module).__mro__ if name in cls.__dict__)
    if owner in (nn.Module, object) or owner.__module__.startswith("torch."):
        return None  # nn.Module's own methods, bar the reflection above
    if not _runs_code(owner.__dict__[name]):
        return None  # a class constant
    if (id(module), name) in checking:
        return None
    return _reads_running_state(module, runs_as_written, name, checking)


def _runs_code(value: object) -> bool:
    """Whether a class attribute is code that reading it through an instance may run: a method,
    a property or any other descriptor."""
    return callable(value) or hasattr(value, "__get__")


#: Values that hold no module: ``_running_module_held_by`` looks no further into them.
_HOLD_NO_MODULE = (
    torch.Tensor, str, bytes, int, float, complex, bool, type(None), type, types.ModuleType,
    torch.dtype, torch.device,
)  # fmt: skip
#: How deep ``_running_module_held_by`` follows references (a helper's list of its modules is 2).
_HELD_DEPTH = 6


def _running_module_held_by(value: object, runs_as_written: _Running) -> str | None:
    """What makes ``value`` (no module) unsafe to trace through, or None: the first module it
    reaches through its attributes, elements, a function's closure and defaults, or a bound
    method's object (a helper ``Keeper(self.block)``, a lambda over a module) that runs as
    written, is or holds one, or lies outside the traced tree (``"Counted3, which runs as
    written"``); or an object that code running as written holds (``_objects_of_running_code``).
    Code the trace runs through such a value may read that module's state, and the text of its
    class, when it has one, is not read."""
    seen: set[int] = set()
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if id(item) in seen or depth > _HELD_DEPTH or isinstance(item, _HOLD_NO_MODULE):
            continue
        seen.add(id(item))
        if id(item) in runs_as_written.objects:
            return f"a {type(item).__name__} that code running as written holds"
        if isinstance(item, nn.Module):
            if id(item) not in runs_as_written.in_model:
                return f"{type(item).__name__}, a module outside the model traced"
            for module in item.modules():
                if id(module) in runs_as_written:
                    return f"{type(module).__name__}, which runs as written"
            continue
        pending += [(part, depth + 1) for part in _references(item)]
    return None


def _objects_of_running_code(running: list[nn.Module]) -> set[int]:
    """Ids of the objects, other than modules and tensors, that the modules in ``running`` hold
    as attributes or through their hooks (a bound method's object, a closure's cells), and what
    those hold: what their code may change as it runs (``self.recorder.last``, set by a hook of
    ``self.recorder``'s). Parameters, buffers and children are not walked: tensors are read live,
    and modules are judged as modules."""
    objects: set[int] = set()
    pending = [
        (value, 0)
        for module in running
        for name, value in vars(module).items()
        if name not in ("_modules", "_parameters", "_buffers")
    ]
    while pending:
        item, depth = pending.pop()
        if id(item) in objects or depth > _HELD_DEPTH:
            continue
        if isinstance(item, (*_HOLD_NO_MODULE, nn.Module)):
            continue
        objects.add(id(item))
        pending += [(part, depth + 1) for part in _references(item)]
    return objects


def _references(item: object) -> list[object]:
    """What ``item`` holds: a container's elements, a function's closure and defaults, a bound
    method's object and function, a partial's function and arguments, an object's attributes."""
    if isinstance(item, dict):
        return list(item.values())
    if isinstance(item, (list, tuple, set, frozenset)):
        return list(item)
    if isinstance(item, types.MethodType):
        return [item.__self__, item.__func__]
    if isinstance(item, types.FunctionType):
        cells = [c for c in map(_cell_contents, item.__closure__ or ()) if c is not _EMPTY_CELL]
        return [*cells, *(item.__defaults__ or ()), *(item.__kwdefaults__ or {}).values()]
    if isinstance(item, functools.partial):
        return [item.func, *item.args, *item.keywords.values()]
    try:
        attributes = list(vars(item).values())
    except TypeError:  # no __dict__
        attributes = []
    slots = {n for cls in type(item).__mro__ for n in _slot_names(cls)}
    return attributes + [getattr(item, n) for n in slots if hasattr(item, n)]


def _slot_names(cls: type) -> tuple[str, ...]:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _first_running_in(module: nn.Module, runs_as_written: _Running) -> str | None:
    """``"it"`` if ``module`` runs as written, else ``"its a.b"`` for the first module in it that
    does, or None."""
    for path, m in module.named_modules():
        if id(m) in runs_as_written:
            return f"its {path}" if path else "it"
    return None


def _any_running_element(container: object, runs_as_written: _Running) -> nn.Module | None:
    """For ``container[i]``: a module element that runs as written or holds one, if any."""
    if not isinstance(container, nn.Module):
        return None
    for element in container.children():
        if any(id(m) in runs_as_written for m in element.modules()):
            return element
    return None
