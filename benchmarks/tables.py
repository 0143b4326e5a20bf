"""How every benchmark prints: a header saying where it ran, then Markdown tables.

The tables go into ``docs/benchmarks.md`` as they are printed, so they are Markdown; the header comes
first because a number from this shared two-core machine means little without the thread count, the
torch build and the command that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

#: The checkout these scripts belong to. Its ``fuser`` (and ``strategies``) must be the one imported:
#: run as ``python benchmarks/NAME.py``, Python puts ``benchmarks/`` first on the path, not the
#: checkout, so an installed ``fuser`` (an editable install of another worktree, say) would be
#: timed while the header names this checkout's commit. Every script imports this module first.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path[:2]:
    sys.path.insert(1, str(REPO))


def fix_threads(threads: int) -> int:
    """Pin torch's intra-op thread count so every run of a table uses the same; return it.

    A fixed count matters more than a large one: torch's default follows the cores it sees, and on a
    machine other processes share, a varying count changes times more than any fuser change could.
    """
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for the header."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fuser_version() -> str:
    """The last commit that touched ``fuser/``, and whether ``fuser/`` has uncommitted edits.

    Several people change the fuser while tables are made; a number is only comparable with one
    made on the same fuser.
    """
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=False
        )
        return completed.stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", "fuser")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "fuser")
    return f"{commit}" + (" with uncommitted changes" if dirty else "")


def _fuser_location() -> str:
    import fuser

    location = Path(fuser.__file__).resolve().parent
    return os.path.relpath(location, REPO) if location.is_relative_to(REPO) else str(location)


def environment_header(threads: int | None = None) -> str:
    """The command that made the tables, and what they ran on, as Markdown lines."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
    command = shlex.join(["python", script, *sys.argv[1:]])
    lines = [
        f"Command: `{command}`",
        "",
        f"- fuser/ at commit {fuser_version()}, imported from {_fuser_location()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores visible",
    ]
    if threads is not None:
        lines.append(f"- torch.set_num_threads({threads})")
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if isa_cap:  # strategies/kernel_bugs.py: oneDNN kept off AMX, where bfloat16 convs go wrong
        lines.append(f"- ONEDNN_MAX_CPU_ISA={isa_cap}")
    if torch.cuda.is_available():
        # cuDNN runs float32 convolutions in TF32 by default (about 3 decimal digits), which
        # dominates every float32 error measured on the GPU.
        tf32 = {True: "on", False: "off"}
        lines.append(
            f"- CUDA: {torch.cuda.get_device_name()}; TF32 for cuDNN convolutions "
            f"{tf32[torch.backends.cudnn.allow_tf32]}, for matmuls "
            f"{tf32[torch.backends.cuda.matmul.allow_tf32]}"
        )
    else:
        lines.append("- CUDA: not available (CPU only)")
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with columns padded to line up in a terminal too.

    The first column is left-aligned (names), the others right-aligned (numbers).
    """
    cells = [[str(h) for h in headers], *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |", *map(line, cells[1:])])


def milliseconds(seconds: float) -> str:
    """A duration for a table: three significant figures, in ms."""
    return f"{1e3 * seconds:.3g}"


def ratio(numerator: float, denominator: float) -> str:
    """A ratio for a table, to three decimals (the 1.01 targets need two)."""
    return f"{numerator / denominator:.3f}"
