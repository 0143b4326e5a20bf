"""Tensors that code outside every traced graph may change in place as the fused model runs.

A fold reads a layer's weight and bias and a BatchNorm's statistics and affine once, when fusing.
What traced code does to them the graph records (``in_place``). Code that runs as written is not
in any graph, and runs on every call of the fused model: a forward hook nudging a layer's bias
through a tensor its closure holds, an untraceable module keeping a BN's running mean as an
attribute and updating it, a BatchNorm in training mode updating the statistics it shares with
an eval-mode one. The original then computes with new values on every call, and a fold would
keep the values it read: such a fold is left (README rule 6).

What that code can reach is found from the objects it holds, mostly without reading it: hook
functions (their closure, defaults, bound object), the attributes of modules whose code is not
torch's (other than their parameters, buffers and children, and the hook dicts), and what those
hold in turn (``frozen_reads._references``, 6 deep). Modules reached are not walked: a module's
own code using a child other than by calling it keeps that child whole (``child_usage``), and
what a module that runs as written reaches, modules included, is counted with the graph that
calls it (``tensors_of_running_modules``). A hook reaching a module (a closure over the model, an
object holding a layer) counts every tensor of it where the hook's own code names an in-place
change (``_names_an_in_place_change``): hooks that keep features for a caller, the common kind,
name none. torch.nn's
own layers change their tensors only in training mode (running statistics) or, for an embedding
with ``max_norm``, its weight. Any tensor reached counts, read or written, and so does a plain
tensor attribute of a module that is traced (whose code the graph records): what the code does
with it is not read, and leaving a fold is the error that costs nothing but speed.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase

from .frozen_reads import _HELD_DEPTH, _HOLD_NO_MODULE, _references
from .patterns import (
    CONTAINER_MODULES,
    batch_norm_module_behaves_as_base,
    is_batch_norm_module,
    layer_kind_of_module,
    own_call_code,
)
from .shapes import _MODULE_INTERNALS
from .sharing import storage_of

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def storages_changed_as_it_runs(model: nn.Module) -> dict[int, str]:
    """Storage (``sharing.storage_of``) of each tensor of ``model`` (the fuser's working copy)
    that code running as written may change in place, with who may change it.

    Some may be the caller's tensors' (``copy.deepcopy`` keeps functions as they are, so a hook
    in the copy still closes over the caller's tensors, and changes them where the caller's model
    reads them): ``as_the_copys`` names them as the copy's."""
    changed: dict[int, str] = {}
    for path, module in model.named_modules():
        label = path or "the model"
        state = vars(module)
        for name in _HOOK_DICTS:
            for hook in (state.get(name) or {}).values():
                tensors, reached = _reached(hook, into_modules=False)
                for tensor in tensors:
                    _add(tensor, f"a hook of {label}", changed)
                if reached and _names_an_in_place_change(hook):
                    for other in reached:  # its code may change any of their tensors
                        for tensor in (*other.parameters(), *other.buffers()):
                            _add(
                                tensor,
                                f"a hook of {label}, through {type(other).__name__}",
                                changed,
                            )
        torch_layer = _is_torch_layer(module)
        for tensor, why in _changed_by_torch_code(module, torch_layer):
            who = f"{label} ({type(module).__name__}, {why})"
            _add(tensor, who, changed)
        if isinstance(module, torch.jit.ScriptModule):  # compiled: its code runs as written
            for tensor in (*module.parameters(), *module.buffers()):
                _add(tensor, f"{label} (compiled)", changed)
        if not (torch_layer or isinstance(module, (fx.GraphModule, torch.jit.ScriptModule))):
            # (A GraphModule's code is generated: its graph says what it changes. A compiled
            # module keeps its state in C++.)
            for name, value in state.items():
                if name not in _MODULE_INTERNALS:
                    for tensor in _reached(value, into_modules=False)[0]:
                        _add(tensor, f"{label}.{name}", changed)
    return changed


def as_the_copys(changed: dict[int, str], callers_to_copies: dict[int, int]) -> dict[int, str]:
    """``changed`` with each storage of the caller's tensors replaced by that of its copy."""
    return {callers_to_copies.get(storage, storage): who for storage, who in changed.items()}


def tensors_of_running_modules(gm: fx.GraphModule, untraced: set[int]) -> dict[int, str]:
    """Storages of every tensor the modules ``gm`` calls whose code runs as written (``untraced``,
    ids: opaque or kept calls) can reach, bar torch's own layers and the convs, linears and
    BatchNorms the fuser knows as such, which change nothing in eval mode: their parameters and
    buffers, their children's (a child of such a module may be called in ``gm`` too), and what
    they hold, modules included (``self.__dict__["other"] = sibling``). Their code may change
    any of it as it runs, and what it does is not read. (A hook's reach, and a compiled
    module's, is ``storages_changed_as_it_runs``'; what a hook does to the module it is handed
    is not read.)"""
    changed: dict[int, str] = {}
    if not untraced:
        return changed
    for path, module in gm.named_modules():
        if id(module) in untraced and not runs_known_code(module):
            for tensor in _reached(module, into_modules=True)[0]:
                _add(tensor, f"{path} (which runs as written)", changed)
    return changed


def runs_known_code(module: nn.Module) -> bool:
    """torch.nn's own layers, and the convs, linears and BatchNorms that run their torch base's
    code (``Conv3DSimple``, ``FrozenBatchNorm2d``): none changes its tensors in eval mode."""
    if _is_torch_layer(module):
        return True
    if own_call_code(module) is not None:
        return False
    if is_batch_norm_module(module):
        return batch_norm_module_behaves_as_base(module)
    return layer_kind_of_module(module) is not None


def _is_torch_layer(module: nn.Module) -> bool:
    """torch.nn's own modules, bar its containers, which run the code of what they hold."""
    torch_code = type(module).__module__.startswith("torch.nn.")
    return torch_code and not isinstance(module, CONTAINER_MODULES)


def _changed_by_torch_code(
    module: nn.Module, torch_layer: bool
) -> Iterator[tuple[torch.Tensor, str]]:
    """What torch's own code in ``module`` changes in place as it runs: a norm's running
    statistics in training mode (its subclasses' too), an embedding's weight with ``max_norm``."""
    if module.training and (torch_layer or isinstance(module, _NormBase)):
        for buffer in module.buffers(recurse=False):
            yield buffer, "in training mode"
    if vars(module).get("max_norm") is not None:
        for weight in module.parameters(recurse=False):
            yield weight, "max_norm renormalises it"


def _reached(value: object, into_modules: bool) -> tuple[list[torch.Tensor], list[nn.Module]]:
    """The tensors ``value`` holds (itself included) through what it holds
    (``frozen_reads._references``, 6 deep), and the modules it reaches: walked into when
    ``into_modules`` (their parameters, buffers, children and attributes, each a fresh 6 deep),
    else not."""
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    modules: list[nn.Module] = []
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if id(item) in seen or depth > _HELD_DEPTH:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            tensors.append(item)
        elif isinstance(item, nn.Module):
            modules.append(item)
            if into_modules:
                parts = [*item._parameters.values(), *item._buffers.values()]
                parts += [*item._modules.values(), *_plain_attributes(item)]
                pending += [(part, 0) for part in parts]
        elif not isinstance(item, _HOLD_NO_MODULE):
            pending += [(part, depth + 1) for part in _references(item)]
    return tensors, modules


def _plain_attributes(module: nn.Module) -> list[object]:
    return [value for name, value in vars(module).items() if name not in _MODULE_INTERNALS]


def _names_an_in_place_change(function: object) -> bool:
    """Whether a hook's own code names what changes a tensor in place: a method or function
    whose name ends in ``_`` (``add_``, ``copy_``, ``torch.neg_``; not ``_private`` nor dunder
    names) or an ``out=`` argument. Only its own code, nested functions included, is read: code
    it calls is not (a hook handing a module to a helper that changes it is not seen)."""
    if isinstance(function, types.MethodType):
        function = function.__func__
    if isinstance(function, functools.partial):
        function = function.func
    code = getattr(function, "__code__", None) or getattr(type(function).__call__, "__code__", None)
    pending = [code] if isinstance(code, types.CodeType) else []
    while pending:
        code = pending.pop()
        if any(n.endswith("_") and not n.startswith("_") for n in code.co_names):
            return True
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):
                pending.append(constant)
            elif isinstance(constant, tuple) and "out" in constant:  # keyword names of a call
                return True
    return False


def who_may_change(changed: dict[int, str], tensor: torch.Tensor) -> str | None:
    """Who may change ``tensor`` as the model runs, by ``changed`` (storages), or None."""
    storage = _storage(tensor)
    return None if storage is None else changed.get(storage)


def _add(tensor: torch.Tensor, who: str, changed: dict[int, str]) -> None:
    storage = _storage(tensor)
    if storage is not None:
        changed.setdefault(storage, who)


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return storage_of(tensor)
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage to read
        return None
