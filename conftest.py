"""Settings of a test session, shared by tests/ and nbval over notebooks/ (their kernels inherit
this process's environment).

One fresh, empty results directory per pytest run (``REPRO_OUTPUTS``): nothing written by older
code is read, and every ci-tier record the session needs is computed once, by whichever test or
notebook needs it first, and then read by the others (records are locked while computed). With
``--ci-records`` (``make test``) the records of every notebook nbval executes are computed first,
on two processes (``tests/ci_records.py``), so the two test workers read instead of waiting on
each other's locks.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Progress bars off: nbval drains a kernel's messages only after a cell finishes, and a long cell's
# widget updates overflow ZeroMQ's queue (see repro/progress.py).
os.environ["REPRO_PROGRESS"] = "0"

SLOW = ("embedded", "browser", "subprocess")  # markers whose tests are end to end (also "slow")


def pytest_addoption(parser):
    parser.addoption("--ci-records", action="store_true",
                     help="first compute the ci-tier records the notebooks and embedded tests read, on two "
                          "processes (tests/ci_records.py; `make test`)")


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller set everything up
        return
    # REPRO_TEST_OUTPUTS: a results directory to reuse across sessions while developing (e.g. filled by
    # `python tests/ci_records.py 1 1 DIR`); kept afterwards. Unset (`make test`): a fresh one, removed.
    os.environ["REPRO_OUTPUTS"] = os.environ.get("REPRO_TEST_OUTPUTS") or tempfile.mkdtemp(prefix="repro-test-")
    if (config.getoption("numprocesses", None) or 0) > 1:
        # one torch thread per worker (and per subprocess it starts), so two workers do not
        # oversubscribe two cores (torch's thread pool spins and slows many times over)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
    if config.getoption("ci_records"):
        config.ci_records_s, config.ci_records_parts = compute_ci_records(Path(os.environ["REPRO_OUTPUTS"]),
                                                                           processes=2)


def compute_ci_records(outputs: Path, processes: int) -> tuple[float, list[str]]:
    """``tests/ci_records.py`` in ``processes`` parts at once; returns the wall seconds and each part's
    summary line (its runs and seconds: how well ``ci_records.COST`` balanced them)."""
    start = time.perf_counter()
    script = Path(__file__).parent / "tests" / "ci_records.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(k), str(processes), str(outputs)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(1, processes + 1)]
    logs = [p.communicate()[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise pytest.UsageError(f"computing the ci-tier records failed:\n{log[-4000:]}")
    return time.perf_counter() - start, [line[line.index("ci records part"):] for log in logs
                                         for line in log.splitlines() if "ci records part" in line]


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and not os.environ.get("REPRO_TEST_OUTPUTS"):
        shutil.rmtree(os.environ["REPRO_OUTPUTS"], ignore_errors=True)


# The longest scopes of `make test` (docs/TESTING.md), which the two workers should start first: the
# paper-tier dry run alone is ~4.5 min of one worker, and started last it is the whole suite's tail.
LONGEST_FIRST = ("tests/test_paper_tier.py", "tests/test_batch.py", "tests/test_qaft.py", "tests/test_gptq.py")


def pytest_collection_modifyitems(config, items):
    """``slow``: every nbval notebook and every test marked embedded, browser or subprocess. Then the
    order pytest-xdist hands out scopes in (`make test`: ``--dist loadscope --no-loadscope-reorder``),
    longest first so the short ones fill the end: ``LONGEST_FIRST``, then scopes with a slow item
    (notebooks, end-to-end modules), then the rest; within a scope the order is kept."""
    for item in items:
        if item.path.suffix == ".ipynb" or any(item.get_closest_marker(name) for name in SLOW):
            item.add_marker(pytest.mark.slow)
    root = Path(str(config.rootpath))
    scope_of = {item: item.path.relative_to(root).as_posix() for item in items}
    slow_scopes = {scope_of[item] for item in items if item.get_closest_marker("slow")}

    def rank(item):
        scope = scope_of[item]
        return LONGEST_FIRST.index(scope) if scope in LONGEST_FIRST else len(LONGEST_FIRST) + (scope not in slow_scopes)

    items.sort(key=rank)  # stable: each scope's items keep their order, scopes of one rank theirs


BUSY_S = {}  # controller: seconds of setup + call + teardown per pytest-xdist worker


def pytest_runtest_logreport(report):
    worker = getattr(getattr(report, "node", None), "gateway", None)
    if worker is not None:
        BUSY_S[worker.id] = BUSY_S.get(worker.id, 0.0) + report.duration


def pytest_sessionstart(session):
    session.config.tests_start = time.perf_counter()


@pytest.fixture(scope="session")
def ci_outputs():
    """The session's results directory: tests computing standard ci-tier runs share its records
    with each other and with the notebooks."""
    return Path(os.environ["REPRO_OUTPUTS"])


@pytest.fixture(scope="session")
def seed_records(ci_outputs):
    """``seed_records(outputs, configs)``: copy the records of ``configs`` from the session's results
    directory into ``outputs`` (computed there first if no test or notebook has yet), so that a
    batch or a kernel reading ``outputs`` finds them and nothing else."""
    from repro import runs, store

    def seed(outputs: Path, configs) -> None:
        for config in configs:
            runs.run(config, ci_outputs)
            target = store.record_path(config, outputs)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(store.record_path(config, ci_outputs), target)

    return seed


def pytest_terminal_summary(terminalreporter):
    """Where the session computed its records: the GPTQ/QAFT numbers the notebooks print depend on it."""
    from repro.runs import machine

    terminalreporter.write_line(f"machine: {machine()}, {os.cpu_count()} cores")
    if getattr(terminalreporter.config, "ci_records_s", None) is not None:
        terminalreporter.write_line(f"ci-tier records computed before the tests (--ci-records): "
                                    f"{terminalreporter.config.ci_records_s:.0f} s "
                                    f"({'; '.join(terminalreporter.config.ci_records_parts)})")
    if BUSY_S:  # how evenly the workers shared the tests: the wall is the busier one's time plus idle waits
        wall = time.perf_counter() - terminalreporter.config.tests_start
        terminalreporter.write_line(f"tests: {wall:.0f} s wall; busy per worker: " +
                                    ", ".join(f"{w} {s:.0f} s" for w, s in sorted(BUSY_S.items())))
