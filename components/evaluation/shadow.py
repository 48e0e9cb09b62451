"""Shadow evaluation: the challenger scores the champion's production rows, unseen by anyone.

Both models score the same batch with the batch-scoring engine
(:func:`~.scoring.score_files`): the champion into the served output, exactly what
``stemma run score`` writes there, the challenger into a folder beside it
(:func:`shadow_output_dir`, ``<served>-shadow``) that nothing serves. The two outputs are
joined by the entity id with the batch's segment columns and, when they have arrived, the
labels (:func:`~.rows.build_shadow_rows`); :func:`shadow_evaluate` then compares them and decides:

* ``reject``: the challenger fails on more rows than ``evaluate.shadow.max_error_rate``
  (not scored, NaN or infinite scores, or one constant score), or, with enough labels, the
  upper bound of its improvement over the champion is at or below the margin (at best
  equal);
* ``wait``: fewer labelled rows than ``evaluate.shadow.min_labelled_rows`` (by default
  20% of the batch's rows, 30 to 2,000), or an interval that still straddles the margin
  (more labelled rows will narrow it);
* ``promote``: the lower bound of the improvement (paired bootstrap on the same labelled
  rows, :func:`~.comparison.paired_bootstrap`) is above the margin.

The improvement is the metric difference in the metric's better direction (challenger
minus champion for ROC AUC, champion minus challenger for the log loss); a relative margin
(``1%``) is a share of the champion's value on the same rows. Segments
(``evaluate.shadow.segments``) are compared too and reported, but only the overall
comparison decides. :func:`promote_challenger` moves the aliases with
:func:`~.promotion.promote` (compare-and-set against the champion that was shadowed).

A multiclass model is compared on its probability of each class and the labels' class
codes (:func:`~.rows.scores_of`); two models agree on a row when they predict the same
class. Rows whose label is no class of the models are counted (``unknown_labels``, and a
reason), never compared.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stemma.components.errors import RegistryError
from stemma.components.evaluation.comparison import (
    FailureCounts,
    MetricComparison,
    as_dict,
    bootstrap_settings,
    comparison_metrics,
    count_failures,
    decision_agreement,
    paired_bootstrap,
    plot_metric_differences,
    plot_score_scatter,
    score_distances,
)
from stemma.components.evaluation.rows import (
    CHALLENGER_SCORE,
    CHALLENGER_SCORED,
    CHAMPION_SCORE,
    CHAMPION_SCORED,
    scores_of,
)
from stemma.components.platform.decisions import Decided, build_decision_record
from stemma.components.platform.lineage import (
    Edge,
    LineageRecord,
    Node,
    decision_node_id,
    evaluation_node_id,
    input_node_id,
    model_version_node,
    predictions_node_id,
    run_node,
)
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.engine import score_files
from stemma.components.scoring.job import ScoringResult
from stemma.components.scoring.output import default_output_dir
from stemma.components.spec import METRIC_DIRECTIONS, EvaluateSpec, ShadowSpec
from stemma.components.spec.limits import percent_of

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stemma.components.registry.promotion import PromotionRecord

PROMOTE = "promote"
REJECT = "reject"
WAIT = "wait"
#: Suffix of the folder beside the served output that holds the challenger's scores.
SHADOW_SUFFIX = "-shadow"
#: Most values of one segment column compared (the most frequent ones).
MAX_SEGMENT_VALUES = 20
#: Fewest labelled rows for which a segment gets an interval of its own.
MIN_SEGMENT_ROWS = 30

_METRIC_KEY = re.compile(r"[^A-Za-z0-9_.-]+")


# ---------------------------------------------------------------------------------------
# Where the scores go


def shadow_output_dir(served: Path) -> Path:
    """The folder beside the served output that holds the challenger's scores."""
    served = Path(served)
    return served.with_name(served.name + SHADOW_SUFFIX)


def default_served_output(score_output: Path, score_input: Path, batch: Path) -> Path:
    """Where the champion's scores of ``batch`` go when no output is named: where
    ``stemma run score --input <batch>`` writes them (:func:`~.output.default_output_dir`),
    so shadowing one day never replaces the scores of the whole input."""
    return default_output_dir(score_output, score_input, batch)


