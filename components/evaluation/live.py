"""Shadow and canary judged from the online endpoint's prediction log.

The endpoint did the serving (:mod:`.log_rows` reads what it logged), so the evidence is
the log rather than a batch both models score here:

* **Shadow** (:func:`pair_shadow_rows`): each row of ``shadow/`` (the challenger's score of
  a request it shadowed) is paired with the champion's row of ``predictions/`` for the
  same request and row (``stemma_request_id``, ``stemma_row``); the labels join by id.
  Only scores of the current challenger, paired with answers of the current champion,
  count; the others are left out and counted in the report. The pairs then go through the
  batch shadow's comparison and decision (:func:`~.shadow.shadow_evaluate`).
* **Canary** (:func:`log_step_scores`): one day of ``predictions/`` is one step's batch.
  The rows the canary's challenger served (``stemma_variant`` ``canary``; after the
  promotion, every row it served) are its arm, the rows the control served as champion
  the control arm. The control re-scores the challenger's rows from their logged inputs,
  so the guards compare both models on the same rows, as in a batch step; the latency
  guard compares the time the endpoint took to answer each arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from stemma.components.data.prediction_log import (
    CANARY_VARIANT,
    CHAMPION_VARIANT,
    LATENCY_COLUMN,
    MODEL_VERSION_COLUMN,
    REQUEST_ID_COLUMN,
    ROW_COLUMN,
    SCORE_COLUMN,
    TIME_COLUMN,
    VARIANT_COLUMN,
)
from stemma.components.errors import DataError
from stemma.components.evaluation.canary_steps import (
    ARM_CHALLENGER,
    ARM_CHAMPION,
    ARM_COLUMN,
    CONTROL_DIR,
    VERSION_COLUMN,
    StepScores,
    write_table_if_changed,
)
from stemma.components.evaluation.log_rows import (
    LogDay,
    latest_per_id,
    read_log_rows,
    served_latency,
)
from stemma.components.evaluation.rows import (
    CHALLENGER_SCORE,
    CHALLENGER_SCORED,
    CHAMPION_SCORE,
    CHAMPION_SCORED,
    add_labels,
    class_probability_columns,
    compared_classes,
    probability_columns,
    read_scores,
)
from stemma.components.evaluation.shadow import WAIT, ShadowFacts, ShadowReport, shadow_record
from stemma.components.platform.lineage import LineageRecord, Node, input_node_id
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.engine import score_files

#: Why shadow rows are left out, as the report's ``skipped`` keys them.
OTHER_CHALLENGER = "other_challenger"
OTHER_CHAMPION = "other_champion"
UNPAIRED = "unpaired"
REPEATED = "repeated"
#: Identifies a logged row: the request and the row's place in it.
ROW_KEY = [REQUEST_ID_COLUMN, ROW_COLUMN]
#: Columns a shadow judgement reads from each folder besides the id.
SHADOW_COLUMNS = [*ROW_KEY, MODEL_VERSION_COLUMN, SCORE_COLUMN]
SERVED_COLUMNS = [*ROW_KEY, TIME_COLUMN, MODEL_VERSION_COLUMN, VARIANT_COLUMN, SCORE_COLUMN]
#: Columns a canary step reads from its day besides the id and the control's inputs.
STEP_COLUMNS = [*SERVED_COLUMNS, LATENCY_COLUMN]
#: Column keying the rows the control re-scores (ids may repeat or be missing).
ROW_POSITION = "stemma_log_row"
#: The control's input in a canary step folder judged from the log.
CONTROL_INPUT = "arm/control-input.parquet"


# ---------------------------------------------------------------------------------------
# Shadow


@dataclass(frozen=True)
class ShadowPairs:
    """The challenger's shadow scores paired with the champion's answers.

    Attributes:
        rows: one row per pair (the latest of an id): id, both scores, whether each model
            scored it, the segment columns and ``label``.
        skipped: shadow rows left out, by why (:data:`OTHER_CHALLENGER`, ...).
        other_versions: shadow rows of versions other than the challenger, by version.
    """

    rows: pd.DataFrame
    skipped: dict[str, int]
    other_versions: dict[str, int] = field(default_factory=dict)


def pair_shadow_rows(
    served: pd.DataFrame,
    shadowed: pd.DataFrame,
    *,
    id_column: str,
    champion_version: str,
    challenger_version: str,
    labels: pd.DataFrame | None,
    segments: list[str],
    classes: tuple[object, ...] | None = None,
) -> ShadowPairs:
    """Pair each shadow score of the challenger with the champion's answer to the same row.

    Args:
        served: rows of ``predictions/`` (:data:`SERVED_COLUMNS`, the id, the segments;
            multiclass: each class's probability).
        shadowed: rows of ``shadow/`` (:data:`SHADOW_COLUMNS`; multiclass: each class's
            probability).
        id_column: the entity id the labels join on.
        champion_version, challenger_version: the versions whose rows count.
        labels: from :func:`~.log_rows.read_log_labels` or :func:`~.rows.load_labels`,
            through :func:`~.rows.encode_labels`.
        segments: columns of ``served`` compared per value.
        classes: multiclass: the classes compared (:func:`~.rows.compared_classes`).
    """
    shadow_version = shadowed[MODEL_VERSION_COLUMN].astype(str)
    ours = shadow_version == str(challenger_version)
    other_versions = {
        str(version): int(count) for version, count in shadow_version[~ours].value_counts().items()
    }
    logged = class_probability_columns(classes)
    challenger = shadowed.loc[ours, [*ROW_KEY, SCORE_COLUMN, *logged]].rename(
        columns=_probability_names(logged, CHALLENGER_SCORE)
    )
    wanted = [*SERVED_COLUMNS, *logged, id_column, *[c for c in segments if c in served]]
    answers = (
        served[list(dict.fromkeys(wanted))]
        .drop_duplicates(ROW_KEY, keep="last")
        .rename(columns=_probability_names(logged, CHAMPION_SCORE, score=False))
    )
    joined = challenger.merge(answers, on=ROW_KEY, how="left", validate="many_to_one")
    unpaired = joined[MODEL_VERSION_COLUMN].isna()
    by_champion = (joined[MODEL_VERSION_COLUMN].astype(str) == str(champion_version)) & (
        joined[VARIANT_COLUMN] == CHAMPION_VARIANT
    )
    pairs, repeated = latest_per_id(joined[~unpaired & by_champion], id_column)
    rows = pairs.rename(columns={SCORE_COLUMN: CHAMPION_SCORE})
    for column in (CHAMPION_SCORE, CHALLENGER_SCORE):
        for name in [column, *probability_columns(column, len(logged))]:
            rows[name] = rows[name].astype(np.float64)
    rows[CHAMPION_SCORED] = True
    rows[CHALLENGER_SCORED] = True
    add_labels(rows, labels, id_column)
    skipped = {
        OTHER_CHALLENGER: int((~ours).sum()),
        OTHER_CHAMPION: int((~unpaired & ~by_champion).sum()),
        UNPAIRED: int(unpaired.sum()),
        REPEATED: repeated,
    }
    return ShadowPairs(rows, skipped, other_versions)


def _probability_names(
    logged: list[str], score_column: str, *, score: bool = True
) -> dict[str, str]:
    """Renames of the log's columns to a model's columns in the paired rows: its score
    (unless ``score`` is False) and each class's probability."""
    names = dict(zip(logged, probability_columns(score_column, len(logged)), strict=True))
    return {SCORE_COLUMN: score_column, **names} if score else names


def log_shadow_report(
    report: ShadowReport, pairs: ShadowPairs, *, champion_version: str, challenger_version: str
) -> ShadowReport:
    """The report of :func:`~.shadow.shadow_evaluate` on ``pairs``, saying what was left out.

    With no pair at all the decision is ``wait`` (the shadow has not scored a request of
    this champion yet), not ``reject``: the challenger failed at nothing.
    """
    notes = skipped_notes(pairs, champion_version, challenger_version)
    if pairs.rows.empty:
        return replace(
            report,
            decision=WAIT,
            reasons=[
                f"no shadow score of v{challenger_version} paired with an answer of champion "
                f"v{champion_version} in the log yet: live shadow (endpoint.shadow) scores a "
                "sample of the requests with the @challenger alias",
                *notes,
            ],
            skipped=dict(pairs.skipped),
        )
    return replace(report, reasons=[*report.reasons, *notes], skipped=dict(pairs.skipped))


def skipped_notes(pairs: ShadowPairs, champion_version: str, challenger_version: str) -> list[str]:
    """One line per reason shadow rows were left out."""
    skipped = pairs.skipped
    versions = ", ".join(
        f"v{version}: {count:,}" for version, count in sorted(pairs.other_versions.items())
    )
    wording = {
        OTHER_CHALLENGER: f"scored by another version than the challenger v{challenger_version} "
        f"({versions})",
        OTHER_CHAMPION: f"shadowing an answer of another version than champion v{champion_version}",
        UNPAIRED: "whose answer is not in the log read (another day, or not logged)",
        REPEATED: "of an id scored again later (the latest pair of an id counts)",
    }
    return [
        f"{skipped[key]:,} shadow rows not counted: {text}"
        for key, text in wording.items()
        if skipped.get(key)
    ]


@dataclass(frozen=True, kw_only=True)
class LogShadowLineage(ShadowFacts):
    """What a shadow evaluation judged from the endpoint's log read and decided.

    ``days``: each day folder read (``predictions/`` and ``shadow/``) as its path under
    the project, digest and the md5 of each part.
    """

    days: list[tuple[str, str, dict[str, str]]]


def build_log_shadow_record(facts: LogShadowLineage, report: ShadowReport) -> LineageRecord:
    """The lineage record of a shadow judged from the log: its day folders are the inputs."""
    inputs = [
        Node(
            "input",
            input_node_id(path, digest),
            f"md5:{digest}",
            {"path": path, "files": dict(files), "log": True},
        )
        for path, digest, files in facts.days
    ]
    return shadow_record(facts, report, inputs=inputs, produced=[])


# ---------------------------------------------------------------------------------------
# Canary


def log_step_scores(
    control: ScoringModel,
    day: LogDay,
    folder: Path,
    *,
    challenger_version: str,
    control_version: str,
    promoted: bool,
    id_column: str,
    **scoring: Any,
) -> StepScores:
    """One day of the log as a canary step's scores.

    The challenger's arm is what it served (variant ``canary``; once ``promoted``, any row
    it served, as champion); the control arm what the control served as champion. Other
    rows (another version's) are left out and counted. The control scores the challenger's
    rows from their logged inputs with :func:`~.scoring.score_files` (``scoring``:
    ``chunk_rows``, ``invalid_rows``, ...), into ``folder``, atomically and resumably.

    Raises:
        DataError: a part lacks a column the step needs, or the control's inputs while the
            challenger has rows to compare.
    """
    classes = compared_classes(control)
    logged_columns = class_probability_columns(classes)
    frame = read_log_rows(
        [day], [id_column, *STEP_COLUMNS, *logged_columns], optional=control.feature_columns
    )
    version = frame[MODEL_VERSION_COLUMN].astype(str)
    variant = frame[VARIANT_COLUMN].astype(str)
    arm = (version == str(challenger_version)) & ((variant == CANARY_VARIANT) | promoted)
    control_arm = ~arm & (version == str(control_version)) & (variant == CHAMPION_VARIANT)
    left_out = (variant + " v" + version)[~(arm | control_arm)].value_counts()
    kept, repeated = latest_per_id(frame[arm | control_arm].assign(_arm=arm), id_column)
    in_arm = kept.pop("_arm").to_numpy(dtype=bool)
    columns = [SCORE_COLUMN, *logged_columns]
    rescored = np.full((len(kept), len(columns)), np.nan)
    rescored[in_arm], result = _control_scores(
        control, kept[in_arm], day, folder, columns, **scoring
    )
    rows = pd.DataFrame(
        {
            id_column: kept[id_column].to_numpy(),
            ARM_COLUMN: np.where(in_arm, ARM_CHALLENGER, ARM_CHAMPION),
            VERSION_COLUMN: kept[MODEL_VERSION_COLUMN].astype(str).to_numpy(),
        }
    )
    _add_step_scores(rows, kept[columns].to_numpy(dtype=np.float64), rescored, in_arm)
    latency = {
        name: numbers
        for name, numbers in (
            ("champion", served_latency(kept[~in_arm])),
            ("challenger", served_latency(kept[in_arm])),
        )
        if numbers
    }
    return StepScores(
        batch=day.path,
        digest=day.digest,
        folder=Path(folder),
        rows=rows,
        control=result,
        challenger=None,
        predictions=None,
        predictions_sha256=None,
        latency=latency,
        log={
            "day": day.day,
            "parts": dict(day.files),
            "skipped": {str(key): int(count) for key, count in left_out.items()},
            "repeated": repeated,
        },
    )


def _add_step_scores(
    rows: pd.DataFrame, logged: np.ndarray, rescored: np.ndarray, in_arm: np.ndarray
) -> None:
    """Both models' scores of a day's rows: the challenger's as logged on its arm; the
    control's as logged on its own arm and as it scored the challenger's rows again. Each
    is ``(rows, 1 + classes)``: the score, then a multiclass model's probabilities."""
    rows[CHALLENGER_SCORED] = in_arm
    width = logged.shape[1] - 1
    for side, values in (
        (CHALLENGER_SCORE, np.where(in_arm[:, None], logged, np.nan)),
        (CHAMPION_SCORE, np.where(in_arm[:, None], rescored, logged)),
    ):
        for position, name in enumerate([side, *probability_columns(side, width)]):
            rows[name] = values[:, position]
    rows[CHAMPION_SCORED] = ~in_arm | ~np.isnan(rescored[:, 0])


def _control_scores(
    control: ScoringModel,
    arm: pd.DataFrame,
    day: LogDay,
    folder: Path,
    columns: list[str],
    **scoring: Any,
) -> tuple[np.ndarray, Any]:
    """The control's ``columns`` (its score, and each class's probability for a multiclass
    model) of each of the challenger's rows (NaN where it rejected one)."""
    if arm.empty:
        return np.full((0, len(columns)), np.nan), None
    features = list(control.feature_columns)
    missing = [column for column in features if column not in arm]
    if missing:
        raise DataError(
            f"{day.path}: the log lacks inputs of the control v{control.version}: "
            f"{', '.join(missing)}",
            [
                "the control scores the challenger's rows from their logged inputs, to "
                "compare both on the same rows",
                "every part of the day must hold the model's input columns",
            ],
        )
    keyed = arm[features].reset_index(drop=True)
    keyed.insert(0, ROW_POSITION, np.arange(len(keyed), dtype=np.int64))
    table = pa.Table.from_pandas(keyed, preserve_index=False)
    path = write_table_if_changed(Path(folder) / CONTROL_INPUT, table)
    options = {**scoring, "id_column": ROW_POSITION}
    result = score_files(control, [path], Path(folder) / CONTROL_DIR, progress=False, **options)
    classes = compared_classes(control)
    scored = read_scores(result, ROW_POSITION, classes).set_index(ROW_POSITION)[columns]
    positions = np.arange(len(keyed), dtype=np.int64)
    return scored.reindex(positions).to_numpy(dtype=np.float64), result
