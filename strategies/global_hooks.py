"""Global module hooks for the soundness property ``global_hooks_refused_or_honoured``.

``torch.nn.modules.module.register_module_forward_hook`` (and its pre-hook sibling) installs a
hook that runs on every module call of every model in the process. A hook that changes what some
modules return (a calibration shim, an activation clamp, a debugging offset) is part of what the
model computes while it is registered: a fold removes BatchNorm module calls and changes what its
layer returns, so a fuser must refuse such a model (``ValueError``) or leave it equivalent.

``register_module_parameter_registration_hook`` installs one that sees every parameter assigned
to any module, and may replace it (a cast, a move, a reparametrisation). It never runs when the
original model is called, but it does when a fuser assigns its folded weights: they come out
replaced, although they were computed from parameters the hook had already let through.

Each hook is Python source that defines the hook and registers it as ``hook_handle``; the same
text is appended to a failing network's program, so the report still reproduces the failure.
Hooks are registered only while one network is fused and run, and always removed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

GLOBAL_HOOKS = {
    "shift_batch_norm_outputs": '''
def shift_batch_norm_outputs(module, args, output):
    """Every BatchNorm module's output, shifted: gone with the BatchNorm calls a fold removes."""
    if hasattr(module, "running_mean") and torch.is_tensor(output):
        return output + 0.25


hook_handle = torch.nn.modules.module.register_module_forward_hook(shift_batch_norm_outputs)
''',
    "shift_batch_norm_inputs": '''
def shift_batch_norm_inputs(module, args):
    """Every BatchNorm module's input, shifted before it normalises: a pre-hook."""
    if hasattr(module, "running_mean") and args and torch.is_tensor(args[0]):
        return (args[0] + 0.25, *args[1:])


hook_handle = torch.nn.modules.module.register_module_forward_pre_hook(shift_batch_norm_inputs)
''',
    "halve_layer_outputs": '''
def halve_layer_outputs(module, args, output):
    """Every conv's and Linear's output, halved: a fold into the layer puts the BatchNorm's shift
    under the hook, which the original applies after it."""
    layers = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    if isinstance(module, layers) and torch.is_tensor(output):
        return output * 0.5


hook_handle = torch.nn.modules.module.register_module_forward_hook(halve_layer_outputs)
''',
    "halve_registered_parameters": '''
def halve_registered_parameters(module, name, parameter):
    """Every parameter assigned to a module while it is registered, halved: the network was
    built before, so only what a fuser assigns comes out halved."""
    if parameter is not None:
        return torch.nn.Parameter(parameter.detach() * 0.5, parameter.requires_grad)


hook_handle = torch.nn.modules.module.register_module_parameter_registration_hook(
    halve_registered_parameters
)
''',
}

GLOBAL_HOOK_KINDS = tuple(GLOBAL_HOOKS)


@contextmanager
def registered_global_hook(kind: str) -> Iterator[None]:
    """Register the global hook ``kind`` for the duration of the block."""
    namespace = {"torch": torch}
    exec(compile(GLOBAL_HOOKS[kind], f"<global hook {kind}>", "exec"), namespace)
    try:
        yield
    finally:
        namespace["hook_handle"].remove()