@dataclass(frozen=True)
class ScoredPair:
    """Both models' scoring of one batch."""

    files: list[Path]
    served: ScoringResult
    shadow: ScoringResult


def score_pair(
    champion: ScoringModel,
    challenger: ScoringModel,
    files: Sequence[Path],
    served_dir: Path,
    **scoring: Any,
) -> ScoredPair:
    """Score the batch with the champion into ``served_dir`` and the challenger beside it.

    Both calls are :func:`~.scoring.score_files` with the keyword arguments ``scoring``
    (``id_column``, ``chunk_rows``, ``invalid_rows``, ``unknown_categories``, ``threads``),
    so both outputs are atomic and resumable, and a served folder already complete for
    this champion and batch is left untouched.

    Raises:
        RegistryError: the challenger is the champion.
        DataError: as :func:`~.scoring.score_files`.
    """
    if champion.model_uri == challenger.model_uri:
        raise RegistryError(
            f"the challenger is the champion ({champion.label}): nothing to compare",
            ["name another version with --challenger models:/<name>/<version>"],
        )
    files = [Path(path) for path in files]
    served = score_files(champion, files, Path(served_dir), progress=False, **scoring)
    shadow = score_files(
        challenger, files, shadow_output_dir(served_dir), progress=False, **scoring
    )
    return ScoredPair(files=files, served=served, shadow=shadow)


# ---------------------------------------------------------------------------------------
# Comparing and deciding


@dataclass(frozen=True)
class SegmentComparison:
    """The metric comparison on the rows of one segment value."""

    column: str
    value: str
    rows: int
    comparison: MetricComparison | None
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.column}={self.value}"

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


@dataclass(frozen=True)
class ShadowReport:
    """What a shadow evaluation found and decided.

    Attributes:
        decision: ``promote``, ``reject`` or ``wait``.
        reasons: why, in words and numbers, the deciding reason first.
        metric: the primary metric (``gate.metric``).
        champion_version, challenger_version: the versions compared.
        rows: rows in the batch.
        compared_rows: rows both models scored with a finite score.
        labelled_rows: compared rows with a label.
        champion_failures, challenger_failures: rows each model failed on (the
            challenger's among the rows the champion served).
        agreement: share of compared rows with the same decision.
        distances: ``psi``, ``ks``, ``ks_pvalue``, ``js`` of the challenger's scores
            against the champion's.
        comparison: the paired bootstrap overall, None without labelled rows.
        segments: per segment value.
        latency: per model, ``p50``/``p95``/``p99`` chunk latency (ms) and rows per second.
        settings: the settings that decided.
        skipped: rows left out of the comparison, by why (judging from the endpoint's log:
            scores of another version than the challenger, say).
        unknown_labels: rows whose label is no class of the models (a classifier's
            production label outside its classes and label map): counted, not compared.
    """

    decision: str
    reasons: list[str]
    metric: str
    champion_version: str
    challenger_version: str
    rows: int
    compared_rows: int
    labelled_rows: int
    champion_failures: FailureCounts
    challenger_failures: FailureCounts
    agreement: float
    distances: dict[str, float]
    comparison: MetricComparison | None
    segments: list[SegmentComparison] = field(default_factory=list)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    unknown_labels: int = 0

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow (one ``log_batch``)."""
        values: dict[str, float] = {
            "rows": self.rows,
            "compared_rows": self.compared_rows,
            "labelled_rows": self.labelled_rows,
            "unknown_labels": self.unknown_labels,
            "agreement": self.agreement,
            "champion_error_rate": self.champion_failures.error_rate,
            "challenger_error_rate": self.challenger_failures.error_rate,
            **{f"score_{name}": value for name, value in self.distances.items()},
            "decision_promote": float(self.decision == PROMOTE),
        }
        for model, numbers in self.latency.items():
            values.update({f"{model}_{key}": value for key, value in numbers.items()})
        values.update({f"skipped_{why}": count for why, count in self.skipped.items()})
        values.update(comparison_metrics(self.metric, self.comparison))
        for segment in self.segments:
            prefix = _METRIC_KEY.sub("_", f"segment.{segment.column}.{segment.value}")
            values[f"{prefix}.rows"] = segment.rows
            values.update(comparison_metrics("metric", segment.comparison, prefix=prefix))
        return {key: float(value) for key, value in values.items()}

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-able data (what the run's ``shadow/report.json`` holds)."""
        return as_dict(self)


