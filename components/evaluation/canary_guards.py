"""The guards of a canary step, and what they decide: advance, hold or roll back.

Per step: the challenger's error rate on its arm (rows not scored, NaN/inf, constant
output), the drift of its scores against the control arm (PSI; against the control's
scores of the same rows when the control arm is too small), the metric difference against
the champion on the same labelled rows once labels arrive (paired bootstrap), and
optionally the time per request. Any breach rolls back; too few rows hold the step.
A multiclass model is compared on its probability of each class; rows whose label is no
class of the models are counted (``unknown_labels``, and a reason), not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stemma.components.evaluation.canary_steps import ARM_CHALLENGER, ARM_COLUMN, StepScores
from stemma.components.evaluation.comparison import (
    FailureCounts,
    MetricComparison,
    as_dict,
    bootstrap_settings,
    comparison_metrics,
    count_failures,
    paired_bootstrap,
    score_distances,
)
from stemma.components.evaluation.rows import (
    CHALLENGER_SCORED,
    CHAMPION_SCORED,
    add_labels,
    measure_latency,
    scores_of,
)
from stemma.components.runtime.loading import ScoringModel
from stemma.components.spec import EvaluateSpec
from stemma.components.spec.limits import describe_drop

#: What a step decides.
ADVANCE = "advance"
HOLD = "hold"
ROLLBACK = "rollback"
#: Guard outcomes.
GUARD_OK = "ok"
GUARD_BREACH = "breach"
GUARD_HOLD = "hold"
GUARD_PENDING = "pending"
GUARD_OFF = "off"


@dataclass(frozen=True)
class GuardResult:
    """One guard's verdict on a step."""

    name: str
    status: str
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class StepEvaluation:
    """What the guards found on one step and what they decide.

    Attributes:
        decision: ``advance``, ``hold`` or ``rollback``.
        reasons: the guards that decided, in words and numbers.
        guards: every guard's verdict.
        rows: rows in the batch.
        arm_rows: rows routed to the challenger.
        fallback_rows: challenger rows the champion served because the challenger failed.
        failures: the challenger's failures on its arm.
        distances: the challenger's scores against the reference (``psi``, ``ks``, ...).
        comparison: the metric against the champion on the same labelled rows, if any.
        latency: per model, request latency percentiles (ms), see
            :func:`~.rows.measure_latency`.
        unknown_labels: rows of the step whose label is no class of the models: counted,
            not compared.
    """

    decision: str
    reasons: list[str]
    guards: list[GuardResult]
    rows: int
    arm_rows: int
    fallback_rows: int
    failures: FailureCounts
    distances: dict[str, float]
    comparison: MetricComparison | None
    latency: dict[str, dict[str, float]]
    unknown_labels: int = 0

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow."""
        values: dict[str, float] = {
            "rows": self.rows,
            "unknown_labels": self.unknown_labels,
            "arm_rows": self.arm_rows,
            "fallback_rows": self.fallback_rows,
            "challenger_error_rate": self.failures.error_rate,
            **{f"score_{name}": value for name, value in self.distances.items()},
            **{
                f"{model}_{key}": value
                for model, numbers in self.latency.items()
                for key, value in numbers.items()
            },
        }
        if self.comparison is not None:
            values["labelled_rows"] = self.comparison.rows
        values.update(comparison_metrics("metric", self.comparison))
        return {key: float(value) for key, value in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


def evaluate_step(
    scores: StepScores,
    *,
    labels: pd.DataFrame | None,
    id_column: str,
    task: str,
    metric: str,
    settings: EvaluateSpec,
    control: ScoringModel,
    challenger: ScoringModel,
    promoting: bool,
) -> StepEvaluation:
    """Run the guards on a scored step and decide to advance, hold or roll back.

    Args:
        scores: from :func:`~.canary_steps.score_step` or :func:`~.live.log_step_scores`.
        labels: :func:`~.rows.load_labels` through :func:`~.rows.encode_labels`, or None.
        id_column: the entity id.
        task, metric: the task and ``gate.metric``.
        settings: ``evaluate`` (the guards, confidence, resamples, seed).
        control, challenger: the two models (thresholds).
        promoting: advancing from this step promotes the challenger; with
            ``guards.require_labels`` it then holds until the metric guard could count.
    """
    guards = settings.canary.guards
    rows = scores.rows.copy()
    add_labels(rows, labels, id_column)
    arm = (rows[ARM_COLUMN] == ARM_CHALLENGER).to_numpy()
    scored = scores_of(rows, control, challenger)
    a, b = scored.champion_row, scored.challenger_row
    a_ok = rows[CHAMPION_SCORED].to_numpy(dtype=bool) & np.isfinite(a)
    b_scored = rows[CHALLENGER_SCORED].to_numpy(dtype=bool)
    # The challenger answers for the rows of its arm the champion could score: a row no
    # model can score is the input's fault.
    judged = arm & a_ok
    failures = count_failures(b[judged & b_scored], rows=int(judged.sum()))
    both = judged & b_scored & np.isfinite(b)
    results = _row_guards(failures, int(arm.sum()), guards)
    labelled = both & scored.known
    needed = guards.labelled_rows_needed(int(arm.sum()))
    comparison = None
    if labelled.sum() >= needed:
        comparison = paired_bootstrap(
            metric,
            task,
            *scored.at(labelled),
            champion_threshold=control.threshold,
            challenger_threshold=challenger.threshold,
            **bootstrap_settings(settings),
        )
    metric_guard = _metric_guard(comparison, (int(labelled.sum()), needed), guards, promoting)
    control_arm = ~arm & a_ok
    if control_arm.sum() >= guards.min_rows:
        reference, against = a[control_arm], "the control arm"
    else:
        reference, against = a[both], "the champion's scores of the same rows"
    distances = score_distances(reference, b[both], task=task)
    results.append(_drift_guard(distances["psi"], int(both.sum()), against, guards, metric_guard))
    results.append(metric_guard)
    latency = _step_latency(scores, control, challenger)
    results.append(_latency_guard(latency, guards.max_latency_ratio))

    decision, reasons = _decide(results)
    reasons += [f"labels: {scored.note}"] if scored.note else []
    fallback = int((arm & ~(b_scored & np.isfinite(b)) & a_ok).sum())
    return StepEvaluation(
        decision=decision,
        reasons=reasons,
        guards=results,
        rows=len(rows),
        arm_rows=int(arm.sum()),
        fallback_rows=fallback,
        failures=failures,
        distances=distances,
        comparison=comparison,
        latency=latency,
        unknown_labels=int(scored.unknown.sum()),
    )


def _step_latency(
    scores: StepScores, control: ScoringModel, challenger: ScoringModel
) -> dict[str, dict[str, float]]:
    """Request latency per model: as the endpoint served (a day of its log), else both
    models timed on the batch."""
    if scores.latency is not None:
        return scores.latency
    return measure_latency({"champion": control, "challenger": challenger}, [scores.batch])


def _row_guards(failures: FailureCounts, arm_rows: int, guards: Any) -> list[GuardResult]:
    """The error-rate guard, and a hold while the challenger's arm has too few rows."""
    results = [
        GuardResult(
            "error_rate",
            GUARD_BREACH if failures.error_rate > guards.max_error_rate else GUARD_OK,
            failures.error_rate,
            guards.max_error_rate,
            f"the challenger fails on {failures.describe()}",
        )
    ]
    if arm_rows < guards.min_rows:
        results.append(
            GuardResult(
                "rows",
                GUARD_HOLD,
                float(arm_rows),
                float(guards.min_rows),
                f"{arm_rows:,} rows in the challenger's arm, fewer than "
                f"guards.min_rows {guards.min_rows:,}",
            )
        )
    return results


