"""A pytest plugin (tests/conftest.py loads it): a test marked restarts_postgres fails when it skips.

scripts/test runs that test in a pytest session of its own, which would otherwise pass having tested nothing.
"""

from __future__ import annotations

import pytest

MARKER = "restarts_postgres"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker(MARKER) is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a {MARKER} test must run, not skip ({reason})"
