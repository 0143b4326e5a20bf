"""The properties a fuser must satisfy, as plain functions over one drawn network.

``tests/test_properties.py`` turns each into a Hypothesis test; the benchmark calls
``check_network`` to time draw + build + fuse + check. A violated property raises
``PropertyViolation``, whose message names the property, the BatchNorm site(s), the error against
what is allowed, the oracle's verdicts, the fuser's report, the network as runnable Python, and
the spec literal to pin it as a regression.

Soundness (any correct fuser, whatever it folds): ``fused_matches_original``,
``input_model_untouched``, ``output_signature_preserved``, ``idempotent``,
``survives_copy_and_save``, ``training_model_refused_or_equivalent``,
``global_hooks_refused_or_honoured``, ``other_rank_refused_or_honoured`` (on the networks
of ``strategies/two_ranks.py``), and, on pinned networks
only, ``scripts_where_the_original_does``. Completeness (folds everything the README promises):
``no_foldable_batchnorm_remains``, ``report_agrees_with_oracle``, ``no_dead_state``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import types
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from hypothesis import given, seed, settings
from torch import fx, nn

from strategies.batchnorm_calls import batchnorm_calls
from strategies.build import build_from_source
from strategies.draw import net_specs
from strategies.fuser_under_test import FuserUnderTest
from strategies.global_hooks import GLOBAL_HOOKS, registered_global_hook
from strategies.oracle import Site, foldable_sites
from strategies.snapshot import named_state, snapshot, touched_by_fusing
from strategies.source import render_source
from strategies.spec import AUTOCAST, CALL_COUNTER, COUNTS_CALLS, Chain, NetSpec, literal
from strategies.tolerance import (
    Comparison,
    OutOfRange,
    Reference,
    evaluate,
    fresh_copies,
    measure_reference,
)
from strategies.two_ranks import other_rank_inputs

RUNNING_MEAN = ".running_mean"
_networks_checked = 0


def networks_checked() -> int:
    """How many networks this process has built and fused (the suite reports the total)."""
    return _networks_checked


def _count_network() -> None:
    global _networks_checked
    _networks_checked += 1


class PropertyViolation(AssertionError):
    """A property failed on one network; the message is a complete bug report."""


@dataclass
class Trial:
    """One network, built, evaluated (original and float64 reference) and fused once."""

    spec: NetSpec
    fuser: FuserUnderTest
    source: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    reference: Reference
    sites: list[Site]
    touched: list[str]
    fused: nn.Module | None = None
    report: object | None = None
    error: BaseException | None = None
    global_hook: str | None = None
    #: For each module that counts its calls (``Chain.boundary == "counts_calls"``), by path: the
    #: original's count and the fused model's (None: it has no such module or count) right after
    #: fusing, before the fused model ran.
    counts_at_fuse: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    _fused_output: torch.Tensor | None = field(default=None, repr=False)

    @property
    def fuser_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """What the fuser is given as example inputs (``NetSpec.example_inputs``): a fresh copy
        each time, so that a fuser that changes them cannot change what the models run on."""
        return fresh_copies(self.inputs) if self.spec.example_inputs else None

    def violation(self, prop: str, detail: str, sites: str | None = None) -> PropertyViolation:
        """A ``PropertyViolation`` carrying everything needed to understand and reproduce it."""
        lines = [f"property {prop} violated" + (f" at BatchNorm site {sites}" if sites else "")]
        lines += [f"  {detail_line}" for detail_line in detail.splitlines()]
        given = "" if self.spec.example_inputs else ", called without example_inputs"
        if self.spec.fused_in_inference_mode:
            given += ", inside torch.inference_mode()"
        lines.append(f"fuser under test: {self.fuser.name}{given}")
        lines.append("oracle (README foldability definition):")
        lines += [f"  {site.describe()}" for site in self.sites] or ["  no BatchNorm call sites"]
        if self.report is not None:
            lines.append("fuser's report:")
            lines += [f"  {line}" for line in str(self.report).splitlines()]
        lines += ["network (runnable Python: builds `model` and `inputs`):", "", self.source]
        lines.append(f"pin it in tests/pinned.py:\n    {literal(self.spec)}")
        if self.global_hook is not None:
            lines.append(
                f"and replay it under global hook {self.global_hook!r} "
                "(check_global_hooks_refused_or_honoured)"
            )
        return PropertyViolation("\n".join(lines))

    def require_fused(self, prop: str) -> nn.Module:
        """The fused module, or a violation when the fuser refused an eval-mode model."""
        if self.error is not None:
            detail = f"the fuser raised {type(self.error).__name__}: {self.error}"
            raise self.violation(prop, detail + " (on an eval-mode model it must fuse)") from (
                self.error
            )
        return self.fused

    def fused_output(self, prop: str) -> torch.Tensor:
        if self._fused_output is None:
            self._fused_output = self.run_fused(prop, self.require_fused(prop))
        return self._fused_output

    def run_fused(self, prop: str, module: nn.Module) -> torch.Tensor:
        """Evaluate a fused module; if it cannot even run, or it changes its input otherwise
        than the original does (``Act.inplace``), that is this property's violation."""
        try:
            output, inputs_after = evaluate(module, self.inputs)
        except Exception as error:
            detail = f"running the fused model raised {type(error).__name__}: {error}"
            raise self.violation(prop, detail) from error
        expected = self.reference.inputs_after
        for index, (got, want) in enumerate(zip(inputs_after, expected, strict=True)):
            if not torch.equal(got, want):
                changes = "changes" if not torch.equal(want, self.inputs[index]) else "leaves"
                detail = (
                    f"the fused model leaves its input {index} otherwise than the original, which "
                    f"{changes} it (in place): they differ by up to {_largest_difference(got, want)}"
                )
                raise self.violation(prop, detail, self.suspects())
        return output

    @property
    def original_output(self) -> torch.Tensor:
        return self.reference.original_output

    def compare(self, fused_output: torch.Tensor) -> Comparison:
        """The tolerance rule (``strategies/tolerance.py``) applied to a fused output."""
        return self.reference.compare(fused_output)

    def suspects(self) -> str | None:
        """Sites a wrong output most likely comes from: what the fuser says it folded, else
        what the oracle would fold."""
        folded = getattr(self.report, "folded", None)
        if folded:
            return ", ".join(f"{site.bn} (call {site.call_index})" for site in folded)
        names = [f"{s.bn} (call {s.call_index})" for s in self.sites if s.foldable]
        return ", ".join(names) or None


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"a change of kind ({a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)})"
    return f"{float((a.double() - b.double()).abs().max()):.3g}"