def _decide(results: list[GuardResult]) -> tuple[str, list[str]]:
    """Any breach rolls back, else any hold holds, else the step advances."""

    def said(status: str) -> list[str]:
        return [f"{g.name}: {g.detail}" for g in results if g.status == status]

    if breaches := said(GUARD_BREACH):
        return ROLLBACK, breaches
    if holds := said(GUARD_HOLD):
        return HOLD, holds
    return ADVANCE, said(GUARD_OK) + said(GUARD_PENDING)


def _drift_guard(
    psi: float, rows: int, against: str, guards: Any, metric_guard: GuardResult
) -> GuardResult:
    """The challenger's score distribution against the control's.

    A shift of the scores is a proxy for risk while no label says how good the challenger
    is: once the metric guard passes on labelled rows, a shift it explains (a better model
    scores differently) does not roll back.
    """
    if rows < guards.min_rows or not np.isfinite(psi):
        # A PSI over a handful of rows is mostly empty bins: not evidence either way.
        return GuardResult(
            "score_drift",
            GUARD_PENDING,
            None,
            guards.max_score_psi,
            f"{rows:,} rows scored by the challenger, fewer than guards.min_rows "
            f"{guards.min_rows:,}",
        )
    status, detail = GUARD_OK, f"PSI of the challenger's scores against {against}: {psi:.4f}"
    if psi > guards.max_score_psi and metric_guard.status == GUARD_OK:
        detail += (
            f", above max_score_psi {guards.max_score_psi:g} but the labels show the "
            "challenger is not worse (metric guard)"
        )
    elif psi > guards.max_score_psi:
        status = GUARD_BREACH
        detail += (
            f", above max_score_psi {guards.max_score_psi:g} with no labels to vouch for "
            "the challenger"
        )
    return GuardResult("score_drift", status, psi, guards.max_score_psi, detail)


