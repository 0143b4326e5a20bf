"""Networks that once exposed a bug, replayed by every run of the property suite.

When a property fails, its message ends with ``pin it in tests/pinned.py:`` and a spec literal. Add
it here under a name that says what it caught; ``tests/test_properties.py`` replays every entry
against the fuser under test (soundness and completeness), whatever the Hypothesis profile.
"""

from __future__ import annotations

from strategies.spec import Act, Chain, Flatten, Layer, NetSpec, Norm, Tap, TwoCalls

__all__ = ["PINNED", "Act", "Chain", "Flatten", "Layer", "NetSpec", "Norm", "Tap", "TwoCalls"]

PINNED: dict[str, NetSpec] = {
    # conv -> bn: the smallest foldable network (a deepcopy "fuser" fails completeness here).
    "conv1d_then_bn": NetSpec(
        input_shape=(2, 1, 3),
        blocks=(
            Chain(
                ops=(
                    Layer(
                        kind="conv",
                        spatial_dims=1,
                        input_ndim=3,
                        in_channels=1,
                        out_channels=1,
                        kernel_size=(1,),
                        stride=(1,),
                        padding=(0,),
                        dilation=(1,),
                        bias=False,
                    ),
                    Norm(input_ndim=3, num_features=1, eps=1.0),
                ),
            ),
        ),
    ),
}
