"""Build torchvision models for the command line: random weights, randomised BatchNorm statistics.

Nothing is downloaded: every builder is called with ``weights=None`` (and ``weights_backbone=None``
for segmentation). A freshly built model's BatchNorms all have ``running_mean = 0``,
``running_var = 1``, ``weight = 1`` and ``bias = 0``, which makes each BN (nearly) the identity: a fuser
that swapped scale and shift, or forgot the mean, would still pass. So every BN's statistics and
affine parameters are redrawn here, FrozenBatchNorm2d's buffers included.

Statistics drawn blindly do not match what the BN sees, and the mismatch compounds with depth:
ResNet-152 then produces outputs around 1e14, where an error measurement says little. So the running
statistics of every BN that runs are drawn around the scale of its actual input on a random batch,
as a trained network's would be, and activations stay of order one at any depth.
"""

from __future__ import annotations

import difflib
import inspect
import math
from types import ModuleType

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

#: The torchvision model namespaces the command line accepts, by family name.
FAMILY_MODULES: dict[str, ModuleType] = {
    "classification": torchvision.models,
    "video": torchvision.models.video,
    "segmentation": torchvision.models.segmentation,
}

#: Namespaces whose models exist but take other inputs than one image or clip tensor.
UNSUPPORTED_MODULES: dict[str, ModuleType] = {
    "detection": torchvision.models.detection,
    "optical flow": torchvision.models.optical_flow,
    "quantization": torchvision.models.quantization,
}

#: Spatial input size (height = width) used when ``--size`` is not given.
DEFAULT_SIZE: dict[str, int] = {"classification": 224, "video": 112, "segmentation": 224}

#: Clip length T of a video input (N, 3, T, H, W) used when ``--frames`` is not given.
DEFAULT_FRAMES = 8

#: (size, frames) for the models that cannot take their family's defaults: S3D ends in a fixed
#: (2, 7, 7) average pool, and the MViT builders fix their position encoding to 16 x 224 x 224.
MODEL_INPUT_DEFAULTS: dict[str, tuple[int, int]] = {
    "s3d": (224, 16),
    "mvit_v1_b": (224, 16),
    "mvit_v2_s": (224, 16),
}

#: What counts as a BatchNorm when statistics are randomised and when the BN-free bound is built.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)

LIST_HINT = "run `python -m fuser --list` to see every valid model name"


class UnknownModelError(ValueError):
    """A model name the command line cannot build; the message says what to do instead."""


def supported_models() -> dict[str, list[str]]:
    """Every model name the command line accepts, by family."""
    return {
        family: torchvision.models.list_models(module=module)
        for family, module in FAMILY_MODULES.items()
    }


def model_family(name: str) -> str:
    """The family of a model name, or ``UnknownModelError`` saying why it is not accepted."""
    by_family = supported_models()
    for family, names in by_family.items():
        if name in names:
            return family
    for kind, module in UNSUPPORTED_MODULES.items():
        if name in torchvision.models.list_models(module=module):
            raise UnknownModelError(
                f"{name!r} is a torchvision {kind} model; only classification, video and "
                f"segmentation models are supported ({LIST_HINT})"
            )
    every_name = [model for names in by_family.values() for model in names]
    close = difflib.get_close_matches(name, every_name, n=3)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}{suggestion} ({LIST_HINT})")


def default_input_size(name: str) -> tuple[int, int]:
    """The (size, frames) the command line uses for ``name`` when it is not told otherwise."""
    return MODEL_INPUT_DEFAULTS.get(name, (DEFAULT_SIZE[model_family(name)], DEFAULT_FRAMES))


