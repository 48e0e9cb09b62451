"""What a batch scoring cost: its CPU time, per million predictions, priced on a machine.

The scoring engine counts the CPU time a scoring spends (``ScoringResult.cpu_seconds``:
the process's clock around the call, every thread counted; for a Dask fan-out, the
planning process's plus each worker process's while it scored, see
:func:`.job.worker_cpu_seconds`). :func:`scoring_cost` turns it into CPU-seconds per
million rows scored and prices those on the spec's ``cost.scoring`` machine with
``spec.compress.cost_per_million``: the share of the machine's cores the work kept busy on
a CPU machine, the wall-clock time on a GPU machine.

The figure is an upper bound of what the model alone costs: reading, checking and writing
the rows are counted too, as they are on the machine that runs the scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

from stemma.components.scoring.job import ScoringResult
from stemma.components.spec.compress import CostSpec, cost_per_million, format_amount

#: Rows per priced unit.
MILLION = 1_000_000


@dataclass(frozen=True)
class ScoringCost:
    """A scoring's CPU time and what a million of its predictions cost.

    Attributes:
        cpu_seconds: CPU time the scoring spent.
        rows: rows of the chunks it scored (resumed parts are not counted).
        cpu_seconds_per_million: ``cpu_seconds`` per million of ``rows`` (None: no row
            was scored by this run, so nothing to divide by).
        cost_per_million: that, priced on ``machine`` (None as above).
        machine: the spec's ``cost.scoring`` machine.
        currency: the spec's ``cost.currency``.
        illustrative: the prices are Stemma's illustrative defaults.
        line: one line for summaries (``cost: 0.0021 USD per million predictions on ...``).
    """

    cpu_seconds: float
    rows: int
    cpu_seconds_per_million: float | None
    cost_per_million: float | None
    machine: str
    currency: str
    illustrative: bool
    line: str

    def metrics(self) -> dict[str, float]:
        """``cpu_seconds``, and the per-million figures when there are any."""
        values = {"cpu_seconds": self.cpu_seconds}
        if self.cpu_seconds_per_million is not None and self.cost_per_million is not None:
            values["cpu_s_per_million"] = self.cpu_seconds_per_million
            values["cost_per_million"] = self.cost_per_million
        return values

    def params(self) -> dict[str, str]:
        """The machine and currency the cost is in (``cost.machine``, ``cost.currency``)."""
        shown = f"{self.machine} (illustrative prices)" if self.illustrative else self.machine
        return {"cost.machine": shown, "cost.currency": self.currency}


def scoring_cost(result: ScoringResult, cost: CostSpec) -> ScoringCost:
    """The CPU time and cost of a scoring, priced on ``cost``'s scoring machine."""
    rows = result.rows_scored_now
    machine = cost.machine("scoring")
    if rows <= 0:
        return ScoringCost(
            cpu_seconds=result.cpu_seconds,
            rows=0,
            cpu_seconds_per_million=None,
            cost_per_million=None,
            machine=cost.scoring,
            currency=cost.currency,
            illustrative=cost.illustrative,
            line=(
                f"cost: none to price (no row scored by this run; "
                f"{format_amount(result.cpu_seconds)} CPU-seconds)"
            ),
        )
    cpu_per_million = result.cpu_seconds / rows * MILLION
    wall_per_million = result.seconds / rows * MILLION
    amount = cost_per_million(cpu_per_million, wall_per_million, machine)
    return ScoringCost(
        cpu_seconds=result.cpu_seconds,
        rows=rows,
        cpu_seconds_per_million=cpu_per_million,
        cost_per_million=amount,
        machine=cost.scoring,
        currency=cost.currency,
        illustrative=cost.illustrative,
        line=(
            f"cost: {cost.describe('scoring', amount)} "
            f"({format_amount(cpu_per_million)} CPU-seconds per million)"
        ),
    )
