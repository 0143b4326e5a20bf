"""Symbolic tracing that keeps every module the fuser must not look inside as one call.

Leaves (kept as ``call_module`` nodes) are: the layers and BatchNorms the fuser folds, torch.nn's own
modules (FX's default), modules with hooks (tracing through a module drops its hooks, which would
silently change the model), and modules FX cannot trace. The last are found only when a trace fails:
the smallest untraceable submodules become opaque leaves so that the rest of the model still traces.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import FuserError
from .frozen_reads import frozen_state_readers
from .global_state import ModuleLevelSnapshot
from .patterns import (
    batch_norm_module_behaves_as_base,
    call_overridden,
    has_hooks,
    is_batch_norm_module,
    layer_kind_of_module,
    own_call_code,
)
from .report import UntracedModule
from .shapes import attributes_of, changed_state, restore_attributes, tensor_attributes


def is_foldable_layer_or_batch_norm(module: nn.Module) -> bool:
    if layer_kind_of_module(module) is not None:
        return True
    return is_batch_norm_module(module) and batch_norm_module_behaves_as_base(module)


class FoldTracer(fx.Tracer):
    """FX's tracer with the fuser's leaf rules; ``opaque`` holds ids of untraceable modules, and
    ``kept`` ids of modules to keep as calls and fuse on their own (see ``fuse.py``).

    A submodule whose code fails to trace is rolled back and kept as one call (made opaque) on
    the spot, and the trace goes on: one trace finds every untraceable submodule, where tracing
    each candidate again on its own would cost a trace per module.
    """

    def __init__(
        self,
        opaque: set[int],
        untraced: list[tuple[str, str]],
        kept: frozenset[int] = frozenset(),
        autocast: set[int] | None = None,
    ) -> None:
        super().__init__()
        self.opaque = opaque
        self.autocast = set() if autocast is None else autocast  # opaque: its code enters autocast
        self.kept = kept
        self.untraced = untraced  # (qualified name, why) of each module made opaque
        self.entered: set[int] = set()  # modules traced through at some call site
        self._proxy_cache: dict | None = None
        self.attributes_before_trace: dict[int, tuple] = {}  # set by _trace_with
        self._leaf_answer: tuple[nn.Module, bool] | None = None  # see call_module

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        answered = self._leaf_answer
        if answered is not None and answered[0] is m:  # FX asking again what call_module asked
            self._leaf_answer = None
            return answered[1]
        if id(m) in self.opaque or id(m) in self.kept or has_hooks(m):
            return True
        if is_foldable_layer_or_batch_norm(m):
            return True
        if is_batch_norm_module(m) and own_call_code(m) is not None:
            # Kept as the call it is, so the report names it and why it stays. torch.nn's BNs are
            # leaves anyway; torchvision's FrozenBatchNorm2d would be traced through, its forward
            # replaced on the instance recorded as arithmetic that names no BatchNorm.
            return True
        if isinstance(m, torch.jit.ScriptModule):  # compiled code: FX cannot look inside
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        self._proxy_cache = parameter_proxy_cache  # rolled back with the graph, see call_module
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        """FX's ``call_module``, which asks ``is_leaf_module`` first thing: it is handed the
        answer this method found (the rules take a few microseconds a call, and a trace makes
        hundreds), and a module whose call fails to trace is rolled back and kept as a call."""
        if self.is_leaf_module(m, ""):
            _refuse_own_call_code(m)
            return self._call_answered(m, True, forward, args, kwargs)
        checkpoint = _TraceCheckpoint(self, m)
        try:
            result = self._call_answered(m, False, forward, args, kwargs)
        except _RetraceNeeded:
            raise
        except Exception as error:  # tracing runs user code: any failure means "not traceable"
            checkpoint.roll_back()
            _refuse_own_call_code(m)
            self.opaque.add(id(m))
            if isinstance(error, AutocastInForward):
                self.autocast.add(id(m))
            self.untraced.append((self.path_of_module(m), _describe(error)))
            if id(m) in self.entered:  # traced through elsewhere: it must be opaque everywhere
                raise _RetraceNeeded from error
            return super().call_module(m, forward, args, kwargs)
        self.entered.add(id(m))
        return result

    def _call_answered(self, m: nn.Module, leaf: bool, forward, args, kwargs):
        self._leaf_answer = (m, leaf)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:  # never left for a later question: a module's answer changes once it is opaque
            self._leaf_answer = None


class OwnCallCode(Exception):
    """Raised inside a trace at a module call that cannot be recorded as one ``call_module``."""


def _refuse_own_call_code(module: nn.Module) -> None:
    """A module kept as one call whose class overrides ``__call__`` cannot be recorded: the trace
    has already recorded what its ``__call__`` did around the call, and the node would run that
    again. The module calling it fails to trace instead (and stays opaque, calling it as written).
    A traced-through module is fine: its ``__call__`` code is recorded once, its forward inlined.
    """
    if call_overridden(module):
        raise OwnCallCode(
            f"it calls {type(module).__name__}, whose class overrides __call__, and that cannot "
            "be kept as one call"
        )


class _RetraceNeeded(Exception):
    """A module traced through at one call site failed at another: trace again with it opaque."""


class _TraceCheckpoint:
    """What a failed submodule call must undo: its nodes, its attribute changes, the tracer's
    bookkeeping, and the reports of untraceable modules found inside it (it is opaque whole).

    Attributes go back to the copy taken when the trace began (the trace's end restores them to
    it anyway), rather than to a copy taken at every call: that would cost a walk of each
    submodule's subtree per call, in every trace, for a rollback that rarely happens.
    """

    def __init__(self, tracer: FoldTracer, module: nn.Module) -> None:
        self.tracer = tracer
        self.last_node = next(iter(reversed(tracer.graph.nodes)), None)
        self.stack_depth = len(tracer.module_stack)
        self.untraced = len(tracer.untraced)
        self.module = module

    def roll_back(self) -> None:
        tracer, graph = self.tracer, self.tracer.graph
        for node in reversed(graph.nodes):
            if node is self.last_node:
                break
            graph.erase_node(node)
        if tracer._proxy_cache is not None:
            for name, proxy in list(tracer._proxy_cache.items()):
                if getattr(proxy.node, "_erased", False):
                    del tracer._proxy_cache[name]
        # (FX's per-module call counts stay as they are: they only number the module-stack
        # metadata, and copying them at every call would make a trace quadratic.)
        while len(tracer.module_stack) > self.stack_depth:
            tracer.module_stack.popitem(last=True)
        del tracer.untraced[self.untraced :]
        saved = tracer.attributes_before_trace
        restore_attributes([saved[id(m)] for m in self.module.modules() if id(m) in saved])
        # Buffers the failed call changed in place are not put back here: whether the change
        # came from the call or from code before it cannot be told without a copy per call, so
        # it counts at the trace's end like any other (``_TensorSnapshot``).


class TracedGraphModule(fx.GraphModule):
    """A GraphModule whose constructor generates no code.

    The fold pass edits every traced graph and generates its code afterwards (``recompile``), so
    the code FX's constructor would generate first is never run: for mobilenet_v2 that is 4 ms of
    a 50 ms fuse. Until ``recompile()`` has run the module has no ``forward``, and calling it
    fails loudly; FX's ``Interpreter`` (shape propagation) runs the graph without it. After that
    it is an ordinary GraphModule: later ``recompile()`` calls generate code as usual.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule") -> None:
        self.__dict__["_codegen_deferred"] = True  # read by recompile, which __init__ calls
        try:
            super().__init__(root, graph, class_name)
        finally:
            del self.__dict__["_codegen_deferred"]

    def recompile(self):
        if self.__dict__.get("_codegen_deferred"):
            return None
        return super().recompile()

    def __reduce__(self):
        """FX's own pickling, so that a saved fused model loads with torch alone, plus the hooks
        and the training flag as pickle state.

        FX saves a GraphModule as its code and attributes and, on load, builds a new one from
        the code, which starts with empty hook dicts and ``training=True``; of the saved
        attributes it sets back only those the new module lacks. The forward hook of a fused
        container (moved onto its GraphModule) would be gone after ``torch.load``, silently.
        Pickle hands the state to ``nn.Module.__setstate__``, which puts it back.
        """
        rebuild, arguments = super().__reduce__()
        saved = arguments[0]
        return rebuild, arguments, {name: saved[name] for name in _REBUILT_FRESH if name in saved}

    def __deepcopy__(self, memo: dict) -> TracedGraphModule:
        """FX's deep copy, plus the hooks and training flag it leaves out: it rebuilds the module
        and copies back only its state-dict hooks, so ``copy.deepcopy`` of a fused model (an EMA
        copy, a copy before quantization) would run a fused container without its forward hook.
        """
        duplicate = super().__deepcopy__(memo)
        for name in _REBUILT_FRESH:
            if name in self.__dict__:
                duplicate.__dict__[name] = copy.deepcopy(self.__dict__[name], memo)
        return duplicate


