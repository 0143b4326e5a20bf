"""What a fuse call did, site by site.

The report is the fuser's account to its user: every BatchNorm call site it saw, and for each one
either the layer it was folded into (and on which side) or the reason it was left. The property
suite compares it with an independent oracle, so the naming here is part of the public contract.

Site naming (all names are qualified names in the caller's original model):
- a BatchNorm module call: ``bn`` is the module's qualified name (``"layer1.0.bn1"``);
- a functional ``F.batch_norm`` (or ``torch.batch_norm``) call: ``bn`` is the qualified name of its
  ``running_mean`` tensor (``"head.norm.running_mean"``), or the graph node's name when it has no
  constant running stats.
- ``call_index`` counts the calls of the same ``bn`` in execution order, from 0, so a module
  called twice has two sites. Across graphs (a module fused on its own, such as a hooked child,
  runs its own graph) a graph's calls come before those inside the modules it calls.
- ``into`` is the layer folded into: its module's qualified name, or for a functional layer the
  qualified name of its weight. When the layer is shared (rule 5) the fold goes into a copy for
  this site, and ``into`` still names the original.
- ``rank_checked``: the rank a fold is exact at, where the BN also runs at another one the layer
  takes (README, ranks): the fused model raises when called so that the layer sees another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

OUTPUT_SIDE = "output"
INPUT_SIDE = "input"


@dataclass(frozen=True)
class SiteReport:
    """One BatchNorm call site and what became of it."""

    bn: str
    call_index: int
    folded: bool
    into: str | None = None
    side: str | None = None
    reason: str | None = None
    #: For a fold exact at one rank only (the BN also runs on another the layer takes: README,
    #: ranks), that rank: the fused model checks it on every call and raises at any other.
    rank_checked: int | None = None

    def describe(self) -> str:
        site = self.bn if self.call_index == 0 else f"{self.bn} (call {self.call_index + 1})"
        if self.folded and self.rank_checked is not None:
            return (
                f"{site}: folded into {self.into} ({self.side} side; exact only while the layer "
                f"runs on {self.rank_checked}-D tensors, which the fused model checks on every call)"
            )
        if self.folded:
            return f"{site}: folded into {self.into} ({self.side} side)"
        return f"{site}: left ({self.reason})"


@dataclass(frozen=True)
class UntracedModule:
    """A module FX could not trace; it runs as it is, and its children were fused on their own."""

    name: str
    error: str


@dataclass
class FusionReport:
    """Every BatchNorm call site of one ``fuse`` call, folded or left with a reason."""

    sites: list[SiteReport] = field(default_factory=list)
    untraced: list[UntracedModule] = field(default_factory=list)

    @property
    def folded(self) -> list[SiteReport]:
        return [site for site in self.sites if site.folded]

    @property
    def left(self) -> list[SiteReport]:
        return [site for site in self.sites if not site.folded]

    def site(self, bn: str, call_index: int = 0) -> SiteReport:
        """The report for one call site; ``KeyError`` names what was asked for when it is absent."""
        for candidate in self.sites:
            if candidate.bn == bn and candidate.call_index == call_index:
                return candidate
        raise KeyError(f"no BatchNorm call site {bn!r} (call {call_index}) in this report")

    def to_dict(self) -> dict:
        return {
            "folded": len(self.folded),
            "left": len(self.left),
            "sites": [asdict(site) for site in self.sites],
            "untraced": [asdict(module) for module in self.untraced],
        }

    def __str__(self) -> str:
        lines = [f"{len(self.folded)} BatchNorm call sites folded, {len(self.left)} left"]
        lines += ["  " + site.describe() for site in self.sites]
        if self.untraced:
            lines.append("not traced (run as they are, their children fused on their own):")
            lines += [f"  {module.name}: {module.error}" for module in self.untraced]
        return "\n".join(lines)
