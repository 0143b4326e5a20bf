"""Where every op of a spec lives in the built module: one answer shared by renderer and oracle.

The oracle names BatchNorm call sites the way ``fuser/report.py`` does (module qualified name, or
the qualified name of a functional call's ``running_mean``), and the renderer must put the modules
exactly there. Both ask this module, so the two can only agree.

Layout: block ``i`` packaged inline puts its ops on the root as ``b{i}_{role}{k}``; a wrapper block
is ``b{i}`` with attributes ``{role}{k}``; a sequential block is ``b{i}`` nested as a staircase
(``Sequential(op0, Sequential(op1, Sequential(op2)))``) so that chains cross ``Sequential``
boundaries. Behind a guarded boundary (``spec.GUARDED``), the guard module is ``b{i}``: it holds an
inline chain's ops itself, and a sequential or wrapper chain as ``b{i}.inner``.
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.spec import (
    CONV,
    CONV_TRANSPOSE,
    FUNCTIONAL,
    GUARDED,
    INLINE,
    SEQUENTIAL,
    TRACED_SUBCLASS,
    TWIN,
    Act,
    Chain,
    Layer,
    Norm,
    Op,
    TwoCalls,
)


def role(op: Op) -> str:
    """The short word an op's attribute name starts with."""
    if isinstance(op, Layer):
        return {CONV: "conv", CONV_TRANSPOSE: "convt"}.get(op.kind, "fc")
    if isinstance(op, Norm):
        return "bn"
    if isinstance(op, Act):
        return "act"
    return "flatten"


def has_attribute(op: Op, packaging: str) -> bool:
    """Whether an op owns a submodule: layers and norms always (functional ones hold their
    tensors in a holder module), activations when called as modules, and every op of a
    ``Sequential`` (which can only hold modules)."""
    if packaging == SEQUENTIAL:
        return True
    if isinstance(op, (Layer, Norm)):
        return True
    if isinstance(op, Act):
        return not op.functional
    return False


def block_prefix(block_index: int, packaging: str) -> str:
    """Qualified-name prefix of a block's attributes: on the root (inline) or in ``b{i}``."""
    return f"b{block_index}_" if packaging == INLINE else f"b{block_index}."


def staircase(count: int, depth: int) -> list[tuple[int, ...]]:
    """Index paths of ``count`` ops in a ``Sequential`` staircase ``depth`` levels deep."""
    if depth <= 1:
        return [(k,) for k in range(count)]
    if count == 1:
        return [(0, *path) for path in staircase(1, depth - 1)]
    return [(0,)] + [(1, *path) for path in staircase(count - 1, depth - 1)]


def chain_container(block_index: int, chain: Chain) -> str | None:
    """Qualified name of the module holding a chain's ops, ``None`` for the root."""
    if chain.boundary in GUARDED:
        return f"b{block_index}" if chain.packaging == INLINE else f"b{block_index}.inner"
    return None if chain.packaging == INLINE else f"b{block_index}"


def chain_names(block_index: int, chain: Chain) -> list[str | None]:
    """Qualified name of the submodule behind each op of a chain, ``None`` where it has none."""
    container = chain_container(block_index, chain)
    if chain.packaging == SEQUENTIAL:
        paths = staircase(len(chain.ops), chain.depth)
        return [f"{container}." + ".".join(map(str, path)) for path in paths]
    prefix = f"b{block_index}_" if container is None else f"{container}."
    return [
        prefix + f"{role(op)}{k}" if has_attribute(op, chain.packaging) else None
        for k, op in enumerate(chain.ops)
    ]


@dataclass(frozen=True)
class TwoCallsNames:
    """Qualified names inside a ``TwoCalls`` block."""

    layer: str
    first_norms: list[str]
    second_norms: list[str]
    second_layer: str  # the layer module the second call runs: ``layer``, or its twin


def two_calls_names(block_index: int, block: TwoCalls) -> TwoCallsNames:
    """Names of the shared layer and of both branches' norms (shared norms repeat the first's)."""
    prefix = block_prefix(block_index, block.packaging)
    first = [prefix + f"bn_a{k}" for k in range(len(block.first_norms))]
    if block.second_norms is None:
        second = first
    else:
        second = [prefix + f"bn_b{k}" for k in range(len(block.second_norms))]
    layer = prefix + role(block.layer)
    second_layer = f"{layer}_twin" if block.second == TWIN else layer
    return TwoCallsNames(layer, first, second, second_layer)


def local_name(qualname: str) -> str:
    """The attribute name of a submodule within the module that holds it: the root for inline
    blocks (``b0_conv0``), the wrapper for wrapper blocks (``b0.conv0`` holds ``conv0``)."""
    return qualname.rsplit(".", 1)[-1]


def site_name(qualname: str, norm: Norm) -> str | None:
    """The report's name for a norm's call site (``fuser/report.py``): the module's qualified
    name, or for an ``F.batch_norm`` call the qualified name of its ``running_mean`` tensor;
    ``None`` for a functional call without running statistics (the report names those by graph
    node, which the spec cannot predict)."""
    if norm.style in (FUNCTIONAL, TRACED_SUBCLASS):
        return f"{qualname}.running_mean" if norm.track_running_stats else None
    return qualname
