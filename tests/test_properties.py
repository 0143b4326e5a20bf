"""The property suite: random conv/BN networks, fused by the fuser under test, checked against
a float64 evaluation and against the oracle's reading of the README's foldability definition.

``pytest --fuser=package.module:function`` runs all of it against another fuser;
``-m soundness`` keeps the properties any correct fuser must satisfy, whatever it folds.
Each property lives in ``strategies/properties.py``; its failure message is a complete bug report
(property, site, error vs allowed, the network as runnable Python, the spec literal to pin).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st
from torch import nn

from strategies import NetSpec, net_specs
from strategies.fuser_under_test import FuserUnderTest
from strategies.global_hooks import GLOBAL_HOOK_KINDS
from strategies.properties import (
    COMPLETENESS_TRIAL_CHECKS,
    SOUNDNESS_TRIAL_CHECKS,
    OutOfRange,
    PropertyViolation,
    Trial,
    check_fused_matches_original,
    check_global_hooks_refused_or_honoured,
    check_idempotent,
    check_input_model_untouched,
    check_no_dead_state,
    check_no_foldable_batchnorm_remains,
    check_other_rank_refused_or_honoured,
    check_output_signature_preserved,
    check_report_agrees_with_oracle,
    check_scripts_where_the_original_does,
    check_survives_copy_and_save,
    check_training_model_refused_or_equivalent,
    run_trial,
)
from strategies.snapshot import shared_memory
from strategies.two_ranks import two_rank_specs
from tests.compat import cpu_runs_float16, requires_cpu_float16
from tests.pinned import PINNED, SOUNDNESS_ONLY, TWO_RANKS

REQUIRES_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the cuda variants run where a GPU is present",
)
DEVICES = ["cpu", pytest.param("cuda", marks=REQUIRES_CUDA)]
# Soundness sees every dtype (float16 where this torch has CPU kernels for it); completeness leaves
# out float16, where the README lets a fold be refused when its weights would overflow, which the
# spec alone cannot predict.
HALF_DTYPES = ("bfloat16", "float16") if cpu_runs_float16() else ("bfloat16",)
SOUNDNESS_SPECS = net_specs(dtypes=("float32", "float64", "float32", "float64", *HALF_DTYPES))
COMPLETENESS_SPECS = net_specs(dtypes=("float32", "float64", "bfloat16"))
# Networks whose top level runs as written (``NetSpec.root_untraced``), a kind the default
# strategy leaves out (it takes most folds with it); every property, in two tests by marker.
UNTRACED_ROOT_SPECS = net_specs(dtypes=("float32", "float64", "bfloat16"), untraced_root=True)
# Networks the original runs at two ranks (``strategies/two_ranks.py``), the second never drawn
# by the default strategy.
TWO_RANK_SPECS = two_rank_specs()


def trial_on(device: str, spec: NetSpec, fuser: FuserUnderTest, with_report: bool = False) -> Trial:
    """Build, evaluate and fuse ``spec`` on ``device``; networks that overflow their own dtype
    (float16) are rejected, as they say nothing about the fuser."""
    try:
        return run_trial(replace(spec, device=device), fuser, with_report=with_report)
    except OutOfRange:
        reject()


def checked_on(
    device: str, spec: NetSpec, fuser: FuserUnderTest, checks: tuple, with_report: bool = False
) -> Trial:
    """``trial_on``, then every check of ``checks`` on the trial."""
    trial = trial_on(device, spec, fuser, with_report=with_report)
    for check in checks:
        check(trial)
    return trial


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS)
def test_fused_matches_original(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_fused_matches_original(trial_on(device, spec, fuser_under_test))


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS)
def test_input_model_is_untouched(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_input_model_untouched(trial_on(device, spec, fuser_under_test))


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS)
def test_output_dtype_device_and_shape_are_preserved(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_output_signature_preserved(trial_on(device, spec, fuser_under_test))


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS)
def test_fusing_twice_changes_nothing_more(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_idempotent(trial_on(device, spec, fuser_under_test))


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS)
def test_fused_model_survives_copy_and_save(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_survives_copy_and_save(trial_on(device, spec, fuser_under_test))


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS)
def test_training_mode_model_is_refused_or_left_equivalent(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    try:
        check_training_model_refused_or_equivalent(replace(spec, device=device), fuser_under_test)
    except OutOfRange:
        reject()


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=SOUNDNESS_SPECS, hook=st.sampled_from(GLOBAL_HOOK_KINDS))
def test_global_module_hooks_are_refused_or_honoured(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec, hook: str
) -> None:
    try:
        check_global_hooks_refused_or_honoured(replace(spec, device=device), fuser_under_test, hook)
    except OutOfRange:
        reject()


@pytest.mark.completeness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=COMPLETENESS_SPECS)
def test_no_foldable_batchnorm_remains(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_no_foldable_batchnorm_remains(trial_on(device, spec, fuser_under_test))


@pytest.mark.completeness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=COMPLETENESS_SPECS)
def test_report_agrees_with_oracle(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_report_agrees_with_oracle(trial_on(device, spec, fuser_under_test, with_report=True))


@pytest.mark.completeness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=COMPLETENESS_SPECS)
def test_fused_model_keeps_no_dead_state(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    check_no_dead_state(trial_on(device, spec, fuser_under_test))


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=UNTRACED_ROOT_SPECS)
def test_a_model_whose_top_level_runs_as_written_is_fused_soundly(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    checked_on(device, spec, fuser_under_test, SOUNDNESS_TRIAL_CHECKS)


@pytest.mark.completeness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=UNTRACED_ROOT_SPECS)
def test_a_model_whose_top_level_runs_as_written_is_fused_completely(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    checked_on(device, spec, fuser_under_test, COMPLETENESS_TRIAL_CHECKS, with_report=True)


@pytest.mark.soundness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=TWO_RANK_SPECS)
def test_a_model_run_at_two_ranks_is_fused_soundly_at_both(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    trial = checked_on(device, spec, fuser_under_test, SOUNDNESS_TRIAL_CHECKS)
    check_other_rank_refused_or_honoured(trial)


@pytest.mark.completeness
@pytest.mark.parametrize("device", DEVICES)
@given(spec=TWO_RANK_SPECS)
def test_a_model_run_at_two_ranks_is_fused_completely(
    fuser_under_test: FuserUnderTest, device: str, spec: NetSpec
) -> None:
    checked_on(device, spec, fuser_under_test, COMPLETENESS_TRIAL_CHECKS, with_report=True)


def _pinned_cases(completeness: bool = False) -> list:
    """Every pinned network (for completeness, those the oracle can judge); CUDA ones run where a
    GPU is present, float16 ones where this torch has CPU float16 kernels."""
    cases = []
    for name in sorted(PINNED):
        if completeness and name in SOUNDNESS_ONLY:
            continue
        spec = PINNED[name]
        if spec.device == "cuda":
            cases.append(pytest.param(name, marks=REQUIRES_CUDA))
        elif spec.dtype == "float16":
            cases.append(pytest.param(name, marks=requires_cpu_float16))
        else:
            cases.append(name)
    return cases


@pytest.mark.soundness
@pytest.mark.parametrize("name", _pinned_cases())
def test_pinned_network_is_fused_soundly(fuser_under_test: FuserUnderTest, name: str) -> None:
    """Every network that ever exposed a bug, replayed on every run."""
    spec = PINNED[name]
    trial = run_trial(spec, fuser_under_test)
    for check in SOUNDNESS_TRIAL_CHECKS:
        check(trial)
    if name in TWO_RANKS:
        check_other_rank_refused_or_honoured(trial)
    check_training_model_refused_or_equivalent(spec, fuser_under_test, built=trial)


@pytest.mark.completeness
@pytest.mark.parametrize("name", _pinned_cases(completeness=True))
def test_pinned_network_is_fused_completely(fuser_under_test: FuserUnderTest, name: str) -> None:
    trial = run_trial(PINNED[name], fuser_under_test, with_report=True)
    for check in COMPLETENESS_TRIAL_CHECKS:
        check(trial)


@pytest.mark.soundness
def test_pinned_networks_script_where_their_originals_do(fuser_under_test: FuserUnderTest) -> None:
    """The README's promise that a fused model scripts, on every pinned CPU network whose original
    scripts and runs scripted; enough of them do for the test to mean something."""
    scripted = []
    for name in sorted(PINNED):
        spec = PINNED[name]
        if spec.device == "cuda" or (spec.dtype == "float16" and not cpu_runs_float16()):
            continue
        trial = run_trial(spec, fuser_under_test)
        if trial.error is None and check_scripts_where_the_original_does(trial):
            scripted.append(name)
    assert len(scripted) >= MIN_SCRIPTED_PINNED, scripted


MIN_SCRIPTED_PINNED = 10


def _pinned_trial(name: str, fuser: str) -> Trial:
    return run_trial(PINNED[name], FuserUnderTest.from_target(fuser), with_report=True)


def test_a_fused_model_must_change_its_input_as_the_original_does():
    """The harness runs each model on its own copy of the inputs and compares what the runs left
    in them: a fused model whose activations stopped working in place leaves the input as it was."""
    mutant = "tests.mutants.rewriter_bugs:in_place_activations_made_out_of_place"
    trial = _pinned_trial("in_place_relu_changes_the_network_input", mutant)
    check_input_model_untouched(trial)
    with pytest.raises(PropertyViolation, match="leaves its input 0 otherwise than the original"):
        check_fused_matches_original(trial)


def test_a_fused_model_must_not_share_memory_with_the_input():
    """Left bitwise alone by fusing, the caller's model can still be changed later through a fused
    model that holds its tensors (here, the BN the fuser must leave in training mode)."""
    mutant = "tests.mutants.bookkeeping_bugs:parameters_shared_with_caller"
    trial = _pinned_trial("torch_fuse_training_bn_submodule", mutant)
    check_fused_matches_original(trial)
    with pytest.raises(PropertyViolation, match="shares memory with the input model's"):
        check_input_model_untouched(trial)
    check_input_model_untouched(_pinned_trial("torch_fuse_training_bn_submodule", "fuser:fuse"))


def test_a_report_must_not_list_a_layer_as_a_batch_norm_call():
    """Entries the oracle cannot name (functional calls without statistics are named by graph
    node) are let through, but not one naming a module of the network that is no BatchNorm."""
    broken = "tests.broken_fusers:reports_its_layers_as_batch_norms"
    with pytest.raises(PropertyViolation, match="a Conv1d, as a BatchNorm call"):
        check_report_agrees_with_oracle(_pinned_trial("conv1d_then_bn", broken))
    check_report_agrees_with_oracle(_pinned_trial("conv1d_then_bn", "fuser:fuse_with_report"))


@pytest.mark.parametrize("hook", GLOBAL_HOOK_KINDS)
def test_a_fuser_that_folds_under_a_global_hook_is_caught(hook):
    """torch's fuse folds a Conv1d -> BatchNorm1d pair whatever global hooks are registered; each
    drawn hook changes what that pair computes once folded (the registration hook halves the
    folded weights as torch assigns them). Ours refuses (a ``ValueError``)."""
    spec = PINNED["conv1d_then_bn"]
    torch_fuse = FuserUnderTest.from_target("torch.fx.experimental.optimization:fuse")
    with pytest.raises(PropertyViolation, match="global_hooks_refused_or_honoured violated"):
        check_global_hooks_refused_or_honoured(spec, torch_fuse, hook)
    check_global_hooks_refused_or_honoured(spec, FuserUnderTest.from_target("fuser:fuse"), hook)
    assert not torch.nn.modules.module._global_forward_hooks, "the hook outlived the check"
    assert not torch.nn.modules.module._global_forward_pre_hooks, "the hook outlived the check"
    registration_hooks = torch.nn.modules.module._global_parameter_registration_hooks
    assert not registration_hooks, "the hook outlived the check"


def test_a_fuser_that_traces_through_a_no_grad_block_is_caught():
    """torch's fuse traces through a module's ``with torch.no_grad():`` block, which FX does not
    record: the values stay right, but the fused output requires grad where the original's does
    not. Ours keeps that module as one call (fusing inside it)."""
    torch_fuse = FuserUnderTest.from_target("torch.fx.experimental.optimization:fuse")
    trial = run_trial(PINNED["torch_fuse_no_grad_block"], torch_fuse)
    check_fused_matches_original(trial)
    with pytest.raises(PropertyViolation, match="fused output has requires_grad=True"):
        check_output_signature_preserved(trial)
    check_output_signature_preserved(_pinned_trial("torch_fuse_no_grad_block", "fuser:fuse"))


@pytest.mark.parametrize(
    "pinned",
    [
        "torch_fuse_counting_block",
        "counting_block_setting_around_setattr",
        "counting_block_in_a_held_object",
        "counting_block_in_a_buffer",
        "counting_block_with_a_held_method",
    ],
)
def test_a_fuser_that_traces_through_a_module_counting_its_calls_is_caught(pinned):
    """torch's fuse traces through a module's ``self.calls.append(...)`` (or its
    ``object.__setattr__(self, "calls", n)``, ``self.calls.count += 1`` in a namespace it
    holds, ``self.calls.add_(1)`` on a buffer, or ``self.calls()``, a plain object's method),
    which FX does not record: the fused model's output
    is right, but its module (and count) is gone. Ours keeps that module as one call (fusing
    inside it where its code allows) and leaves no count of its own runs behind."""
    torch_fuse = FuserUnderTest.from_target("torch.fx.experimental.optimization:fuse")
    trial = run_trial(PINNED[pinned], torch_fuse)
    with pytest.raises(PropertyViolation, match=r"the fused model has no b0\.calls"):
        check_fused_matches_original(trial)
    check_fused_matches_original(_pinned_trial(pinned, "fuser:fuse"))


@pytest.mark.parametrize("hook", GLOBAL_HOOK_KINDS)
def test_a_fuser_that_leaves_a_training_bn_alone_passes_under_a_global_hook(hook):
    """A plain copy computes what the original does under any hook. The copy judged it by was
    once put wholly in eval mode, undoing the network's own training-mode BatchNorm: every fuser
    that left that BatchNorm alone failed (ours refuses under global hooks, so it never did)."""
    spec = PINNED["torch_fuse_training_bn_submodule"]
    copying = FuserUnderTest.from_target("tests.broken_fusers:folds_nothing")
    check_global_hooks_refused_or_honoured(spec, copying, hook)


def test_a_copy_made_inside_inference_mode_is_caught():
    """A fuser called inside ``torch.inference_mode()`` that deep-copies there hands back
    inference tensors: the copy's training-mode BatchNorm cannot update its statistics once run
    outside it, where the original runs. ``folds_nothing`` copies outside it and passes."""
    spec = replace(PINNED["torch_fuse_training_bn_submodule"], fused_in_inference_mode=True)
    plain = FuserUnderTest.from_target("copy:deepcopy")
    with pytest.raises(PropertyViolation, match="Inplace update to inference tensor"):
        check_fused_matches_original(run_trial(spec, plain))
    check_fused_matches_original(
        run_trial(spec, FuserUnderTest.from_target("tests.broken_fusers:folds_nothing"))
    )


def test_shared_memory_finds_views_and_tensor_attributes_but_not_copies():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    assert shared_memory(model, copy.deepcopy(model)) == []
    assert shared_memory(model, nn.Identity()) == []
    fused = copy.deepcopy(model)
    fused[0].weight = nn.Parameter(model[0].weight.detach()[1:])  # a view of the caller's weight
    fused[1].scale = model[1].running_var  # a plain tensor attribute, as FX keeps constants
    fused[1].register_buffer("empty", model[1].running_mean[:0])  # no memory to share
    found = shared_memory(model, fused)
    assert len(found) == 2, found
    assert "fused tensor 0.weight shares memory with the input model's 0.weight" in found[0]
    assert "fused tensor 1.scale shares memory with the input model's 1.running_var" in found[1]


def test_fusing_must_not_change_the_example_inputs():
    mutant = "tests.mutants.bookkeeping_bugs:example_inputs_changed"
    trial = _pinned_trial("in_place_relu_changes_the_network_input", mutant)
    check_fused_matches_original(trial)  # the models ran on copies: only fusing changed them
    with pytest.raises(PropertyViolation, match="example input 0 changed by fusing"):
        check_input_model_untouched(trial)