def _example_inputs_changed(before: tuple[torch.Tensor, ...], given: tuple | None) -> list[str]:
    """What fusing did to the example inputs it was given: the caller's tensors, never its to
    change (a fuser that runs the model on them must run it on copies)."""
    if given is None:
        return []
    return [
        f"example input {index} changed by fusing: by up to {_largest_difference(now, then)}"
        for index, (now, then) in enumerate(zip(given, before, strict=True))
        if not torch.equal(now, then)
    ]


def run_trial(spec: NetSpec, fuser: FuserUnderTest, *, with_report: bool = False) -> Trial:
    """Build the network, evaluate it and its float64 reference, snapshot it, fuse it, and
    record whether fusing touched it. Raises ``OutOfRange`` for networks without a finite
    output in their dtype."""
    _count_network()
    source = render_source(spec)
    model, inputs = build_from_source(source)
    reference = measure_reference(model, inputs, spec.seed)
    before = snapshot(model)
    trial = Trial(spec, fuser, source, model, inputs, reference, foldable_sites(spec), touched=[])
    given = trial.fuser_inputs
    mode = torch.inference_mode() if spec.fused_in_inference_mode else contextlib.nullcontext()
    try:
        fuse = fuser.fuse_with_report if with_report else fuser.fuse
        with mode:
            trial.fused, trial.report = fuse(model, given)
    except Exception as error:  # the properties decide whether raising was allowed
        trial.error = error
    trial.touched = touched_by_fusing(before, model, trial.fused)
    trial.touched += _example_inputs_changed(inputs, given)
    if trial.fused is not None:
        trial.counts_at_fuse = {
            path: (_call_count(model, path), _call_count(trial.fused, path))
            for path in _counting_modules(spec)
        }
    return trial


