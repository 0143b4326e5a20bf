"""The fold pass's reference counts (``graph_edit.UsageCounts``) must stay exact.

The pass decides from them whether a layer is read by one call only (fold in place) or must be
copied first, and whether an attribute may be deleted. A count left on an object the pass has let
go of is worse than a wrong number: ids are reused, so a later object can inherit it. That happened
(CI, stop 12): the placeholder module FX makes for ``self.stats.running_mean`` kept the counts of
its erased ``get_attr`` nodes after it was deleted, and a layer copy allocated at its address then
looked read by two calls, was copied again, and the first copy stayed in the model unread. The
outcome depended on the allocator; the counts themselves do not, so these tests check them.
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import given
from torch import fx, nn

from fuser import fuse
from fuser.fold_pass import _FoldPass
from fuser.graph_edit import UsageCounts
from strategies import NetSpec, build, net_specs


class BatchNormStats(nn.Module):
    """The statistics and affine parameters of a functional ``F.batch_norm`` call."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)


class FunctionalBatchNormAfterSharedConv(nn.Module):
    """A conv called twice: once into a BN module, once into ``F.batch_norm`` reading attributes
    of a submodule (which FX turns into a placeholder ``nn.Module`` holding just those tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.stats = BatchNormStats(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stats
        functional = F.batch_norm(
            self.conv(x), s.running_mean, s.running_var, s.weight, s.bias, False, 0.1, 1e-5
        )
        return self.bn(self.conv(x)) + functional


def _recount_matches(fold_pass: _FoldPass) -> None:
    """The pass's counts equal a fresh count of the graph it leaves, and it holds exactly the
    objects it counts."""
    fresh = UsageCounts(fold_pass.gm, fold_pass.usage._shared)
    assert fold_pass.usage._counts == fresh._counts
    assert fold_pass.usage._held.keys() == fold_pass.usage._counts.keys()


def test_erasing_an_attribute_read_releases_the_modules_on_its_path() -> None:
    gm = fx.symbolic_trace(FunctionalBatchNormAfterSharedConv().eval())
    placeholder = gm.stats
    assert type(placeholder) is nn.Module  # FX's stand-in, deleted with its last tensor
    fold_pass = _FoldPass(gm, "", frozenset(), frozenset())
    reports = fold_pass.run()
    assert [report.folded for report in reports] == [True, True]
    assert not hasattr(gm, "stats")
    assert id(placeholder) not in fold_pass.usage._counts
    _recount_matches(fold_pass)


class ReadsItsBatchNormWeight(nn.Module):
    """A BN folded away whose weight the forward still reads, and a conv held under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.alias = self.conv
        self.bn = nn.BatchNorm2d(4)
        self.bn_alias = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = self.bn(self.conv(x)) * self.bn.weight.reshape(1, -1, 1, 1)
        return scaled + self.bn_alias(self.alias(x))


def test_counts_stay_exact_when_a_folded_module_is_swapped_or_dropped() -> None:
    gm = fx.symbolic_trace(ReadsItsBatchNormWeight().eval())
    held_twice = frozenset({id(gm.conv), id(gm.conv.weight), id(gm.conv.bias)})
    fold_pass = _FoldPass(gm, "", held_twice, frozenset())
    assert all(report.folded for report in fold_pass.run())
    assert type(gm.bn) is nn.Module and dict(gm.bn.named_parameters()).keys() == {"weight"}
    assert not hasattr(gm, "conv")  # both calls folded into copies; the original is read by none
    _recount_matches(fold_pass)


def test_the_first_copy_of_a_twice_called_layer_is_the_only_one() -> None:
    """Both BNs fold: one call keeps the conv, the other gets one copy, and nothing else is left."""
    model = FunctionalBatchNormAfterSharedConv().eval()
    fused = fuse(model, (torch.randn(2, 3, 5, 5),))
    modules = dict(fused.named_children())
    assert sorted(modules) == ["conv", "conv_folded"]


def _with_recount(run):
    def run_then_recount(fold_pass: _FoldPass):
        reports = run(fold_pass)
        _recount_matches(fold_pass)
        return reports

    return run_then_recount


@given(spec=net_specs(dtypes=("float32", "float64")))
def test_every_fold_pass_leaves_exact_counts(spec: NetSpec) -> None:
    """On drawn networks (functional BNs, shared and twice-called layers, nested packaging), every
    fold pass ``fuse`` runs ends with counts a fresh count of its graph agrees with."""
    model, inputs = build(spec)
    with mock.patch.object(_FoldPass, "run", _with_recount(_FoldPass.run)):
        fuse(model, inputs if spec.example_inputs else None)
