"""A warm interpreter for the mutant runs: the heavy imports done once, a fork per run.

Each mutant run is a whole pytest session in an interpreter of its own, so no patch, import or
Hypothesis state can leak from one run into the next. A fresh ``python -m pytest`` spends about
4.5 CPU seconds before its first test, most of it importing torch and torchvision: over the 69
mutants of the CI's mutant tier about 290 CPU seconds, a third of the tier (928 -> 641 s CPU). A fork of an interpreter that has
imported torch, Hypothesis, pytest and the suite's own packages, and run nothing else, is as
fresh (whatever a run changes dies with its process) and starts at once.

The server (``python -m tests.mutants.warm_interpreter``, started by ``WarmInterpreter``) reads
one request per line on stdin, as JSON: pytest's arguments, the environment, the working
directory and a log path. For each it forks; the child makes itself look like a fresh
``python -m pytest`` started with that environment in that directory, its output going to the
log, and exits with pytest's status. The server answers with the child's pid (so that the client
can kill it), then with its exit status and CPU seconds. One server runs one child at a time and
serves one client thread.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import resource

ROOT = Path(__file__).resolve().parents[2]

#: Imported by the server before its first fork: what every run imports anyway and takes long.
#: The suite's own test modules and conftest are left to pytest, which imports them its own way.
PRELOADED = ("torch", "torchvision", "hypothesis", "pytest", "xdist.plugin", "strategies", "fuser")

#: The exit status a child reports when the run itself crashed before pytest could give one.
CHILD_CRASHED = 70

#: Seconds between the server's looks at its child and at its client while a run is going: what
#: an ended run waits before its answer, at most.
CLIENT_POLL_S = 0.05

#: ``prctl``'s option to send the caller a signal when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


# -- the server ----------------------------------------------------------------------------------


def serve() -> None:
    """Answer requests until stdin closes. Protocol lines go to a private copy of stdout, so that
    nothing imported code prints can garble them; fd 1 then points at stderr."""
    for name in PRELOADED:
        with contextlib.suppress(Exception):  # a module that fails to import fails in each run
            importlib.import_module(name)
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()  # a child inherits unwritten buffers and would write them again
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_child(request, protocol.fileno(), server)
        protocol.write(json.dumps({"pid": pid}) + "\n")
        reaped = _wait_while_the_client_lives(pid)
        if reaped is None:  # the client is gone: nobody will read the answer
            return
        wait_status, usage = reaped
        status = os.waitstatus_to_exitcode(wait_status)
        cpu_seconds = usage.ru_utime + usage.ru_stime
        protocol.write(json.dumps({"status": status, "cpu_seconds": cpu_seconds}) + "\n")


def _wait_while_the_client_lives(pid: int) -> tuple[int, resource.struct_rusage] | None:
    """``os.wait4(pid)``'s status and usage; None, with the child killed and reaped, if the
    client goes away first.

    The client sends nothing while a run is going (it waits for the answer), so stdin turning
    readable then means it was closed: the client died, or was killed while its run's child
    still had minutes to go. Without this the child would run on to its end, with no one to
    report to, and the server after it (the server only sees the end of its input between runs).
    """
    while True:
        reaped, wait_status, usage = os.wait4(pid, os.WNOHANG)
        if reaped:
            return wait_status, usage
        if select.select([0], [], [], CLIENT_POLL_S)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None


def _die_with_the_server(server: int) -> None:
    """Have the kernel kill this child if the server (pid ``server``) dies first (Linux's
    ``PR_SET_PDEATHSIG``; elsewhere nothing): a server killed outright cannot kill its child."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != server:  # the server died before the request above was made
        os._exit(CHILD_CRASHED)


def _run_child(request: dict, protocol_fd: int, server: int) -> None:
    """Become ``python -m pytest ARGS`` run in ``cwd`` with ``env`` (never returns)."""
    status = CHILD_CRASHED
    try:
        _die_with_the_server(server)
        os.close(protocol_fd)
        _redirect(0, os.devnull, os.O_RDONLY)
        # The server's stdin object may hold requests it read ahead: a new one reads fd 0.
        sys.stdin = os.fdopen(0, "r", closefd=False)
        _redirect(1, request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(1, 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # What a fresh interpreter's path would start with: the working directory, then PYTHONPATH.
        first = [
            request["cwd"],
            *filter(None, request["env"].get("PYTHONPATH", "").split(os.pathsep)),
        ]
        sys.path[:] = first + [entry for entry in sys.path if entry not in first]
        random.seed()  # a fresh interpreter seeds from the OS, not from its parent's state
        import pytest

        # pytest would rewrite the asserts of its plugins' packages (Hypothesis, xdist) as it
        # imports them; here they are imported already, which changes nothing the suite checks
        # but makes pytest warn about each.
        args = ["-W", "ignore::pytest.PytestAssertRewriteWarning", *request["args"]]
        sys.argv = ["pytest", *args]
        status = int(pytest.main(args))
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o644)
    if opened != fd:
        os.dup2(opened, fd)
        os.close(opened)


# -- the client ----------------------------------------------------------------------------------


class WarmInterpreter:
    """A server process, started on first use; ``run`` is ``subprocess.run`` for pytest, with a
    timeout and CPU time. Not shared between threads: use ``for_this_thread()``."""

    _per_thread = threading.local()

    def __init__(self) -> None:
        self._server: subprocess.Popen | None = None
        self._pending = b""

    @classmethod
    def for_this_thread(cls) -> WarmInterpreter:
        if not hasattr(cls._per_thread, "interpreter"):
            cls._per_thread.interpreter = cls()
        return cls._per_thread.interpreter

    def run(
        self, args: list[str], env: dict[str, str], log_path: Path, timeout_s: float
    ) -> tuple[int | None, float, float]:
        """Run ``pytest ARGS`` in ROOT with ``env``, its output to ``log_path``; return its exit
        status (None when killed at ``timeout_s``), wall seconds and CPU seconds."""
        start = time.perf_counter()
        pid = self.start(args, env, log_path)
        answer = self._answer(start + timeout_s)
        killed = answer is None
        if killed:
            # The child may have ended (and the server reaped it) since the deadline passed:
            # then there is nothing to kill, and its own status is the answer.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            answer = self._answer(None)
        seconds = time.perf_counter() - start
        timed_out = killed and answer["status"] == -signal.SIGKILL
        return (None if timed_out else answer["status"]), seconds, answer["cpu_seconds"]

    def start(self, args: list[str], env: dict[str, str], log_path: Path) -> int:
        """Send the request for ``run`` and return the pid of the child the server forked for
        it; its answer (status and CPU seconds) is the server's next line."""
        server = self._started()
        request = {"args": args, "env": env, "cwd": str(ROOT), "log": str(log_path)}
        server.stdin.write((json.dumps(request) + "\n").encode())
        server.stdin.flush()
        return self._answer(None)["pid"]

    def close(self) -> None:
        """Stop the server (it exits when its stdin closes); a later ``run`` starts another."""
        if self._server is not None:
            self._server.stdin.close()
            self._server.wait()
            self._server.stdout.close()
            self._server = None

    def _started(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [sys.executable, "-m", __name__],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._pending = b""
        return self._server

    def _answer(self, deadline: float | None) -> dict | None:
        """The server's next line as a dict; None if ``deadline`` passes first."""
        stdout = self._server.stdout.fileno()
        while b"\n" not in self._pending:
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if not select.select([stdout], [], [], wait)[0]:
                return None
            chunk = os.read(stdout, 4096)
            if not chunk:
                raise RuntimeError("the warm interpreter died (its output is on stderr)")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)


if __name__ == "__main__":
    serve()
