"""Pytest configuration for the whole repository: Hypothesis profiles, the example database, the
``--fuser`` gate, and one CPU thread per test process.

Profiles (``--hypothesis-profile NAME`` or ``HYPOTHESIS_PROFILE=NAME``; default ``dev``):

- ``dev``: random exploration, ``DEV_EXAMPLES`` networks per property, failures saved to the example
  database and replayed first on the next run.
- ``ci``: derandomized (every run draws the same networks), ``CI_EXAMPLES`` per property, no deadline,
  ``print_blob`` on. Hypothesis ties derandomize to ``database=None``, so CI never reads or writes the
  database: failures found in CI are pinned in ``tests/pinned.py`` instead.
- ``thorough``: like ``dev`` with ten times the examples (nightly, or before a release).
- ``smoke``: a handful of examples, no database, no shrinking; for the suite's own test that a
  broken fuser makes it fail.

Example database (``dev`` and ``thorough``): ``CONVBN_HYPOTHESIS_DB=/shared/dir`` shares a
``DirectoryBasedExampleDatabase`` between machines and workers (it is safe under ``pytest -n``);
``CONVBN_HYPOTHESIS_REDIS=redis://host:6379/0`` uses Hypothesis's Redis database (install
``hypothesis[redis]``), combined with the local or shared directory when both are set. Unset, Hypothesis
uses ``.hypothesis/examples`` in the working directory.

Short leases (a GPU lent for minutes): ``CONVBN_NO_SHRINK=1`` reports a failing example at once
instead of shrinking it first, and ``CONVBN_FAILURE_LOG=path`` appends each failure to ``path`` when it
happens, not when the whole run ends. ``CONVBN_LAST_NETWORK_DIR=dir`` has each process write the network
it is about to build to ``dir`` first, so that a torch kernel crashing a worker leaves the network
behind; the failure log then shows it (``.ci/gpu`` sets all three for its ``thorough-cuda`` stage).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    MultiplexedDatabase,
)

from strategies import properties
from strategies.build import LAST_NETWORK_DIR_ENV, freeze_startup_objects
from strategies.fuser_under_test import FuserUnderTest
from strategies.kernel_bugs import avoid_known_kernel_bugs

DEFAULT_FUSER = "fuser:fuse"
DEFAULT_FUSER_REPORT = "fuser:fuse_with_report"
DEV_EXAMPLES = 100
CI_EXAMPLES = 300  # x 7 property tests: 2,100 random networks per CI run
DATABASE_DIRECTORY_ENV = "CONVBN_HYPOTHESIS_DB"
DATABASE_REDIS_ENV = "CONVBN_HYPOTHESIS_REDIS"
NO_SHRINK_ENV = "CONVBN_NO_SHRINK"  # set: the loaded profile without its shrink phase
FAILURE_LOG_ENV = "CONVBN_FAILURE_LOG"  # a path: failures appended as they happen

# The networks are tiny: with several threads per process, OpenMP's spinning threads of two xdist
# workers (and anyone else's jobs) fight over the cores and every kernel gets ~100x slower.
torch.set_num_threads(1)
# Before any test runs a convolution: oneDNN's AMX kernels compute some strided bfloat16
# convolutions wrongly or crash (strategies/kernel_bugs.py). xdist workers inherit the setting.
avoid_known_kernel_bugs()


def example_database() -> ExampleDatabase | None:
    """The database the exploring profiles save failures to (see the module docstring)."""
    databases: list[ExampleDatabase] = []
    directory = os.environ.get(DATABASE_DIRECTORY_ENV)
    if directory:
        databases.append(DirectoryBasedExampleDatabase(directory))
    redis_url = os.environ.get(DATABASE_REDIS_ENV)
    if redis_url:
        import redis  # hypothesis[redis]
        from hypothesis.extra.redis import RedisExampleDatabase

        if not databases:
            databases.append(DirectoryBasedExampleDatabase(".hypothesis/examples"))
        databases.append(RedisExampleDatabase(redis.Redis.from_url(redis_url)))
    if not databases:
        return None
    return databases[0] if len(databases) == 1 else MultiplexedDatabase(*databases)


def _register_profiles() -> None:
    database = example_database()
    explore = {"database": database} if database is not None else {}
    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("dev", max_examples=DEV_EXAMPLES, **common, **explore)
    settings.register_profile("thorough", max_examples=10 * DEV_EXAMPLES, **common, **explore)
    settings.register_profile(
        "ci", max_examples=CI_EXAMPLES, derandomize=True, print_blob=True, **common
    )
    settings.register_profile(
        "smoke",
        max_examples=30,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        **common,
    )
    profile = os.environ.get("HYPOTHESIS_PROFILE", "dev")
    if os.environ.get(NO_SHRINK_ENV):
        no_shrink = [Phase.explicit, Phase.reuse, Phase.generate]
        settings.register_profile(
            f"{profile}-no-shrink", settings.get_profile(profile), phases=no_shrink
        )
        profile = f"{profile}-no-shrink"
    settings.load_profile(profile)


_register_profiles()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuser",
        default=None,
        metavar="package.module:function",
        help="run the property suite against this fuser, called as fn(model) or "
        f"fn(model, example_inputs=...) (default: {DEFAULT_FUSER}, report via "
        f"{DEFAULT_FUSER_REPORT})",
    )


@pytest.fixture(scope="session")
def fuser_under_test(request: pytest.FixtureRequest) -> FuserUnderTest:
    """The fuser every property runs against: ``--fuser``, or ours with its report."""
    target = request.config.getoption("--fuser")
    if target is None:
        return FuserUnderTest.from_target(DEFAULT_FUSER, DEFAULT_FUSER_REPORT)
    return FuserUnderTest.from_target(target)


def pytest_report_header(config: pytest.Config) -> str:
    target = config.getoption("--fuser") or DEFAULT_FUSER
    return f"fuser under test: {target}; hypothesis profile: {settings.get_current_profile_name()}"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported: freeze what is alive, so that the networks' classes are
    freed soon after each is checked (``strategies.build.freeze_startup_objects``)."""
    freeze_startup_objects()


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the count to the controller
        workeroutput["networks_checked"] = properties.networks_checked()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: add up the networks each worker checked."""
    count = getattr(node, "workeroutput", {}).get("networks_checked", 0)
    node.config._convbn_networks_checked = (
        getattr(node.config, "_convbn_networks_checked", 0) + count
    )


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Under ``pytest -n`` with no ``--dist`` given, schedule by work stealing instead of xdist's
    default ``load``. The property tests are a dozen long items among a thousand short ones, and
    ``load`` handed most of the long ones to one worker: with ``-n 2`` on 2 cores the ``ci``
    profile of tests/test_properties.py took 118-133 s against 149 s with ``-n 1`` (load average
    about 1.2), and 86 s with ``--dist worksteal``. Set here, not in ``addopts``: a run with
    ``-p no:xdist`` would reject ``--dist``. Runs before xdist's own hook, which would otherwise
    turn the default ``no`` into ``load``."""
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "worksteal"