def shadow_evaluate(
    rows: pd.DataFrame,
    *,
    task: str,
    metric: str,
    settings: EvaluateSpec,
    champion: ScoringModel,
    challenger: ScoringModel,
    latency: dict[str, dict[str, float]] | None = None,
) -> ShadowReport:
    """Compare the two models on the rows of :func:`~.rows.build_shadow_rows` and decide.

    Args:
        rows: from :func:`~.rows.build_shadow_rows`.
        task, metric: the task and the primary metric (``gate.metric``).
        settings: ``evaluate`` (confidence, resamples, seed, the ``shadow`` rule).
        champion, challenger: the models, for their versions and thresholds.
        latency: per model, request latency percentiles (:func:`~.rows.measure_latency`).

    Raises:
        ValueError: a metric unknown for the task.
    """
    if metric not in METRIC_DIRECTIONS.get(task, {}):
        raise ValueError(f"{metric!r} is not a {task} metric")
    rule = settings.shadow
    scored = scores_of(rows, champion, challenger)
    a, b = scored.champion_row, scored.challenger_row
    champion_failures, challenger_failures, compared = _failures(rows, a, b)
    labelled = compared & scored.known

    thresholds = {
        "champion_threshold": float(champion.threshold),
        "challenger_threshold": float(challenger.threshold),
    }
    options = {**thresholds, **bootstrap_settings(settings)}

    def compare(mask: np.ndarray) -> MetricComparison:
        return paired_bootstrap(metric, task, *scored.at(mask), **options)

    comparison = compare(labelled) if labelled.any() else None
    segments = [
        segment
        for column in rule.segments
        if column in rows.columns
        for segment in _segment_comparisons(rows, column, labelled, compare)
    ]
    needed = rule.labelled_rows_needed(len(rows))
    margin = None if comparison is None else rule.margin.limit(comparison.champion)
    decision, reasons = _decide(
        rule,
        challenger_failures,
        (int(compared.sum()), int(labelled.sum()), needed),
        comparison,
        metric,
    )
    return ShadowReport(
        decision=decision,
        reasons=reasons + _segment_notes(segments) + ([scored.note] if scored.note else []),
        metric=metric,
        champion_version=str(champion.version),
        challenger_version=str(challenger.version),
        rows=len(rows),
        compared_rows=int(compared.sum()),
        labelled_rows=int(labelled.sum()),
        champion_failures=champion_failures,
        challenger_failures=challenger_failures,
        agreement=decision_agreement(
            scored.champion[compared], scored.challenger[compared], task=task, **thresholds
        ),
        distances=score_distances(a[compared], b[compared], task=task),
        comparison=comparison,
        segments=segments,
        latency=dict(latency or {}),
        settings=_decided_settings(settings, needed, margin, metric),
        unknown_labels=int(scored.unknown.sum()),
    )


def _decided_settings(
    settings: EvaluateSpec, needed: int, margin: float | None, metric: str
) -> dict[str, Any]:
    """The shadow rule as decided: the minimum for this batch, the margin in the metric's
    units, and the bootstrap's settings."""
    return {
        **settings.shadow.model_dump(mode="json"),
        "min_labelled_rows": needed,
        "margin": margin if margin is None or np.isfinite(margin) else None,
        "margin_spec": settings.shadow.margin.to_spec(),
        **settings.model_dump(include={"confidence", "bootstrap_resamples", "seed"}),
        "metric": metric,
    }


