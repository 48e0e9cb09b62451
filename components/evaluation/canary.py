"""Canary release: a growing share of entities is served by the challenger, one step per batch.

Routing. An entity is served by the challenger when the stable hash bucket of its id
(:func:`~.comparison.route_buckets`, salted per canary) is below the step's fraction, so the
same entity stays in the same arm while the fraction holds and stays with the challenger
when the fraction grows. For each batch, the *control* model (the champion when the canary
started) scores every row and the *canary* model (the challenger) scores the rows of its
arm, both with the batch-scoring engine; the served predictions (``predictions.parquet``)
hold one row per entity with the arm, the version that served it and whether the champion
stood in for a challenger that failed on the row (``fallback``).

Guards, per step (:func:`evaluate_step`): the challenger's error rate on its arm (rows not
scored, NaN/inf, constant output), the drift of its scores against the control arm (PSI;
against the control's scores of the same rows when the control arm is too small), the
metric difference against the champion on the same labelled rows once labels arrive
(paired bootstrap), and optionally the time per row. Any breach rolls back; too few rows
holds the step; otherwise the canary advances.

The state machine (:func:`plan_transition`), one transition per batch::

    canary, step i (fraction < 1) --advance--> step i + 1
    canary, step at 1.0           --advance--> promote() --> bake (or completed without bake)
    bake, batch k                 --advance--> bake k + 1 --> completed after bake_batches
    canary (any step)             --breach---> retire_challenger(): rolled_back
    bake                          --breach---> rollback(): the previous champion is back
    any                           --hold-----> same step; more than max_holds in a row ends it

Every alias move goes through :mod:`.promotion` (compare-and-set ``promote``, ``rollback``,
``retire_challenger``), and each is idempotent on resume: a promotion already made, a
rollback already done or an alias already gone is recognised, not repeated.

State. The canary's state is a JSON tag on the registered model (:data:`STATE_TAG`), written
once per batch after the batch's alias move, so each nightly run continues the step
sequence. A batch's decision is written to its folder (``_STEP.json``) before any alias
moves: a run killed at any point, started again, re-reads that decision instead of
re-deciding on data that may have changed (labels that arrived meanwhile), finishes the
alias move if it had not happened, and then records the step once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stemma.components.errors import DataError, RegistryError
from stemma.components.evaluation.comparison import (
    FailureCounts,
    MetricComparison,
    count_failures,
    paired_bootstrap,
    route_to_challenger,
    score_distances,
)
from stemma.components.evaluation.shadow import (
    LABEL,
    measure_latency,
    read_batch_columns,
    read_scores,
)
from stemma.components.lineage.records import (
    Decided,
    Edge,
    Node,
    build_decision_record,
    decision_node_id,
    evaluation_node_id,
    input_node_id,
    model_version_node,
    run_node,
)
from stemma.components.registry.gate import CHAMPION_ALIAS
from stemma.components.scoring.engine import (
    PREDICTION_COLUMN,
    SCORE_COLUMN,
    ScoringModel,
    ScoringResult,
    input_digest,
    score_files,
)
from stemma.components.spec import EvaluateSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stemma.components.registry.promotion import PromotionRecord

#: The alias the champion's predecessor keeps (see :mod:`.promotion`).
PREVIOUS_CHAMPION_ALIAS = "previous-champion"
#: Registered-model tag holding the canary's state as JSON.
STATE_TAG = "stemma.canary.state"
STATE_FORMAT = 1
#: Phases and statuses of a canary.
PHASE_CANARY = "canary"
PHASE_BAKE = "bake"
RUNNING = "running"
COMPLETED = "completed"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
TERMINAL = (COMPLETED, ROLLED_BACK, ABORTED)
#: What a step decides.
ADVANCE = "advance"
HOLD = "hold"
ROLLBACK = "rollback"
#: Alias moves a transition makes.
ACTION_NONE = "none"
ACTION_PROMOTE = "promote"
ACTION_ROLLBACK = "rollback"
ACTION_RETIRE = "retire"
#: Guard outcomes.
GUARD_OK = "ok"
GUARD_BREACH = "breach"
GUARD_HOLD = "hold"
GUARD_PENDING = "pending"
GUARD_OFF = "off"
#: Arms, as the served predictions name them.
ARM_CHALLENGER = "challenger"
ARM_CHAMPION = "champion"
#: Columns of the served predictions besides the id, prediction and score.
ARM_COLUMN = "arm"
VERSION_COLUMN = "model_version"
FALLBACK_COLUMN = "fallback"
#: Files of a step folder.
STEP_FILE = "_STEP.json"
PREDICTIONS_FILE = "predictions.parquet"
ARM_INPUT = "arm/challenger.parquet"
CONTROL_DIR = "control"
CHALLENGER_DIR = "challenger"
#: Suffix of the default canary output folder, beside ``score.output``.
CANARY_SUFFIX = "-canary"
#: Version of the step decision file; part of its key.
STEP_FORMAT = 1
#: Run tag that identifies a step's MLflow run, so a resumed step reuses it.
STEP_KEY_TAG = "stemma.canary.step_key"


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class StepEntry:
    """One batch the canary processed."""

    batch: str
    digest: str
    phase: str
    step: int
    fraction: float
    decision: str
    action: str
    outcome: str
    run_id: str | None
    when: str


@dataclass(frozen=True)
class CanaryState:
    """Where a canary stands; persisted as the registered-model tag :data:`STATE_TAG`.

    Attributes:
        model: the registered model.
        challenger: the version under canary.
        control: the champion when the canary started (the rollback target).
        salt: mixed into the routing hash; fixed for the canary's life.
        steps: the fractions, ending at 1.0.
        bake_batches: batches watched after the promotion.
        max_holds: holds in a row that end the canary.
        phase: ``canary`` or ``bake``.
        step: index of the current fraction (``canary`` phase).
        holds: holds in a row at the current step.
        baked: batches watched since the promotion.
        status: ``running``, ``completed``, ``rolled_back`` or ``aborted``.
        cause: why it ended (terminal statuses).
        revision: bumped on every write; a writer checks it has not moved.
        history: the batches processed, in order.
    """

    model: str
    challenger: str
    control: str
    salt: str
    steps: tuple[float, ...]
    bake_batches: int
    max_holds: int
    phase: str = PHASE_CANARY
    step: int = 0
    holds: int = 0
    baked: int = 0
    status: str = RUNNING
    cause: str = ""
    started: str = field(default_factory=utc_now)
    updated: str = field(default_factory=utc_now)
    revision: int = 0
    history: tuple[StepEntry, ...] = ()

    @property
    def fraction(self) -> float:
        """The share of entities the challenger serves now."""
        return 1.0 if self.phase == PHASE_BAKE else float(self.steps[self.step])

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def processed(self, digest: str) -> StepEntry | None:
        """The entry of a batch already processed, by its content digest."""
        return next((entry for entry in self.history if entry.digest == digest), None)

    def describe(self) -> str:
        """``credit v5 (control v4): step 2 of 4 at 25%, running``."""
        where = (
            f"step {self.step + 1} of {len(self.steps)} at {self.fraction:.0%}"
            if self.phase == PHASE_CANARY
            else f"bake {self.baked} of {self.bake_batches} at 100%"
        )
        tail = f" ({self.cause})" if self.cause else ""
        return (
            f"{self.model} v{self.challenger} (control v{self.control}): {where}, "
            f"{self.status}{tail}"
        )

    def to_json(self) -> str:
        return json.dumps({"format": STATE_FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CanaryState:
        document = json.loads(text)
        if document.pop("format", None) != STATE_FORMAT:
            raise ValueError("unknown canary state format")
        document["steps"] = tuple(document["steps"])
        document["history"] = tuple(StepEntry(**entry) for entry in document["history"])
        return cls(**document)


def read_state(client: MlflowClient, model_name: str) -> CanaryState | None:
    """The canary state recorded on the registered model, or None.

    Raises:
        RegistryError: the model cannot be read, or its state tag is not readable.
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        raise RegistryError(
            f"cannot read registered model {model_name!r}", [_message(error)]
        ) from error
    text = (registered.tags or {}).get(STATE_TAG)
    if not text:
        return None
    try:
        return CanaryState.from_json(text)
    except (ValueError, TypeError, KeyError) as error:
        raise RegistryError(
            f"{model_name}: the canary state (tag {STATE_TAG}) is unreadable",
            [str(error), "delete the tag to start over: it was written by another version"],
        ) from error


