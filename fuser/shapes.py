"""Running the model on ``example_inputs`` without leaving a trace on it.

The fuser runs the model for two reasons: shape propagation (to prove a Linear's input is 2-D) and,
for a model FX cannot trace whole, recording what each submodule is called with. A run must not
change the model: a BN left in training mode would update its running statistics, and a dropout
would draw random numbers, so buffers and the RNG state are restored afterwards.
"""

from __future__ import annotations

import contextlib
import operator
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_map

from .errors import FuserError


@contextlib.contextmanager
def state_preserved(module: nn.Module) -> Iterator[None]:
    """Run ``module`` for the fuser's own purposes and leave no trace of it: buffers (a
    training-mode BatchNorm's statistics), parameters (code that changes one in place as it runs,
    ``self.conv.bias.data.add_(0.5)``), the RNG, and every module's attributes (code that counts
    its calls or keeps its last features, ``self.calls += 1``) and the tensors they keep as plain
    attributes (``tensor_attributes``), as the caller's model has them; the fused model starts
    from the same state. Only runs on example inputs pay for the copies."""
    plain = [tensor for tensor, _, _ in tensor_attributes(module)]
    tensors = [*module.parameters(), *module.buffers(), *plain]
    saved = [(tensor, tensor.detach().clone()) for tensor in tensors]
    attributes = attributes_of(module)
    devices = sorted({t.device.index for t, _ in saved if t.is_cuda and t.device.index is not None})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield
        finally:
            restore_attributes(attributes)
            for tensor, value in saved:
                tensor.copy_(value)


def tensor_attributes(module: nn.Module) -> list[tuple[torch.Tensor, nn.Module, str]]:
    """Tensors the modules keep as plain attributes, not registered as parameters or buffers
    (``self.scale = torch.ones(1)``), alone or in a list, tuple or dict attribute
    (``self.history = [torch.zeros(3)]``, ``self.weights = [self.conv.weight]``), each once:
    code may change them in place as it runs, and FX hands traced code the tensor itself, as it
    does a buffer (a parameter held so too, which its ``.data`` changes without moving its
    version counter). With the module holding each and the attribute's name."""
    found: dict[int, tuple[torch.Tensor, nn.Module, str]] = {}
    for m in module.modules():
        if isinstance(m, torch.jit.ScriptModule):  # compiled: its attributes are C++ state
            continue
        for name, value in m.__dict__.items():
            if name in _MODULE_INTERNALS or type(value) in _SCALARS:
                continue
            values = value.values() if isinstance(value, dict) else value
            for item in values if isinstance(value, (list, tuple, dict)) else (value,):
                if isinstance(item, torch.Tensor):
                    found.setdefault(id(item), (item, m, name))
    return list(found.values())


#: Attribute values that are certainly no tensor and hold none (skipped at once).
_SCALARS = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size})


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")
#: Containers a module may keep as plain attributes and fill as it runs (``self.outputs.append``).
_CONTAINERS = (list, dict, set)
#: What ``nn.Module`` itself keeps in every instance (its parameter, buffer and module dicts, its
#: hook dicts): torch's bookkeeping, not state a model's code fills as it runs.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def attributes_of(module: nn.Module) -> list[tuple]:
    """Each module's attributes, the contents of its parameter, buffer and module dicts, the
    contents of every list, dict or set it keeps as an attribute, and the attributes (and their
    lists, dicts and sets) of every plain object it holds, for ``restore_attributes`` and
    ``changed_state``."""
    saved = []
    for m in module.modules():
        if isinstance(m, torch.jit.ScriptModule):  # compiled: its attributes are C++ state
            continue
        state = m.__dict__
        inner = [(d, dict(d)) for d in map(state.get, _MODULE_DICTS) if d is not None]
        containers, held = [], []
        for name, value in state.items():
            if name in _MODULE_INTERNALS or type(value) in _ATOMS:
                continue
            if isinstance(value, _CONTAINERS):
                containers.append((name, value, _copy_of(value)))
            elif isinstance(value, types.MethodType):  # a plain object's method: that object
                if _is_plain_object(value.__self__):
                    held.append(_held_state(name, value.__self__))
            elif _is_plain_object(value):
                held.append(_held_state(name, value))
        saved.append((m, dict(state), inner, containers, held))
    return saved


def _held_state(name: str, value: object) -> tuple:
    """A held object's attributes, its lists, dicts and sets, and (a function's) the variables
    of its closure, which a counter made by a factory function keeps (``nonlocal n; n += 1``)."""
    state = value.__dict__
    cells = []
    if isinstance(value, types.FunctionType) and value.__closure__:
        variables = zip(value.__code__.co_freevars, value.__closure__, strict=True)
        cells = [(variable, cell, _cell_contents(cell)) for variable, cell in variables]
    return name, value, dict(state), _containers_of(state), cells