def _failures(
    rows: pd.DataFrame, a: np.ndarray, b: np.ndarray
) -> tuple[FailureCounts, FailureCounts, np.ndarray]:
    """Each model's failures, and the rows both scored with a finite score."""
    a_scored = rows[CHAMPION_SCORED].to_numpy(dtype=bool)
    b_scored = rows[CHALLENGER_SCORED].to_numpy(dtype=bool)
    served = a_scored & np.isfinite(a)
    champion = count_failures(a[a_scored], rows=len(rows))
    # The challenger is judged on the rows the champion could serve: rows no model can
    # score (a missing feature, say) are the input's fault, not the challenger's.
    challenger = count_failures(b[served & b_scored], rows=int(served.sum()))
    return champion, challenger, served & b_scored & np.isfinite(b)


def _segment_comparisons(
    rows: pd.DataFrame, column: str, labelled: np.ndarray, compare: Any
) -> list[SegmentComparison]:
    values = rows.loc[labelled, column]
    counts = values.value_counts()
    out = []
    # The most frequent values, shown in their own order (elevel=0, 1, 2, ...).
    for value, count in sorted(counts.head(MAX_SEGMENT_VALUES).items(), key=_value_order):
        if count < MIN_SEGMENT_ROWS:
            comparison, note = None, f"fewer than {MIN_SEGMENT_ROWS} rows"
        else:
            comparison = compare(labelled & (rows[column] == value).to_numpy())
            note = "" if comparison.decidable else "the metric is undefined in too many resamples"
        out.append(SegmentComparison(column, str(value), int(count), comparison, note))
    if len(counts) > MAX_SEGMENT_VALUES:
        out.append(
            SegmentComparison(
                column,
                "(other)",
                int(counts.iloc[MAX_SEGMENT_VALUES:].sum()),
                None,
                f"only the {MAX_SEGMENT_VALUES} most frequent values are compared",
            )
        )
    return out


def _value_order(item: tuple[Any, int]) -> tuple[int, Any]:
    value = item[0]
    return (0, value) if isinstance(value, int | float | np.number) else (1, str(value))


def _decide(
    rule: ShadowSpec,
    challenger_failures: FailureCounts,
    counts: tuple[int, int, int],
    comparison: MetricComparison | None,
    metric: str,
) -> tuple[str, list[str]]:
    """Reject, wait or promote. ``counts``: rows both models scored, those labelled, and
    the labelled rows the decision needs."""
    compared_rows, labelled_rows, needed = counts
    if challenger_failures.error_rate > rule.max_error_rate:
        return REJECT, [
            f"the challenger fails on {challenger_failures.describe()}, above "
            f"evaluate.shadow.max_error_rate {rule.max_error_rate:.2%}"
        ]
    if compared_rows == 0:
        return REJECT, ["no row was scored by both models"]
    if comparison is None or labelled_rows < needed:
        return WAIT, [
            f"{labelled_rows:,} labelled rows so far; the decision needs "
            f"evaluate.shadow.min_labelled_rows {needed:,}"
            + (" (20% of the batch, 30 to 2,000)" if rule.min_labelled_rows is None else "")
            + (f" ({comparison.describe()})" if comparison is not None else "")
        ]
    if not comparison.decidable:
        return WAIT, [
            f"{metric} is undefined in {comparison.resamples - comparison.defined} of "
            f"{comparison.resamples} resamples (too few rows of a class): wait for more labels"
        ]
    direction = "higher" if comparison.higher_is_better else "lower"
    margin = rule.margin.limit(comparison.champion)
    if not np.isfinite(margin):
        return WAIT, [f"the margin {rule.margin} of the champion's {metric} is not defined"]
    bounds = (
        f"improvement ({direction} is better) {comparison.improvement:+.4f} "
        f"({percent_of(comparison.improvement, comparison.champion, signed=True)} of the "
        "champion's), "
        f"{comparison.confidence:.0%} interval {comparison.improvement_low:+.4f} to "
        f"{comparison.improvement_high:+.4f}, margin {margin:+.4f}"
        + (f" ({rule.margin})" if rule.margin.relative else "")
    )
    if comparison.improvement_low > margin:
        return PROMOTE, [
            f"the challenger is better: {comparison.describe()}",
            f"{bounds}: the lower bound is above the margin",
        ]
    if comparison.improvement_high <= margin:
        return REJECT, [
            f"the challenger is not better: {comparison.describe()}",
            f"{bounds}: even the upper bound does not clear the margin",
        ]
    return WAIT, [
        f"not enough evidence yet: {comparison.describe()}",
        f"{bounds}: the interval straddles the margin; more labelled rows will narrow it",
    ]