def _counting_modules(spec: NetSpec) -> list[str]:
    """Paths of the modules that count their calls (a guarded block is ``b{index}``)."""
    return [
        f"b{index}"
        for index, block in enumerate(spec.blocks)
        if isinstance(block, Chain) and block.boundary == COUNTS_CALLS
    ]


def _call_count(model: nn.Module, path: str) -> int | None:
    """The count a module of ``model`` keeps of its calls (an int, the length of the list it
    appends to, the int in the namespace it holds or in the object whose method it holds, or the
    value of its int64 buffer); None when there is no such module or count (a fuser that traced
    through it)."""
    try:
        count = getattr(model.get_submodule(path), CALL_COUNTER)
    except AttributeError:
        return None
    if isinstance(count, list):
        return len(count)
    if isinstance(count, torch.Tensor):
        return int(count.item()) if count.numel() == 1 and not count.is_floating_point() else None
    if isinstance(count, types.MethodType):  # ``Tally().tick``: its object keeps the count
        count = count.__self__
    if not isinstance(count, int):  # a namespace or a ``Tally``
        count = getattr(count, "count", None)
    return count if isinstance(count, int) else None


def _check_same_kind_of_output(trial: Trial, prop: str, output: torch.Tensor) -> None:
    """An output of another dtype, device or shape is not the original's, whatever its values:
    a float32 output where the model returns bfloat16 is closer to the float64 reference, not
    the same output."""
    detail = _kind_difference(output, trial.original_output)
    if detail is not None:
        raise trial.violation(prop, detail)


def _kind_difference(output: torch.Tensor, original: torch.Tensor) -> str | None:
    for what in ("dtype", "device", "shape"):
        if getattr(output, what) != getattr(original, what):
            return f"output {what} {getattr(output, what)} != original {getattr(original, what)}"
    return None


def _check_matches_original(
    trial: Trial,
    prop: str,
    output: torch.Tensor,
    when: str = "",
    reference: Reference | None = None,
) -> None:
    """The output is of the original's kind and within the tolerance rule of it; ``when`` says
    what was done to the fused model first (``"after copy.deepcopy: "``), and ``reference`` is
    the original's on other inputs than the trial's (``check_other_rank_refused_or_honoured``)."""
    reference = trial.reference if reference is None else reference
    detail = _kind_difference(output, reference.original_output)
    if detail is not None:
        raise trial.violation(prop, when + detail)
    comparison = reference.compare(output)
    if not comparison.ok:
        raise trial.violation(prop, when + comparison.describe(), trial.suspects())


def check_fused_matches_original(trial: Trial) -> None:
    """The fused model computes what the original computes, within the tolerance rule, and
    keeps the state the original's code keeps on its modules (``_check_counts_calls``)."""
    prop = "fused_matches_original"
    _check_matches_original(trial, prop, trial.fused_output(prop))
    _check_counts_calls(trial, prop)


def _check_counts_calls(trial: Trial, prop: str) -> None:
    """A module that counts its calls on itself (``self.calls += 1``) still has its count in the
    fused model, the original's right after fusing (whatever the fuser ran its own copy on),
    and counts each call of the fused model as the original counts each of its own."""
    for path, (original, fused) in trial.counts_at_fuse.items():
        name = f"{path}.{CALL_COUNTER}"
        if fused is None:
            detail = f"the fused model has no {name}, which the original's code counts its calls in"
            raise trial.violation(prop, detail)
        if fused != original:
            detail = (
                f"right after fusing, the fused model's {name} was {fused} and the original's "
                f"{original}: the fuser's own runs of the model were counted"
            )
            raise trial.violation(prop, detail)
        before = _call_count(trial.fused, path)
        trial.run_fused(prop, trial.fused)
        after = _call_count(trial.fused, path)
        if before is None or after != before + 1:
            detail = (
                f"a call of the fused model took {name} from {before} to {after}; each call of "
                "the original counts one"
            )
            raise trial.violation(prop, detail)


