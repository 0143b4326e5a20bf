"""Build a spec into a module and its example inputs, by running its rendered source.

Executing ``render_source(spec)`` (rather than building modules directly) means the program a
failure report prints is, character for character, the network that was tested.
"""

from __future__ import annotations

import torch
from torch import nn

from strategies.source import render_source
from strategies.spec import NetSpec


def build(spec: NetSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The network (eval mode, with its hooks and training-mode submodules) and its inputs."""
    return build_from_source(render_source(spec))


def build_from_source(source: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Run a rendered program in a fresh namespace and return its ``model`` and ``inputs``."""
    namespace: dict[str, object] = {"__name__": "convbn_network"}
    exec(compile(source, "<convbn-network>", "exec"), namespace)
    return namespace["model"], namespace["inputs"]