def write_state(client: MlflowClient, state: CanaryState) -> CanaryState:
    """Record ``state`` as the next revision, if nobody else wrote since it was read.

    Raises:
        RegistryError: the recorded revision is not the one ``state`` was derived from
            (two canary runs of one model at once); nothing is written.
    """
    current = read_state(client, state.model)
    recorded = current.revision if current is not None else 0
    if recorded != state.revision:
        raise RegistryError(
            f"{state.model}: the canary state changed while this run worked "
            f"(revision {recorded}, expected {state.revision})",
            ["another canary run of this model is under way; run one at a time"],
        )
    written = replace(state, revision=state.revision + 1, updated=utc_now())
    client.set_registered_model_tag(state.model, STATE_TAG, written.to_json())
    return written


def start_state(
    model_name: str,
    challenger: str,
    control: str,
    settings: EvaluateSpec,
    *,
    revision: int = 0,
) -> CanaryState:
    """A new canary of ``challenger`` against ``control`` at the first step."""
    canary = settings.canary
    return CanaryState(
        model=model_name,
        challenger=str(challenger),
        control=str(control),
        salt=f"{model_name}/v{challenger}",
        steps=tuple(float(step) for step in canary.steps),
        bake_batches=canary.bake_batches,
        max_holds=canary.max_holds,
        revision=revision,
    )