def build_model(name: str, *, size: int, frames: int = DEFAULT_FRAMES, seed: int = 0) -> nn.Module:
    """The named model with random weights and randomised BN statistics, in eval mode, on the CPU.

    ``size`` is passed to the builders whose architecture is tied to the input size and that take
    it as an option (ViT's position embedding, MaxViT's partitions), so that any size the
    architecture allows can be checked, not only the one it was published with.
    """
    family = model_family(name)
    builder = torchvision.models.get_model_builder(name)
    parameters = inspect.signature(builder).parameters
    kwargs: dict[str, object] = {"weights": None}
    if family == "segmentation":
        kwargs["weights_backbone"] = None
        if "aux_loss" in parameters:
            # The auxiliary head has BatchNorms of its own: build it so that they are checked too.
            kwargs["aux_loss"] = True
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    elif name.startswith("maxvit_"):
        kwargs["input_size"] = (size, size)

    torch.manual_seed(seed)
    model = builder(**kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm_statistics(model, generator)
    # An input of its own (seed + 1): the statistics fit the data, not the very input being checked.
    batch = example_input(family, batch=1, size=size, frames=frames, seed=seed + 1)
    match_batchnorm_statistics(model, batch, generator)
    return model


def randomize_batchnorm_statistics(model: nn.Module, generator: torch.Generator) -> int:
    """Redraw every BN's running statistics and affine parameters in place; return how many BNs.

    Each BN ends far from the identity: means and biases around zero with spread 0.5, variances
    log-uniform over [1/4, 4] (a fold that uses the variance where it needs its square root is off by
    up to 2x), and weights of magnitude 0.5 to 1.5 with about one channel in four negative (a fold
    that loses the sign shows). ``match_batchnorm_statistics`` then replaces the running statistics of
    the BNs that run; these stay for the ones that do not (Inception's auxiliary head in eval mode).
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, BATCHNORM_TYPES):
            continue
        count += 1
        with torch.no_grad():
            if module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.copy_(0.5 * torch.randn(shape, generator=generator))
                log_var = torch.empty(shape).uniform_(-1.0, 1.0, generator=generator)
                module.running_var.copy_(torch.exp(log_var * math.log(4.0)))
            if module.weight is not None:
                shape = module.weight.shape
                magnitude = torch.empty(shape).uniform_(0.5, 1.5, generator=generator)
                negative = torch.rand(shape, generator=generator) < 0.25
                module.weight.copy_(torch.where(negative, -magnitude, magnitude))
            if module.bias is not None:
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return count


def match_batchnorm_statistics(
    model: nn.Module, batch: torch.Tensor, generator: torch.Generator
) -> None:
    """Redraw the running statistics of each BN that runs on ``batch``, scaled to its input.

    Each BN's statistics are set just before it runs (a forward pre-hook), so that they account for
    every BN before it. They are drawn around the mean and standard deviation of the BN's whole
    input, not channel by channel: per-channel estimates from one small input are poor (a channel
    seen at one spatial position has variance zero), and a BN that divides by a variance that is far
    too small amplifies rounding errors until float32 has no correct digits left. Per channel, the
    mean is then moved by a random half standard deviation and the variance scaled log-uniformly over
    [1/4, 4], so that no BN normalises exactly and a fold that mishandles either statistic shows.
    """

    def draw_statistics(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if module.running_mean is None:
            return
        mean, std = x.mean().item(), x.std(correction=0).item()
        channels = module.running_mean.shape
        offset = 0.5 * torch.randn(channels, generator=generator)
        log_factor = torch.empty(channels).uniform_(-1.0, 1.0, generator=generator)
        module.running_mean.copy_(mean + std * offset)
        module.running_var.copy_(std**2 * torch.exp(log_factor * math.log(4.0)))

    batchnorms = [m for m in model.modules() if isinstance(m, BATCHNORM_TYPES)]
    hooks = [bn.register_forward_pre_hook(draw_statistics) for bn in batchnorms]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()


def example_input(
    family: str, *, batch: int, size: int, frames: int = DEFAULT_FRAMES, seed: int = 0
) -> torch.Tensor:
    """A random input of the shape the family expects: (N, 3, H, W) images or (N, 3, T, H, W) clips."""
    generator = torch.Generator().manual_seed(seed)
    if family == "video":
        return torch.randn(batch, 3, frames, size, size, generator=generator)
    return torch.randn(batch, 3, size, size, generator=generator)
