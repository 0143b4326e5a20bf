"""The public entry points: check the input, copy it, trace it, fold it, report.

A model FX cannot trace whole is fused piece by piece: its smallest untraceable submodules stay
opaque inside the traced graph, and when even the top level cannot be traced, each child is fused
on its own. The caller's model is never touched: all work happens on a deep copy.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace

import torch
from torch import fx, nn
from torch.nn.parameter import is_lazy

from .child_usage import CALLED, ELEMENTS_CALLED, child_usage
from .copying import deep_copy
from .errors import FuserError
from .fidelity import ForwardReference
from .fold_pass import fold_batch_norms
from .graph_edit import set_attr
from .hook_usage import hook_reading_its_module
from .in_place import tensor_augmented_assignments_as_methods
from .patterns import (
    CONTAINER_MODULES,
    global_module_hooks,
    has_hooks,
    is_batch_norm_module,
    own_call_code,
)
from .report import FusionReport, SiteReport, UntracedModule
from .run_time_writes import (
    as_the_copys,
    storages_changed_as_it_runs,
    tensors_of_running_modules,
)
from .shapes import example_inputs_rejected, propagate_shapes, record_module_inputs
from .sharing import ModelParts
from .tracing import (
    FoldTracer,
    TracedGraphModule,
    TraceOutcome,
    is_foldable_layer_or_batch_norm,
    is_library_leaf,
    trace_with_opaque_submodules,
)


def fuse(model: nn.Module, example_inputs: tuple | None = None) -> nn.Module:
    """Return a copy of ``model`` with every foldable eval-mode BatchNorm folded away.

    A ``torch.fx.GraphModule`` when the whole model traces. ``example_inputs`` (the positional
    arguments of one forward call) let the fuser prove tensor ranks, which Linear folds need.
    """
    fused, _ = fuse_with_report(model, example_inputs)
    return fused


def fuse_with_report(
    model: nn.Module, example_inputs: tuple | None = None
) -> tuple[nn.Module, FusionReport]:
    """Like ``fuse``, and also say what became of every BatchNorm call site.

    Whatever mode the caller is in, the fused model's tensors are made outside
    ``torch.inference_mode``: tensors made inside it can never take part in autograd, so a model
    fused there would raise wherever the original runs with gradients enabled (``torch.jit.trace``,
    a saliency map, fine-tuning)."""
    with torch.inference_mode(False):
        return _fuse_with_report(model, example_inputs)


def _fuse_with_report(
    model: nn.Module, example_inputs: tuple | None
) -> tuple[nn.Module, FusionReport]:
    inputs = _check_input(model, example_inputs)
    callers = ModelParts.of(model)
    _check_initialized(model, callers)
    try:
        working_copy = _deep_copy(model)
    except Exception as error:  # the model's own parts decide how (and whether) they copy
        raise FuserError(
            "fuse works on a deep copy of the model (yours is never changed), and "
            f"copy.deepcopy(model) failed: {type(error).__name__}: {error}{_pruning_advice(model)}"
        ) from error
    recorded = {id(working_copy): inputs} if inputs is not None else {}  # run on copies only
    report = FusionReport()
    parts = ModelParts.of(working_copy)
    shared = parts.held_twice() | parts.shared_with(callers)
    changed = storages_changed_as_it_runs(working_copy)
    if changed:  # (matching the caller's tensors to the copy's costs more than finding none)
        changed = as_the_copys(changed, parts.storages_copied_from(callers))
    fuser = _Fuser(recorded, report, shared, parts.private_storages(callers), changed)
    fused = fuser.fuse_module(working_copy, "")
    report.sites = _numbered_across_graphs(report.sites)
    return fused, report


def _numbered_across_graphs(sites: list[SiteReport]) -> list[SiteReport]:
    """Number the calls of each BN across the whole report.

    Each graph's fold pass numbers its own calls from 0; a BN called by the root and also inside
    a module fused on its own (a hooked child) would otherwise be reported twice as call 0, and
    ``FusionReport.site`` could find only one of them. The report lists a graph's sites before
    those of the modules fused inside it, so a BN's calls keep that order.
    """
    seen: Counter[str] = Counter()
    numbered = []
    for site in sites:
        numbered.append(replace(site, call_index=seen[site.bn]))
        seen[site.bn] += 1
    return numbered


def _check_input(model: object, example_inputs: object) -> tuple | None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__name__}")
    if _is_compiled_wrapper(model):
        raise FuserError(
            "the model is a torch.compile wrapper (OptimizedModule), whose forward runs compiled "
            "code FX cannot trace: fuse the eager model (model._orig_mod), then compile the "
            "fused one"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise FuserError(
            "fuse cannot trace a torch.jit.ScriptModule: fuse the eager nn.Module, then script it"
        )
    if model.training and _from_torch_export(model):
        raise FuserError(
            "the model is a torch.export module (ExportedProgram.module()): its BatchNorms are "
            "ATen calls whose train or eval behaviour was fixed when it was exported, and it "
            "refuses .eval(); fuse the eager model, then export the fused one"
        )
    if model.training:
        raise FuserError(
            "the model is in training mode, where BatchNorm uses batch statistics and cannot be "
            "folded: call model.eval() first"
        )
    hooks = global_module_hooks()
    if hooks:
        raise FuserError(
            "global module hooks are registered (" + "; ".join(hooks) + "): call hooks run on "
            "every module call, and folding removes BatchNorm calls and changes what their "
            "layers return; registration hooks may replace the folded weights and the modules "
            "that fusing assigns; under them the fused model would compute something else. "
            "Remove them (handle.remove()) before fusing, and run the fused model without them"
        )
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tuple of forward arguments, got {type(example_inputs).__name__}"
    )


def _from_torch_export(model: nn.Module) -> bool:
    """``ExportedProgram.module()`` (torch 2.3 and later) reports ``training=True`` and raises
    on ``.eval()``, so the usual advice would be impossible to follow."""
    return any(cls.__module__.startswith("torch.export") for cls in type(model).__mro__)


def _is_compiled_wrapper(model: nn.Module) -> bool:
    """``torch.compile(model)`` returns an ``OptimizedModule`` holding the model as ``_orig_mod``
    (torch 2.0 and later); looked up by name, so that checking never imports dynamo."""
    return any(
        cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo")
        for cls in type(model).__mro__
    )


def _pruning_advice(model: nn.Module) -> str:
    """What to do when the copy failed on a pruned layer: ``torch.nn.utils.prune`` leaves a
    weight computed from ``weight_orig`` and a mask in the module, a tensor with a history that
    ``copy.deepcopy`` refuses. Making the pruning permanent removes it (and the forward
    pre-hook that would keep the layer from taking a fold)."""
    prune = sys.modules.get("torch.nn.utils.prune")  # no pruned module before it is imported
    if prune is None:
        return ""
    pruned = [
        f"{path or '<model>'}.{hook._tensor_name}"
        for path, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]
    if not pruned:
        return ""
    return (
        f"; the model has pruned tensors ({', '.join(pruned)}): make the pruning permanent "
        "with torch.nn.utils.prune.remove(module, name) for each, then fuse"
    )


def _check_initialized(model: nn.Module, parts: ModelParts) -> None:
    """A lazy module (``nn.LazyConv2d``, ``nn.LazyBatchNorm2d``, ...) has no weights or statistics
    until its first forward: there is nothing to fold yet, and the copy the fuser works on would
    draw its own random weights on its first call, computing something the caller's model never
    will. Refused with the parts to initialize, before any copy is made."""
    if not any(is_lazy(tensor) for tensor in (*parts.parameters, *parts.buffers)):
        return
    named = (*model.named_parameters(remove_duplicate=False), *model.named_buffers())
    names = ", ".join(sorted({name for name, tensor in named if is_lazy(tensor)}))
    raise FuserError(
        f"the model has uninitialized lazy parameters or buffers ({names}): "
        "run one forward pass on a real batch to initialize them, then fuse"
    )


class _Fuser:
    """Fuses a module tree; ``inputs`` maps module ids to the arguments of their first call."""

    def __init__(
        self,
        inputs: dict[int, tuple],
        report: FusionReport,
        shared: frozenset[int],
        private: frozenset[int],
        changed_as_it_runs: dict[int, str],
    ) -> None:
        self.inputs = inputs
        self.report = report
        self.shared = shared  # objects never changed in place (see fold_batch_norms)
        self.private = private  # weight storages a fold may overwrite
        self.changed_as_it_runs = changed_as_it_runs  # storages untraced code may change
        self.inputs_recorded = not inputs
        self.autocast_regions = 0  # modules entering torch.autocast whose children are fused

    def fuse_module(self, module: nn.Module, path: str) -> nn.Module:
        hook_reading_it = hook_reading_its_module(module)
        if hook_reading_it is not None:  # it would be handed the fused module: keep it whole
            self._leave_child(module, path, f"not fused: {hook_reading_it}")
            return module
        outcome = trace_with_opaque_submodules(module, path)
        if outcome.graph_module is None:
            enters_autocast = id(module) in outcome.autocast
            return self._fuse_untraced(module, path, outcome.error or "", enters_autocast)
        example_inputs = self.inputs.get(id(module))
        if example_inputs is not None:
            outcome, mismatch = self._faithful_trace(module, path, outcome, example_inputs)
            if mismatch is not None:
                return self._fuse_untraced(module, path, mismatch)
        gm = outcome.graph_module
        tensor_augmented_assignments_as_methods(gm)
        leaves_to_enter = outcome.opaque or outcome.kept or any(has_hooks(m) for m in gm.modules())
        if leaves_to_enter:
            self._record_inputs(module)
        self.report.untraced.extend(outcome.untraced)
        under_autocast = self.autocast_regions > 0
        changed = tensors_of_running_modules(gm, outcome.opaque | outcome.kept)
        changed.update(self.changed_as_it_runs)
        sites = fold_batch_norms(gm, path, self.shared, self.private, under_autocast, changed)
        self.report.sites.extend(sites)
        if leaves_to_enter:
            self._fuse_inside_leaves(gm, path, outcome)
        _carry_over(module, gm)
        return gm

    def _faithful_trace(
        self, module: nn.Module, path: str, outcome: TraceOutcome, example_inputs: tuple
    ) -> tuple[TraceOutcome, str | None]:
        """A trace of ``module`` whose graph computes its forward on the example inputs, or the
        first trace and why it does not (``fidelity``).

        When the plain trace differs, the code FX froze may sit in children the trace entered:
        each is traced on its own and checked on the inputs it was called with, and those that
        differ are kept as calls in a second trace of ``module`` (each is then fused on its own,
        where the same check narrows it down further). So a type check deep in one block costs
        the folds across that block's boundary, not the whole model's. If the second trace still
        differs, ``module``'s own code is what FX froze.
        """
        reference = ForwardReference(module, example_inputs)
        strict = not path
        mismatch = self._run_and_compare(outcome.graph_module, reference, example_inputs, strict)
        if mismatch is None:
            return outcome, None
        self._record_inputs(module)
        culprits = frozenset(
            id(child)
            for child in _children_traced_through(module, outcome.opaque)
            if self._traces_unfaithfully(child)
        )
        if culprits:
            retried = trace_with_opaque_submodules(module, path, culprits)
            traced = retried.graph_module
            faithful = (
                traced is not None
                and self._run_and_compare(traced, reference, example_inputs, strict) is None
            )
            if faithful:
                return retried, None
        return outcome, mismatch

    def _traces_unfaithfully(self, module: nn.Module) -> bool:
        """Whether ``module``'s own trace differs from its forward on the inputs it was first
        called with. A module never called, or one FX cannot trace at all, is no culprit: the
        trace that entered it lost nothing of it."""
        inputs = self.inputs.get(id(module))
        if inputs is None:
            return False
        gm = trace_with_opaque_submodules(module, "").graph_module
        if gm is None:
            return False
        reference = ForwardReference(module, inputs)
        return self._run_and_compare(gm, reference, inputs, strict=False) is not None

    def _fuse_untraced(
        self, module: nn.Module, path: str, why: str, enters_autocast: bool = False
    ) -> nn.Module:
        """``module`` runs as written (it could not be traced, or its trace computes something
        else); its children are fused on their own, as running inside the autocast region its
        code enters, if it does (``fold_batch_norms``'s ``under_autocast``)."""
        self.report.untraced.append(UntracedModule(path or "<model>", why))
        self._record_inputs(module)
        self._fuse_children_in_region(module, path, enters_autocast)
        return module

    def _fuse_children_in_region(self, module: nn.Module, path: str, enters_autocast: bool) -> None:
        """``fuse_children``, counting the autocast region ``module``'s code enters, if it does:
        layers inside it return the autocast dtype (``fold_batch_norms``'s ``under_autocast``)."""
        self.autocast_regions += enters_autocast
        try:
            self.fuse_children(module, path)
        finally:
            self.autocast_regions -= enters_autocast

    def fuse_children(self, module: nn.Module, path: str) -> None:
        """Fuse the children of a module whose own code runs as it is, as far as that is safe.

        A child the code only calls is replaced by its fused version; the elements of a
        container it only indexes or loops over and calls are fused one by one; a child it uses
        in any other way is left untouched (see ``child_usage``).
        """
        own_code = own_call_code(module)
        if own_code is not None:
            self._leave_children(module, path, own_code)
            return
        usage = _usage_of_children(module)
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if is_batch_norm_module(child):
                self._report_unseen_call(child_path, path)
            if is_foldable_layer_or_batch_norm(child) or not _holds_batch_norm(child):
                continue
            if isinstance(child, torch.jit.ScriptModule):  # compiled: no Python code to trace
                reason = "TorchScript module: runs as it is, nothing inside it is folded"
                self.report.untraced.append(UntracedModule(child_path, reason))
                continue
            verdict = usage[name]
            if verdict == CALLED:
                fused = self.fuse_module(child, child_path)
                if fused is not child:
                    setattr(module, name, fused)
            elif verdict == ELEMENTS_CALLED and isinstance(child, CONTAINER_MODULES):
                self.fuse_children(child, child_path)
            elif any(is_batch_norm_module(m) for m in child.modules()):
                owner = path or "the model"
                reason = f"not fused: {owner}'s code uses it other than by calling it"
                # A BN child's own call is reported above, once: one entry stands for its calls.
                self._leave_child(child, child_path, reason, own_call_reported=True)

    def _leave_children(self, module: nn.Module, path: str, why: str) -> None:
        """Report every child holding a BatchNorm as left whole: ``module``'s code (the code
        that runs, not its class's) cannot be read, so no use of a child is known to be a call."""
        owner = path or "the model"
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if is_batch_norm_module(child):
                self._report_unseen_call(child_path, path)
            elif any(is_batch_norm_module(m) for m in child.modules()):
                self._leave_child(child, child_path, f"not fused: {owner} {why}")

    def _leave_child(
        self, child: nn.Module, child_path: str, reason: str, own_call_reported: bool = False
    ) -> None:
        """Report ``child`` as left whole, and each BatchNorm module in it as left inside it
        (``child`` itself too, unless its call is reported already)."""
        self.report.untraced.append(UntracedModule(child_path or "<model>", reason))
        for bn_path, bn in child.named_modules(prefix=child_path):
            if own_call_reported and bn is child:
                continue
            if is_batch_norm_module(bn):
                self.report.sites.append(
                    SiteReport(bn_path, 0, folded=False, reason=f"inside {reason}")
                )

    def _report_unseen_call(self, bn_path: str, owner_path: str) -> None:
        """A BN module called by code that runs as written: its calls are never seen, so never
        folded."""
        owner = owner_path or "the model"
        reason = f"called by {owner}'s code, which runs as written (not traced)"
        self.report.sites.append(SiteReport(bn_path, 0, folded=False, reason=reason))

    def _fuse_inside_leaves(self, gm: fx.GraphModule, path: str, outcome: TraceOutcome) -> None:
        """Opaque, kept and hooked modules stay single calls in ``gm``; they are fused on their own.

        A hooked or kept module is traced and folded by itself (a hooked one keeps its hooks); an
        opaque one cannot be traced, so its children are fused instead. One whose tensors ``gm``
        also reads (``self.child.block[0].bias``) is left whole: a fold inside it would change
        (or, folding into a copy, remove) the tensor ``gm`` reads.
        """
        read = layer_tensors_read(gm)
        done: set[int] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if id(module) in done or is_foldable_layer_or_batch_norm(module):
                continue
            done.add(id(module))
            module_path = f"{path}.{node.target}" if path else node.target
            inside = [target for target in read if target.startswith(f"{node.target}.")]
            if inside:
                why = f"not fused: the traced code around it reads its tensor {inside[0]}"
                self._leave_child(module, module_path, why)
            elif id(module) in outcome.opaque:
                entered = id(module) in outcome.autocast
                self._fuse_children_in_region(module, module_path, entered)
            elif id(module) in outcome.kept or (has_hooks(module) and not is_library_leaf(module)):
                fused = self.fuse_module(module, module_path)
                if fused is not module:
                    set_attr(gm, node.target, fused)

    def _record_inputs(self, module: nn.Module) -> None:
        """Record every submodule's inputs once, by running the model on its example inputs."""
        if self.inputs_recorded:
            return
        self.inputs_recorded = True
        root_inputs = self.inputs.get(id(module))
        if root_inputs is not None:
            self.inputs.update(record_module_inputs(module, root_inputs))

    @staticmethod
    def _run_and_compare(
        gm: fx.GraphModule, reference: ForwardReference, example_inputs: tuple, strict: bool
    ) -> str | None:
        """Run the traced graph on the example inputs (recording shapes) and compare its output
        with the module's own forward: why the graph cannot be used, or None.

        Inputs that run through neither are the caller's mistake at the top (``strict``); inputs
        recorded for a submodule may just not replay, and then shapes stay unknown.
        """
        run = propagate_shapes(gm, example_inputs)
        mismatch = reference.mismatch(run.output, run.error)
        if run.error is not None and mismatch is None and strict:
            raise example_inputs_rejected(run.error) from run.error
        return mismatch


def _deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` (by ``copying.deep_copy``), except that GraphModules keep their hooks.

    ``GraphModule.__deepcopy__`` rebuilds the module and drops its hooks, so a model holding
    plain GraphModules with hooks (one traced by its author) would lose them. This package's own
    GraphModules deep-copy their hooks themselves (``TracedGraphModule.__deepcopy__``), bound to
    the copy as a deep copy binds them; the hook dicts put back here are shallow copies.
    """
    duplicate = deep_copy(model)
    for path, original in model.named_modules():
        if isinstance(original, fx.GraphModule) and not isinstance(original, TracedGraphModule):
            copied = duplicate.get_submodule(path)
            for name, hooks in _hook_dicts(original).items():
                setattr(copied, name, type(hooks)(hooks))
    return duplicate


def _hook_dicts(module: nn.Module) -> dict:
    return {
        name: value
        for name, value in vars(module).items()
        if name.startswith(("_forward", "_backward")) and "hooks" in name
    }


def _usage_of_children(module: nn.Module) -> dict[str, str]:
    """torch.nn's containers only call their elements; other modules' code is read."""
    if isinstance(module, CONTAINER_MODULES) and type(module).__module__.startswith("torch.nn"):
        return {name: CALLED for name, _ in module.named_children()}
    return child_usage(module)


def _children_traced_through(module: nn.Module, opaque: set[int]) -> list[nn.Module]:
    """The children of ``module`` a trace enters (each once), by the tracer's own leaf rules: not
    the layers and BNs it folds, torch.nn's own modules, hooked, compiled or opaque ones."""
    is_leaf = FoldTracer(opaque, []).is_leaf_module
    children = {id(child): child for child in module.children() if not is_leaf(child, "")}
    return list(children.values())


def layer_tensors_read(gm: fx.GraphModule) -> list[str]:
    """Targets of ``gm``'s ``get_attr`` nodes that are tensors of a layer or BN module (which
    folds change or remove), wherever in the module tree they sit."""
    return [
        node.target
        for node in gm.graph.nodes
        if node.op == "get_attr" and "." in node.target and _held_by_fold_target(gm, node)
    ]


def _held_by_fold_target(gm: fx.GraphModule, node: fx.Node) -> bool:
    owner = node.target.rpartition(".")[0]
    try:
        return is_foldable_layer_or_batch_norm(gm.get_submodule(owner))
    except AttributeError:
        return False


def _holds_batch_norm(module: nn.Module) -> bool:
    """Could anything in ``module`` be a BatchNorm call (a BN module, or code calling one)?"""
    return any(is_batch_norm_module(m) or not is_library_leaf(m) for m in module.modules())


def _carry_over(original: nn.Module, fused: nn.Module) -> None:
    """Give the fused module what tracing does not keep: hooks and plain attributes.

    Hooks run only on module calls, so a traced module loses its own; they are moved to the
    fused module (the same hook dicts, so their handles still remove them). Plain public
    attributes (``out_channels`` and the like) are copied for code that reads them.
    """
    for name, value in _hook_dicts(original).items():
        setattr(fused, name, value)
    for name, value in vars(original).items():
        if not name.startswith("_") and not hasattr(fused, name):
            setattr(fused, name, value)
