"""The mutant corpus: deliberately buggy fusers that the property suite must catch.

Each mutant is our real fuser with exactly one realistic bug, a function with the gate's signature
``fn(model, example_inputs=None)`` that ``pytest --fuser=tests.mutants.MODULE:FUNCTION`` can run the
whole property suite against. Like ``fuser.fuse_with_report`` it returns ``(fused, report)`` (the
gate accepts the pair), so the suite checks the report too, as it does for our fuser. Its docstring names the bug, what a network needs for the bug to show,
and the property that should catch it. The corpus is spread over the four places fuser bugs live:

- ``fold_math_bugs``: the numbers (BN scale and shift, folding per channel, groups, layouts);
- ``matcher_bugs``: which sites fold (other readers, ranks, padding, hooks, training mode, subclasses);
- ``rewriter_bugs``: where the folded numbers go (shared modules, tied weights, stale tables, dtypes);
- ``bookkeeping_bugs``: what is handed back (the caller's model, dead nodes, the report).

``python -m tests.mutants`` runs the suite against every mutant and prints the mutation score and the
time to catch each; ``pytest -m mutants tests/test_mutants.py`` asserts that every one is caught
(the known misses, findings about the strategies, are strict xfails; see docs/mutants.md).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

MUTANT_MODULES = ("fold_math_bugs", "matcher_bugs", "rewriter_bugs", "bookkeeping_bugs")


@dataclass(frozen=True)
class Mutant:
    """One buggy fuser: where it lives and what its docstring says about it."""

    module: str
    name: str
    doc: str

    @property
    def target(self) -> str:
        """The ``--fuser`` value that selects this mutant."""
        return f"{__name__}.{self.module}:{self.name}"

    @property
    def area(self) -> str:
        return self.module.removesuffix("_bugs").replace("_", " ")

    @property
    def bug(self) -> str:
        """The docstring's first sentence, without its ``Bug:`` prefix."""
        text = " ".join(self.doc.split())
        text = text.split(". ", 1)[0].rstrip(".")
        return text.split(": ", 1)[1] if text.startswith("Bug") and ": " in text else text

    @property
    def expected_catch(self) -> str:
        """What the docstring says should catch it (after ``Caught by:``)."""
        text = " ".join(self.doc.split())
        _, _, caught_by = text.partition("Caught by: ")
        return caught_by.rstrip(".")

    @property
    def python_path(self) -> tuple[str, ...]:
        """Where the suite must look first to import it: nowhere beyond the checkout."""
        return ()

    def load(self) -> Callable:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.name)


def all_mutants() -> list[Mutant]:
    """Every mutant, grouped by module, in source order."""
    mutants = []
    for module_name in MUTANT_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        functions = [getattr(module, name) for name in module.__all__]
        functions.sort(key=lambda fn: fn.__code__.co_firstlineno)
        for fn in functions:
            mutants.append(Mutant(module_name, fn.__name__, inspect.getdoc(fn) or ""))
    return mutants
