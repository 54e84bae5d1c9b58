"""Project-local pytest settings only: the plugin registers itself through the pytest11 entry point.

Here: the hang guard that bounds every test of the machinery (tests/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent / "tests"
#: pytest-timeout's limit for a test under tests/ that names none of its own: a hang guard, never a speed check. The
#: slowest test under tests/ took 159 s (test_load_cluster.py; the next ones 142 s and 109 s, each running the suite
#: in subprocesses) in a full `make test` local pass on the 2-core CI machine kind (--durations): 20 minutes is about
#: 8 times that, so no test needs a limit of its own.
TESTS_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test under tests/ without a timeout marker TESTS_TIMEOUT_S.

    Not an ini-wide `timeout`: the suite's tests (suite/) also run on BLIP-base for users (`make bench`), where one
    level or one export can legitimately take many minutes, and a limit sized for the tiny model would fail them.
    A --timeout on the command line (or a timeout in pytest.ini) still wins, for tests/ as for suite/. The default
    method (a signal) fails the test where it hangs, so its fixtures still stop the servers and children it started.
    """
    if config.getoption("timeout", None) is not None or config.getini("timeout"):
        return
    for item in items:
        if item.path.is_relative_to(TESTS_DIR) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TESTS_TIMEOUT_S))