def check_other_rank_refused_or_honoured(trial: Trial) -> None:
    """Called on the network's input at another rank (``strategies/two_ranks.py``: unbatched,
    or a Linear's 3-D input), which the original runs on too, the fused model returns what the
    original does, within the tolerance rule, or raises: a fold is exact only where the BN
    normalises the layer's channels, and refusing the other rank is no wrong result."""
    prop = "other_rank_refused_or_honoured"
    fused = trial.require_fused(prop)
    other = other_rank_inputs(trial.spec, trial.inputs)
    reference = measure_reference(trial.model, other, trial.spec.seed)
    try:
        output = evaluate(fused, other)[0]
    except Exception:
        return
    when = f"called on a {other[0].ndim}-D input of shape {tuple(other[0].shape)}: "
    _check_matches_original(trial, prop, output, when, reference)


def check_input_model_untouched(trial: Trial) -> None:
    """Fusing left the caller's model bitwise identical (tensors, tree, flags, hooks), and the
    example inputs it was given too; and the fused model shares no memory with it, so that
    nothing done to the fused model later can change it (``shared_memory``)."""
    if trial.touched:
        raise trial.violation("input_model_untouched", "\n".join(trial.touched))


def check_output_signature_preserved(trial: Trial) -> None:
    """The fused output has the original's dtype, device and shape; run with gradients enabled,
    it requires grad exactly when the original's does; every parameter the fused model shares a
    name with keeps its dtype, device and ``requires_grad``; and a model fused inside
    ``torch.inference_mode()`` (``NetSpec.fused_in_inference_mode``) still runs with gradients
    wherever the original does."""
    prop = "output_signature_preserved"
    _check_same_kind_of_output(trial, prop, trial.fused_output(prop))
    _check_tracks_gradients_as_original(trial, prop)
    if trial.spec.fused_in_inference_mode:
        _check_runs_with_gradients(trial, prop)
    before = dict(trial.model.named_parameters())
    for name, parameter in trial.fused.named_parameters():
        if name not in before:
            continue
        for what in ("dtype", "device", "requires_grad"):
            if getattr(parameter, what) != getattr(before[name], what):
                detail = (
                    f"parameter {name}: {what} {getattr(parameter, what)} "
                    f"!= original {getattr(before[name], what)}"
                )
                raise trial.violation(prop, detail)


def _check_tracks_gradients_as_original(trial: Trial, prop: str) -> None:
    """Run with gradients enabled on inputs that require grad, the fused output requires grad
    exactly when the original's does. A ``torch.no_grad()`` block a fuser traces through runs
    with gradients once fused (FX records none of the block): a backward pass would then reach,
    and an optimizer step change, the weights the original keeps out of it. The inputs, not
    the parameters, are what is tracked: a fold may move a BatchNorm's trainable affine into a
    frozen layer, whose folded parameters stay frozen."""
    want, _ = _tracks_gradients(trial.model, trial.inputs)
    if want is None:
        return  # the original does not run with gradients: nothing to compare with
    got, failure = _tracks_gradients(trial.fused, trial.inputs)
    if got is None:
        detail = f"the original runs with gradients enabled; the fused model raised {failure}"
        raise trial.violation(prop, detail)
    if got != want:
        detail = (
            f"run with gradients enabled, the fused output has requires_grad={got}, the "
            f"original's requires_grad={want}"
        )
        raise trial.violation(prop, detail, trial.suspects())


