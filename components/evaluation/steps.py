"""The shadow and canary flows' steps without the flows: settings and labels, the shadow
comparison, and the canary's challenger, state and step decision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from stemma.components.data import prediction_log
from stemma.components.data.labels import label_files, labels_are_classes
from stemma.components.errors import DataError, RegistryError, SpecError
from stemma.components.evaluation import canary, canary_guards, live, log_rows, rows, shadow
from stemma.components.platform.refs import format_model_ref, parse_model_ref
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.inputs import input_digest
from stemma.components.spec import EvaluateSpec, LoadedSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stemma.components.evaluation.canary_steps import StepScores

#: What ``--log`` without a folder stands for: the spec's ``endpoint.log.path``.
ENDPOINT_LOG = "endpoint.log.path"


def evaluate_settings(loaded: LoadedSpec) -> tuple[EvaluateSpec, str]:
    """The spec's ``evaluate`` section (defaults when absent) and the id column.

    Raises:
        SpecError: the spec names no ``data.id``: rows are joined by id.
    """
    spec = loaded.spec
    if spec.data.id is None:
        raise SpecError(
            f"{loaded.path}: shadow and canary evaluation join rows by id, and data.id is not set",
            ["set data.id to the entity id column (application_id in the worked example)"],
        )
    return spec.evaluate or EvaluateSpec(), spec.data.id


def labels_location(
    loaded: LoadedSpec, settings: EvaluateSpec, labels: str | None
) -> tuple[Path | None, bool]:
    """Where the labels are and whether they must exist (named explicitly) or may lag."""
    if labels:
        return loaded.resolve(labels), True
    if settings.labels:
        return loaded.resolve(settings.labels), False
    return None, False


def read_labels(
    loaded: LoadedSpec, path: Path | None, required: bool
) -> tuple[pd.DataFrame | None, str | None, str]:
    """The labels (None when none have arrived), their digest, and a note on them.

    Raises:
        DataError: labels named explicitly are missing or malformed; labels from the spec
            are malformed.
    """
    spec = loaded.spec
    if path is None:
        return None, None, "no labels configured (evaluate.labels or --labels)"
    if not path.exists() and not required:
        return None, None, f"no labels at {path} yet"
    labels = rows.load_labels(
        path,
        id_column=str(spec.data.id),
        target=spec.data.target,
        task=spec.data.task,
        classes=labels_are_classes(spec.data),
    )
    # label_files: also the days of the endpoint's logged labels (a folder per day)
    digest, _ = input_digest(label_files(path))
    return labels, digest, f"{len(labels):,} labels from {path}"


def compare_shadow(
    loaded: LoadedSpec,
    settings: EvaluateSpec,
    pair: shadow.ScoredPair,
    models: tuple[ScoringModel, ScoringModel],
    labels: pd.DataFrame | None,
    labels_required: bool,
    labels_source: str,
) -> tuple[pd.DataFrame, shadow.ShadowReport]:
    """Join both models' scores with the batch and the labels, time both, and decide."""
    spec = loaded.spec
    champion, challenger = models
    id_column = str(spec.data.id)
    segments = [column for column in settings.shadow.segments if column != id_column]
    classes = rows.compared_classes(champion, challenger)
    joined = rows.build_shadow_rows(
        rows.read_batch_columns(pair.files, [id_column, *segments]),
        rows.read_scores(pair.served, id_column, classes),
        rows.read_scores(pair.shadow, id_column, classes),
        id_column=id_column,
        labels=rows.encode_labels(labels, champion.preprocessor),
        labels_required=labels_required,
        labels_source=labels_source,
        classes=classes,
    )
    # Per-request latency of each model, and the batch scoring's own throughput when this
    # run scored (a folder already complete was not timed).
    latency = rows.measure_latency({"champion": champion, "challenger": challenger}, pair.files)
    for name, result in (("champion", pair.served), ("challenger", pair.shadow)):
        if not result.already_complete:
            latency.setdefault(name, {})["rows_per_second"] = result.rows_per_second
    report = shadow.shadow_evaluate(
        joined,
        task=spec.data.task,
        metric=spec.gate.metric,
        settings=settings,
        champion=champion,
        challenger=challenger,
        latency=latency,
    )
    return joined, report


def version_of(client: MlflowClient, reference: str) -> str:
    """The version a reference names (``models:/m/3`` or ``models:/m@alias``).

    Raises:
        RegistryError: the alias points nowhere.
    """
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_ref(reference)
    if version is not None:
        return version
    try:
        return str(client.get_model_version_by_alias(name, str(alias)).version)
    except MlflowException as error:
        aliases = canary.model_aliases(client, name)
        listing = ", ".join(f"{key} -> v{value}" for key, value in sorted(aliases.items()))
        raise RegistryError(
            f"model {name!r} has no alias {alias!r}: no challenger to canary",
            [
                f"its aliases: {listing or 'none'}",
                "register a challenger (stemma run train) or name one with --challenger",
            ],
        ) from error


