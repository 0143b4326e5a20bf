"""A bitwise record of a module, to prove a fuser left its input alone.

Records every parameter and buffer (bits, dtype, device, shape, ``requires_grad`` and identity),
the module tree (names, types, identities, training flags) and the hooks of every module. Comparing
two snapshots lists each difference in words.

Leaving the input alone also means handing back a model that cannot change it later:
``shared_memory`` lists the tensors of a fused model that share memory with the input model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")


@dataclass(frozen=True)
class _TensorRecord:
    identity: int
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    requires_grad: bool
    bits: torch.Tensor


@dataclass(frozen=True)
class ModelSnapshot:
    """What ``snapshot`` saw; compare two with ``differences``."""

    tensors: dict[str, _TensorRecord]
    modules: dict[str, tuple[type, int, bool]]
    hooks: dict[str, tuple[tuple[int, ...], ...]]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).clone().view(torch.uint8).cpu()


def snapshot(model: nn.Module) -> ModelSnapshot:
    """Record everything a fuser must not change in its input model."""
    tensors = {}
    for name, tensor in named_state(model):
        tensors[name] = _TensorRecord(
            id(tensor),
            tensor.dtype,
            tensor.device,
            tuple(tensor.shape),
            tensor.requires_grad,
            _bits(tensor),
        )
    modules = {}
    hooks = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules[name] = (type(module), id(module), module.training)
        hooks[name] = tuple(
            tuple(id(hook) for hook in getattr(module, attribute).values())
            for attribute in HOOK_DICTS
        )
    return ModelSnapshot(tensors, modules, hooks)


def differences(before: ModelSnapshot, after: ModelSnapshot) -> list[str]:
    """Every way ``after`` differs from ``before``, one line each (empty when untouched)."""
    found = []
    if before.modules.keys() != after.modules.keys():
        added = sorted(after.modules.keys() - before.modules.keys())
        removed = sorted(before.modules.keys() - after.modules.keys())
        found.append(f"module tree changed: added {added}, removed {removed}")
    for name, (kind, identity, training) in before.modules.items():
        if name not in after.modules:
            continue
        now_kind, now_identity, now_training = after.modules[name]
        label = name or "<root>"
        if (kind, identity) != (now_kind, now_identity):
            found.append(f"module {label} replaced ({kind.__name__} -> {now_kind.__name__})")
        if training != now_training:
            found.append(f"module {label} training flag changed {training} -> {now_training}")
        if before.hooks[name] != after.hooks[name]:
            found.append(f"module {label} hooks changed")
    if before.tensors.keys() != after.tensors.keys():
        added = sorted(after.tensors.keys() - before.tensors.keys())
        removed = sorted(before.tensors.keys() - after.tensors.keys())
        found.append(f"parameters/buffers changed: added {added}, removed {removed}")
    for name, record in before.tensors.items():
        now = after.tensors.get(name)
        if now is None:
            continue
        if record.identity != now.identity:
            found.append(f"tensor {name} replaced by another tensor object")
        if (record.dtype, record.device, record.shape) != (now.dtype, now.device, now.shape):
            found.append(
                f"tensor {name} changed from {record.dtype} {record.shape} on {record.device} "
                f"to {now.dtype} {now.shape} on {now.device}"
            )
        elif not torch.equal(record.bits, now.bits):
            found.append(f"tensor {name} values changed")
        if record.requires_grad != now.requires_grad:
            found.append(f"tensor {name} requires_grad changed")
    return found


def named_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, parameter or buffer) of ``module``, a tensor held under two names twice."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def touched_by_fusing(before: ModelSnapshot, model: nn.Module, fused: object) -> list[str]:
    """Every way fusing touched ``model`` (recorded as ``before``), one line each: what changed in
    it, and what of the fused model lies in its memory (``shared_memory``)."""
    return differences(before, snapshot(model)) + shared_memory(model, fused)


def shared_memory(model: nn.Module, fused: object) -> list[str]:
    """The tensors of ``fused`` whose memory is a tensor's of ``model``, one line each.

    A fused model must be a copy: anything that then changes it in place (``load_state_dict``, an
    optimizer step, ``fused.weight.mul_(...)``, quantizing in place) would otherwise change the
    caller's model too, though fusing itself left it bitwise alone. Parameters, buffers and plain
    tensor attributes (FX's constants) are compared by storage, so a view of a caller's tensor
    counts as shared.
    """
    if not isinstance(fused, nn.Module):
        return []
    owners = {}
    for name, tensor in _tensors(model):
        key = _storage_key(tensor)
        if key is not None:
            owners.setdefault(key, name)
    found = []
    for name, tensor in _tensors(fused):
        owner = owners.get(_storage_key(tensor))
        if owner is not None:
            found.append(
                f"fused tensor {name} shares memory with the input model's {owner}: changing "
                "the fused model in place (load_state_dict, an optimizer step) changes the input"
            )
    return found


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, buffer and plain tensor attribute of every module, by qualified name."""
    yield from named_state(model)
    for path, module in model.named_modules(remove_duplicate=False):
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield (f"{path}.{name}" if path else name), value


def _storage_key(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    """Where ``tensor``'s memory lies, or None where it has none to share (empty, meta, sparse)."""
    if tensor.layout is not torch.strided or not tensor.numel():
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
        return None
    return (tensor.device, pointer) if pointer else None
