"""The torch kernel bugs the suite steers around (``strategies/kernel_bugs.py``) stay out of its way.

On a CPU without AMX these pass whatever the environment says; on one with AMX they fail (or, the
crash, fail in a child process) without the oneDNN cap that ``conftest.py`` sets.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from strategies.kernel_bugs import ONEDNN_ISA_ENV, SEGFAULTING_CONV3D_CASE


def test_the_suite_runs_with_onednn_kept_off_amx():
    assert os.environ.get(ONEDNN_ISA_ENV), "conftest.py sets the cap before any test runs"


def test_a_strided_bfloat16_conv_with_one_output_column_is_computed_right():
    # The layer of the network the ci profile met on 2026-11-28 whose original output was NaN
    # on one build and finite on the next: one output column, stride 2 along the width.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 14, 6, 4, generator=generator).bfloat16()
    w = (torch.randn(8, 7, 3, 3, generator=generator) / 8).bfloat16()
    options = {"stride": (1, 2), "padding": (1, 0), "groups": 2}
    expected = F.conv2d(x.double(), w.double(), None, **options)
    for _ in range(5):  # the wrong results differed from one allocation to the next
        output = F.conv2d(x, w, None, **options)
        torch.testing.assert_close(output.double(), expected, atol=0.05, rtol=0.02)


def test_a_bfloat16_conv3d_that_crashed_the_process_runs():
    done = subprocess.run(
        [sys.executable, "-c", SEGFAULTING_CONV3D_CASE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