#: What an empty closure cell holds, as far as the comparison goes (its contents raise).
_EMPTY_CELL = object()


def _cell_contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


#: Objects with a ``__dict__`` that are not state a module holds: modules (each saved on its own),
#: tensors (``_TensorSnapshot`` and the buffer copies see those), classes, Python modules, and a
#: GraphModule's graph (FX's own: running the module never changes it).
_NOT_HELD_STATE = (nn.Module, torch.Tensor, type, types.ModuleType, fx.Graph)
#: The most common attribute values, none with a ``__dict__``: skipped without looking for one.
_ATOMS = frozenset(
    {bool, int, float, str, type(None), tuple, torch.dtype, torch.device, torch.Size}
)


def _is_plain_object(value: object) -> bool:
    """An object keeping its state in a ``__dict__`` (``self.stats = Stats()``, a namespace, a
    function with attributes), whose attributes code may set as it runs: ``self.stats.calls += 1``
    goes through no module at all. (``attributes_of`` skips ``_ATOMS`` before asking.)"""
    return isinstance(getattr(value, "__dict__", None), dict) and not isinstance(
        value, _NOT_HELD_STATE
    )


def _containers_of(attributes: dict) -> list[tuple]:
    return [
        (name, value, _copy_of(value))
        for name, value in attributes.items()
        if isinstance(value, _CONTAINERS)
    ]


def _copy_of(container: list | dict | set) -> list | dict | set:
    """A container's contents, as the plain container its class extends (a ``defaultdict``'s
    constructor would want its factory first)."""
    for kind in _CONTAINERS:
        if isinstance(container, kind):
            return kind(container)
    raise TypeError(type(container).__name__)


def restore_attributes(saved: list) -> None:
    for m, attributes, inner, containers, held in saved:
        _restore_dict(m.__dict__, attributes)
        for original, contents in inner:
            _restore_dict(original, contents)
        for _, container, contents in containers:
            _refill(container, contents)
        for _, value, value_attributes, value_containers, cells in held:
            _restore_dict(value.__dict__, value_attributes)
            for _, container, contents in value_containers:
                _refill(container, contents)
            for _, cell, contents in cells:
                if contents is not _EMPTY_CELL:
                    cell.cell_contents = contents
                elif _cell_contents(cell) is not _EMPTY_CELL:
                    del cell.cell_contents


def shallow_state(value: object) -> list | dict | set | None:
    """What a list, dict or set holds, or a plain object's attributes (``_is_plain_object``),
    for ``shallow_state_changed`` and ``restore_shallow_state``; None for anything else. The same
    one-level snapshot ``attributes_of`` takes of what a module keeps, for values held elsewhere
    (``global_state``'s module-level state)."""
    if isinstance(value, _CONTAINERS):
        return _copy_of(value)
    if type(value) not in _ATOMS and _is_plain_object(value):
        return dict(value.__dict__)
    return None


def shallow_state_changed(value: object, saved: list | dict | set) -> bool:
    """Whether ``value`` holds other objects (by identity) than when ``shallow_state`` took
    ``saved``."""
    if isinstance(value, _CONTAINERS):
        return not _same_contents(value, saved)
    return bool(_rebound(value.__dict__, saved))


def restore_shallow_state(value: object, saved: list | dict | set) -> None:
    if isinstance(value, _CONTAINERS):
        _refill(value, saved)
    else:
        _restore_dict(value.__dict__, saved)


def _restore_dict(now: dict, then: dict) -> None:
    now.clear()
    now.update(then)


