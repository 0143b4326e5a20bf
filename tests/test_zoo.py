"""The model zoo tier: every torchvision classification, video, segmentation and detection model.

Each model is built with random weights (nothing is downloaded) and BatchNorm statistics redrawn
far from the identity (``fuser.zoo``: default statistics make every BN the identity and hide wrong
folds), fused with example inputs, and checked against a float64 run of the unfused model under the
suite's rule (``fuser.reference``). Every BatchNorm must be folded except the ones the README's
definition leaves, and those are named here from the architecture, not taken from the report.

Detection models cannot be traced at the top level (their forward loops over images and proposals),
so they fold through the fallback that fuses each child on its own. Their final boxes are not
compared: NMS and top-k on near-tied scores reorder boxes under any rounding change, so two correct
models can disagree there. The backbone's feature maps and each head's outputs are compared instead,
each on the very inputs the unfused model gave that part.

What runs where (see docs/zoo.md): a fast subset, one model per architecture family, runs in the
default ``pytest`` run and so in CI; the whole zoo runs when the run selects the ``zoo`` marker
(``pytest -m zoo``, ``tox -e zoo``). Without ``-m zoo`` the other models are skipped, with that reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from helpers import remaining_batch_norms
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision.ops.misc import FrozenBatchNorm2d

from fuser import FusionReport, fuse_with_report
from fuser.reference import check_against_float64
from fuser.zoo import (
    FAMILY_MODULES,
    build_model,
    example_input,
    match_batchnorm_statistics,
    model_family,
    randomize_batchnorm_statistics,
)
from strategies.properties import dead_state

pytestmark = [
    pytest.mark.zoo,
    # Inception and GoogLeNet warn that their default initialisation will change; irrelevant here.
    pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning"),
]

# --- which models, at which input size -------------------------------------------------------------

#: Image side used unless a model needs another (small, so that the whole zoo stays cheap).
DEFAULT_SIZE = 64
#: Clip length of video inputs unless a model needs another.
DEFAULT_FRAMES = 4

#: Models whose architecture fixes or bounds the input size.
INPUT_SIZE: dict[str, int] = {
    "inception_v3": 80,  # its stem and reductions need at least 75 px
    "maxvit_t": 224,  # each stage partitions into 7x7 windows and grids: 224 = 7 * 32
    "vit_h_14": 56,  # patches of 14 px
    "s3d": 224,  # ends in a fixed 7x7 (spatial) average pool
    "mvit_v1_b": 224,  # relative position tables sized for 224 px, 16 frames
    "mvit_v2_s": 224,
}
#: Video models whose clip length is bounded below.
FRAMES: dict[str, int] = {
    "s3d": 16,  # a fixed temporal pool of 2 after a temporal stride of 8
    "mvit_v1_b": 16,
    "mvit_v2_s": 16,
}

#: The fast subset that runs in every ``pytest`` run (CI): one model per architecture family that
#: has BatchNorms, picked for distinct BN placements, plus one BN-free model. Each fuses and checks
#: in a few seconds at its input size.
CI_MODELS = frozenset(
    {
        "densenet121",  # BNs after concatenations, left by definition
        "efficientnet_b0",  # squeeze-excitation, stochastic depth
        "googlenet",  # BasicConv2d blocks, input transform
        "inception_v3",  # factorised convolutions, 80 px input
        "mnasnet0_5",
        "mobilenet_v3_small",  # hardswish, squeeze-excitation with its own convs
        "regnet_y_400mf",  # grouped convolutions, squeeze-excitation
        "shufflenet_v2_x0_5",  # channel split and shuffle
        "squeezenet1_1",  # no BatchNorm at all: fusing must be a no-op
        "r2plus1d_18",  # Conv3d subclasses, (2+1)-D factorisation
        "lraspp_mobilenet_v3_large",  # segmentation head with a BN on a pooled branch
        "fasterrcnn_mobilenet_v3_large_320_fpn",  # detection fallback, FrozenBatchNorm2d
    }
)


#: Models that take minutes and gigabytes to build, copy and check on a CPU (regnet_y_128gf: 640 M
#: parameters, 6.5 min and 11 GB in one process). They carry the ``slow`` marker, so that
#: ``tox -e zoo`` can run them one at a time after the rest (two at once would not fit in memory).
GIANT_MODELS = frozenset({"regnet_y_128gf", "vit_h_14"})

#: Models that fail for a known fuser bug; strict, so the fix shows up as a pass to remove here.
KNOWN_FUSER_BUGS: dict[str, str] = {}


def full_zoo_selected(config: pytest.Config) -> bool:
    """True when this run asked for the zoo tier by marker (``-m zoo``, as ``tox -e zoo`` does)."""
    return "zoo" in (config.option.markexpr or "")


def skip_unless_selected(name: str, config: pytest.Config) -> None:
    if name not in CI_MODELS and not full_zoo_selected(config):
        pytest.skip("outside the CI subset of the zoo: run `pytest -m zoo` (tox -e zoo)")


def models_of(family: str) -> list[str]:
    return torchvision.models.list_models(module=FAMILY_MODULES[family])


def zoo_params(names: list[str]) -> list:
    """The names as pytest parameters, giants marked ``slow`` and known fuser bugs ``xfail``."""
    params = []
    for name in names:
        marks = [pytest.mark.slow] if name in GIANT_MODELS else []
        if name in KNOWN_FUSER_BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FUSER_BUGS[name]))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


ZOO_MODELS = zoo_params(
    [name for family in ("classification", "video", "segmentation") for name in models_of(family)]
)
DETECTION_MODELS = zoo_params(torchvision.models.list_models(module=torchvision.models.detection))

# --- BatchNorms the README's definition leaves, named from the architecture ------------------------

BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def batch_norm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BATCH_NORM_TYPES)]


def densenet_batch_norms_after_concatenation(model: nn.Module) -> list[str]:
    """DenseNet's BNs whose input is a ``torch.cat`` and whose output feeds a ReLU.

    Each dense layer's ``norm1`` normalises the concatenation of all earlier feature maps, each
    transition's ``norm`` and the final ``features.norm5`` normalise a dense block's concatenated
    output; every one is followed by a ReLU. No conv or linear is next to them on either side, so
    rule 2 and rule 3 both fail and they stay (the model still computes the same thing).
    """
    names = batch_norm_names(model)
    after_cat = [n for n in names if n.endswith((".norm1", ".norm")) or n == "features.norm5"]
    assert after_cat, "no DenseNet BNs found: torchvision's DenseNet has changed, update this test"
    return after_cat


#: Per model family, the BNs that are expected to stay; every other model must fold all of them.
EXPECTED_LEFT: dict[str, Callable[[nn.Module], list[str]]] = {
    "densenet": densenet_batch_norms_after_concatenation,
}


def expected_left(name: str, model: nn.Module) -> list[str]:
    for prefix, names in EXPECTED_LEFT.items():
        if name.startswith(prefix):
            return sorted(names(model))
    return []


def batch_norms_that_run(model: nn.Module, *inputs: object) -> list[str]:
    """The BN modules a forward pass on ``inputs`` calls, by qualified name.

    Only these are call sites: Inception's and GoogLeNet's auxiliary heads hold BNs that run in
    training mode only, and the report rightly does not mention them.
    """
    names = {m: name for name, m in model.named_modules() if isinstance(m, BATCH_NORM_TYPES)}
    called: set[str] = set()
    handles = [bn.register_forward_pre_hook(lambda m, args: called.add(names[m])) for bn in names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(called)


def assert_every_batch_norm_accounted_for(
    ran: list[str], fused: nn.Module, report: FusionReport, left: list[str]
) -> None:
    """Each BN that ran is a reported site; those in ``left`` stay, with a reason; no other stays."""
    unreported = sorted(set(ran) - {site.bn for site in report.sites})
    assert not unreported, f"BatchNorms the report does not mention: {unreported}\n{report}"
    assert sorted({site.bn for site in report.left}) == left, (
        f"left sites differ from the {len(left)} expected: {left}\n{report}"
    )
    assert all(site.reason for site in report.left), report
    remaining = remaining_batch_norms(fused)
    functional = [name for name in remaining if ":" in name]  # F.batch_norm calls, "module:node"
    assert not functional, f"functional batch_norm calls remain: {functional}"
    remaining_that_run = sorted(set(remaining) & set(ran))
    assert remaining_that_run == left, (
        f"BatchNorms left in the fused model differ from the sites expected to stay: "
        f"{sorted(set(remaining_that_run) ^ set(left))}"
    )


# --- classification, video, segmentation ---------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model_fuses_to_an_equivalent_model_with_no_foldable_batchnorm_left(name, request):
    skip_unless_selected(name, request.config)
    size, frames = INPUT_SIZE.get(name, DEFAULT_SIZE), FRAMES.get(name, DEFAULT_FRAMES)
    family = model_family(name)
    model = build_model(name, size=size, frames=frames, seed=0)
    x = example_input(family, batch=2, size=size, frames=frames, seed=1)

    fused, report = fuse_with_report(model, example_inputs=(x,))

    assert report.untraced == [], f"{name} no longer traces whole:\n{report}"
    ran = batch_norms_that_run(model, x)
    assert_every_batch_norm_accounted_for(ran, fused, report, expected_left(name, model))
    check = check_against_float64(model, fused, (x,))
    assert check.passed, f"{name} at {tuple(x.shape)}:\n{check}\n{report}"
    assert dead_state(fused) is None, dead_state(fused)


# --- detection -------------------------------------------------------------------------------------

#: Parts of a detection model whose outputs are compared, by qualified name (those a model has).
#: Each runs on tensors alone; what lies between them (anchors, NMS, RoI pooling) has no BatchNorm.
DETECTION_PARTS = (
    "backbone",
    "rpn.head",
    "roi_heads.box_head",
    "roi_heads.box_predictor",
    "roi_heads.mask_head",
    "roi_heads.mask_predictor",
    "roi_heads.keypoint_head",
    "roi_heads.keypoint_predictor",
    "head",
)

#: Side of the (square) image given to detection models. R-CNN, RetinaNet and FCOS resize it to
#: ``min_size``; SSD models resize to their fixed 300 or 320 px whatever they are given.
DETECTION_IMAGE_SIDE = 128


def freeze_batch_norms(module: nn.Module) -> None:
    """Replace each ``nn.BatchNorm2d`` under ``module`` by a ``FrozenBatchNorm2d``, in place.

    torchvision builds detection trunks with ``FrozenBatchNorm2d`` only when it loads pretrained
    weights; without weights it uses ``nn.BatchNorm2d``. This puts back what a real detector has.
    """
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            freeze_batch_norms(child)


def build_detection_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A detection model with a frozen-BN trunk and randomised statistics, and an image for it."""
    kwargs: dict[str, object] = {"weights": None, "weights_backbone": None}
    if not name.startswith("ssd"):
        kwargs.update(min_size=DETECTION_IMAGE_SIDE, max_size=DETECTION_IMAGE_SIDE)
    if "rcnn" in name:
        # Keep every detection, so that the mask and keypoint heads run on a full batch of boxes
        # (random weights score below the default 0.05 threshold, leaving those heads nothing).
        kwargs["box_score_thresh"] = 0.0
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, **kwargs).eval()
    trunk = getattr(model.backbone, "body", None)
    if trunk is not None:
        freeze_batch_norms(trunk)
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm_statistics(model, generator)
    side = DETECTION_IMAGE_SIDE
    calibration = torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    match_batchnorm_statistics(model, [calibration], generator)
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed + 2))
    return model, image