_in_an_xdist_worker = False


def pytest_configure(config: pytest.Config) -> None:
    # From the config, not from PYTEST_XDIST_WORKER: a pytest run started by a test inside a
    # worker inherits that variable, and its own controller would take itself for a worker.
    global _in_an_xdist_worker
    _in_an_xdist_worker = hasattr(config, "workerinput")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``CONVBN_FAILURE_LOG=path``, each failure is appended to ``path`` as soon as it is
    reported. Under ``pytest -n`` the failures are printed only once every worker has finished its
    test, minutes later in the ``thorough`` profile: on a short GPU lease that may never come."""
    path = os.environ.get(FAILURE_LOG_ENV)
    if not path or not report.failed or _in_an_xdist_worker:
        return  # xdist workers' reports reach the controller, which writes them once
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        log.write(_network_a_crashed_worker_left(report))


def _network_a_crashed_worker_left(report: pytest.TestReport) -> str:
    """For the report of an xdist worker that crashed (a segfault in a torch kernel), the network
    it was building or running, if ``CONVBN_LAST_NETWORK_DIR`` had it written down."""
    directory = os.environ.get(LAST_NETWORK_DIR_ENV)
    worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
    if not directory or worker is None or report.when != "???":  # xdist's mark of a crash
        return ""
    path = os.path.join(directory, f"{worker}.py")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as network:
        return (
            f"---- the network worker {worker} was on when it crashed ({path}):\n{network.read()}\n"
        )


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    count = getattr(config, "_convbn_networks_checked", 0) + properties.networks_checked()
    if count:
        terminalreporter.write_line(
            f"property suite: {count} random networks built, fused and checked"
        )