def _trace_with(tracer: FoldTracer, module: nn.Module) -> TracedGraphModule:
    with (
        _attributes_restored(module) as saved,
        _tensors_restored(module) as tensors,
        _module_level_state_restored(module) as module_level,
        _autocast_refused(),
        _grad_mode_changes_refused(),
        _augmented_assignments_recorded(),
    ):
        tracer.attributes_before_trace = {id(entry[0]): entry for entry in saved}
        with _module_state_writes_refused() as machinery_writes:
            graph = tracer.trace(module)
        changed = [c for c in changed_state(saved) if (id(c[0]), c[1]) not in machinery_writes]
        changed += tensors.changed() + module_level.changed()
        _refuse_unrecorded_state_changes(tracer, module, changed)
        # FX records the tracer's class so that unpickling can trace the generated code again.
        # Ours needs arguments and this package; FX's own Tracer retraces that code just as well,
        # and a fused model saved whole then loads with torch alone.
        graph._tracer_cls = None
        # Made before the restore: it copies the constants tracing stored on the root.
        return TracedGraphModule(tracer.root, graph, type(module).__name__)


def _refuse_unrecorded_state_changes(
    tracer: FoldTracer, root: nn.Module, changed: list[tuple[nn.Module, str, str]]
) -> None:
    """State the traced code changed where ``nn.Module.__setattr__`` (refused while tracing)
    does not see it would never change in the traced graph: FX runs the code and records none of
    it. That is a list, dict or set a module keeps being filled (``self.outputs.append(x)``), and
    an attribute set around ``__setattr__`` (``object.__setattr__(self, "calls", n)``,
    ``self.__dict__[...]``, ``self._buffers[...]``), and a buffer changed in place
    (``_TensorSnapshot``). The modules whose state changed are made
    opaque (their code, which usually changes it, then runs as written) and the trace starts
    again. If one is the module traced, or one is opaque already (so code outside it changes
    it), the whole module stays untraced."""
    if not changed:
        return
    owners = {id(m) for m, _, _ in changed}
    unrecorded = "which FX does not record (traced, the fused model would never change it)"
    first, name, kind = changed[0]
    if id(root) in owners or owners & tracer.opaque:
        raise StateWriteInForward(
            f"its code changes {type(first).__name__}.{name} ({kind}) as it runs, {unrecorded}"
        )
    for m, name, kind in changed:
        if id(m) not in tracer.opaque:
            tracer.opaque.add(id(m))
            why = f"StateWriteInForward: its {name} ({kind}) is changed as it runs, {unrecorded}"
            tracer.untraced.append((tracer.path_of_module(m), why))
    raise _RetraceNeeded


