"""What differs, for the tests, between the torch versions of tox.ini's matrix: in one place.

The fuser itself needs no compatibility code: from torch 2.1 to 2.14 the calls it makes (FX
tracing, ``ShapeProp``, module hooks, ``torch.random.fork_rng``) behave alike, and its tests pass
on both ends of the range (docs/tox.md). What differs is torch's CPU kernels: torch 2.1 has no
float16 convolution, matrix multiply or batch norm on the CPU, so a float16 model cannot be run
there to check it, though it can still be fused.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F


@functools.cache
def cpu_runs_float16() -> bool:
    """Whether this torch runs float16 conv, linear and batch norm on the CPU (2.1 does not)."""
    x = torch.ones(1, 2, 3, 3, dtype=torch.float16)
    try:
        F.conv2d(x, torch.ones(2, 2, 1, 1, dtype=torch.float16))
        F.linear(x.flatten(1), torch.ones(2, 18, dtype=torch.float16))
        F.batch_norm(x, torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.float16))
    except RuntimeError:  # "... not implemented for 'Half'"
        return False
    return True


#: For tests that run a float16 model on the CPU.
requires_cpu_float16 = pytest.mark.skipif(
    not cpu_runs_float16(),
    reason=f"torch {torch.__version__} has no float16 conv/linear/batch_norm on the CPU",
)
