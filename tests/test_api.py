"""The public API's promises: errors, the caller's model left alone, what the fused model is and
what it works with, and fuse time linear in the graph's size."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_equivalent,
    randomise_bn_stats,
    remaining_batch_norms,
    shift_output,
    tutorial_model,
)
from torch import fx, nn
from torch.nn.utils import prune

from fuser import FuserError, FusionReport, fuse, fuse_with_report
from fuser.fold_pass import fold_batch_norms


def conv_bn_relu(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
    )


def small_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn_relu(3, 4), conv_bn_relu(4, 4), nn.Conv2d(4, 2, 1))
    return randomise_bn_stats(model).eval()


def hooked_net() -> nn.Module:
    """``small_net`` whose first block has a forward hook: the fuser traces that block into a
    GraphModule of its own and moves the hook onto it."""
    model = small_net()
    model[0].register_forward_hook(shift_output)
    return model


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("not_a_module", [lambda x: x, "resnet18", None, torch.zeros(2)])
def test_anything_but_a_module_raises_type_error(not_a_module):
    with pytest.raises(TypeError):
        fuse(not_a_module)


def test_fuser_error_is_a_value_error():
    assert issubclass(FuserError, ValueError)


def test_model_in_training_mode_raises_fuser_error_asking_for_eval():
    model = small_net().train()
    with pytest.raises(FuserError, match=r"\.eval\(\)"):
        fuse(model)


def test_a_model_deepcopy_cannot_copy_raises_a_fuser_error_naming_the_copy():
    """The fuser works on a deep copy; a model holding something uncopyable (a lock, or the
    non-leaf weight an old-style ``weight_norm`` leaves after a forward) gets a clear error."""
    model = small_net()
    model.lock = threading.Lock()
    with pytest.raises(FuserError, match=r"copy\.deepcopy\(model\) failed: TypeError"):
        fuse(model)


def test_a_pruned_model_deepcopy_cannot_copy_gets_the_way_to_make_pruning_permanent():
    """``torch.nn.utils.prune`` leaves each pruned weight as a tensor computed from
    ``weight_orig``, which ``copy.deepcopy`` refuses: the error names the pruned tensors and the
    fix, after which the model fuses."""
    model = small_net()
    prune.l1_unstructured(model[0][0], "weight", amount=0.3)
    with pytest.raises(FuserError, match=r"pruned tensors \(0\.0\.weight\).*prune\.remove"):
        fuse(model)
    prune.remove(model[0][0], "weight")
    x = image(2, 3, 6, 6)
    fused = fuse(model, (x,))
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, x)


def test_a_torch_compile_wrapper_raises_a_fuser_error_naming_the_eager_model():
    """``torch.compile(model)`` runs compiled code FX cannot trace: fusing it would leave every
    BatchNorm, silently (no error, nothing folded)."""
    compiled = torch.compile(small_net())
    with pytest.raises(FuserError, match=r"torch\.compile wrapper .*model\._orig_mod"):
        fuse(compiled)
    assert_equivalent(compiled._orig_mod, fuse(compiled._orig_mod), image(2, 3, 6, 6))


@pytest.mark.parametrize(
    ("make_model", "names"),
    [
        (lambda: nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)), "0.bias, 0.weight"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()),
            "1.bias, 1.running_mean, 1.running_var, 1.weight",
        ),
        (lambda: nn.Sequential(nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5)), "1.bias"),
    ],
    ids=["lazy conv", "lazy batchnorm", "lazy linear"],
)
def test_an_uninitialized_lazy_module_raises_a_fuser_error_naming_its_parameters(make_model, names):
    """Before its first forward a lazy module has nothing to fold, and a copy of it would draw
    its own random weights: a clear error, not the raw one from reading an uninitialized tensor
    (a ValueError from ``numel`` or from the deep copy, before this check)."""
    model = make_model().eval()
    for inputs in (None, (image(2, 3, 8, 8),)):
        with pytest.raises(FuserError, match=rf"uninitialized lazy .*\({names}.*forward pass"):
            fuse(model, inputs)
    assert any(isinstance(p, nn.UninitializedParameter) for p in model.parameters())


def test_a_lazy_module_fuses_once_a_forward_pass_has_initialized_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU())
    model(image(2, 3, 8, 8))  # the first forward gives the lazy modules their shapes
    model = randomise_bn_stats(model).eval()
    x = image(2, 3, 8, 8, seed=2)
    fused = fuse(model, (x,))
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, x)


def test_a_torch_export_module_raises_a_fuser_error_that_does_not_ask_for_eval():
    exported = torch.export.export(small_net(), (image(2, 3, 6, 6),)).module()
    try:
        exported.eval()
    except Exception:  # torch 2.3 and later: a training flag that .eval() cannot change
        with pytest.raises(FuserError, match=r"torch\.export module .* fuse the eager model"):
            fuse(exported)
    else:
        pytest.skip("this torch's exported modules accept .eval(): the advice can be followed")


def _shift_batch_norm_output(module, args, output):
    return output + 1.0 if isinstance(module, nn.BatchNorm2d) else None


def _shift_batch_norm_input(module, args):
    return (args[0] + 1.0,) if isinstance(module, nn.BatchNorm2d) else None


def _halve_registered_parameter(module, name, parameter):
    return None if parameter is None else nn.Parameter(parameter.detach() * 0.5)


def _scale_gradient(module, grad_output):
    return tuple(None if grad is None else grad * 2.0 for grad in grad_output)


@pytest.mark.parametrize(
    "register",
    [
        lambda: torch.nn.modules.module.register_module_forward_hook(_shift_batch_norm_output),
        lambda: torch.nn.modules.module.register_module_forward_pre_hook(_shift_batch_norm_input),
        lambda: torch.nn.modules.module.register_module_full_backward_pre_hook(_scale_gradient),
        lambda: torch.nn.modules.module.register_module_full_backward_hook(
            lambda module, grad_input, grad_output: None
        ),
        lambda: torch.nn.modules.module.register_module_parameter_registration_hook(
            _halve_registered_parameter
        ),
        lambda: torch.nn.modules.module.register_module_module_registration_hook(
            lambda module, name, submodule: None
        ),
        lambda: torch.nn.modules.module.register_module_buffer_registration_hook(
            lambda module, name, buffer: None
        ),
    ],
    ids=[
        "forward",
        "forward_pre",
        "full_backward_pre",
        "full_backward",
        "parameter_registration",
        "module_registration",
        "buffer_registration",
    ],
)
def test_global_module_hooks_raise_a_fuser_error_naming_them(register):
    """A global call hook runs on every module call: a folded BN's calls would be gone from under
    it (the forward one here shifts every BN's output, which a fused model would silently drop).
    A registration hook sees what fusing assigns to modules and may replace it (the parameter one
    here would halve the folded weights: the fused model would be off by half its output)."""
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    handle = register()
    try:
        with pytest.raises(FuserError, match=r"global module hooks are registered \(register_"):
            fuse(model, (image(1, 3, 6, 6),))
    finally:
        handle.remove()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert_equivalent(model, fuse(model), image(1, 3, 6, 6))  # once removed, it fuses


def test_a_model_fused_inside_inference_mode_still_runs_with_gradients():
    """A script fusing inside ``torch.inference_mode()`` (with a model and inputs made there too)
    must not hand back inference tensors, which autograd refuses: the original runs with
    gradients, so must the fused model (``torch.jit.trace``, saliency maps, fine-tuning)."""
    with torch.inference_mode():
        model, x = small_net(), image(2, 3, 6, 6)
        fused = fuse(model, (x,))
    assert not any(tensor.is_inference() for tensor in fused.state_dict().values())
    fused(image(2, 3, 6, 6)).sum().backward()
    assert all(parameter.grad is not None for parameter in fused.parameters())
    with torch.inference_mode():
        assert_equivalent(model, fused, x)


def test_torchscript_module_raises_a_clear_error():
    scripted = torch.jit.script(small_net())
    with pytest.raises((TypeError, FuserError), match=r"(?i)script"):
        fuse(scripted)


# --- the caller's model is never modified ---------------------------------------------------------


class Everything(nn.Module):
    """A bit of every rule: plain folds, a conv called twice, a hooked BN, a BN kept in training."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.hooked = nn.BatchNorm2d(4)
        self.training_bn = nn.BatchNorm2d(4)
        self.pre_bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.bn_a(self.shared(x))
        x = self.hooked(self.bn_b(self.shared(x)))
        x = self.training_bn(x)
        return self.head(self.pre_bn(x))


def everything() -> Everything:
    torch.manual_seed(0)
    model = randomise_bn_stats(Everything()).eval()
    model.training_bn.train()
    model.hooked.register_forward_hook(lambda module, args, output: None)
    model.head.register_forward_pre_hook(lambda module, args: None)
    return model


def snapshot(model: nn.Module) -> dict:
    return {
        "tensors": {
            name: (t, t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()
        },
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "structure": [(name, type(m)) for name, m in model.named_modules()],
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {
            name: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for name, m in model.named_modules()
        },
    }


@pytest.mark.parametrize("with_example_inputs", [False, True], ids=["traced", "shape-propagated"])
def test_fusing_never_modifies_the_callers_model(with_example_inputs):
    model = everything()
    x = image(2, 3, 6, 6)
    before = snapshot(model)

    fused = fuse(model, example_inputs=(x,) if with_example_inputs else None)
    with torch.no_grad():
        fused(x)  # running the fused model must not touch the original either

    after = snapshot(model)
    assert after["structure"] == before["structure"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, saved) in before["tensors"].items():
        now, _ = after["tensors"][name]
        assert now is tensor, f"{name} was replaced on the caller's model"
        assert torch.equal(now, saved), f"{name} changed value on the caller's model"


class ChangesItsInput(nn.Module):
    """Adds to its input in place, by an operator or a method; ``branch`` makes it untraceable,
    so that the fuser runs it eagerly to record its children's inputs."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.body = conv_bn_relu(3, 4)

    def forward(self, x):
        x += 1.0
        x.mul_(2.0)
        if self.branch and bool(x.sum() > 0):
            x.sub_(1.0)
        return self.body(x)


@pytest.mark.parametrize("branch", [False, True], ids=["traced", "run eagerly"])
def test_example_inputs_are_not_changed_by_a_model_that_changes_its_input(branch):
    # The fuser runs the model on example_inputs (shape propagation, recording children's inputs).
    model = randomise_bn_stats(ChangesItsInput(branch)).eval()
    x = image(2, 3, 6, 6)
    before = x.clone()

    fused, report = fuse_with_report(model, example_inputs=(x,))

    assert torch.equal(x, before), "fuse changed the caller's example input"
    assert report.folded, report
    assert_equivalent(model, fused, x)


class SharedOnCopy(nn.Conv2d):
    """A conv whose ``__deepcopy__`` returns itself, as code sharing pretrained parts does."""

    def __deepcopy__(self, memo):
        return self


class SharedParameter(nn.Parameter):
    """A parameter whose ``__deepcopy__`` returns itself: the copied conv holds the caller's."""

    def __deepcopy__(self, memo):
        return self


class SharesStorageOnCopy(nn.Conv2d):
    """A conv whose copies get new parameters over the same storage (a cheap "copy")."""

    def __deepcopy__(self, memo):
        duplicate = SharesStorageOnCopy(self.in_channels, self.out_channels, self.kernel_size)
        duplicate.weight = nn.Parameter(self.weight.data)
        duplicate.bias = nn.Parameter(self.bias.data)
        return duplicate


def conv_with_shared_weight() -> nn.Conv2d:
    conv = nn.Conv2d(3, 4, 3)
    conv.weight = SharedParameter(conv.weight.detach().clone())
    return conv


@pytest.mark.parametrize(
    "make_conv",
    [lambda: SharedOnCopy(3, 4, 3), conv_with_shared_weight, lambda: SharesStorageOnCopy(3, 4, 3)],
    ids=["module", "weight", "storage"],
)
def test_a_part_deepcopy_does_not_copy_is_never_changed(make_conv):
    """The fold must not change the caller's objects that the working copy still holds."""
    torch.manual_seed(0)
    model = randomise_bn_stats(nn.Sequential(make_conv(), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = image(2, 3, 6, 6)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    expected = model(x)

    fused, report = fuse_with_report(model)

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed on the caller's model"
    torch.testing.assert_close(fused(x), expected)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    if isinstance(model[0], SharedOnCopy):  # the module itself is the caller's: left as it is
        (site,) = report.sites
        assert not site.folded and "__deepcopy__ does not copy it" in site.reason


class ConvCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


@pytest.mark.parametrize("private", [True, False], ids=["private", "not-private"])
@pytest.mark.parametrize("make", [lambda: conv_bn_relu(3, 4), ConvCalledTwice], ids=["one", "two"])
def test_a_fold_overwrites_a_weight_only_when_its_storage_and_layer_are_private(private, make):
    """A weight whose storage nothing else uses (``private_storages``), in a layer one call reads,
    takes the folded values in place: fusing then holds one copy of the weights, not two. Any
    other weight is replaced by a new tensor, and the result is the same either way."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(randomise_bn_stats(make()).eval())
    conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    weight, x = conv.weight, image(2, 3, 5, 5)
    before = weight.detach().clone()
    expected = gm(x)
    storages = frozenset({weight.untyped_storage().data_ptr()}) if private else frozenset()

    (site,) = fold_batch_norms(gm, "", frozenset(), storages)

    assert site.folded
    torch.testing.assert_close(gm(x), expected)
    if make is ConvCalledTwice:  # the other call still reads the conv: the fold went into a copy
        assert conv.weight is weight and torch.equal(weight, before)
    elif private:
        assert conv.weight is weight and not torch.equal(weight, before)
    else:
        assert conv.weight is not weight and torch.equal(weight, before)


# --- what the fused model is ----------------------------------------------------------------------


def test_fuse_returns_a_graph_module_equivalent_to_the_original():
    model = small_net()
    fused = fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert_equivalent(model, fused, image(2, 3, 6, 6))


def test_fuse_with_report_returns_the_model_and_a_report_of_every_site():
    model = small_net()
    fused, report = fuse_with_report(model)
    assert isinstance(report, FusionReport)
    assert sorted(site.bn for site in report.sites) == ["0.1", "1.1"]
    assert len(report.folded) == 2
    assert "2 BatchNorm call sites folded, 0 left" in str(report)
    assert report.to_dict()["folded"] == 2
    assert_equivalent(model, fused, image(2, 3, 6, 6))


@pytest.mark.parametrize("given", ["tensor", "tuple", "list"])
def test_example_inputs_may_be_one_tensor_a_tuple_or_a_list(given):
    """A Linear on a 2-D input folds only when example inputs prove the rank (README rule 2):
    the fold shows that the inputs were used, however they were passed."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(5, 4)
    example_inputs = {"tensor": x, "tuple": (x,), "list": [x]}[given]
    fused, report = fuse_with_report(model, example_inputs)
    assert report.site("1").folded, report
    assert_equivalent(model, fused, x)


class TakesAScaleAndAnOption(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    def forward(self, x, scale, unused=None):
        return self.body(x) * scale


def test_example_inputs_may_hold_numbers_and_none_beside_tensors():
    """Only the tensors among the inputs are copied for the fuser's runs; the rest are passed as
    they are, and the Linear's fold shows the runs took place (README rule 2)."""
    torch.manual_seed(0)
    model = randomise_bn_stats(TakesAScaleAndAnOption()).eval()
    x = torch.randn(5, 4)
    fused, report = fuse_with_report(model, (x, 0.5, None))
    assert report.site("body.1").folded, report
    torch.testing.assert_close(fused(x, 0.5), model(x, 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused(x, -2.0, None), model(x, -2.0, None), rtol=1e-5, atol=1e-6)


def test_folded_batchnorms_are_deleted_from_the_fused_state_dict():
    model = small_net()
    fused = fuse(model)
    keys = fused.state_dict().keys()
    leftovers = [key for key in keys if key.startswith(("0.1.", "1.1."))]
    assert leftovers == [], f"folded BatchNorm entries remain in the state_dict: {leftovers}"
    assert {"0.0.weight", "0.0.bias", "1.0.weight", "2.weight"} <= set(keys)


def test_fusing_a_fused_model_folds_nothing_more_and_stays_equivalent():
    model = everything()
    model.training_bn.eval()  # leave only sites that stay left for a reason of their own
    fused = fuse(model)
    refused, report = fuse_with_report(fused)
    assert report.folded == [], f"a second fuse folded more:\n{report}"
    assert_equivalent(model, refused, image(2, 3, 6, 6))


def test_a_forward_hook_on_the_model_itself_still_fires_in_the_fused_model():
    model = small_net()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append("pre-hook"))
    model.register_forward_hook(lambda module, args, output: calls.append("hook"))

    fused = fuse(model)
    calls.clear()
    fused(image(2, 3, 6, 6))
    assert calls == ["pre-hook", "hook"], "the model's own hooks do not fire in the fused model"


# --- untraceable models ---------------------------------------------------------------------------


class DataDependentTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.positive = conv_bn_relu(3, 4)
        self.negative = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:
            return self.positive(x)
        return self.negative(x)


def test_untraceable_model_fuses_its_children_and_reports_the_untraced_part():
    torch.manual_seed(0)
    model = randomise_bn_stats(DataDependentTop()).eval()

    fused, report = fuse_with_report(model)

    assert report.untraced, f"the report does not name the untraced model\n{report}"
    assert report.site("positive.1").folded, report
    assert report.site("negative.1").folded, report
    assert remaining_batch_norms(fused) == []
    x = image(2, 3, 5, 5)
    positive, negative = x.abs() + 0.1, -x.abs() - 0.1
    assert_equivalent(model, fused, positive)
    assert_equivalent(model, fused, negative)


def test_untraceable_child_is_named_and_the_traceable_rest_fuses():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.inner(x) if x.mean() > 0 else -x

    class WithGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn_relu(3, 4)
            self.gate = Gate()
            self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

        def forward(self, x):
            return self.head(self.gate(self.stem(x)))

    torch.manual_seed(0)
    model = randomise_bn_stats(WithGate()).eval()
    fused, report = fuse_with_report(model)

    assert "gate" in [module.name for module in report.untraced], report
    for bn in ("stem.1", "gate.inner.1", "head.1"):
        assert report.site(bn).folded, report
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, image(2, 3, 5, 5))


class Untraceable(nn.Module):
    """A model whose forward branches on data, so FX cannot trace it whole."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.body(x)


def test_untraceable_model_that_iterates_a_sequential_child_still_runs_the_same():
    class IteratesChild(Untraceable):
        def __init__(self):
            super().__init__()
            self.features = conv_bn_relu(3, 4)

        def body(self, x):
            for layer in self.features:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = randomise_bn_stats(IteratesChild()).eval()
    assert_equivalent(model, fuse(model), image(2, 3, 5, 5))


def test_untraceable_model_that_calls_a_childs_conv_directly_still_runs_the_same():
    class CallsGrandchild(Untraceable):
        def __init__(self):
            super().__init__()
            self.block = conv_bn_relu(3, 4)

        def body(self, x):
            return self.block(x) + self.block[0](x)

    torch.manual_seed(0)
    model = randomise_bn_stats(CallsGrandchild()).eval()
    assert_equivalent(model, fuse(model), image(2, 3, 5, 5))


def test_untraceable_model_that_reads_inside_a_container_child_keeps_that_child_whole():
    """``self.stages[1][1].weight``: the code reads into the container, so none of its elements
    may be swapped for a fused GraphModule (which has no ``[1]``), though the code also calls it."""

    class ReadsIntoStages(Untraceable):
        def __init__(self):
            super().__init__()
            self.stages = nn.Sequential(conv_bn_relu(3, 4), conv_bn_relu(4, 4))

        def body(self, x):
            return self.stages(x) * self.stages[1][1].weight.view(1, -1, 1, 1)

    torch.manual_seed(0)
    model = randomise_bn_stats(ReadsIntoStages()).eval()
    fused, report = fuse_with_report(model)
    assert_equivalent(model, fused, image(2, 3, 5, 5))
    assert all(type(stage) is nn.Sequential for stage in fused.stages), fused
    assert "stages" in [module.name for module in report.untraced], report


def test_example_inputs_the_model_cannot_run_raise_a_fuser_error():
    model = small_net()  # three input channels
    with pytest.raises(FuserError, match="example_inputs could not be run through the model"):
        fuse(model, (image(2, 5, 6, 6),))


def test_the_fused_model_keeps_the_models_public_attributes():
    """Code that reads ``model.num_classes`` must read it from the fused model too; tracing
    keeps only what the graph uses, so the fuser copies the traced module's over."""
    model = small_net()
    model.num_classes = 10
    fused = fuse(model)
    assert fused.num_classes == 10


def test_conv_shared_by_two_children_of_an_untraceable_model_folds_into_copies():
    class SharedAcrossChildren(Untraceable):
        def __init__(self):
            super().__init__()
            shared = nn.Conv2d(3, 3, 1)
            self.block1 = nn.Sequential(shared, nn.BatchNorm2d(3))
            self.block2 = nn.Sequential(shared, nn.BatchNorm2d(3))

        def body(self, x):
            return self.block1(x) + self.block2(x)

    torch.manual_seed(0)
    model = randomise_bn_stats(SharedAcrossChildren()).eval()
    fused, report = fuse_with_report(model)
    assert report.site("block1.1").folded and report.site("block2.1").folded, report
    assert_equivalent(model, fused, image(2, 3, 5, 5))


# --- the fused model works with torch's compilers -------------------------------------------------


def test_fused_tutorial_model_works_with_torch_jit_script():
    model = tutorial_model()
    scripted = torch.jit.script(fuse(model))
    assert_equivalent(model, scripted, image(5, 1, 4, 4))


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_fused_model_works_with_torch_compile(backend):
    torch._dynamo.reset()
    model = small_net()
    compiled = torch.compile(fuse(model), backend=backend)
    assert_equivalent(model, compiled, image(2, 3, 6, 6))


def test_fused_model_works_with_torch_export():
    model = small_net()
    x = image(2, 3, 6, 6)
    exported = torch.export.export(fuse(model), (x,))
    assert_equivalent(model, exported.module(), x)
    targets = {str(node.target) for node in exported.graph.nodes}
    assert not any("batch_norm" in target for target in targets), targets


_LOAD_WITHOUT_FUSER = """
import sys
import torch
sys.modules["fuser"] = None  # importing the fuser now fails: the saved model must not need it
torch.set_num_threads(1)  # as the test's own run: the same kernels, so the same bits
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
"""


@pytest.mark.parametrize("make_model", [small_net, hooked_net], ids=["plain", "hooked block"])
def test_a_fused_model_saved_whole_loads_and_runs_with_torch_alone(tmp_path, make_model):
    """``torch.save(fused)`` pickles a GraphModule with the class of the tracer that made it, which
    unpickling instantiates; the saved model must load where this package is not installed, with
    the hooks the fuser moved onto its GraphModules (and their outputs, bit for bit)."""
    model, x = make_model(), image(2, 3, 6, 6)
    fused = fuse(model)
    assert isinstance(fused.get_submodule("0"), fx.GraphModule) == (make_model is hooked_net)
    torch.save(fused, tmp_path / "fused.pt")
    torch.save(x, tmp_path / "x.pt")
    command = [sys.executable, "-c", _LOAD_WITHOUT_FUSER]
    paths = [str(tmp_path / name) for name in ("fused.pt", "x.pt", "y.pt")]
    helpers = str(Path(__file__).parent)  # where the hook's module is
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [helpers, os.environ.get("PYTHONPATH")])),
    )
    subprocess.run(command + paths, check=True, capture_output=True, cwd=tmp_path, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = fused(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "duplicate",
    [lambda module: pickle.loads(pickle.dumps(module)), copy.deepcopy],
    ids=["pickled", "deep-copied"],
)
def test_a_duplicated_fused_model_keeps_its_hooks_and_training_flags(duplicate):
    """FX rebuilds a pickled GraphModule from its code, with no hooks and ``training=True``, and
    its deep copy keeps only state-dict hooks; the fuser's GraphModules keep both."""
    model, x = hooked_net(), image(2, 3, 6, 6)
    fused = fuse(model, (x,))
    fused.get_submodule("2").train()  # a module left in training mode stays so
    loaded = duplicate(fused)
    flags = [(name, m.training) for name, m in fused.named_modules()]
    assert [(name, m.training) for name, m in loaded.named_modules()] == flags
    assert list(loaded.get_submodule("0")._forward_hooks.values()) == [shift_output]
    loaded.get_submodule("2").eval()
    assert_equivalent(model, loaded, x)


class CountsItsBlockCalls(nn.Module):
    """A forward hook that is a bound method: it counts on the module it is bound to."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn_relu(3, 4)
        self.head = nn.Conv2d(4, 2, 1)
        self.block.register_forward_hook(self.count)
        self.calls = 0

    def count(self, module, args, output):
        self.calls += 1
        return output * 2.0

    def forward(self, x):
        return self.head(self.block(x))


def test_fusing_a_fused_model_again_shares_no_hook_state_with_it():
    """The fuser works on a deep copy, and a deep copy rebinds a bound-method hook to the copy:
    running the model fused twice must not count on the model fused once."""
    model, x = randomise_bn_stats(CountsItsBlockCalls()).eval(), image(2, 3, 6, 6)
    once = fuse(model, (x,))
    (hook,) = once.get_submodule("block")._forward_hooks.values()
    calls = hook.__self__.calls
    twice = fuse(once, (x,))
    with torch.no_grad():
        twice(x)
    assert hook.__self__.calls == calls
    assert_equivalent(model, twice, x)


def test_fused_models_survive_pickling_and_deep_copies_of_themselves():
    torch.manual_seed(0)
    x = image(2, 3, 6, 6)
    for model in (small_net(), randomise_bn_stats(DataDependentTop()).eval()):
        fused = fuse(model)
        for again in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
            again = pickle.loads(pickle.dumps(again))  # a copy of a copy, pickled once more
            assert_equivalent(model, again, x)
            assert remaining_batch_norms(again) == []


# --- fuse time is linear in the graph's size ------------------------------------------------------


def conv_bn_chain(pairs: int) -> nn.Module:
    layers = []
    for _ in range(pairs):
        layers += [nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)]
    return nn.Sequential(*layers).eval()


def seconds_to_fuse(model: nn.Module, pairs: int) -> float:
    start = time.perf_counter()
    _, report = fuse_with_report(model)
    elapsed = time.perf_counter() - start
    assert len(report.folded) == pairs
    return elapsed


def test_fuse_time_grows_linearly_with_the_graph():
    small, large = conv_bn_chain(200), conv_bn_chain(1600)
    small_times, large_times = [], []
    for _ in range(2):  # interleaved, best of each: robust to a busy machine
        small_times += [seconds_to_fuse(small, 200) / 200 for _ in range(3)]
        large_times.append(seconds_to_fuse(large, 1600) / 1600)
    small_per_pair, large_per_pair = min(small_times), min(large_times)
    assert large_per_pair <= 3 * small_per_pair, (
        f"fusing 1600 conv/bn pairs took {large_per_pair * 1e3:.2f} ms per pair, "
        f"200 pairs {small_per_pair * 1e3:.2f} ms per pair: fuse time grows faster than the graph"
    )


@pytest.mark.parametrize("on_meta", ["layer", "bn", "both"])
def test_a_fold_on_the_meta_device_is_left_with_a_reason_not_an_error(on_meta):
    """Meta tensors hold no values: there is nothing to fold and no overflow to rule out."""
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    if on_meta in ("layer", "both"):
        conv = conv.to("meta")
    if on_meta in ("bn", "both"):
        bn = bn.to("meta")
    model = nn.Sequential(nn.Sequential(conv, bn), nn.BatchNorm2d(4).to("meta"), nn.Conv2d(4, 2, 1))
    fused, report = fuse_with_report(model.eval())
    assert [site.folded for site in report.sites] == [False, False]
    assert all("meta device, which holds no values" in site.reason for site in report.sites)
    called = [fused.get_submodule(n.target) for n in fused.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in called) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
def test_a_layer_and_bn_on_different_devices_are_left_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).cuda()).eval()
    _, report = fuse_with_report(model)
    (site,) = report.sites
    assert not site.folded and "on different devices (cpu, cuda:0)" in site.reason