def changed_state(saved: list) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, what it is) of each change to a module's state since ``attributes_of``
    took ``saved``: a list, dict or set it keeps whose contents changed (``"a list"``), and an
    attribute set, added or deleted in its ``__dict__`` or its parameter, buffer or module dict
    directly (``"an attribute"``), the writes ``nn.Module.__setattr__`` never sees:
    ``object.__setattr__(self, "calls", n)``, ``self.__dict__["calls"] = n``,
    ``self._buffers["last"] = x``; and the same one level down, in a plain object the module
    holds (``self.stats.calls += 1``, ``self.stats.history.append(x)``: ``"stats.calls"``,
    ``"an attribute of the Stats it holds"``), in the object whose method it holds, and in the
    closure of a function it holds (a counter's ``nonlocal n``). Compared by identity."""
    changed = []
    for m, attributes, inner, containers, held in saved:
        changed += [(m, name, "an attribute") for name in _rebound(m.__dict__, attributes)]
        for original, contents in inner:
            changed += [(m, name, "an attribute") for name in _rebound(original, contents)]
        if containers:  # most modules keep none: no call
            changed += [(m, name, kind) for name, kind in _refilled(containers)]
        for name, value, value_attributes, value_containers, cells in held:
            holder = f"of the {type(value).__name__} it holds"
            changed += [
                (m, f"{name}.{attribute}", f"an attribute {holder}")
                for attribute in _rebound(value.__dict__, value_attributes)
            ]
            changed += [
                (m, f"{name}.{attribute}", f"{kind} {holder}")
                for attribute, kind in _refilled(value_containers)
            ]
            changed += [
                (m, f"{name}.{variable}", "a variable of the closure of the function it holds")
                for variable, cell, contents in cells
                if _cell_contents(cell) is not contents
            ]
    return changed


def _refilled(containers: list[tuple]) -> list[tuple[str, str]]:
    """(name, what it is) of each list, dict or set whose contents changed."""
    return [
        (name, _a(type(container).__name__))
        for name, container, contents in containers
        if not _same_contents(container, contents)
    ]


def _rebound(now: dict, then: dict) -> list[str]:
    """The keys of ``now`` set, added or deleted since it held ``then``, by identity."""
    if now.keys() == then.keys() and all(map(operator.is_, now.values(), then.values())):
        return []  # the common case: same keys, same objects in the same order (C loops)
    added_or_set = [key for key, value in now.items() if key not in then or then[key] is not value]
    return added_or_set + [key for key in then if key not in now]


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _same_contents(container: list | dict | set, contents: list | dict | set) -> bool:
    """The same objects, compared by identity (a proxy compares by building a graph node)."""
    if isinstance(container, dict):
        return container.keys() == contents.keys() and all(
            container[key] is value for key, value in contents.items()
        )
    if isinstance(container, set):
        return {id(item) for item in container} == {id(item) for item in contents}
    return len(container) == len(contents) and all(
        a is b for a, b in zip(container, contents, strict=True)
    )


def _refill(container: list | dict | set, contents: list | dict | set) -> None:
    if isinstance(container, list):
        container[:] = contents
    else:
        container.clear()
        container.update(contents)


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic cuDNN algorithms for a run whose output is compared bit for bit.

    The trace check (``fidelity``) compares a traced graph with its module's forward. On an H200,
    a faithful graph of a block with a float64 ConvTranspose3d differed from its forward in the
    last bits in 8 of 20 fuses (ten eager runs of the model agreed bit for bit), and none with these
    flags set. The flags are put back afterwards.
    """
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def example_inputs_rejected(error: Exception) -> FuserError:
    """The caller's inputs do not run through the model."""
    return FuserError(f"example_inputs could not be run through the model: {error}")


def copy_inputs(inputs: tuple) -> tuple:
    """The inputs with each tensor copied (once, however often it appears), for one run of the
    model: code that changes its input in place (``x += 1``, ``x.relu_()``) must change neither
    the caller's tensors, which ``fuse`` never touches, nor what the next run reads."""
    copies: dict[int, torch.Tensor] = {}

    def copy_of(value: object) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in copies:
            copies[id(value)] = value.detach().clone()
        return copies[id(value)]

    return tree_map(copy_of, inputs)


@dataclass
class TracedRun:
    """One run of a traced graph on the example inputs: its output, or the error that stopped it."""

    output: object = None
    error: Exception | None = None


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> TracedRun:
    """Run ``gm`` on copies of ``example_inputs``, recording each node's output shape in
    ``node.meta["tensor_meta"]``.

    FX's interpreter can fail where the model runs fine (it hands wrapped functions immutable
    lists, which torchvision's Swin3D writes to). Then the graph's generated code runs instead, the
    shapes stay unknown, and only sites that need them are left.
    """
    try:
        with state_preserved(gm), deterministic_kernels():
            output = ShapeProp(gm).propagate(*copy_inputs(example_inputs))
        return TracedRun(output)
    except Exception:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
    gm.recompile()  # a traced module has no code yet (``tracing.TracedGraphModule``)
    try:
        with state_preserved(gm), deterministic_kernels():
            return TracedRun(gm(*copy_inputs(example_inputs)))
    except Exception as error:
        return TracedRun(error=error)


def record_module_inputs(model: nn.Module, example_inputs: tuple) -> dict[int, tuple]:
    """Positional arguments of each submodule's first call, keyed by the submodule's id."""
    recorded: dict[int, tuple] = {}

    def remember(module: nn.Module, args: tuple) -> None:
        recorded.setdefault(id(module), args)

    scripted = {
        id(m) for s in model.modules() if isinstance(s, torch.jit.ScriptModule) for m in s.modules()
    }
    handles = [
        m.register_forward_pre_hook(remember)
        for m in model.modules()
        if m is not model and id(m) not in scripted  # compiled modules take no Python hooks
    ]
    try:
        with state_preserved(model):
            model(*copy_inputs(example_inputs))
    except Exception as error:
        raise example_inputs_rejected(error) from error
    finally:
        for handle in handles:
            handle.remove()
    return recorded
