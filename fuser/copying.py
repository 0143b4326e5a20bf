"""``copy.deepcopy`` of a module tree, with a direct path for modules, dicts and buffers.

Both fusers in the fuse-pass benchmark start with a deep copy (the caller's model is never
touched), and for a model with small weights the copy is a third of the fuser's time. Most of
that is ``copy.deepcopy``'s generic route through the pickle protocol: ``__reduce_ex__``, then
rebuilding the object from its state. A module goes that way, and so does each of the dozen
(mostly empty) hook ``OrderedDict``s every module carries.

Here a plain ``nn.Module``, and an exact ``dict``, ``OrderedDict``, ``tuple`` or ``set``, are
rebuilt directly, doing what ``copy.deepcopy`` does for them, and so is a plain buffer (an exact
``torch.Tensor`` with nothing attached): ``Tensor.__deepcopy__`` spends most of its 20 us on the
checks for the kinds of tensor it must treat otherwise, and a model holds three buffers a
BatchNorm. Everything else (other tensors, parameters, user objects, other containers,
modules with a copy protocol of their own, such as ``GraphModule``) goes to ``copy.deepcopy``
with the same memo, so objects shared within the model, and cycles, are copied exactly as
``copy.deepcopy`` copies them.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

#: Methods by which a class can change how it is copied; a module class that overrides any of
#: them is copied by ``copy.deepcopy``.
_COPY_PROTOCOL = ("__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")
_COPY_HOOKS = frozenset({"__deepcopy__", *_COPY_PROTOCOL})
_MISSING = object()


def deep_copy(value: T) -> T:
    """What ``copy.deepcopy(value)`` returns, made faster for module trees."""
    return _copy(value, {})


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    cls = type(value)
    if copy._deepcopy_dispatch.get(cls) is copy._deepcopy_atomic:
        return value  # what deepcopy returns for None, numbers, strings, functions, classes
    copied = memo.get(id(value), _MISSING)
    if copied is not _MISSING:
        return copied
    if cls is dict or (cls is OrderedDict and not vars(value)):
        return _copy_dict(value, memo)
    if cls is tuple:
        return _copy_tuple(value, memo)
    if cls is set:
        # deepcopy's route for a set: its reduce (set, its items as a list), rebuilt.
        duplicate = set([_copy(item, memo) for item in value])
        memo[id(value)] = duplicate
        return duplicate
    if isinstance(value, nn.Module) and _copied_directly(value):
        return _copy_module(value, memo)
    if cls is torch.Tensor and _plain_tensor(value):
        return _copy_plain_tensor(value, memo)
    return copy.deepcopy(value, memo)


def _copy_dict(value: dict, memo: dict[int, Any]) -> dict:
    # deepcopy's _deepcopy_dict for dict; for OrderedDict, its reduce (class, no arguments, the
    # items) rebuilt the same way. Keys are copied too, as deepcopy copies them.
    duplicate = type(value)()
    memo[id(value)] = duplicate
    for key, item in value.items():
        duplicate[_copy(key, memo)] = _copy(item, memo)
    return duplicate


def _copy_tuple(value: tuple, memo: dict[int, Any]) -> tuple:
    # deepcopy's _deepcopy_tuple: the same tuple when every item is its own copy (a module's
    # kernel_size, stride and padding), and memoised only when it is not.
    items = [_copy(item, memo) for item in value]
    copied = memo.get(id(value), _MISSING)  # a cycle through the tuple copied it already
    if copied is not _MISSING:
        return copied
    if all(item is original for item, original in zip(items, value, strict=True)):
        return value
    duplicate = memo[id(value)] = tuple(items)
    return duplicate


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    # deepcopy's route for a module: __reduce_ex__(4) gives (copyreg.__newobj__, (cls,),
    # module.__getstate__()), and _reconstruct makes cls.__new__(cls), memoises it, deep-copies
    # the state and hands it to __setstate__.
    cls = type(module)
    duplicate = cls.__new__(cls)
    memo[id(module)] = duplicate
    state = {name: _copy(item, memo) for name, item in module.__getstate__().items()}
    duplicate.__setstate__(state)
    return duplicate


def _plain_tensor(tensor: torch.Tensor) -> bool:
    """A dense CPU or CUDA tensor with no autograd state, no lazy conjugate or negative bit, no
    attributes of its own and no ``__torch_function__`` mode to ask: one that
    ``Tensor.__deepcopy__`` copies by copying its storage and viewing the copy as the tensor
    views its own."""
    return (
        tensor.is_leaf
        and not tensor.requires_grad
        and tensor.grad is None
        and tensor.layout is torch.strided
        and tensor.device.type in ("cpu", "cuda")
        and not (tensor.is_quantized or tensor.is_nested or tensor.is_conj() or tensor.is_neg())
        and not tensor.__dict__
        and not torch._C._has_torch_function_unary(tensor)
    )


def _copy_plain_tensor(tensor: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
    # Tensor.__deepcopy__'s route for such a tensor: its storage is deep-copied through the memo
    # (keyed by the storage's address under memo["torch"], as UntypedStorage.__deepcopy__ keys
    # it), so tensors sharing a storage in the model share the copy; the copy is viewed with
    # the tensor's offset, size and strides.
    storages = memo.setdefault("torch", {})
    storage = tensor.untyped_storage()
    copied = storages.get(storage._cdata)
    if copied is None:
        copied = storages[storage._cdata] = storage.clone()
    with torch.no_grad():
        duplicate = tensor.new_empty([]).set_(
            copied, tensor.storage_offset(), tensor.size(), tensor.stride()
        )
    memo[id(tensor)] = duplicate
    return duplicate


def _copied_directly(module: nn.Module) -> bool:
    """Would ``copy.deepcopy`` copy this module by nn.Module's own protocol?

    Not when its class (or, oddly, the instance) defines ``__deepcopy__``, overrides the pickle
    protocol, is registered with ``copy`` or ``copyreg``, or has ``__slots__``.
    """
    cls = type(module)
    return (
        getattr(cls, "__deepcopy__", None) is None
        and all(getattr(cls, name) is getattr(nn.Module, name) for name in _COPY_PROTOCOL)
        and _COPY_HOOKS.isdisjoint(module.__dict__)
        and cls not in copy._deepcopy_dispatch
        and cls not in copyreg.dispatch_table
        and not copyreg._slotnames(cls)
    )
