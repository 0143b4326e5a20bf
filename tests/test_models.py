"""Whole models: the seed tutorial's model and torchvision's ResNet18 fuse to equivalent models with
no BatchNorm left."""

from __future__ import annotations

import torch
import torchvision
from helpers import assert_equivalent, randomise_bn_stats, remaining_batch_norms, tutorial_model

from fuser import fuse_with_report


def test_tutorial_model_fuses_to_an_equivalent_model_with_no_batchnorm_left():
    model = tutorial_model()
    fused, report = fuse_with_report(model)

    assert report.left == [], report
    assert sorted(site.bn for site in report.sites) == ["bn1", "nested.0", "wrapped.mod"]
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, torch.randn(5, 1, 3, 3))


def test_resnet18_fuses_to_an_equivalent_model_with_no_batchnorm_left():
    torch.manual_seed(0)
    model = randomise_bn_stats(torchvision.models.resnet18(weights=None), seed=18).eval()
    fused, report = fuse_with_report(model)

    assert len(report.folded) == 20 and report.left == [], report
    assert remaining_batch_norms(fused) == []
    assert_equivalent(model, fused, torch.randn(1, 3, 64, 64))
