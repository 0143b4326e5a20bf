"""Machine-made mutants: every small edit of one ``fuser/`` file, run through the ``--fuser`` gate.

The hand-written corpus (``python -m tests.mutants``) holds bugs someone thought of. This finds the
ones nobody did: each mutant is the whole ``fuser`` package, copied under another name
(``mutated_fuser``, so the real one stays importable for the attribution check), with one edit in one
file:

- a comparison flipped to its neighbour (``<`` and ``<=``, ``==`` and ``!=``, ``is`` and ``is not``,
  ``in`` and ``not in``);
- ``and`` and ``or`` swapped, a ``not`` dropped;
- ``+`` and ``-``, ``*`` and ``/`` swapped;
- a guard deleted: an ``if`` whose whole body is ``return``, ``continue`` or ``break``.

Code inside ``raise`` statements and f-strings (error messages) is left alone. The suite then runs
against ``mutated_fuser:fuse_with_report`` with the corpus's machinery (``tests/mutants/run.py``:
first failure only, attributed against the real fuser). A ``missed`` mutant is either equivalent
(a faster path given up, a defensive check nothing in the suite's domain reaches) or a gap in the
suite; each one needs reading. ``stale`` here means the mutated fuser crashed loudly
(``TypeError`` and the like), which is a catch of sorts, not a silent wrong result.

    python -m tests.mutants.ast_mutation fuser/fold_pass.py -j 2
    python -m tests.mutants.ast_mutation fuser/fold_math.py --list
    python -m tests.mutants.ast_mutation fuser/fold_pass.py --lines 456 459

It exits 0 whatever the verdicts: its misses are findings to read, not failures (docs/mutants.md).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .run import DEFAULT_TIMEOUT_S, MISSED, ROOT, MutantRun, run_mutants

PACKAGE = "fuser"
MUTATED_PACKAGE = "mutated_fuser"

_FLIPPED_COMPARISONS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_SWAPPED_ARITHMETIC: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
}
_GUARD_EXITS = (ast.Return, ast.Continue, ast.Break)


@dataclass(frozen=True)
class Edit:
    """One mutation point: the ``index``-th node of ``ast.walk`` over the file, and what to do."""

    index: int
    kind: str  # "compare", "boolean", "not", "arithmetic" or "guard"
    operand: int  # which operator of a chained comparison
    line: int
    description: str


def edits(tree: ast.AST) -> list[Edit]:
    """Every mutation point of a parsed file, in ``ast.walk`` order."""
    nodes = list(ast.walk(tree))
    untouched = {
        id(inner)
        for node in nodes
        if isinstance(node, (ast.Raise, ast.JoinedStr))
        for inner in ast.walk(node)
    }
    found = []
    for index, node in enumerate(nodes):
        if id(node) in untouched:
            continue
        if isinstance(node, ast.Compare):
            for operand, op in enumerate(node.ops):
                if type(op) in _FLIPPED_COMPARISONS:
                    flipped = _FLIPPED_COMPARISONS[type(op)].__name__
                    description = f"{type(op).__name__} -> {flipped}"
                    found.append(Edit(index, "compare", operand, node.lineno, description))
        elif isinstance(node, ast.BoolOp):
            description = f"{type(node.op).__name__.lower()} -> the other"
            found.append(Edit(index, "boolean", 0, node.lineno, description))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append(Edit(index, "not", 0, node.lineno, "not dropped"))
        elif isinstance(node, ast.BinOp) and type(node.op) in _SWAPPED_ARITHMETIC:
            swapped = _SWAPPED_ARITHMETIC[type(node.op)].__name__
            description = f"{type(node.op).__name__} -> {swapped}"
            found.append(Edit(index, "arithmetic", 0, node.lineno, description))
        elif _is_guard(node):
            found.append(Edit(index, "guard", 0, node.lineno, "guard deleted"))
    return found


def _is_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and not node.orelse
        and len(node.body) == 1
        and isinstance(node.body[0], _GUARD_EXITS)
    )


def mutated_source(source: str, edit: Edit) -> str:
    """``source`` with ``edit`` applied (as ``ast.unparse`` writes it: comments are gone)."""
    tree = ast.parse(source)
    target = list(ast.walk(tree))[edit.index]

    class Apply(ast.NodeTransformer):
        def visit(self, node: ast.AST) -> ast.AST:
            if node is not target:
                return super().visit(node)
            if edit.kind == "compare":
                node.ops[edit.operand] = _FLIPPED_COMPARISONS[type(node.ops[edit.operand])]()
            elif edit.kind == "boolean":
                node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            elif edit.kind == "not":
                return node.operand
            elif edit.kind == "arithmetic":
                node.op = _SWAPPED_ARITHMETIC[type(node.op)]()
            else:  # a guard
                return ast.Pass()
            return node

    return ast.unparse(ast.fix_missing_locations(Apply().visit(tree)))


@dataclass(frozen=True)
class AstMutant:
    """The fuser package with one edit, written under ``directory/mutated_fuser``; the corpus's
    runner takes it as it takes a hand-written mutant (``name``, ``target``, ``python_path``,
    ``load``)."""

    file: str  # relative to the package, e.g. "fold_pass.py"
    edit: Edit
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.file}:{self.edit.line} {self.edit.description}"

    @property
    def target(self) -> str:
        return f"{MUTATED_PACKAGE}:fuse_with_report"

    @property
    def python_path(self) -> tuple[str, ...]:
        return (str(self.directory),)

    def load(self) -> None:
        """Write the mutated package and compile its modules: ``run_mutant`` calls this first,
        and a mutant that does not compile is reported broken. (The suite imports it in its own
        process.)"""
        package = self.directory / MUTATED_PACKAGE
        shutil.copytree(ROOT / PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
        source = (ROOT / PACKAGE / self.file).read_text()
        (package / self.file).write_text(mutated_source(source, self.edit))
        for path in sorted(package.glob("*.py")):
            compile(path.read_text(), str(path), "exec")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.mutants.ast_mutation", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "files", nargs="+", help="files of the fuser package, e.g. fuser/fold_pass.py"
    )
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--profile", default="ci", help="Hypothesis profile (default: ci)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per mutant"
    )
    parser.add_argument("--list", action="store_true", help="list the mutation points and exit")
    parser.add_argument(
        "--lines", type=int, nargs="+", help="only the edits on these lines (to rerun misses)"
    )
    args = parser.parse_args(argv)

    planned = []
    for name in args.files:
        file = Path(name).name
        source = (ROOT / PACKAGE / file).read_text()
        found = edits(ast.parse(source))
        planned += [(file, edit) for edit in found if not args.lines or edit.line in args.lines]
    if args.list:
        for file, edit in planned:
            print(f"{file}:{edit.line} {edit.description}")
        return 0

    def report(run: MutantRun) -> None:
        print(run.describe(), flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="convbn-ast-mutants-") as scratch:
        mutants = [
            AstMutant(file, edit, Path(scratch) / str(number))
            for number, (file, edit) in enumerate(planned)
        ]
        runs = run_mutants(
            mutants, jobs=args.jobs, on_result=report, profile=args.profile, timeout_s=args.timeout
        )
    wall_s = time.perf_counter() - start
    verdicts = Counter(run.verdict for run in runs)
    counts = ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))
    print(f"\n{len(runs)} mutants: {counts}; {wall_s:.0f} s wall")
    for run in runs:
        if run.verdict == MISSED:
            print(f"missed: {run.mutant.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