def resolve_canary(
    client: MlflowClient, model_name: str, settings: EvaluateSpec, challenger: str | None
) -> tuple[canary.CanaryState, bool]:
    """The canary to continue, or a new one; and whether it was just started.

    Raises:
        RegistryError: a running canary is of another challenger than the one named; no
            challenger; no champion; the challenger is the champion.
    """
    state = canary.read_state(client, model_name)
    named = version_of(client, challenger) if challenger else None
    if state is not None and not state.ended:
        if named is not None and named != state.challenger:
            raise RegistryError(
                f"{model_name}: a canary of v{state.challenger} is under way "
                f"({state.describe()}); it cannot switch to v{named}",
                [
                    "let it finish, or roll it back: stemma rollback / remove the tag "
                    f"{canary.STATE_TAG}"
                ],
            )
        return state, False
    if named is None:
        waiting = canary.model_aliases(client, model_name).get("challenger")
        if waiting is None and state is not None:
            return state, False  # the last canary ended and no new challenger waits
        named = version_of(client, format_model_ref(model_name, alias="challenger"))
    if state is not None and state.challenger == named and not challenger:
        return state, False  # that canary ended; naming the challenger again restarts it
    control = canary.model_aliases(client, model_name).get(canary.CHAMPION_ALIAS)
    if control is None:
        raise RegistryError(
            f"{model_name} has no champion to compare the challenger with",
            ["promote one first: stemma promote models:/<name>/<version>"],
        )
    if control == named:
        raise RegistryError(
            f"the challenger is the champion ({model_name} v{named}): nothing to canary"
        )
    revision = state.revision if state is not None else 0
    fresh = canary.start_state(model_name, named, control, settings, revision=revision)
    return canary.write_state(client, fresh), True


def decide_canary_step(
    loaded: LoadedSpec,
    settings: EvaluateSpec,
    state: canary.CanaryState,
    scores: StepScores,
    labels: pd.DataFrame | None,
    models: tuple[ScoringModel, ScoringModel],
    key: str,
) -> dict[str, Any]:
    """The step's decision: the one already on disk for this step, else a new one (written)."""
    recorded = canary.read_step_record(scores.folder, key)
    if recorded is not None:
        return recorded
    spec = loaded.spec
    control, challenger = models
    evaluation = canary_guards.evaluate_step(
        scores,
        labels=rows.encode_labels(labels, control.preprocessor),
        id_column=str(spec.data.id),
        task=spec.data.task,
        metric=spec.gate.metric,
        settings=settings,
        control=control,
        challenger=challenger,
        promoting=state.phase == canary.PHASE_CANARY and state.step == len(state.steps) - 1,
    )
    document = {
        "key": key,
        "format": canary.STEP_FORMAT,
        "batch": scores.batch.name,
        "digest": scores.digest,
        "phase": state.phase,
        "step": state.step,
        "fraction": state.fraction,
        "control_version": control.version,
        "challenger_version": challenger.version,
        "decision": evaluation.decision,
        "reasons": evaluation.reasons,
        "metrics": evaluation.metrics(),
        "evaluation": evaluation.to_dict(),
        "predictions_sha256": scores.predictions_sha256,
        "decided_at": canary.utc_now(),
    }
    if scores.log:
        document["log"] = scores.log
        document["metrics"].update(
            skipped_rows=float(sum(scores.log["skipped"].values())),
            repeated_rows=float(scores.log["repeated"]),
        )
    canary.write_step_record(scores.folder, document)
    return document


def step_where(state: canary.CanaryState) -> str:
    """Where a step stands, for its run's name: ``step 2/4 25%`` or ``bake 1/3``."""
    if state.phase == canary.PHASE_CANARY:
        return f"step {state.step + 1}/{len(state.steps)} {state.fraction:.0%}"
    return f"bake {state.baked + 1}/{state.bake_batches}"


# ---------------------------------------------------------------------------------------
# Judging from the online endpoint's prediction log


def open_prediction_log(loaded: LoadedSpec, log: str) -> log_rows.LogFolder:
    """The log ``--log`` names: a folder or one day folder of it; :data:`ENDPOINT_LOG`
    stands for the spec's ``endpoint.log.path``.

    Raises:
        SpecError: :data:`ENDPOINT_LOG` and the spec has no ``endpoint.log``.
        DataError: as :func:`~.log_rows.open_log`.
    """
    if log == ENDPOINT_LOG:
        endpoint = loaded.spec.endpoint
        if endpoint is None or endpoint.log is None:
            raise SpecError(
                f"{loaded.path}: --log without a folder reads endpoint.log.path, and "
                "endpoint.log is not set",
                ["name the log folder: --log <folder>"],
            )
        log = endpoint.log.path
    return log_rows.open_log(log if log.startswith("s3://") else loaded.resolve(log))