# ---------------------------------------------------------------------------------------
# Scoring a step


def step_folder(root: Path, state: CanaryState, batch: Path) -> Path:
    """Where the canary keeps one batch's scores: ``<root>/v<challenger>/<batch stem>``."""
    return Path(root) / f"v{state.challenger}" / Path(batch).stem


@dataclass(frozen=True)
class StepScores:
    """One batch scored by both arms.

    Attributes:
        batch: the batch file.
        digest: its md5.
        folder: the step folder.
        fraction: the challenger's share.
        rows: one row per batch row: id, arm (``challenger``/``champion``), both models'
            scores (NaN where not scored) and whether each scored the row.
        control: the control model's scoring of the whole batch.
        challenger: the challenger's scoring of its arm (None when the arm is empty).
        predictions: the served predictions file.
        predictions_sha256: its sha256.
    """

    batch: Path
    digest: str
    folder: Path
    fraction: float
    rows: pd.DataFrame
    control: ScoringResult
    challenger: ScoringResult | None
    predictions: Path
    predictions_sha256: str


def score_step(
    control: ScoringModel,
    challenger: ScoringModel,
    batch: Path,
    folder: Path,
    *,
    fraction: float,
    salt: str,
    id_column: str,
    chunk_rows: int,
    invalid_rows: str = "reject",
    unknown_categories: str = "reject",
    threads: int | None = None,
) -> StepScores:
    """Route a batch, score each arm, and write the served predictions.

    The control scores every row (its arm, and the reference the guards compare the
    challenger with); the challenger scores the rows routed to it, read from a file of
    those rows (``arm/challenger.parquet``). Every output is written atomically and, as
    the scoring is, resumes where a killed run stopped.

    Raises:
        DataError: the batch repeats ids, or as :func:`~.scoring.score_files`.
    """
    batch = Path(batch)
    folder = Path(folder)
    digest, _ = input_digest([batch])

    def score(model: ScoringModel, files: list[Path], output: Path) -> ScoringResult:
        return score_files(
            model,
            files,
            output,
            id_column=id_column,
            chunk_rows=chunk_rows,
            invalid_rows=invalid_rows,
            unknown_categories=unknown_categories,
            threads=threads,
            progress=False,
        )

    ids = read_batch_columns([batch], [id_column])[id_column]
    repeated = ids[ids.duplicated()]
    if not repeated.empty:
        raise DataError(
            f"{batch}: {repeated.nunique()} ids repeat in {id_column}",
            ["the canary routes entities by id: ids must be unique within a batch"],
        )
    routed = route_to_challenger(ids.to_numpy(), fraction, salt)
    control_result = score(control, [batch], folder / CONTROL_DIR)
    challenger_result = None
    if routed.any():
        arm_file = _write_arm_input(batch, folder / ARM_INPUT, id_column, ids[routed])
        challenger_result = score(challenger, [arm_file], folder / CHALLENGER_DIR)

    rows = pd.DataFrame({id_column: ids.to_numpy(), ARM_COLUMN: ARM_CHAMPION})
    rows.loc[routed, ARM_COLUMN] = ARM_CHALLENGER
    for result, score_name, scored_name in (
        (control_result, "champion_score", "champion_scored"),
        (challenger_result, "challenger_score", "challenger_scored"),
    ):
        if result is None:
            rows[scored_name] = False
            rows[score_name] = np.nan
            continue
        mapped = read_scores(result, id_column).set_index(id_column)[SCORE_COLUMN]
        rows[scored_name] = rows[id_column].isin(mapped.index)
        rows[score_name] = rows[id_column].map(mapped).astype(np.float64)
    predictions = folder / PREDICTIONS_FILE
    sha256 = _write_predictions(predictions, rows, id_column, control, challenger)
    return StepScores(
        batch=batch,
        digest=digest,
        folder=folder,
        fraction=fraction,
        rows=rows,
        control=control_result,
        challenger=challenger_result,
        predictions=predictions,
        predictions_sha256=sha256,
    )