class AutocastInForward(Exception):
    """Raised inside a trace when the traced code enters ``torch.autocast``."""


class GradModeInForward(Exception):
    """Raised inside a trace when the traced code changes the grad mode."""


#: How code changes the grad mode, as (class, method): ``torch.set_grad_enabled(False)`` changes it
#: when constructed, as a plain call; the others on entering, as ``with`` blocks or decorators
#: (a decorated function enters a fresh copy of its context manager on every call).
GRAD_MODE_CHANGES = (
    (torch.no_grad, "__enter__"),
    (torch.enable_grad, "__enter__"),
    (torch.set_grad_enabled, "__init__"),
    (torch.inference_mode, "__enter__"),
)


def _autocast_refused() -> contextlib.AbstractContextManager:
    """Make code that enters ``torch.autocast`` untraceable while a trace runs.

    FX runs a ``with torch.autocast(...)`` block while tracing but records none of it: the
    traced graph runs those operations without autocast, in other dtypes, and (for a region
    that turns autocast off) differently again under a caller's autocast. So the module whose
    code enters it stays one opaque call that runs its own code. ``torch.autocast.__enter__``
    is what every form goes through: the ``with`` statement, the decorator, and the
    ``torch.cuda.amp`` and ``torch.cpu.amp`` subclasses, which call it.
    """
    message = (
        "its code enters torch.autocast, which FX does not record (traced, the code would run "
        "without it)"
    )
    return _refused_while_tracing(((torch.autocast, "__enter__"),), AutocastInForward, message)


