"""Random conv/BN networks for the property suite: specs, strategies, builder, oracle.

This package never imports ``fuser``: the oracle decides foldability from the spec alone.

- ``net_specs(...)``: Hypothesis strategy of ``NetSpec`` values (plain frozen dataclasses).
- ``build(spec)``: the ``nn.Module`` (eval mode) and its example inputs.
- ``render_source(spec)``: a standalone Python program that rebuilds exactly that network.
- ``foldable_sites(spec)``: the oracle's verdict for every BatchNorm call site.
"""

from strategies.build import build, build_from_source
from strategies.draw import net_specs
from strategies.oracle import INPUT_SIDE, OUTPUT_SIDE, Site, foldable_sites
from strategies.source import render_source
from strategies.spec import Act, Chain, Flatten, Layer, NetSpec, Norm, Tap, TwoCalls

__all__ = [
    "INPUT_SIDE",
    "OUTPUT_SIDE",
    "Act",
    "Chain",
    "Flatten",
    "Layer",
    "NetSpec",
    "Norm",
    "Site",
    "Tap",
    "TwoCalls",
    "build",
    "build_from_source",
    "foldable_sites",
    "net_specs",
    "render_source",
]