def _tracks_gradients(
    module: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[bool | None, str | None]:
    """Whether ``module``'s output requires grad, run with gradients enabled on floating-point
    inputs that require grad (None, and why, when that run raises). They are not leaves, so a
    network may still change them in place. A module holding a training-mode BatchNorm runs as
    a copy: the run updates its statistics, which other checks compare afterwards."""
    if any(m.training for m in module.modules()):
        module = copy.deepcopy(module)
    try:
        with torch.enable_grad():
            tracked = tuple(
                x.detach().requires_grad_().clone() if x.is_floating_point() else x for x in inputs
            )
            return module(*tracked).requires_grad, None
    except Exception as error:
        return None, _one_line(error)


def _check_runs_with_gradients(trial: Trial, prop: str) -> None:
    failure = _gradient_failure(trial.fused, trial.inputs)
    if failure is None:
        return
    original, inputs = build_from_source(trial.source)  # afresh: the trial's stays untouched
    if _gradient_failure(original, inputs) is None:
        detail = f"the original runs with gradients enabled; the fused model raised {failure}"
        raise trial.violation(prop, detail)


def _gradient_failure(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Why a forward pass with gradients enabled, and the gradient of its output's sum with
    respect to the parameters, fail; None when they run. ``autograd.grad`` leaves every
    ``.grad`` as it was."""
    try:
        with torch.enable_grad():
            output = module(*fresh_copies(inputs))
            parameters = [p for p in module.parameters() if p.requires_grad]
            if output.requires_grad and parameters:
                torch.autograd.grad(output.sum(), parameters, allow_unused=True)
    except Exception as error:
        return _one_line(error)
    return None


def _one_line(error: Exception) -> str:
    """An exception as one short line, for a violation's detail."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def check_idempotent(trial: Trial) -> None:
    """Fusing the fused model again still matches the original, and (when the fuser reports)
    folds nothing more; and, the fused model being a model like any other (a GraphModule, as
    models traced by their authors are), that fuse leaves it as ``input_model_untouched`` asks."""
    prop = "idempotent"
    fused = trial.require_fused(prop)
    before = snapshot(fused)
    try:
        twice, report = trial.fuser.fuse_with_report(fused, trial.fuser_inputs)
    except Exception as error:
        detail = f"fusing the fused model raised {type(error).__name__}: {error}"
        raise trial.violation(prop, detail) from error
    touched = touched_by_fusing(before, fused, twice)
    if touched:
        raise trial.violation(prop, "fusing the fused model again:\n" + "\n".join(touched))
    output = trial.run_fused(prop, twice)
    _check_same_kind_of_output(trial, prop, output)
    comparison = trial.compare(output)
    if not comparison.ok:
        raise trial.violation(prop, "after a second fuse: " + comparison.describe())
    folded = getattr(report, "folded", None)
    if folded:
        names = ", ".join(f"{site.bn} (call {site.call_index})" for site in folded)
        raise trial.violation(prop, "the second fuse folded more", names)


_SAVED = "torch.save then torch.load"


def check_survives_copy_and_save(trial: Trial) -> None:
    """The fused model, deep-copied or saved whole with ``torch.save`` and loaded back, still
    computes what the original computes (the tolerance rule, and the same changes to its inputs):
    users duplicate and ship fused models these two ways. Each is judged where the original itself
    survives it; one whose ``forward`` was replaced on the instance does not pickle, and then the
    fused one need not either."""
    prop = "survives_copy_and_save"
    fused = trial.require_fused(prop)
    for how, duplicate in (("copy.deepcopy", copy.deepcopy), (_SAVED, _saved_and_loaded)):
        failure = _duplicate_failure(trial, prop, how, duplicate, fused)
        if failure is not None and _survives(duplicate, trial.model):
            raise failure


def _duplicate_failure(
    trial: Trial, prop: str, how: str, duplicate, fused: nn.Module
) -> PropertyViolation | None:
    """Why the fused model does not survive ``duplicate``, or None. The original's own fate is
    asked only on a failure (``_survives``): duplicating it costs as much again."""
    try:
        again = duplicate(fused)
    except Exception as error:
        detail = (
            f"{how} of the fused model raised {type(error).__name__}: {error} "
            "(the original survives it)"
        )
        failure = trial.violation(prop, detail)
        failure.__cause__ = error
        return failure
    try:
        output = trial.run_fused(f"{prop} ({how})", again)
        _check_matches_original(trial, prop, output, when=f"after {how}: ")
    except PropertyViolation as violation:
        return violation
    return None


def _survives(duplicate, model: nn.Module) -> bool:
    try:
        duplicate(model)
    except Exception:
        return False
    return True


def check_scripts_where_the_original_does(trial: Trial) -> bool:
    """``torch.jit.script`` of the fused model works and computes what the original computes,
    wherever the original scripts and, scripted, computes what it computes (TorchScript compiles
    a class's ``forward``, not one replaced on the instance); returns whether it judged (most
    drawn networks do not script: their code uses what TorchScript lacks). Too slow to run on
    every random network (about 0.1 s a network); the suite runs it on the pinned ones.

    Not judged with an autocast block: TorchScript's CPU autocast casts a conv's input but not its
    bias, so a fold that gives a bias-less conv a bias there fails scripted (eager autocast casts
    both, and the fused model runs right)."""
    prop = "scripts_where_the_original_does"
    if any(isinstance(b, Chain) and b.boundary == AUTOCAST for b in trial.spec.blocks):
        return False
    try:
        original = evaluate(torch.jit.script(trial.model), trial.inputs)[0]
    except Exception:
        return False
    same_kind = _kind_difference(original, trial.original_output) is None
    if not (same_kind and trial.compare(original).ok):
        return False
    fused = trial.require_fused(prop)
    try:
        scripted = torch.jit.script(fused)
    except Exception as error:
        detail = f"torch.jit.script of the fused model raised {type(error).__name__}: {error}"
        raise trial.violation(prop, detail + " (the original scripts)") from error
    _check_matches_original(trial, prop, trial.run_fused(prop, scripted), when="scripted: ")
    return True


def _saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def check_training_model_refused_or_equivalent(
    spec: NetSpec, fuser: FuserUnderTest, built: Trial | None = None
) -> None:
    """A model in training mode is refused with a ``ValueError`` or left equivalent (BatchNorm
    then normalises with batch statistics, which no fold can reproduce).

    ``built``: a trial of the same spec whose checks are done, so that its untouched model can
    serve instead of building the network again."""
    prop = "training_model_refused_or_equivalent"
    source = render_source(spec) if built is None else built.source
    if built is None:
        _count_network()
        model, inputs = build_from_source(source)
    else:
        model, inputs = built.model, built.inputs
    model.train()
    outcome = _fused_unless_refused(
        spec, fuser, model, inputs, source, prop, "a training-mode model", training=True
    )
    if outcome is None:
        return  # refused: nothing to compare, so no reference is measured
    fused, trial = outcome
    output = trial.run_fused(prop, fused)
    if output.shape != trial.original_output.shape:
        raise trial.violation(prop, f"output shape changed to {tuple(output.shape)}")
    comparison = trial.compare(output)
    if not comparison.ok:
        detail = "the model was in training mode and was fused anyway: " + comparison.describe()
        raise trial.violation(prop, detail, trial.suspects())


def _fused_unless_refused(
    spec: NetSpec,
    fuser: FuserUnderTest,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    source: str,
    prop: str,
    situation: str,
    **fresh: object,
) -> tuple[nn.Module, Trial] | None:
    """Fuse a model the fuser may refuse: None when it raises ``ValueError``, else the fused
    model and a fresh trial (``_fresh_trial(**fresh)``) to judge it by. Any other exception is
    ``prop``'s violation, ``situation`` saying what was fused."""
    try:
        fused, _ = fuser.fuse(model, fresh_copies(inputs) if spec.example_inputs else None)
    except ValueError:
        return None
    except Exception as error:
        detail = f"{situation} raised {type(error).__name__}: {error} (not a ValueError)"
        raise _fresh_trial(spec, fuser, source, **fresh).violation(prop, detail) from error
    return fused, _fresh_trial(spec, fuser, source, **fresh)


def _fresh_trial(
    spec: NetSpec,
    fuser: FuserUnderTest,
    source: str,
    *,
    training: bool = False,
    global_hook: str | None = None,
    built: tuple[nn.Module, tuple[torch.Tensor, ...]] | None = None,
) -> Trial:
    """The network built afresh (the fuser may have changed the one it was given; building is
    deterministic) and measured against its float64 reference. Measuring a training-mode model
    updates its statistics: nothing reads them afterwards. ``global_hook``: the one registered
    now, whose source a failure report shows after the network's. ``built``: that fresh build,
    made before the hook was registered (a registration hook would change the build itself)."""
    model, inputs = build_from_source(source) if built is None else built
    if training:
        model.train()  # as the fused model was; otherwise as built (its drawn training BNs too)
    reference = measure_reference(model, inputs, spec.seed)
    if global_hook is not None:
        source += f"\n# registered while fusing and running:{GLOBAL_HOOKS[global_hook]}"
    sites = foldable_sites(spec)
    return Trial(spec, fuser, source, model, inputs, reference, sites, [], global_hook=global_hook)


def check_global_hooks_refused_or_honoured(spec: NetSpec, fuser: FuserUnderTest, hook: str) -> None:
    """Under a global module hook that changes what some modules return, or replaces the
    parameters assigned to modules (``strategies/global_hooks.py``), the model is refused with a
    ``ValueError`` or fused into one that computes, under the same hook, what the original
    computes under it."""
    prop = "global_hooks_refused_or_honoured"
    _count_network()
    source = render_source(spec)
    model, inputs = build_from_source(source)
    fresh = build_from_source(source)  # the one to judge by, built before the hook like the model
    with registered_global_hook(hook):
        situation = "under a global module hook the fuser"
        outcome = _fused_unless_refused(
            spec, fuser, model, inputs, source, prop, situation, global_hook=hook, built=fresh
        )
        if outcome is None:
            return  # refused: nothing to compare, so no reference is measured
        fused, trial = outcome
        _check_matches_original(trial, prop, trial.run_fused(prop, fused), "under the hook: ")


def _site_of_call(name: str | None, site_names: set[str]) -> str | None:
    """The oracle site a runtime batch norm call belongs to, from its running_mean's name."""
    if name is None:
        return None
    module_name = name.removesuffix(RUNNING_MEAN)
    if name.endswith(RUNNING_MEAN) and module_name in site_names:
        return module_name
    return name if name in site_names else None


def check_no_foldable_batchnorm_remains(trial: Trial) -> None:
    """No BatchNorm call the oracle calls foldable still runs in the fused model."""
    prop = "no_foldable_batchnorm_remains"
    fused = trial.require_fused(prop)
    try:
        calls = batchnorm_calls(fused, trial.inputs)
    except Exception as error:
        detail = f"running the fused model raised {type(error).__name__}: {error}"
        raise trial.violation(prop, detail) from error
    foldable = Counter(site.bn for site in trial.sites if site.foldable)
    unfoldable = Counter(site.bn for site in trial.sites if not site.foldable)
    site_names = {site.bn for site in trial.sites if site.bn is not None}
    remaining = Counter(_site_of_call(name, site_names) for name in calls)
    for name, count in remaining.items():
        if name is not None and foldable[name] and count > unfoldable[name]:
            verdicts = [s.describe() for s in trial.sites if s.bn == name]
            detail = f"{count} batch_norm call(s) still run for it; oracle: " + "; ".join(verdicts)
            raise trial.violation(prop, detail, name)
    if len(calls) > sum(unfoldable.values()):
        detail = (
            f"the fused model runs {len(calls)} batch_norm calls ({calls}) but only "
            f"{sum(unfoldable.values())} sites are unfoldable"
        )
        raise trial.violation(prop, detail, trial.suspects())


def check_report_agrees_with_oracle(trial: Trial) -> None:
    """Site by site, the fuser's report says folded (and on which side) exactly where the
    oracle does; it has an entry for every call the oracle lists that a fuser can see
    (``Site.seen``), and none for calls the network does not make, nor for a module of it that
    is no BatchNorm. Fusers without a report pass trivially."""
    prop = "report_agrees_with_oracle"
    trial.require_fused(prop)
    if trial.report is None:
        return
    reported = {(site.bn, site.call_index): site for site in trial.report.sites}
    for site in trial.sites:
        if site.bn is None:
            continue
        name = f"{site.bn} (call {site.call_index})"
        got = reported.pop((site.bn, site.call_index), None)
        if got is None:
            if site.foldable or site.seen:
                raise trial.violation(prop, f"no report entry; oracle: {site.describe()}", name)
            continue
        if site.foldable and not got.folded:
            detail = f"report: left ({got.reason}); oracle: {site.describe()}"
            raise trial.violation(prop, detail, name)
        if site.foldable and got.side != site.side:
            detail = f"report: folded on the {got.side} side; oracle: {site.describe()}"
            raise trial.violation(prop, detail, name)
        if not site.foldable and got.folded:
            detail = f"report: folded into {got.into} ({got.side} side); oracle: {site.describe()}"
            raise trial.violation(prop, detail, name)
    modules = dict(trial.model.named_modules())
    for (bn, index), got in reported.items():
        if got.folded:
            detail = f"report folds a site the oracle has no foldable BatchNorm for: {got}"
            raise trial.violation(prop, detail, f"{bn} (call {index})")
        if any(site.bn == bn for site in trial.sites):
            detail = f"report has a call the network does not make: {got}"
            raise trial.violation(prop, detail, f"{bn} (call {index})")
        module = modules.get(bn)  # other names are graph nodes: functional calls without stats
        if module is not None and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            detail = f"report lists {bn}, a {type(module).__name__}, as a BatchNorm call: {got}"
            raise trial.violation(prop, detail, f"{bn} (call {index})")


def check_no_dead_state(trial: Trial) -> None:
    """A fold leaves nothing behind (``dead_state``)."""
    prop = "no_dead_state"
    problem = dead_state(trial.require_fused(prop))
    if problem is not None:
        raise trial.violation(prop, problem, trial.suspects())


def dead_state(fused: nn.Module) -> str | None:
    """What a fused model keeps that its graphs never use, or None: a ``get_attr`` node no one
    reads, or a parameter or buffer no node reaches (a layer's old weight, a folded BN's
    statistics). Such leftovers compute nothing, but they keep the memory a fold was meant to give
    back, and they come back in ``state_dict()``. Judged on every GraphModule in the fused model
    (the root, or the fused children of a module that runs as written); another fuser's plain
    modules have no graph to read."""
    for path, module in fused.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        where = f" (in {path})" if path else ""
        unread = [n.name for n in module.graph.nodes if n.op == "get_attr" and not n.users]
        if unread:
            return f"get_attr nodes nobody reads{where}: {unread}"
        unreachable = _unreachable_state(module)
        if unreachable:
            return f"parameters and buffers no graph node reaches{where}: {unreachable}"
    return None


def _unreachable_state(gm: fx.GraphModule) -> list[str]:
    """Names of ``gm``'s parameters and buffers that no ``get_attr`` or ``call_module`` node
    reaches (a module a node calls or reads reaches everything inside it)."""
    reached: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        value = attrgetter(node.target)(gm)
        if isinstance(value, nn.Module):
            reached.update(id(tensor) for _, tensor in named_state(value))
        else:
            reached.add(id(value))
    return [name for name, tensor in named_state(gm) if id(tensor) not in reached]


#: The properties of one fused trial, soundness first: the first proves the fuser left the model
#: as built, which the others then run.
SOUNDNESS_TRIAL_CHECKS = (
    check_input_model_untouched,
    check_fused_matches_original,
    check_output_signature_preserved,
    check_idempotent,
    check_survives_copy_and_save,
)
#: Those that need the fuser's report (``run_trial(..., with_report=True)``).
COMPLETENESS_TRIAL_CHECKS = (
    check_no_foldable_batchnorm_remains,
    check_report_agrees_with_oracle,
    check_no_dead_state,
)
TRIAL_CHECKS = SOUNDNESS_TRIAL_CHECKS + COMPLETENESS_TRIAL_CHECKS


def check_network(spec: NetSpec, fuser: FuserUnderTest) -> None:
    """Every property on one network (one build, one fuse), but the global-hook one, which is
    drawn with its hook (``check_global_hooks_refused_or_honoured``); raises the first violation."""
    trial = run_trial(spec, fuser, with_report=True)
    for check in TRIAL_CHECKS:
        check(trial)  # the first proves the fuser left the model as built
    check_training_model_refused_or_equivalent(spec, fuser, built=trial)


def check_random_networks(fuser: FuserUnderTest, count: int, *, seed_value: int = 0) -> int:
    """Draw, build, fuse and check ``count`` random networks (what the benchmark times);
    returns how many were checked. Raises the (shrunk) violation if one is found."""
    checked = []

    @seed(seed_value)
    @settings(max_examples=count, database=None, deadline=None)
    @given(net_specs())
    def check_one(spec: NetSpec) -> None:
        try:
            check_network(spec, fuser)
        except OutOfRange:
            return
        checked.append(spec)

    check_one()
    return len(checked)