def _grad_mode_changes_refused() -> contextlib.AbstractContextManager:
    """Make code that changes the grad mode untraceable while a trace runs.

    FX runs a ``with torch.no_grad():`` block (or a ``@torch.no_grad()`` forward) while tracing
    but records none of it: the traced graph tracks gradients where the code turned them off, so
    the fused model's output requires grad where the original's does not, and a backward pass
    reaches (and an optimizer step changes) the weights the code kept out of it. So the module
    whose code changes the grad mode stays one opaque call that runs its own code; its children
    are fused on their own, and run inside its region as they did.
    """
    message = (
        "its code changes the grad mode (torch.no_grad, enable_grad, set_grad_enabled or "
        "inference_mode), which FX does not record (traced, the code would track gradients "
        "as its caller does)"
    )
    return _refused_while_tracing(GRAD_MODE_CHANGES, GradModeInForward, message)


@contextlib.contextmanager
def _refused_while_tracing(
    methods: tuple[tuple[type, str], ...], error: type[Exception], message: str
) -> Iterator[None]:
    """Make each (class, method) raise ``error(message)`` when the tracing thread calls it, for
    the duration of the block. Other threads, which may be running models meanwhile, are not
    affected."""
    tracing_thread = threading.get_ident()
    originals = [(cls, name, cls.__dict__.get(name), getattr(cls, name)) for cls, name in methods]

    def refusing(original):
        def refuse(self, *args, **kwargs):
            if threading.get_ident() != tracing_thread:
                return original(self, *args, **kwargs)
            raise error(message)

        return refuse

    for cls, name, _, inherited in originals:
        setattr(cls, name, refusing(inherited))
    try:
        yield
    finally:
        for cls, name, own, _ in originals:
            if own is None:
                delattr(cls, name)
            else:
                setattr(cls, name, own)


class StateWriteInForward(Exception):
    """Raised inside a trace when the traced code sets an attribute of a module."""


#: The modules whose code may set module attributes while a trace runs: FX's own (it stores the
#: constants it meets on the root, and builds GraphModules).
_TRACING_MACHINERY = ("torch.fx.",)


@contextlib.contextmanager
def _module_state_writes_refused() -> Iterator[set[tuple[int, str]]]:
    """Make code that sets a module attribute (``self.calls += 1``, ``self.features = x``)
    untraceable while a trace runs.

    FX runs such code while tracing and records none of it: the traced graph never sets the
    attribute, so the fused model would keep whatever the trace's rollback left there, silently,
    while the caller reads it after every call (a feature kept for later, a call counter). So
    the module whose code sets it stays one opaque call that runs its own code. What FX itself
    stores on the root (the tensor constants it meets) is let through. Other threads, which may
    be running models meanwhile, are not affected.

    Yields the (module id, attribute) pairs FX's writes set, which ``changed_state`` then sees
    as changes: they are FX's, not the model's.
    """
    original = nn.Module.__setattr__
    tracing_thread = threading.get_ident()
    machinery_writes: set[tuple[int, str]] = set()

    def refuse_from_user_code(self: nn.Module, name: str, value: object) -> None:
        if threading.get_ident() == tracing_thread:
            writer = sys._getframe(1).f_globals.get("__name__", "")
            if not writer.startswith(_TRACING_MACHINERY):
                raise StateWriteInForward(
                    f"its code sets {type(self).__name__}.{name} as it runs, which FX does not "
                    "record (traced, the fused model would never set it)"
                )
            machinery_writes.add((id(self), name))
        original(self, name, value)

    nn.Module.__setattr__ = refuse_from_user_code
    try:
        yield machinery_writes
    finally:
        nn.Module.__setattr__ = original


#: ``x op= y`` on a traced value, and the function Python runs for it.
AUGMENTED_ASSIGNMENTS = {
    f"__i{name}__": getattr(operator, f"i{name}")
    for name in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
        "lshift", "rshift", "and", "or", "xor",
    )
}  # fmt: skip


