"""Build a spec into a module and its example inputs, by running its rendered source.

Executing ``render_source(spec)`` (rather than building modules directly) means the program a
failure report prints is, character for character, the network that was tested.

The program runs as a real (in-memory) module whose source ``inspect`` can read, like any model
defined in a file: fusers may read a module's source (ours does, to see how an untraceable parent
uses its children), and a network without source would test a case no user has.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib
import linecache
import os
import sys
import types
from collections import deque

import torch
from torch import nn

from strategies.source import render_source
from strategies.spec import NetSpec

MODULE_PREFIX = "convbn_network_"
LAST_NETWORK_DIR_ENV = "CONVBN_LAST_NETWORK_DIR"

#: Programs kept importable (their classes' source readable, their classes picklable): a trial
#: uses one network at a time, and the training-mode property a second; older ones are dropped.
#: Few, because every live class is a subclass of ``nn.Module``, and each trace walks them all:
#: FX patches ``nn.Module.__call__`` and ``__getattr__`` for the trace and restores them after, and
#: each assignment to a class attribute invalidates the method cache of every subclass (about
#: 0.5 us per subclass per assignment here; 64 networks kept about 450 classes besides torch's
#: 350).
LIVE_MODULES = 8
_live: deque[str] = deque()


def build(spec: NetSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The network (eval mode, with its hooks and training-mode submodules) and its inputs."""
    return build_from_source(render_source(spec))


def build_from_source(source: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Run a rendered program as module ``convbn_network_<hash>`` and return its ``model`` and
    ``inputs``."""
    name = MODULE_PREFIX + hashlib.sha1(source.encode()).hexdigest()[:16]
    leave_behind_for_crashes(source)
    filename = f"<{name}>"
    module = types.ModuleType(name)
    module.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    sys.modules[name] = module
    _remember(name)
    exec(_compiled(source, filename), module.__dict__)
    # Handed over, not kept: the module stays importable for its classes' source, and a network
    # it held would stay alive (and be walked by every full garbage collection) until evicted.
    return module.__dict__.pop("model"), module.__dict__.pop("inputs")


def leave_behind_for_crashes(source: str) -> None:
    """With ``CONVBN_LAST_NETWORK_DIR`` set, write the network about to be built to
    ``<dir>/<xdist worker or "main">.py`` and flush it to disk: a torch kernel that crashes the
    process (a segfault, which no ``except`` sees) leaves behind the program that crashed it. The
    suite has seen such crashes twice, in the original network's own forward, unreproduced."""
    directory = os.environ.get(LAST_NETWORK_DIR_ENV)
    if not directory:
        return
    path = os.path.join(directory, f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.py")
    with open(path, "w", encoding="utf-8") as out:
        out.write(source)
        out.flush()
        os.fsync(out.fileno())


@functools.lru_cache(maxsize=LIVE_MODULES)
def _compiled(source: str, filename: str) -> types.CodeType:
    """Each network is built more than once (the training-mode property builds it again)."""
    return compile(source, filename, "exec")


def freeze_startup_objects() -> None:
    """Exempt every object alive now (torch, Hypothesis, the test modules) from garbage collection.

    Each network's classes, and each ``GraphModule`` (FX gives every instance a class of its
    own), are freed only by a full collection: classes always sit in reference cycles. With
    torch's 340,000 objects in the oldest generation, Python runs full collections rarely, so dead
    classes stay in ``nn.Module``'s subclass list, which every trace walks (``LIVE_MODULES``).
    Frozen (``gc.freeze``), those objects are neither walked by a full collection nor counted
    when Python decides to run one, so dead classes are freed sooner and cheaper. Call it once,
    after the imports: the suite's ``conftest.py`` does, when collection is done.

    torchvision is imported first: networks may hold its ``FrozenBatchNorm2d``, and imported by
    the first such network it would add about 150,000 objects that every full collection walks
    (11% of the suite's time went to garbage collection with it loaded and not frozen).
    """
    importlib.import_module("torchvision.ops.misc")
    gc.collect()
    gc.freeze()


def _remember(name: str) -> None:
    """Keep the newest ``LIVE_MODULES`` programs importable; built objects outlive this."""
    if name in _live:
        _live.remove(name)
    _live.append(name)
    while len(_live) > LIVE_MODULES:
        old = _live.popleft()
        sys.modules.pop(old, None)
        linecache.cache.pop(f"<{old}>", None)