def read_log_labels(
    loaded: LoadedSpec, log: log_rows.LogFolder, labels: str | None
) -> tuple[pd.DataFrame | None, str | None, Path | None, str]:
    """The labels a judgement from the log joins: those named (``--labels``), else those
    the endpoint received (``labels/``, every day); their digest, path and a note.

    Raises:
        DataError: labels named are missing or malformed; the log's are malformed.
    """
    if labels:
        path = loaded.resolve(labels)
        frame, digest, note = read_labels(loaded, path, True)
        return log_rows.ids_as_logged(frame, str(loaded.spec.data.id)), digest, path, note
    spec = loaded.spec
    frame, days = log_rows.read_log_labels(
        log,
        id_column=str(spec.data.id),
        target=spec.data.target,
        task=spec.data.task,
        classes=labels_are_classes(spec.data),
    )
    path = log.root / prediction_log.LABELS
    if frame is None:
        return None, None, None, f"no label in {path} yet (the endpoint's POST /v1/labels)"
    return frame, log_rows.days_digest(days), path, f"{len(frame):,} labels from {path}"


def compare_log_shadow(
    loaded: LoadedSpec,
    settings: EvaluateSpec,
    log: log_rows.LogFolder,
    models: tuple[ScoringModel, ScoringModel],
    labels: pd.DataFrame | None,
) -> tuple[pd.DataFrame, shadow.ShadowReport, list[log_rows.LogDay]]:
    """Pair the challenger's shadow scores with the champion's answers, and decide.

    Returns:
        The pairs (:func:`~.live.pair_shadow_rows`), the report, and the day folders read.

    Raises:
        DataError: the log holds no part, or no shadow score; a part lacks a column.
    """
    spec = loaded.spec
    champion, challenger = models
    id_column = str(spec.data.id)
    shadow_days = log_rows.stream_days(log, prediction_log.SHADOW)
    if not shadow_days:
        log_step_days(log)  # a log with no part at all says so first
        raise DataError(
            f"{log.describe()}: the log holds no shadow score",
            ["live shadow is off: set endpoint.shadow, and the challenger scores a sample"],
        )
    served_days = log_rows.stream_days(log, prediction_log.PREDICTIONS)
    segments = [column for column in settings.shadow.segments if column != id_column]
    inputs = sorted({*champion.feature_columns, *challenger.feature_columns})
    classes = rows.compared_classes(champion, challenger)
    probabilities = rows.class_probability_columns(classes)
    served = log_rows.read_log_rows(
        served_days,
        [id_column, *live.SERVED_COLUMNS, *probabilities],
        optional=[*segments, *inputs, prediction_log.LATENCY_COLUMN],
    )
    shadowed = log_rows.read_log_rows(shadow_days, [*live.SHADOW_COLUMNS, *probabilities])
    pairs = live.pair_shadow_rows(
        served,
        shadowed,
        id_column=id_column,
        champion_version=champion.version,
        challenger_version=challenger.version,
        labels=rows.encode_labels(labels, champion.preprocessor),
        segments=segments,
        classes=classes,
    )
    answered = served[
        served[prediction_log.MODEL_VERSION_COLUMN].astype(str) == str(champion.version)
    ]
    latency = rows.time_models({"champion": champion, "challenger": challenger}, answered)
    as_served = log_rows.served_latency(answered)
    if as_served:
        latency.setdefault("champion", {}).update(
            {f"served_{key}": value for key, value in as_served.items()}
        )
    report = shadow.shadow_evaluate(
        pairs.rows,
        task=spec.data.task,
        metric=spec.gate.metric,
        settings=settings,
        champion=champion,
        challenger=challenger,
        latency=latency,
    )
    report = live.log_shadow_report(
        report,
        pairs,
        champion_version=champion.version,
        challenger_version=challenger.version,
    )
    return pairs.rows, report, [*served_days, *shadow_days]


def log_step_days(log: log_rows.LogFolder) -> list[log_rows.LogDay]:
    """The days of the log's ``predictions/`` (or the one day named), oldest first.

    Raises:
        DataError: none holds a finished part.
    """
    days = log_rows.stream_days(log, prediction_log.PREDICTIONS)
    if not days:
        raise DataError(
            f"{log.describe()}: the prediction log holds no finished part",
            [f"parts are read from {log.root}/predictions/YYYY-MM-DD/part-*.parquet"],
        )
    return days


def log_canary_days(
    days: list[log_rows.LogDay], state: canary.CanaryState, columns: list[str]
) -> tuple[list[log_rows.LogDay], list[str], list[str]]:
    """The days a canary judges, one step each: those over (UTC) since the day it started,
    checked to hold ``columns``; and the days before it started, and those still written.

    Raises:
        DataError: a part of a day to judge lacks one of ``columns``.
    """
    started = state.started[:10]
    before = [day.day for day in days if day.day < started]
    over, still_written = log_rows.complete_days([day for day in days if day.day >= started])
    log_rows.check_columns(over, columns)
    return over, before, [day.day for day in still_written]