def _write_arm_input(batch: Path, path: Path, id_column: str, ids: pd.Series) -> Path:
    """The batch rows routed to the challenger, as a Parquet file (rewritten only if changed)."""
    if batch.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(batch)
    else:
        table = pq.read_table(batch)
    import pyarrow.compute as pc

    chosen = table.filter(pc.is_in(table.column(id_column), value_set=pa.array(ids.to_numpy())))
    return _write_table_if_changed(path, chosen)


def _write_table_if_changed(path: Path, table: pa.Table) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    if path.is_file() and path.read_bytes() == data:
        return path  # the same rows: the scoring of the arm stays valid and resumes
    _write_bytes(path, data)
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_predictions(
    path: Path,
    rows: pd.DataFrame,
    id_column: str,
    control: ScoringModel,
    challenger: ScoringModel,
) -> str:
    """One served prediction per row: the challenger's on its arm unless it failed there."""
    by_challenger = (
        (rows[ARM_COLUMN] == ARM_CHALLENGER)
        & rows["challenger_scored"]
        & np.isfinite(rows["challenger_score"])
    )
    by_control = ~by_challenger & rows["champion_scored"]
    served = by_challenger | by_control
    score = np.where(by_challenger, rows["challenger_score"], rows["champion_score"])[served]
    threshold = np.where(by_challenger, challenger.threshold, control.threshold)[served]
    columns: dict[str, Any] = {
        id_column: pa.array(rows.loc[served, id_column].to_numpy()),
    }
    if control.task == "binary":
        columns[PREDICTION_COLUMN] = pa.array((score >= threshold).astype(np.int64))
    columns[SCORE_COLUMN] = pa.array(score.astype(np.float64))
    columns[ARM_COLUMN] = pa.array(rows.loc[served, ARM_COLUMN].to_numpy(), pa.string())
    columns[VERSION_COLUMN] = pa.array(
        np.where(by_challenger, challenger.version, control.version)[served], pa.string()
    )
    columns[FALLBACK_COLUMN] = pa.array(
        ((rows[ARM_COLUMN] == ARM_CHALLENGER) & ~by_challenger)[served].to_numpy()
    )
    table = pa.table(columns).replace_schema_metadata(
        {
            "stemma.control_model_uri": control.model_uri,
            "stemma.challenger_model_uri": challenger.model_uri,
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    _write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# Guards


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
            :func:`~.shadow.measure_latency`.
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

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow."""
        values: dict[str, float] = {
            "rows": self.rows,
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
            values.update(
                {
                    "labelled_rows": self.comparison.rows,
                    "metric_champion": self.comparison.champion,
                    "metric_challenger": self.comparison.challenger,
                    "metric_difference": self.comparison.difference,
                    "metric_difference_low": self.comparison.low,
                    "metric_difference_high": self.comparison.high,
                }
            )
        return {key: float(value) for key, value in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "guards": [asdict(guard) for guard in self.guards],
            "rows": self.rows,
            "arm_rows": self.arm_rows,
            "fallback_rows": self.fallback_rows,
            "failures": self.failures.to_dict(),
            "distances": dict(self.distances),
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "latency": {model: dict(numbers) for model, numbers in self.latency.items()},
        }


def join_labels(rows: pd.DataFrame, labels: pd.DataFrame | None, id_column: str) -> pd.DataFrame:
    """``rows`` with a ``label`` column (NaN where no label has arrived)."""
    out = rows.copy()
    out[LABEL] = np.nan
    if labels is not None and not labels.empty:
        out[LABEL] = out[id_column].map(labels.set_index(id_column)[LABEL]).astype(np.float64)
    return out


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
        scores: from :func:`score_step`.
        labels: from :func:`~.shadow.load_labels`, or None.
        id_column: the entity id.
        task, metric: the task and ``gate.metric``.
        settings: ``evaluate`` (the guards, confidence, resamples, seed).
        control, challenger: the two models (thresholds).
        promoting: advancing from this step promotes the challenger; with
            ``guards.require_labels`` it then holds until the metric guard could count.
    """
    guards = settings.canary.guards
    rows = join_labels(scores.rows, labels, id_column)
    arm = (rows[ARM_COLUMN] == ARM_CHALLENGER).to_numpy()
    a = rows["champion_score"].to_numpy(dtype=np.float64)
    b = rows["challenger_score"].to_numpy(dtype=np.float64)
    a_ok = rows["champion_scored"].to_numpy(dtype=bool) & np.isfinite(a)
    b_scored = rows["challenger_scored"].to_numpy(dtype=bool)
    # The challenger answers for the rows of its arm the champion could score: a row no
    # model can score is the input's fault.
    judged = arm & a_ok
    failures = count_failures(b[judged & b_scored], rows=int(judged.sum()))
    both = judged & b_scored & np.isfinite(b)
    results: list[GuardResult] = []

    results.append(
        GuardResult(
            "error_rate",
            GUARD_BREACH if failures.error_rate > guards.max_error_rate else GUARD_OK,
            failures.error_rate,
            guards.max_error_rate,
            f"the challenger fails on {failures.describe()}",
        )
    )
    if int(arm.sum()) < guards.min_rows:
        results.append(
            GuardResult(
                "rows",
                GUARD_HOLD,
                float(arm.sum()),
                float(guards.min_rows),
                f"{int(arm.sum()):,} rows in the challenger's arm, fewer than "
                f"guards.min_rows {guards.min_rows:,}",
            )
        )
    labelled = both & rows[LABEL].notna().to_numpy()
    comparison = None
    if labelled.sum() >= guards.min_labelled_rows:
        comparison = paired_bootstrap(
            metric,
            task,
            rows[LABEL].to_numpy(dtype=np.float64)[labelled],
            a[labelled],
            b[labelled],
            champion_threshold=control.threshold,
            challenger_threshold=challenger.threshold,
            confidence=settings.confidence,
            resamples=settings.bootstrap_resamples,
            seed=settings.seed,
        )
    metric_guard = _metric_guard(comparison, int(labelled.sum()), guards, promoting)
    control_arm = ~arm & a_ok
    if control_arm.sum() >= guards.min_rows:
        reference, against = a[control_arm], "the control arm"
    else:
        reference, against = a[both], "the champion's scores of the same rows"
    distances = score_distances(reference, b[both], task=task)
    results.append(_drift_guard(distances["psi"], int(both.sum()), against, guards, metric_guard))
    results.append(metric_guard)
    latency = measure_latency({"champion": control, "challenger": challenger}, [scores.batch])
    results.append(_latency_guard(latency, guards.max_latency_ratio))

    breaches = [guard for guard in results if guard.status == GUARD_BREACH]
    holds = [guard for guard in results if guard.status == GUARD_HOLD]
    if breaches:
        decision, reasons = ROLLBACK, [f"{g.name}: {g.detail}" for g in breaches]
    elif holds:
        decision, reasons = HOLD, [f"{g.name}: {g.detail}" for g in holds]
    else:
        decision = ADVANCE
        reasons = [f"{g.name}: {g.detail}" for g in results if g.status == GUARD_OK]
        reasons += [f"{g.name}: {g.detail}" for g in results if g.status == GUARD_PENDING]
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
    )


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
    detail = f"PSI of the challenger's scores against {against}: {psi:.4f}"
    if psi <= guards.max_score_psi:
        return GuardResult("score_drift", GUARD_OK, psi, guards.max_score_psi, detail)
    if metric_guard.status == GUARD_OK:
        return GuardResult(
            "score_drift",
            GUARD_OK,
            psi,
            guards.max_score_psi,
            f"{detail}, above max_score_psi {guards.max_score_psi:g} but the labels show the "
            "challenger is not worse (metric guard)",
        )
    return GuardResult(
        "score_drift",
        GUARD_BREACH,
        psi,
        guards.max_score_psi,
        f"{detail}, above max_score_psi {guards.max_score_psi:g} with no labels to vouch for "
        "the challenger",
    )


def _metric_guard(
    comparison: MetricComparison | None, labelled: int, guards: Any, promoting: bool
) -> GuardResult:
    if comparison is None or not comparison.decidable:
        why = (
            f"{labelled:,} labelled rows in the challenger's arm, fewer than "
            f"guards.min_labelled_rows {guards.min_labelled_rows:,}"
            if comparison is None
            else "the metric is undefined in too many resamples"
        )
        if promoting and guards.require_labels:
            return GuardResult(
                "metric", GUARD_HOLD, None, None, f"{why}; the promotion waits for labels"
            )
        return GuardResult("metric", GUARD_PENDING, None, None, why)
    limit = -guards.max_metric_drop
    worse = comparison.improvement_high < limit
    return GuardResult(
        "metric",
        GUARD_BREACH if worse else GUARD_OK,
        comparison.improvement_high,
        limit,
        f"{comparison.describe()}; improvement upper bound {comparison.improvement_high:+.4f} "
        f"{'below' if worse else 'not below'} -max_metric_drop {limit:+.4f}",
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


# ---------------------------------------------------------------------------------------
# Transitions


@dataclass(frozen=True)
class Transition:
    """What a step's decision does to the canary."""

    action: str
    state: CanaryState
    cause: str = ""


def plan_transition(state: CanaryState, decision: str, reasons: Sequence[str]) -> Transition:
    """The alias move and the next state after a step decided ``decision``.

    The returned state is not yet written and carries no history entry for the step.
    """
    why = "; ".join(reasons)
    if state.phase == PHASE_CANARY:
        if decision == ROLLBACK:
            cause = f"breach at {state.fraction:.0%}: {why}"
            return Transition(ACTION_RETIRE, replace(state, status=ROLLED_BACK, cause=cause), cause)
        if decision == HOLD:
            if state.holds + 1 > state.max_holds:
                cause = f"held {state.holds + 1} batches at {state.fraction:.0%}: {why}"
                return Transition(
                    ACTION_RETIRE, replace(state, status=ROLLED_BACK, cause=cause), cause
                )
            return Transition(ACTION_NONE, replace(state, holds=state.holds + 1))
        if state.step + 1 < len(state.steps):
            return Transition(ACTION_NONE, replace(state, step=state.step + 1, holds=0))
        done = state.bake_batches == 0
        return Transition(
            ACTION_PROMOTE,
            replace(
                state,
                phase=PHASE_BAKE,
                holds=0,
                status=COMPLETED if done else RUNNING,
                cause="promoted at 100% with every guard green" if done else "",
            ),
        )
    if decision == ROLLBACK:
        cause = f"breach after the promotion: {why}"
        return Transition(ACTION_ROLLBACK, replace(state, status=ROLLED_BACK, cause=cause), cause)
    if decision == HOLD:
        if state.holds + 1 > state.max_holds:
            cause = f"bake ended after {state.holds + 1} batches without evidence; kept"
            return Transition(ACTION_NONE, replace(state, status=COMPLETED, cause=cause))
        return Transition(ACTION_NONE, replace(state, holds=state.holds + 1))
    baked = state.baked + 1
    if baked >= state.bake_batches:
        return Transition(
            ACTION_NONE,
            replace(
                state, baked=baked, holds=0, status=COMPLETED, cause="baked with every guard green"
            ),
        )
    return Transition(ACTION_NONE, replace(state, baked=baked, holds=0))


def model_aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """The registered model's aliases, alias -> version.

    Raises:
        RegistryError: the model cannot be read.
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        raise RegistryError(
            f"cannot read registered model {model_name!r}", [_message(error)]
        ) from error
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def check_aliases(client: MlflowClient, state: CanaryState) -> str | None:
    """Why the registry no longer matches the canary (someone moved the champion), or None."""
    champion = model_aliases(client, state.model).get(CHAMPION_ALIAS)
    expected = state.control if state.phase == PHASE_CANARY else state.challenger
    if champion == expected:
        return None
    role = "the control" if state.phase == PHASE_CANARY else "the promoted challenger"
    return (
        f"the champion is v{champion}, the canary expected v{expected} ({role}): "
        "it was moved outside the canary"
    )


@dataclass(frozen=True)
class AppliedAction:
    """The outcome of a transition's alias move."""

    action: str
    outcome: str
    record: PromotionRecord | None = None
    detail: str = ""


def apply_transition(
    client: MlflowClient,
    state: CanaryState,
    transition: Transition,
    *,
    evidence: dict[str, Any],
    flow_run_id: str | None,
    experiment_id: str | None,
) -> AppliedAction:
    """Make the transition's alias move through :mod:`.promotion`, once.

    A move already made (by a run killed before it recorded the step) is recognised and
    not repeated: the champion already is the challenger (promote), already is the control
    (rollback), or the challenger alias is already gone (retire).

    Returns:
        Outcome ``done``, ``already`` (found made), ``none`` (no move), or the
        promotion's ``lost_race``/``refused`` (the caller ends the canary as aborted).
    """
    from stemma.components.registry.promotion import (
        PromotionError,
        promote,
        retire_challenger,
        rollback,
    )

    action = transition.action
    if action == ACTION_NONE:
        return AppliedAction(action, "none")
    aliases = model_aliases(client, state.model)
    champion = aliases.get(CHAMPION_ALIAS)
    try:
        if action == ACTION_PROMOTE:
            if champion == state.challenger:
                return AppliedAction(action, "already", detail="the challenger is champion already")
            promoted = promote(
                client,
                state.model,
                state.challenger,
                expected_champion=state.control,
                reason=f"canary: every guard green at 100% for v{state.challenger}",
                evidence=evidence,
                flow_run_id=flow_run_id,
                experiment_id=experiment_id,
            )
            return AppliedAction(action, "done", promoted)
        if action == ACTION_ROLLBACK:
            if champion == state.control:
                return AppliedAction(
                    action, "already", detail=f"v{state.control} is champion already"
                )
            previous = aliases.get(PREVIOUS_CHAMPION_ALIAS)
            if champion != state.challenger or previous != state.control:
                return AppliedAction(
                    action,
                    "lost_race",
                    detail=f"the champion is v{champion} and the previous champion v{previous}, "
                    f"not v{state.challenger} and v{state.control}: nothing was moved",
                )
            rolled_back = rollback(
                client,
                state.model,
                reason=f"canary: {transition.cause}",
                evidence=evidence,
                flow_run_id=flow_run_id,
                experiment_id=experiment_id,
            )
            return AppliedAction(action, "done", rolled_back)
        retired = retire_challenger(
            client,
            state.model,
            state.challenger,
            reason=f"canary: {transition.cause}",
            evidence=evidence,
            flow_run_id=flow_run_id,
            experiment_id=experiment_id,
        )
        if retired is None:
            return AppliedAction(action, "already", detail="the challenger alias was gone already")
        return AppliedAction(action, "done", retired)
    except PromotionError as error:
        outcome = error.record.outcome if error.record is not None else "refused"
        return AppliedAction(action, outcome, error.record, error.headline)


def record_step(
    state: CanaryState,
    transition: Transition,
    applied: AppliedAction,
    *,
    batch: Path,
    digest: str,
    decision: str,
    run_id: str | None,
) -> CanaryState:
    """The state after a step: the transition's, with the step in the history.

    A promotion that was refused or lost ends the canary as ``aborted``.
    """
    entry = StepEntry(
        batch=Path(batch).name,
        digest=digest,
        phase=state.phase,
        step=state.step,
        fraction=state.fraction,
        decision=decision,
        action=applied.action,
        outcome=applied.outcome,
        run_id=run_id,
        when=utc_now(),
    )
    following = transition.state
    if applied.outcome not in ("done", "already", "none"):
        following = replace(
            state, status=ABORTED, cause=f"{applied.action} {applied.outcome}: {applied.detail}"
        )
    return replace(following, history=(*state.history, entry), revision=state.revision)


# ---------------------------------------------------------------------------------------
# The step record on disk


def step_key(state: CanaryState, digest: str) -> str:
    """What a step's decision depends on, hashed: the canary, its position and the batch."""
    document = {
        "format": STEP_FORMAT,
        "model": state.model,
        "challenger": state.challenger,
        "control": state.control,
        "salt": state.salt,
        "started": state.started,
        "phase": state.phase,
        "step": state.step,
        "holds": state.holds,
        "baked": state.baked,
        "fraction": state.fraction,
        "batch": digest,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def read_step_record(folder: Path, key: str) -> dict[str, Any] | None:
    """The decision a run took on this step already (maybe killed after it), or None."""
    path = Path(folder) / STEP_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) and document.get("key") == key else None


def write_step_record(folder: Path, document: dict[str, Any]) -> Path:
    """Write the step's decision atomically, before any alias moves."""
    path = Path(folder) / STEP_FILE
    _write_bytes(path, json.dumps(document, sort_keys=True, indent=2, default=str).encode())
    return path


def default_output_root(score_output: Path) -> Path:
    """``<score.output>-canary`` beside the scoring output."""
    score_output = Path(score_output)
    return score_output.with_name(score_output.name + CANARY_SUFFIX)


# ---------------------------------------------------------------------------------------
# Lineage


@dataclass(frozen=True)
class StepLineage:
    """What one canary step read, wrote and decided."""

    pipeline: str
    model_name: str
    control_version: str
    control_weights: str
    challenger_version: str
    challenger_weights: str
    batch_path: str
    batch_digest: str
    labels_path: str | None
    labels_digest: str | None
    predictions_path: str
    predictions_sha256: str
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    phase: str
    step: int
    fraction: float
    decision: str
    reasons: list[str]
    action: str
    outcome: str
    who: str
    when: str
    action_run_id: str | None = None


def build_step_record(facts: StepLineage) -> dict[str, Any]:
    """The lineage record of a canary step (``lineage/record.json``)."""
    batch = input_node_id(facts.batch_path, facts.batch_digest)
    control = model_version_node(
        facts.model_name, facts.control_version, facts.control_weights, "control"
    )
    challenger = model_version_node(
        facts.model_name, facts.challenger_version, facts.challenger_weights, "challenger"
    )
    run = run_node(facts.run_id, facts.experiment_id, facts.flow_run_id)
    predictions = f"predictions:{facts.predictions_path}@{facts.predictions_sha256}"
    step = evaluation_node_id("canary-step", facts.run_id)
    decision = decision_node_id(facts.run_id)
    nodes = [
        Node("input", batch, f"md5:{facts.batch_digest}", {"path": facts.batch_path}),
        control,
        challenger,
        run,
        Node(
            "predictions",
            predictions,
            f"sha256:{facts.predictions_sha256}",
            {"path": facts.predictions_path, "served": True},
        ),
        Node(
            "canary_step",
            step,
            None,
            {"phase": facts.phase, "step": facts.step, "fraction": facts.fraction},
        ),
        Node(
            "decision",
            decision,
            None,
            {
                "decision": facts.decision,
                "reasons": list(facts.reasons),
                "action": facts.action,
                "outcome": facts.outcome,
                "who": facts.who,
                "when": facts.when,
                "flow_run_id": facts.flow_run_id,
                "action_run_id": facts.action_run_id,
            },
        ),
    ]
    edges = [
        Edge(batch, run.id, "input_of"),
        Edge(control.id, run.id, "scored_with"),
        Edge(challenger.id, run.id, "scored_with"),
        Edge(run.id, predictions, "produced"),
        Edge(batch, step, "evaluated_on"),
        Edge(control.id, step, "control_of"),
        Edge(challenger.id, step, "challenger_of"),
        Edge(run.id, step, "produced"),
    ]
    decided = Decided(
        evaluation=step,
        decision=decision,
        challenger=challenger.id,
        incumbent=control.id,
        verdict=facts.decision,
        reasons=list(facts.reasons),
        who=facts.who,
        when=facts.when,
        labels_path=facts.labels_path,
        labels_digest=facts.labels_digest,
        action=facts.action,
        action_outcome=facts.outcome,
        action_run_id=facts.action_run_id,
    )
    return build_decision_record(
        flow="canary",
        pipeline=facts.pipeline,
        nodes=nodes,
        edges=edges,
        decided=decided,
        summary={"action": facts.action, "outcome": facts.outcome},
    )


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)