def _segment_notes(segments: Sequence[SegmentComparison]) -> list[str]:
    return [
        f"segment {segment.label}: the challenger is worse ({comparison.difference:+.4f}, "
        f"interval {comparison.low:+.4f} to {comparison.high:+.4f}, {segment.rows:,} rows)"
        for segment in segments
        if (comparison := segment.comparison) is not None
        and comparison.decidable
        and comparison.improvement_high < 0
    ]


# ---------------------------------------------------------------------------------------
# Plots, lineage, promotion


def plot_shadow(rows: pd.DataFrame, report: ShadowReport, out_dir: Path) -> list[Path]:
    """``score_scatter.png`` and, with a comparison, ``metric_difference.png``."""
    out = Path(out_dir)
    compared = rows[CHAMPION_SCORE].notna() & rows[CHALLENGER_SCORE].notna()
    written = [
        plot_score_scatter(
            rows.loc[compared, CHAMPION_SCORE].to_numpy(),
            rows.loc[compared, CHALLENGER_SCORE].to_numpy(),
            out / "score_scatter.png",
            title=f"Scores: v{report.challenger_version} vs champion v{report.champion_version}",
            champion_label=f"champion v{report.champion_version}",
            challenger_label=f"challenger v{report.challenger_version}",
        )
    ]
    if report.comparison is not None:
        lines = [("overall", report.comparison)] + [
            (segment.label, segment.comparison)
            for segment in report.segments
            if segment.comparison is not None
        ]
        written.append(
            plot_metric_differences(
                lines,
                out / "metric_difference.png",
                margin=float(report.settings.get("margin") or 0.0),
                title=f"{report.metric}: v{report.challenger_version} - v{report.champion_version}",
            )
        )
    return written


@dataclass(frozen=True, kw_only=True)
class ShadowFacts:
    """What a shadow evaluation compared and decided, whatever it read: the models, the
    labels, the run and the decision (:class:`ShadowLineage`, ``live.LogShadowLineage``)."""

    pipeline: str
    model_name: str
    champion_version: str
    champion_weights: str
    challenger_version: str
    challenger_weights: str
    labels_path: str | None
    labels_digest: str | None
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    decision: str
    reasons: list[str]
    who: str = field(default_factory=getpass.getuser)
    when: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    promotion_run_id: str | None = None
    promotion_outcome: str | None = None


@dataclass(frozen=True, kw_only=True)
class ShadowLineage(ShadowFacts):
    """What one shadow evaluation read and wrote."""

    input_path: str
    input_digest: str
    input_files: dict[str, str]
    served_path: str
    served_sha256: str
    shadow_path: str
    shadow_sha256: str


def build_shadow_record(facts: ShadowLineage, report: ShadowReport) -> LineageRecord:
    """The lineage record of a shadow evaluation (``lineage/record.json``)."""
    batch = input_node_id(facts.input_path, facts.input_digest)
    served = predictions_node_id(facts.served_path, facts.served_sha256)
    shadow = predictions_node_id(facts.shadow_path, facts.shadow_sha256)
    inputs = [
        Node(
            "input",
            batch,
            f"md5:{facts.input_digest}",
            {"path": facts.input_path, "files": dict(facts.input_files)},
        )
    ]
    produced = [
        Node(
            "predictions",
            served,
            f"sha256:{facts.served_sha256}",
            {"path": facts.served_path, "served": True},
        ),
        Node(
            "predictions",
            shadow,
            f"sha256:{facts.shadow_sha256}",
            {"path": facts.shadow_path, "served": False},
        ),
    ]
    return shadow_record(facts, report, inputs=inputs, produced=produced)