def _metric_guard(
    comparison: MetricComparison | None,
    labelled: tuple[int, int],
    guards: Any,
    promoting: bool,
) -> GuardResult:
    """The challenger against the champion on the same labelled rows: a breach when even
    the upper bound of the improvement is below minus the limit (of the champion's value
    when relative). ``labelled``: the labelled rows, and how many the guard needs."""
    if comparison is None or not comparison.decidable:
        rows, needed = labelled
        why = (
            f"{rows:,} labelled rows in the challenger's arm, fewer than "
            f"guards.min_labelled_rows {needed:,}"
            if comparison is None
            else "the metric is undefined in too many resamples"
        )
        if promoting and guards.require_labels:
            return GuardResult(
                "metric", GUARD_HOLD, None, None, f"{why}; the promotion waits for labels"
            )
        return GuardResult("metric", GUARD_PENDING, None, None, why)
    drop = guards.metric_drop(comparison.metric)
    limit = -drop.limit(comparison.champion)
    # NaN (a relative limit of a non-finite champion value) breaches: the guard fails closed.
    worse = not comparison.improvement_high >= limit
    bound = describe_drop(
        comparison.metric,
        -comparison.improvement_high,
        comparison.champion,
        higher_is_better=comparison.higher_is_better,
    )
    return GuardResult(
        "metric",
        GUARD_BREACH if worse else GUARD_OK,
        comparison.improvement_high,
        limit,
        f"{comparison.describe()}; at best {bound} (upper bound of the improvement "
        f"{comparison.improvement_high:+.4f}), limit {drop.describe(comparison.champion)}: "
        f"{'beyond' if worse else 'within'} it",
    )


def _latency_guard(latency: dict[str, dict[str, float]], limit: float | None) -> GuardResult:
    if limit is None:
        return GuardResult("latency", GUARD_OFF, None, None, "not checked")
    if "champion" not in latency or "challenger" not in latency:
        return GuardResult(
            "latency", GUARD_PENDING, None, limit, "not measured (no complete row to time)"
        )
    champion = latency["champion"]["latency_ms_p50"]
    challenger = latency["challenger"]["latency_ms_p50"]
    ratio = challenger / max(champion, 1e-9)
    return GuardResult(
        "latency",
        GUARD_BREACH if ratio > limit else GUARD_OK,
        ratio,
        limit,
        f"median request {challenger:.3f} ms vs the champion's {champion:.3f} ms "
        f"({ratio:.2f}x, limit {limit:g}x)",
    )
