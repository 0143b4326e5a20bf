"""Torch kernel bugs the suite steers around: they make the original network's own output wrong,
or crash the process, whatever the fuser does, so no property could judge a fuser there.

- **oneDNN's AMX convolutions** (``brg_conv_fwd:avx10_1_512_amx``, in the oneDNN that torch 2.14.1
  ships). On a CPU with AMX (Intel Sapphire Rapids and later) they compute some strided bfloat16
  convolutions wrongly: ``F.conv2d`` of a (3, 14, 6, 4) input with a 3x3 kernel, stride (1, 2), no
  padding along the width and one output column returns NaN or garbage, a different amount from
  one allocation to the next, so the same network overflowed on one build and not on the next (a
  ``FlakyFailure`` in the ``ci`` profile, 2026-11-28). A 3-D one with stride 3 along the depth
  (``SEGFAULTING_CONV3D_CASE``) crashes the process. Known upstream: pytorch/pytorch#169688
  (strided bfloat16 convolutions on CPU), uxlfoundation/oneDNN#5494 (the AMX convolution's input
  buffer sized too small for some strides). Float32 and float16 give the right results; so does
  bfloat16 once oneDNN may not use AMX, which ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` says (2,114
  random 2-D and 3-D configurations with strides up to 3, none wrong, none crashing; without it
  5 of the sweep's first 203 were wrong and the 204th crashed it). The cap is read when oneDNN first runs a primitive, so it is set
  before any test runs; a value already in the environment is left as it is.
"""

from __future__ import annotations

import os

#: oneDNN's instruction-set cap that keeps its convolutions off AMX (see the module docstring).
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
ONEDNN_ISA_BELOW_AMX = "AVX512_CORE_BF16"

#: A bfloat16 conv3d that crashed the process on oneDNN's AMX kernel (SIGSEGV), as a script.
SEGFAULTING_CONV3D_CASE = """
import torch
import torch.nn.functional as F

generator = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 1, 7, 2, generator=generator).bfloat16()
w = torch.randn(2, 4, 2, 3, 2, generator=generator).bfloat16()
F.conv3d(x, w, None, stride=(3, 1, 1), padding=(1, 1, 1), dilation=(2, 2, 2))
"""


def avoid_known_kernel_bugs() -> None:
    """Keep this process (and the processes it starts) off the kernels above. Call it before
    any convolution runs: oneDNN reads its cap once, at its first primitive."""
    os.environ.setdefault(ONEDNN_ISA_ENV, ONEDNN_ISA_BELOW_AMX)
