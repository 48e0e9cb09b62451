"""False alarms and detection power of the drift monitor: the old defaults against the new,
on the same batches in the same run.

Run with `.venv/bin/pytest tests/benchmarks/bench_drift_false_alarms.py -m benchmark -s`.

Per table (the worked example's credit data, and the synthetic readings with missing values
and rare categories; tests/components/monitoring/drift_batches.py), BATCHES batches of
30 to 5,000 rows (log-uniform) are drawn like the reference, and SHIFTED_BATCHES shifted
ones of the same spread of sizes: the credit data's population shift (day 6 of the
generator), and for the readings a 0.25-sigma shift of the temperature's mean, or its
missing rate tripled (2% to 6%). Each batch is judged (features and a fixed scoring function's scores) by

* the old defaults: PSI on 10 bins deciding at 0.2 on any batch (``psi_min_expected: 1``),
  KS and chi-square Bonferroni-corrected, no minimum batch size, no missing-rate test;
* the new defaults (``MonitorSpec()``).

Printed per table and setting: the false-alarm rate (drift raised on an unshifted batch)
and the power (drift raised on a shifted one), overall and per size band. Asserted: the new
defaults raise a false alarm on at most 1% of the unshifted batches, and the old at a
larger rate.
"""

from __future__ import annotations

import numpy as np
import pytest

from stemma.components.spec import MonitorSpec
from tests.components.monitoring.drift_batches import (
    READINGS_MISSING,
    batch_sizes,
    credit_case,
    judge,
    readings,
    readings_case,
)

#: Unshifted batches per table (false alarms), and shifted batches per kind of shift (power:
#: fewer, as a rate far from 0 needs fewer batches to be known as well).
BATCHES = 1_000
SHIFTED_BATCHES = 250
#: Size bands the rates are printed for (rows, upper bound excluded).
BANDS = ((30, 100), (100, 1_000), (1_000, 5_001))
MOST_FALSE_ALARMS = 0.01

SETTINGS = {
    "old (PSI 0.2 decides)": MonitorSpec(
        thresholds={"psi": 0.2}, psi_min_expected=1, min_rows=1, missing_drift=False
    ),
    "new defaults": MonitorSpec(),
}


def _rates(detected: np.ndarray, sizes: np.ndarray) -> str:
    bands = "  ".join(
        f"{low}-{high - 1}: {detected[(sizes >= low) & (sizes < high)].mean():6.1%}"
        for low, high in BANDS
    )
    return f"{detected.mean():6.1%}  ({bands})"


@pytest.mark.benchmark
def test_false_alarms_and_power_old_and_new_defaults(tmp_path):
    credit, synthetic = credit_case(tmp_path), readings_case()
    sizes = {
        "unshifted": batch_sizes(BATCHES, seed=2026),
        "shifted": batch_sizes(SHIFTED_BATCHES, seed=2027),
    }
    makers = {
        "credit": (
            lambda rows, seed: credit.null_batch(rows, seed),
            {"population shift": lambda rows, seed: credit.shifted.sample(rows, random_state=seed)},
            credit,
        ),
        "readings": (
            lambda rows, seed: readings(rows, seed),
            {
                "0.25 sd warmer": lambda rows, seed: readings(rows, seed, warmer_sd=0.25),
                "3x missing temperature": lambda rows, seed: readings(
                    rows, seed, missing={**READINGS_MISSING, "temperature": 0.06}
                ),
            },
            synthetic,
        ),
    }
    false_alarms: dict[tuple[str, str], float] = {}
    print(
        f"\n{BATCHES} unshifted and {SHIFTED_BATCHES} shifted batches per table, sizes 30-5,000 "
        "(log-uniform); drift raised on:"
    )
    for table, (unshifted, shifts, case) in makers.items():
        kinds = {"unshifted (false alarms)": unshifted, **shifts}
        for kind, make in kinds.items():
            spread = sizes["unshifted" if kind.startswith("unshifted") else "shifted"]
            batches = [make(int(rows), 10_000 * index + 7) for index, rows in enumerate(spread)]
            for name, settings in SETTINGS.items():
                detected = np.array([judge(case, batch, settings).detected for batch in batches])
                print(f"  {table:8s} {kind:26s} {name:22s} {_rates(detected, spread)}", flush=True)
                if kind.startswith("unshifted"):
                    false_alarms[table, name] = float(detected.mean())
    for table in makers:
        old, new = (false_alarms[table, name] for name in SETTINGS)
        print(f"  {table}: false alarms old/new = {old / max(new, 1 / BATCHES):.0f}x")
        assert new <= MOST_FALSE_ALARMS
        assert old > new
