"""The fault plan as a suite: every case says what kind of probe it is, and the run ends
with one line that counts what held.

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


class CaseLedger:
    """The handle a case reports through."""

    def __init__(self, nodeid: str) -> None:
        self._nodeid = nodeid

    def lost_rows(self, count: int) -> None:
        """Rows that went missing or were duplicated in an output (0 when all is well)."""
        _LEDGER.rows_lost += max(0, int(count))

    def executed(self, happened: bool) -> None:
        """Whether code from an untrusted input ran (a marker file appeared, say)."""
        if happened:
            _LEDGER.code_executed.append(self._nodeid)


@pytest.fixture
def fault_ledger(request: pytest.FixtureRequest) -> CaseLedger:
    return CaseLedger(request.node.nodeid)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fault_case(kind): a case of the fault plan; kind is fault, bad_input or untrusted",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault_case")
    if marker is None:
        return
    kind = marker.args[0]
    if kind not in KINDS:
        raise pytest.UsageError(
            f"{item.nodeid}: fault_case kind {kind!r} is not one of {list(KINDS)}"
        )
    # Count each case once: at its call, or at a setup that failed or skipped.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            return
        _LEDGER.tried[kind] += 1
        if report.passed:
            _LEDGER.held[kind] += 1


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