def record_part_inputs(
    model: nn.Module, image: torch.Tensor, parts: list[str]
) -> tuple[dict[str, tuple], list[dict]]:
    """The positional arguments each part received when ``model`` ran on ``image``, and its output."""
    recorded: dict[str, tuple] = {}
    handles = []
    for part in parts:

        def remember(module: nn.Module, args: tuple, kwargs: dict, part: str = part) -> None:
            assert not kwargs, f"{part} was called with keyword arguments"
            recorded.setdefault(part, args)

        handles.append(
            model.get_submodule(part).register_forward_pre_hook(remember, with_kwargs=True)
        )
    try:
        with torch.no_grad():
            detections = model([image])
    finally:
        for handle in handles:
            handle.remove()
    return recorded, detections


class CalledOnTensors(nn.Module):
    """``module`` called with nested arguments whose tensors are passed flat, one per argument.

    ``check_against_float64`` converts each positional input to float64; detection heads take
    lists of feature maps, so their tensors are passed flat and put back in place here.
    """

    def __init__(self, module: nn.Module, args: tuple) -> None:
        super().__init__()
        self.module = module
        self.leaves, self.spec = tree_flatten(args)
        self.tensor_positions = [
            i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)
        ]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.leaves[i] for i in self.tensor_positions)

    def forward(self, *tensors: torch.Tensor):
        leaves = list(self.leaves)
        for position, tensor in zip(self.tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        return self.module(*tree_unflatten(leaves, self.spec))


@pytest.mark.parametrize("name", DETECTION_MODELS)
def test_detection_model_folds_its_backbone_and_heads_through_the_fallback(name, request):
    skip_unless_selected(name, request.config)
    model, image = build_detection_model(name)
    original = copy.deepcopy(model)

    fused, report = fuse_with_report(model, example_inputs=([image],))

    assert "<model>" in [module.name for module in report.untraced], (
        f"the report does not name the untraceable top level of {name}\n{report}"
    )
    ran = batch_norms_that_run(model, [image])
    assert_every_batch_norm_accounted_for(ran, fused, report, left=[])
    frozen = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert all(report.site(bn).folded for bn in frozen), report
    has_batch_norms = bool(ran)
    if has_batch_norms:
        assert report.folded, f"{name} has BatchNorms and none folded\n{report}"

    parts = [part for part in DETECTION_PARTS if _has_submodule(model, part)]
    inputs, detections = record_part_inputs(model, image, parts)
    checked = [part for part in parts if part in inputs]
    for part in checked:
        args = inputs[part]
        assert all(t.numel() for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), (
            f"{part} ran on an empty tensor: its comparison would check nothing"
        )
        unfused_part = CalledOnTensors(model.get_submodule(part), args)
        fused_part = CalledOnTensors(fused.get_submodule(part), args)
        check = check_against_float64(unfused_part, fused_part, unfused_part.tensors())
        assert check.passed, f"{name}.{part}:\n{check}"

    unchecked = [
        s.bn for s in report.folded if not s.bn.startswith(tuple(f"{p}." for p in checked))
    ]
    assert not unchecked, f"folds in parts whose outputs were not compared: {unchecked}"
    if has_batch_norms:
        assert "backbone" in checked
    assert dead_state(fused) is None, dead_state(fused)
    _assert_model_untouched(original, model)
    with torch.no_grad():
        fused_detections = fused([image])
    assert [sorted(d) for d in fused_detections] == [sorted(d) for d in detections]


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _assert_model_untouched(before: nn.Module, after: nn.Module) -> None:
    """Fusing must not change the caller's model: its state is what it was."""
    expected, actual = before.state_dict(), after.state_dict()
    assert expected.keys() == actual.keys()
    changed = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not changed, f"fusing changed the caller's model: {changed[:5]}"