@contextlib.contextmanager
def _augmented_assignments_recorded() -> Iterator[None]:
    """Record ``x += y`` (and every ``op=``) on a traced value as the in-place operation it is.

    FX's ``Proxy`` has no in-place operators, so Python falls back to ``x = x + y``: the graph adds
    out of place and the tensor ``x`` named before is left unchanged. Wherever that tensor is seen
    again, the traced model computes something else: another name for it (``skip = x``), a view of
    it, the caller's input. The graph gets ``operator.iadd(x, y)`` instead, which at run time is
    ``x += y`` itself: the same tensor changes, as it does in eager code (and a number, which has no
    in-place form, is replaced, as it is there). Other threads, which may be tracing with FX
    meanwhile, keep FX's behaviour.
    """
    tracing_thread = threading.get_ident()
    originals = {name: fx.Proxy.__dict__.get(name) for name in AUGMENTED_ASSIGNMENTS}

    def recorded(name: str, function):
        original = originals[name]

        def augmented(self: fx.Proxy, other):
            if threading.get_ident() != tracing_thread:
                return NotImplemented if original is None else original(self, other)
            return self.tracer.create_proxy("call_function", function, (self, other), {})

        return augmented

    for name, function in AUGMENTED_ASSIGNMENTS.items():
        setattr(fx.Proxy, name, recorded(name, function))
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(fx.Proxy, name)
            else:
                setattr(fx.Proxy, name, original)


# What FX's unpickling and deep copy rebuild fresh on a GraphModule: the flag and the hook dicts.
_REBUILT_FRESH = ("training", *(name for name in vars(nn.Module()) if "hook" in name))


@contextlib.contextmanager
def _attributes_restored(module: nn.Module) -> Iterator[list]:
    """Undo what running ``forward`` on proxies did to the modules' attributes.

    Tracing runs user code, and user code caches things: torchvision's ``MultiScaleRoIAlign``
    stores its scales on first call, so a trace (even a failed one) leaves proxies behind that
    break the next real call. Every module's attributes are put back as they were.
    """
    saved = attributes_of(module)
    try:
        yield saved
    finally:
        restore_attributes(saved)


BUFFER_CHANGED = "a buffer changed in place"
TENSOR_ATTRIBUTE_CHANGED = "a tensor attribute changed in place"


class _TensorSnapshot:
    """The modules' buffers (their values and version counters) and the version counters of
    their parameters, taken before a trace, to see and undo what running ``forward`` on proxies
    did to them.

    FX hands traced code a proxy for a parameter read as an attribute, but the tensor itself for
    a buffer (and for a parameter reached otherwise: ``self.parameters()``, ``self._parameters``),
    so ``self.count.add_(1)`` or ``self.bn.running_mean.mul_(0.5)`` changes the working copy
    while tracing and is recorded nowhere: traced, the fused model would never make the change,
    and a BatchNorm would be folded with statistics the caller's model does not have. A buffer
    has changed when its version counter moved or its values differ (``.data`` has a counter of
    its own). A parameter cannot be put back (copying every weight before each trace would cost
    more than the trace), so one whose counter moved makes the fuse fail with a ``FuserError``.

    The values are kept as one flat copy per dtype and device (``_FlatCopy``): a model has
    thousands of small buffers, and one copy and one comparison for all of them cost far less
    than one each.
    """

    def __init__(self, module: nn.Module) -> None:
        self.owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.parameters: dict[int, tuple[torch.Tensor, int | None]] = {}
        for m in module.modules():
            if isinstance(m, torch.jit.ScriptModule):  # compiled: its tensors are C++ state
                continue
            for name, tensor in m._buffers.items():
                if tensor is not None:
                    self.owners.setdefault(id(tensor), []).append((m, name, BUFFER_CHANGED))
                    self.buffers.setdefault(id(tensor), tensor)
            for name, parameter in m._parameters.items():
                if parameter is not None:
                    self.owners.setdefault(id(parameter), []).append((m, name, ""))
                    self.parameters.setdefault(id(parameter), (parameter, _version(parameter)))
        for tensor, m, name in tensor_attributes(module):  # handed to traced code as they are
            self.owners.setdefault(id(tensor), []).append((m, name, TENSOR_ATTRIBUTE_CHANGED))
            self.buffers.setdefault(id(tensor), tensor)
        self.versions = {key: _version(tensor) for key, tensor in self.buffers.items()}
        groups: dict[tuple, list[torch.Tensor]] = {}
        for tensor in self.buffers.values():
            # Values to compare: not on the meta device, nor quantized (whose ``cat`` may
            # requantize); those are judged by their version counter alone.
            if tensor.layout is torch.strided and not (tensor.is_meta or tensor.is_quantized):
                groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        self.copies = [_FlatCopy(group) for group in groups.values()]
        self._changed: list[torch.Tensor] | None = None

    def changed_buffers(self) -> list[torch.Tensor]:
        """The buffers changed since the snapshot (worked out once: asked after the trace)."""
        if self._changed is None:
            moved = {key for key, t in self.buffers.items() if _version(t) != self.versions[key]}
            for flat in self.copies:
                moved.update(id(t) for t in flat.changed())
            self._changed = [self.buffers[key] for key in moved]
        return self._changed

    def changed(self) -> list[tuple[nn.Module, str, str]]:
        """``(owner module, buffer or attribute name, what changed)`` of each buffer or tensor
        attribute changed since the snapshot, for ``_refuse_unrecorded_state_changes``."""
        return [
            (m, name, kind)
            for tensor in self.changed_buffers()
            for m, name, kind in self.owners[id(tensor)]
            if kind  # not the module a parameter held as an attribute is registered on
        ]

    def restore(self) -> None:
        """Put back every changed buffer that has values (a meta tensor has none to change)."""
        changed = {id(t) for t in self.changed_buffers()}
        for flat in self.copies:
            flat.restore(changed)

    def refuse_changed_parameters(self) -> None:
        moved = [
            f"{type(m).__name__}.{name}"
            for key, (parameter, version) in self.parameters.items()
            if _version(parameter) != version and key not in self.buffers  # (put back by value)
            for m, name, _ in self.owners[key]
        ]
        if moved:
            raise FuserError(
                f"the model's code changes parameter {', '.join(moved)} in place as it runs "
                "(reached as a tensor, not as a module attribute): tracing ran that change on "
                "the fuser's copy, and FX records none of it. Move the change out of forward "
                "(apply it to the weights once, before fusing)"
            )


