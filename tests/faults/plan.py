"""The fault plan as a suite: every case says what kind of probe it is, and the run ends
with one line that counts what held.

A plugin of the root conftest (``pytest_plugins``), not a conftest of this folder: with
workers (pytest-xdist) the controller that prints the summary loads only the root conftest
and its plugins.

Mark each case with ``@pytest.mark.fault_case("fault")`` (a kill, a race, an outage),
``"bad_input"`` (a hostile or broken config, batch or file) or ``"untrusted"`` (a model
version crafted to run code). A case passes only when the outcome is right, so the counts
are "passed / tried" per kind. Cases that can lose rows or run foreign code report what
they saw through the ``fault_ledger`` fixture before asserting, so the summary states rows
lost and code executed even when an assertion fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

#: The kinds of case and how the summary line names them.
KINDS = {
    "fault": "faults survived",
    "bad_input": "bad inputs rejected",
    "untrusted": "untrusted models refused",
}


@dataclass
class Ledger:
    """What the cases of one session saw."""

    tried: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    held: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    rows_lost: int = 0
    code_executed: list[str] = field(default_factory=list)


_LEDGER = Ledger()
#: Names of what a case's report carries (its user_properties) for the summary.
FAULT_CASE, ROWS_LOST, CODE_EXECUTED = "fault_case", "fault_rows_lost", "fault_code_executed"


class CaseLedger:
    """The handle a case reports through: what it saw goes with the case's report, so the
    summary adds it up also when cases run in several worker processes (pytest-xdist)."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item

    def lost_rows(self, count: int) -> None:
        """Rows that went missing or were duplicated in an output (0 when all is well)."""
        self._item.user_properties.append((ROWS_LOST, max(0, int(count))))

    def executed(self, happened: bool) -> None:
        """Whether code from an untrusted input ran (a marker file appeared, say)."""
        if happened:
            self._item.user_properties.append((CODE_EXECUTED, self._item.nodeid))


@pytest.fixture
def fault_ledger(request: pytest.FixtureRequest) -> CaseLedger:
    return CaseLedger(request.node)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fault_case(kind): a case of the fault plan; kind is fault, bad_input or untrusted",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    marker = item.get_closest_marker("fault_case")
    if marker is None:
        return
    kind = marker.args[0]
    if kind not in KINDS:
        raise pytest.UsageError(
            f"{item.nodeid}: fault_case kind {kind!r} is not one of {list(KINDS)}"
        )
    outcome.get_result().user_properties.append((FAULT_CASE, kind))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count each case once: at its call, or at a setup that failed or skipped (in the
    process that prints the summary, whichever process ran the case)."""
    properties = [(name, value) for name, value in report.user_properties]
    kinds = [value for name, value in properties if name == FAULT_CASE]
    if not kinds or report.skipped:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _LEDGER.tried[kinds[0]] += 1
        if report.passed:
            _LEDGER.held[kinds[0]] += 1
    if report.when == "call":
        _LEDGER.rows_lost += sum(value for name, value in properties if name == ROWS_LOST)
        _LEDGER.code_executed += [value for name, value in properties if name == CODE_EXECUTED]


def pytest_terminal_summary(terminalreporter: object) -> None:
    if not any(_LEDGER.tried.values()):
        return
    counts = ", ".join(
        f"{label} {_LEDGER.held[kind]}/{_LEDGER.tried[kind]}" for kind, label in KINDS.items()
    )
    executed = (
        "never" if not _LEDGER.code_executed else f"YES in {len(_LEDGER.code_executed)} case(s)"
    )
    terminalreporter.write_line(  # type: ignore[attr-defined]
        f"fault plan: {counts}; rows lost {_LEDGER.rows_lost}; "
        f"code executed from untrusted input: {executed}"
    )