def shadow_record(
    facts: ShadowFacts, report: ShadowReport, *, inputs: Sequence[Node], produced: Sequence[Node]
) -> LineageRecord:
    """A shadow evaluation's record from what it read (``inputs``: batches, log days) and
    wrote (``produced``: the scores both models wrote, compared in the evaluation)."""
    champion = model_version_node(
        facts.model_name, facts.champion_version, facts.champion_weights, "champion"
    )
    challenger = model_version_node(
        facts.model_name, facts.challenger_version, facts.challenger_weights, "challenger"
    )
    run = run_node(facts.run_id, facts.experiment_id, facts.flow_run_id)
    evaluation = evaluation_node_id("shadow-evaluation", facts.run_id)
    decision = decision_node_id(facts.run_id)
    nodes = [
        *inputs,
        champion,
        challenger,
        run,
        *produced,
        Node("shadow_evaluation", evaluation, None, _evaluation_attributes(report)),
        Node("decision", decision, None, _decision_attributes(facts)),
    ]
    edges = [
        *(Edge(node.id, run.id, "input_of") for node in inputs),
        Edge(champion.id, run.id, "scored_with"),
        Edge(challenger.id, run.id, "shadowed_with"),
        *(Edge(run.id, node.id, "produced") for node in produced),
        *(Edge(node.id, evaluation, "evaluated_on") for node in inputs),
        Edge(champion.id, evaluation, "champion_of"),
        Edge(challenger.id, evaluation, "challenger_of"),
        *(Edge(node.id, evaluation, "compared_in") for node in produced),
        Edge(run.id, evaluation, "produced"),
    ]
    decided = Decided(
        evaluation=evaluation,
        decision=decision,
        challenger=challenger.id,
        incumbent=champion.id,
        verdict=facts.decision,
        reasons=list(facts.reasons),
        who=facts.who,
        when=facts.when,
        labels_path=facts.labels_path,
        labels_digest=facts.labels_digest,
        action=PROMOTE if facts.promotion_run_id else None,
        action_outcome=facts.promotion_outcome,
        action_run_id=facts.promotion_run_id,
    )
    return build_decision_record(
        flow="shadow", pipeline=facts.pipeline, nodes=nodes, edges=edges, decided=decided
    )


def _evaluation_attributes(report: ShadowReport) -> dict[str, Any]:
    return {
        "metric": report.metric,
        "labelled_rows": report.labelled_rows,
        "agreement": report.agreement,
        "distances": dict(report.distances),
        "comparison": None if report.comparison is None else report.comparison.to_dict(),
    }


def _decision_attributes(facts: ShadowFacts) -> dict[str, Any]:
    return {
        "decision": facts.decision,
        "reasons": list(facts.reasons),
        "who": facts.who,
        "when": facts.when,
        "flow_run_id": facts.flow_run_id,
        "promotion_run_id": facts.promotion_run_id,
        "promotion_outcome": facts.promotion_outcome,
    }


def promote_challenger(
    client: MlflowClient,
    report: ShadowReport,
    *,
    model_name: str,
    run_id: str,
    flow_run_id: str | None,
    experiment_id: str | None,
) -> PromotionRecord:
    """Promote the challenger a shadow decided for, compare-and-set against its champion.

    Raises:
        ValueError: the report did not decide ``promote``.
        PromotionError: the champion moved since it was shadowed, or the challenger's gate
            did not pass; nothing was moved and the refusal is recorded.
    """
    from stemma.components.registry.promotion import promote

    if report.decision != PROMOTE:
        raise ValueError(f"the shadow decided {report.decision!r}, not {PROMOTE!r}")
    evidence: dict[str, Any] = {
        "flow": "shadow",
        "shadow_run_id": run_id,
        "metric": report.metric,
        "labelled_rows": report.labelled_rows,
        "agreement": report.agreement,
    }
    if (comparison := report.comparison) is not None:
        evidence.update(
            champion=comparison.champion,
            challenger=comparison.challenger,
            difference=comparison.difference,
            interval=[comparison.low, comparison.high],
            confidence=comparison.confidence,
        )
    return promote(
        client,
        model_name,
        report.challenger_version,
        expected_champion=report.champion_version,
        reason=f"shadow evaluation decided promote: {report.reasons[0]}",
        evidence=evidence,
        flow_run_id=flow_run_id,
        experiment_id=experiment_id,
    )
