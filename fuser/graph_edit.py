"""Small, local edits of a GraphModule's attributes, and who still references what.

Every fold rewrites one layer's weights and removes one BN node. Whether the layer can be changed in
place depends on whether anything else reads it, so ``UsageCounts`` keeps, per object identity, the
number of graph nodes that reference each module and tensor; it is built in one pass and updated by
every edit, so no edit needs a whole-graph scan.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import torch
from torch import fx, nn

from .patterns import attribute, fetch_attr, submodule


def referenced_objects(
    gm: fx.GraphModule, node: fx.Node, owners_of: dict[str, list[nn.Module]] | None = None
) -> list[object]:
    """The modules and tensors a node reads.

    A called module counts with everything inside it; an attribute read counts with the modules on
    its path, since ``get_attr("bn.weight")`` needs the module ``bn`` to stay where it is.
    ``owners_of`` may hold the modules on paths already walked (by their path), for a caller
    asking about many nodes while the module tree stays as it is.
    """
    if node.op not in ("call_module", "get_attr"):
        return []
    path, _, name = node.target.rpartition(".")
    owners = _owners_on(gm, path, node.target, {} if owners_of is None else owners_of)
    owner = owners[-1] if owners else gm
    target = attribute(owner, name)
    if isinstance(target, nn.Module):
        return [*owners, *module_objects(target)]
    return [*owners, target]


def _owners_on(
    gm: fx.GraphModule, path: str, target: str, walked: dict[str, list[nn.Module]]
) -> list[nn.Module]:
    """The modules on ``path`` down from ``gm``, checked as ``get_submodule`` checks them, each
    prefix walked once across the calls sharing ``walked``."""
    if not path:
        return []
    known = walked.get(path)
    if known is not None:
        return known
    parent_path, _, atom = path.rpartition(".")
    above = _owners_on(gm, parent_path, target, walked)
    owner = attribute(above[-1] if above else gm, atom)
    if not isinstance(owner, nn.Module):
        raise AttributeError(f"`{atom}` of {target!r} is not an nn.Module")
    walked[path] = owners = [*above, owner]
    return owners


def module_objects(module: nn.Module) -> list[object]:
    """The module, its submodules, its parameters and its buffers (each list without repeats)."""
    if module._modules or not _walks_as_module(type(module)):
        return [*module.modules(), *module.parameters(), *module.buffers()]
    # A leaf (most layers and BNs): what ``parameters()`` and ``buffers()`` yield, read directly.
    return [
        module,
        *_distinct(module._parameters.values()),
        *_distinct(module._buffers.values()),
    ]


def _walks_as_module(cls: type) -> bool:
    """True when ``cls`` lists its modules, parameters and buffers as ``nn.Module`` does."""
    return all(
        getattr(cls, name) is getattr(nn.Module, name)
        for name in ("modules", "parameters", "buffers")
    )


def _distinct(tensors: Iterable[torch.Tensor | None]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if tensor is not None:
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


class UsageCounts:
    """How many graph nodes reference each module and tensor, keyed by object identity.

    Every counted object is held until its count drops to zero. An id is unique only among live
    objects: a counted object that died (a placeholder module deleted with its last attribute)
    could pass its count on to a new one at the same address, such as the copy a fold makes of
    a layer, which would then look read twice and be copied again, leaving the first copy behind.
    """

    def __init__(self, gm: fx.GraphModule, shared: frozenset[int] = frozenset()) -> None:
        self._counts: Counter[int] = Counter()
        self._held: dict[int, object] = {}  # the counted objects, kept alive while counted
        self._shared = shared  # referenced from outside this graph too: one more reference each
        owners_of: dict[str, list[nn.Module]] = {}  # nothing changes the tree while counting
        for node in gm.graph.nodes:
            self.add(referenced_objects(gm, node, owners_of))

    def add(self, objects: Iterable[object]) -> None:
        for obj in objects:
            self._counts[id(obj)] += 1
            self._held[id(obj)] = obj

    def release(self, objects: Iterable[object]) -> None:
        """Drop one reference to each; forget (and let go of) objects nobody references."""
        for obj in objects:
            self._counts[id(obj)] -= 1
            if self._counts[id(obj)] <= 0:
                del self._counts[id(obj)]
                self._held.pop(id(obj), None)

    def is_shared(self, obj: object) -> bool:
        """Held outside this graph too (at another place in the model, or by the caller)."""
        return id(obj) in self._shared

    def count(self, obj: object) -> int:
        return self._counts.get(id(obj), 0) + self.is_shared(obj)

    def references(self, obj: object) -> int:
        """How many nodes of this graph reference ``obj``, what holds it outside left out."""
        return self._counts.get(id(obj), 0)

    def read_by_no_node(self, obj: object) -> bool:
        """No node of this graph references ``obj``: the GraphModule's own attribute for it is
        dead, and may go, even when something outside the graph also holds the object (deleting
        the attribute takes only this module's reference away)."""
        return self.references(obj) == 0

    def only_this_call_reads(self, module: nn.Module) -> bool:
        """True when a module (and each tensor inside it) is referenced by one node only."""
        return all(self.count(obj) == 1 for obj in module_objects(module))


def has_path(gm: fx.GraphModule, qualname: str) -> bool:
    try:
        fetch_attr(gm, qualname)
    except AttributeError:
        return False
    return True


def unique_path(gm: fx.GraphModule, base: str) -> str:
    candidate, suffix = base, 1
    while has_path(gm, candidate):
        suffix += 1
        candidate = f"{base}_{suffix}"
    return candidate


def set_attr(gm: fx.GraphModule, qualname: str, value: object) -> None:
    owner_path, _, name = qualname.rpartition(".")
    setattr(submodule(gm, owner_path), name, value)


def delete_attr(gm: fx.GraphModule, qualname: str) -> None:
    """Delete an attribute, then the empty placeholder modules FX created on its path."""
    owner_path, _, name = qualname.rpartition(".")
    owner = submodule(gm, owner_path)
    delattr(owner, name)
    while owner_path:
        empty = not (owner._parameters or owner._buffers or owner._modules)
        if type(owner) is not nn.Module or not empty:
            return
        owner_path, _, name = owner_path.rpartition(".")
        owner = submodule(gm, owner_path)
        delattr(owner, name)


def tensor_like(
    value: torch.Tensor, like: torch.Tensor | None, reference: torch.Tensor
) -> torch.Tensor:
    """``value`` with the dtype, device, memory format and kind (parameter or not) of ``like``.

    ``like`` is None for a bias the layer did not have: it then follows ``reference`` (the weight).
    ``value`` must be a fresh tensor: when it already has the dtype, device and strides of
    ``like``, it is used as it is, not copied.
    """
    template = like if like is not None else reference
    with torch.no_grad():
        if like is not None and _same_layout(value, like):
            result = value.detach()
        elif like is not None:
            result = torch.empty_like(like).copy_(value)
        else:
            result = value.to(dtype=reference.dtype, device=reference.device)
    if isinstance(template, nn.Parameter):
        return nn.Parameter(result, requires_grad=template.requires_grad)
    return result


def _same_layout(value: torch.Tensor, like: torch.Tensor) -> bool:
    return (
        value.dtype == like.dtype
        and value.device == like.device
        and value.shape == like.shape
        and value.stride() == like.stride()
    )


def overflow_reason(value: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why ``value`` (float64) cannot be stored in ``dtype``, or None when it can.

    Only the largest magnitude of ``value`` (or a NaN in it) matters, so ``value`` may also be any
    tensor with the same largest magnitude, such as the channel maxima ``round_scaled`` returns.
    """
    if not value.numel():
        return None
    largest = value.abs().max().item()  # one reduction: NaN and inf propagate through max
    if not math.isfinite(largest):
        return "the folded weights are not finite"
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    if largest > limit:
        return f"the folded weights would overflow {dtype} ({largest:.3g} > {limit:.3g})"
    return None


def underflow_reason(channel_largest: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why folded weights would lose their precision in ``dtype``, or None: an output channel
    whose weights are not all zero but all below the smallest normal number of ``dtype``
    (``channel_largest``: each output channel's largest magnitude, float64, as ``round_scaled``
    gives it). Below it the spacing of representable numbers stops shrinking (a float16 weight
    of 1e-7 keeps one significant bit), so the channel's output would carry an error far beyond
    its own size, which the unfused model, computing with normal-range activations, has not."""
    if not dtype.is_floating_point or not channel_largest.numel():
        return None
    tiny = torch.finfo(dtype).tiny
    sunk = [value for value in channel_largest.tolist() if 0 < value < tiny]  # one read, no NaN
    if not sunk:
        return None
    return (
        f"the folded weights of {len(sunk)} output channel(s) would all be subnormal in "
        f"{dtype} (largest {max(sunk):.3g} < {tiny:.3g}), losing their precision"
    )