class _FlatCopy:
    """The values of tensors of one dtype and device, copied into one flat tensor."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.values = _flat(tensors)

    def changed(self) -> list[torch.Tensor]:
        """The tensors whose values differ from the copy (NaN where NaN was is no change)."""
        if _same_values(_flat(self.tensors), self.values):
            return []
        pieces = zip(self.tensors, self._pieces(), strict=True)
        return [t for t, before in pieces if not _same_values(t.detach(), before.view(t.shape))]

    def restore(self, changed: set[int]) -> None:
        if not any(id(tensor) in changed for tensor in self.tensors):
            return
        with torch.no_grad():
            for tensor, before in zip(self.tensors, self._pieces(), strict=True):
                if id(tensor) in changed:
                    tensor.copy_(before.view(tensor.shape))

    def _pieces(self) -> tuple[torch.Tensor, ...]:
        return self.values.split([t.numel() for t in self.tensors])


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # No ``detach`` per tensor (it was the slowest step of all) and no ``torch.no_grad()``, which
    # the trace refuses while it runs: buffers do not require grad, so ``cat`` records nothing.
    return torch.cat([t if t.ndim == 1 else t.reshape(-1) for t in tensors])


@contextlib.contextmanager
def _tensors_restored(module: nn.Module) -> Iterator[_TensorSnapshot]:
    """A ``_TensorSnapshot`` of ``module``'s tensors for the duration of a trace: on the way out
    every buffer is put back, and a parameter changed in place raises ``FuserError`` (whether
    the trace succeeded or not: the copy would otherwise keep the change)."""
    snapshot = _TensorSnapshot(module)
    try:
        yield snapshot
    finally:
        snapshot.restore()
        snapshot.refuse_changed_parameters()


@contextlib.contextmanager
def _module_level_state_restored(module: nn.Module) -> Iterator[ModuleLevelSnapshot]:
    """A ``ModuleLevelSnapshot`` of the module-level state ``module``'s code names, for the
    duration of a trace: on the way out what the trace changed is put back (a proxy left in the
    caller's dict would break whatever reads it next)."""
    snapshot = ModuleLevelSnapshot(module)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, which every in-place change moves (None for an inference
    tensor, which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _same_values(tensor: torch.Tensor, before: torch.Tensor) -> bool:
    """The same values, NaN where NaN was (``torch.equal`` calls two NaNs different). Only
    tensors with values to compare come here (``_TensorSnapshot`` leaves out the others)."""
    if torch.equal(tensor, before):
        return True
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return False
    same_nans = torch.equal(tensor.isnan(), before.isnan())
    return same_nans and torch.equal(tensor.nan_to_num(0.0), before.nan_to_num(0.0))


def is_library_leaf(module: nn.Module) -> bool:
    """torch.nn's own modules (and containers), which FX keeps as calls and never looks inside."""
    return fx.Tracer().is_leaf_module(module, "")


#: Why a module reading the state of one that runs as written is not traced (``frozen_reads``).
_FROZEN = "which a trace reads once (traced, the fused model would keep that value)"


def _running_as_written(gm: fx.GraphModule, opaque: set[int], kept: frozenset[int]) -> set[int]:
    """Ids of the modules ``gm`` calls that run their own Python code (or hooks) as written:
    opaque, kept, hooked or compiled ones. torch.nn's own leaves keep no state in Python."""
    running = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            compiled = isinstance(m, torch.jit.ScriptModule)
            if id(m) in opaque or id(m) in kept or has_hooks(m) or compiled:
                running.add(id(m))
    return running


def _describe(error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"[:300]


@dataclass
class TraceOutcome:
    """A traced module (without code until its ``recompile()``), or the error that stopped it;
    plus what had to stay opaque."""

    graph_module: TracedGraphModule | None
    error: str | None = None
    opaque: set[int] = field(default_factory=set)
    untraced: list[UntracedModule] = field(default_factory=list)
    kept: frozenset[int] = frozenset()
    autocast: set[int] = field(default_factory=set)  # untraced: its own code enters autocast


def trace_with_opaque_submodules(
    module: nn.Module, path: str, kept: frozenset[int] = frozenset()
) -> TraceOutcome:
    """Trace ``module``, keeping its smallest untraceable submodules as opaque single calls, and
    the modules in ``kept`` (ids) as calls.

    One trace finds them (see ``FoldTracer``); a second is needed only in the rare case of a
    module traced through at one call site and untraceable at another.
    """
    outcome = TraceOutcome(None, kept=kept)
    own_code = own_call_code(module)
    if own_code is not None:  # FX traces ``type(root).forward``: that code would never run
        outcome.error = f"it {own_code}, and FX traces only its class's forward"
        return outcome
    untraced: list[tuple[str, str]] = []
    while True:
        # The opaque modules (and which of them enter autocast) are kept across retraces.
        tracer = FoldTracer(outcome.opaque, untraced, kept, outcome.autocast)
        try:
            outcome.graph_module = _trace_with(tracer, module)
        except _RetraceNeeded:
            continue
        except FuserError:  # the copy was changed in a way no fallback can undo
            raise
        except Exception as error:  # tracing runs user code: any failure means "not traceable"
            outcome.error = _describe(error)
            if isinstance(error, AutocastInForward):
                outcome.autocast.add(id(module))
        else:
            optional = _optional_argument_used(outcome.graph_module)
            if optional is not None:
                outcome.graph_module, outcome.error = None, optional
                outcome.untraced = _qualified(untraced, path)
                return outcome
            running = _running_as_written(outcome.graph_module, outcome.opaque, kept)
            traced = {id(module), *tracer.entered}
            readers = frozen_state_readers(module, traced, running)
            frozen = {id(reader): f"FrozenStateRead: {why}, {_FROZEN}" for reader, why in readers}
            if id(module) in frozen:
                outcome.graph_module, outcome.error = None, frozen[id(module)]
            elif readers:
                for reader, _ in readers:
                    outcome.opaque.add(id(reader))
                    untraced.append((tracer.path_of_module(reader), frozen[id(reader)]))
                continue
        outcome.untraced = _qualified(untraced, path)
        return outcome


def _qualified(untraced: list[tuple[str, str]], path: str) -> list[UntracedModule]:
    return [UntracedModule(f"{path}.{name}" if path else name, why) for name, why in untraced]


def _optional_argument_used(gm: fx.GraphModule) -> str | None:
    """Why the trace cannot stand for ``forward``: an argument defaulting to None that the graph
    uses. FX hands ``forward`` a proxy for it, which ``is not None``, so code branching on it
    (``if mask is not None: y = y * mask``) is traced as if it were always given, and the graph
    fails, or computes something else, when it is left out as the code allows."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.args == (None,) and node.users:
            return (
                f"OptionalArgument: its forward's argument {node.target!r} defaults to None, and "
                "a trace takes it as given (code checking `is None` is traced one way only)"
            )
    return None
