"""The registration gate: does a new model earn an alias, and its entry in the registry.

:func:`decide_gate` is pure: it compares the candidate's test metric with the spec's bound
and with the current champion *scored on the same test rows* (:func:`champion_value_on`),
and fails closed whenever it cannot decide (a NaN metric, a champion that could not be
scored). :func:`register_and_gate` then registers the version with the decision in its
tags and description, and gives it an alias only when it passed: ``champion`` for the
first model of a name, ``challenger`` when a champion exists. Promoting a challenger is
the promote flow's job, not this module's. :func:`judge_candidate` and
:func:`registered_model_facts` are the training flow's gate without the flow: judge a
candidate against the champion, and read back what a version registered before an
interruption recorded.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from stemma.components.errors import RegistryError, SpecError, StemmaError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.refs import format_model_ref, logged_model_id
from stemma.components.registry.text import record_moves
from stemma.components.spec import METRIC_DIRECTIONS, GateSpec, Spec
from stemma.components.spec.limits import shown

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from stemma.components.platform.lineage import TrainingLineage

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
#: Registered-model tag: the version Stemma last made champion (a move outside Stemma, such
#: as the MLflow UI's alias pencil, leaves it behind; see ``promotion.moved_outside``).
CHAMPION_TAG = tag_names.PROMOTION_CHAMPION
#: Prefix of the version tags that record the gate's decision.
TAG_PREFIX = tag_names.GATE_PREFIX
#: The decision's fields a version carries as tags (what the registry text shows); the
#: whole decision is :data:`DECISION_ARTIFACT` of the training run.
VERSION_TAG_FIELDS = ("decision", "metric", "value")
#: The training run's artifact holding the whole decision, logged before the version is
#: created: a run resumed after a kill completes the version from it.
DECISION_ARTIFACT = "gate/decision.json"
#: How to gate past a champion that is not trusted.
_IGNORE_HINT = "set gate.untrusted_champion: ignore to gate as if there were no champion"
#: Longest error text quoted in a reason (reasons also go into the version's description).
MAX_REASON_CHARS = 300
#: Longest account of an untrusted champion in a reason: room to name its files.
MAX_UNTRUSTED_REASON_CHARS = 900


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why.

    Attributes:
        passed: the model cleared every bar.
        alias: ``champion`` (passed, no champion yet), ``challenger`` (passed, a champion
            exists) or None (failed).
        metric: the gate's metric.
        value: the candidate's value on the test split.
        threshold: the bound in the metric's better direction (``minimum`` when higher is
            better, ``maximum`` when lower is), or None when the spec sets none.
        minimum: the spec's lower bound, if any.
        maximum: the spec's upper bound, if any.
        champion_version: the version holding the ``champion`` alias, or None.
        champion_value: the champion's value on the same test rows, or None.
        margin: how much better than the champion the candidate had to be.
        reasons: one line per check, with the numbers.
        ignored_champion: the champion's version when it was not trusted and the spec's
            ``gate.untrusted_champion`` is ``ignore`` (the gate then ran as if there were
            no champion).
    """

    passed: bool
    alias: str | None
    metric: str
    value: float
    threshold: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    reasons: tuple[str, ...]
    minimum: float | None = None
    maximum: float | None = None
    ignored_champion: str | None = None

    @property
    def decided_against(self) -> str | None:
        """The champion the registry held when the decision was made (trusted or not)."""
        version = self.champion_version or self.ignored_champion
        return None if version is None else str(version)

    @classmethod
    def from_tags(
        cls, tags: Mapping[str, str], task: str, recorded: Mapping[str, Any] | None = None
    ) -> GateDecision | None:
        """The decision on a version, or None when it holds none (or not which alias it
        earned).

        Args:
            tags: the version's tags. Versions of older Stemma versions carry every field
                as a ``stemma.gate.*`` tag; newer ones :data:`VERSION_TAG_FIELDS`.
            task: ``binary``, ``multiclass`` or ``regression`` (the metric's direction).
            recorded: :meth:`record` as the training run logged it
                (:func:`recorded_decision`); the tags win where both hold a field.
        """
        fields: dict[str, Any] = dict(recorded or {})
        fields.update(
            (key.removeprefix(TAG_PREFIX), value)
            for key, value in tags.items()
            if key.startswith(TAG_PREFIX)
        )
        # a passed decision without its alias cannot say which alias it earned
        known = fields.get("decision") == "failed" or (
            fields.get("decision") == "passed" and "alias" in fields
        )
        if not known or not fields.get("metric"):
            return None

        def number(key: str) -> float | None:
            return None if fields.get(key) is None else float(fields[key])

        metric = str(fields["metric"])
        minimum, maximum = number("minimum"), number("maximum")
        higher_is_better = METRIC_DIRECTIONS.get(task, {}).get(metric, True)
        reasons = fields.get("reasons") or ()
        value = number("value")

        def text(key: str) -> str | None:
            return None if fields.get(key) is None else str(fields[key])

        return cls(
            passed=fields["decision"] == "passed",
            alias=text("alias"),
            metric=metric,
            value=math.nan if value is None else value,
            threshold=minimum if higher_is_better else maximum,
            champion_version=text("champion_version"),
            champion_value=number("champion_value"),
            margin=number("margin") or 0.0,
            reasons=tuple(reasons.split("; ") if isinstance(reasons, str) else reasons),
            minimum=minimum,
            maximum=maximum,
            ignored_champion=text("ignored_champion"),
        )

    def tags(self) -> dict[str, str]:
        """The verdict, metric and value as ``stemma.gate.*`` model version tags."""
        fields = self.record()
        return {TAG_PREFIX + key: str(fields[key]) for key in VERSION_TAG_FIELDS}

    def record(self) -> dict[str, Any]:
        """The decision as a lineage record's ``decision`` entry."""
        return {
            "decision": "passed" if self.passed else "failed",
            "alias": self.alias,
            "metric": self.metric,
            "value": self.value,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "champion_version": self.champion_version,
            "champion_value": self.champion_value,
            "margin": self.margin,
            "reasons": list(self.reasons),
            "ignored_champion": self.ignored_champion,
        }

    def summary(self) -> str:
        """A readable account of the decision, for the model version's description."""
        if self.passed:
            headline = f"Gate passed on {self.metric} = {shown(self.value)}: alias `{self.alias}`."
        else:
            headline = f"Gate failed on {self.metric} = {shown(self.value)}: no alias."
        return "\n".join([headline, "", *(f"- {reason}" for reason in self.reasons)])


def _is_missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def decide_gate(
    gate: GateSpec,
    task: str,
    value: float,
    champion_version: str | None,
    champion_value: float | None,
    *,
    champion_error: str | None = None,
    champion_untrusted: bool = False,
) -> GateDecision:
    """Decide whether a model passes the gate; every check is reported, passed or not.

    The candidate must lie within ``minimum``/``maximum`` and beat the champion's value on
    the same rows by ``margin_over_champion`` (``value >= champion + margin`` when higher
    is better, ``value <= champion - margin`` when lower is; a negative margin tolerates a
    slightly worse model). It fails closed: a non-finite value, or a champion whose value
    is missing, fails with a "cannot decide" reason. An untrusted champion (files differ
    from their digests, none recorded, foreign architecture) fails it too, unless
    ``gate.untrusted_champion`` is ``ignore``: then it gates as if there were none.

    Args:
        task: ``binary``, ``multiclass`` or ``regression`` (decides the metric's direction).
        value: the candidate's metric on the test split.
        champion_value: the champion's metric on the same rows (None: not evaluated).
        champion_error: why the champion could not be evaluated (or was not trusted,
            ``champion_untrusted``), shown in the reason.

    Raises:
        SpecError: the metric is not one of the task's metrics.
    """
    higher_is_better = higher_is_better_for(gate.metric, task)
    metric, margin = gate.metric, gate.margin_over_champion
    reasons: list[str] = []
    ignored = None
    if champion_version is not None and champion_untrusted:
        if gate.untrusted_champion == "ignore":
            ignored, champion_version, champion_value = str(champion_version), None, None
            why = f"(gate.untrusted_champion: ignore): {champion_error}"
            reasons.append(f"champion v{ignored} ignored {why}")
        else:
            champion_error = f"it is not trusted ({champion_error}); {_IGNORE_HINT}"

    passed, bound_reasons = _bound_checks(gate, value)
    reasons += bound_reasons
    if champion_version is not None:
        beats, reason = _champion_check(
            metric,
            higher_is_better,
            value,
            champion_version,
            champion_value,
            margin,
            champion_error,
        )
        passed &= beats
        if reason is not None:
            reasons.append(reason)
    elif ignored is None:
        reasons.append("no champion yet: nothing to compare with")

    alias = None
    if passed:
        alias = CHAMPION_ALIAS if champion_version is None else CHALLENGER_ALIAS
    return GateDecision(
        passed=passed,
        alias=alias,
        metric=metric,
        value=float(value) if value is not None else math.nan,
        threshold=gate.minimum if higher_is_better else gate.maximum,
        champion_version=champion_version,
        champion_value=champion_value,
        margin=margin,
        reasons=tuple(reasons),
        minimum=gate.minimum,
        maximum=gate.maximum,
        ignored_champion=ignored,
    )


def higher_is_better_for(metric: str, task: str) -> bool:
    """Whether a higher ``metric`` is better for ``task``; SpecError for a foreign metric."""
    directions = METRIC_DIRECTIONS.get(task, {})
    if metric not in directions:
        raise SpecError(
            f"gate.metric: {metric!r} is not a {task} metric; "
            f"choose one of {', '.join(directions) or '(unknown task)'}"
        )
    return directions[metric]


def _bound_checks(gate: GateSpec, value: float) -> tuple[bool, list[str]]:
    """Whether ``value`` lies within the spec's bounds, and a reason per bound."""
    metric = gate.metric
    if _is_missing(value):
        return False, [f"cannot decide: {metric} of the model is {value} on the test split"]
    passed, reasons = True, []
    if gate.minimum is not None:
        ok = value >= gate.minimum
        passed &= ok
        relation = ">=" if ok else "is below"
        reasons.append(f"{metric} {shown(value)} {relation} minimum {shown(gate.minimum)}")
    if gate.maximum is not None:
        ok = value <= gate.maximum
        passed &= ok
        relation = "<=" if ok else "is above"
        reasons.append(f"{metric} {shown(value)} {relation} maximum {shown(gate.maximum)}")
    return passed, reasons


def _champion_check(
    metric: str,
    higher_is_better: bool,
    value: float,
    champion_version: str,
    champion_value: float | None,
    margin: float,
    champion_error: str | None,
) -> tuple[bool, str | None]:
    """Whether the candidate beats the champion by the margin on the same rows, and why
    (no reason when the candidate's own value is missing: the bounds said so)."""
    if _is_missing(champion_value):
        why = f": {champion_error}" if champion_error else ""
        return False, (
            f"cannot decide: champion v{champion_version} could not be evaluated "
            f"on the same test rows{why}"
        )
    if _is_missing(value):
        return False, None
    assert champion_value is not None
    # Ties pass: with margin 0 a retrained model that matches the champion may
    # become the challenger; a positive margin demands a real improvement.
    if higher_is_better:
        ok = value >= champion_value + margin
        word, sign = "at least", "+"
    else:
        ok = value <= champion_value - margin
        word, sign = "at most", "-"
    return ok, (
        f"{metric} {shown(value)} is {'' if ok else 'not '}{word} champion "
        f"v{champion_version}'s {shown(champion_value)} {sign} margin {shown(margin)}"
    )


def registry_error(action: str, error: Exception) -> RegistryError:
    message = getattr(error, "message", None) or str(error)
    return RegistryError(f"MLflow model registry: {action}", [message])


def _does_not_exist(error: Exception) -> bool:
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def find_champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias, or None (no such model or no alias).

    Raises:
        RegistryError: the registry could not be read.
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        if _does_not_exist(error):
            return None
        raise registry_error(f"cannot read registered model {model_name!r}", error) from error
    # Reading the alias map avoids telling "no alias" apart by error code, which MLflow
    # reports as INVALID_PARAMETER_VALUE.
    version = (registered.aliases or {}).get(CHAMPION_ALIAS)
    if version is None:
        return None
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as error:
        raise registry_error(
            f"cannot read {model_name} v{version}, which holds the {CHAMPION_ALIAS} alias", error
        ) from error


class ChampionValue(NamedTuple):
    """The champion's gate metric on the candidate's rows, or why there is none."""

    value: float | None
    error: str | None
    untrusted: bool = False


def champion_value_on(
    model_uri: str,
    frame: pd.DataFrame,
    y_true: pd.Series | np.ndarray,
    *,
    task: str,
    metric: str,
    architectures: Collection[str] = (),
    client: MlflowClient | None = None,
) -> ChampionValue:
    """Score a registered model on the candidate's test rows and compute the gate metric.

    Loading and scoring the champion here, rather than reading the metric it logged when
    it was trained, compares both models on the same rows. The champion is loaded by
    Stemma's own loader (``runtime.loading.load_scoring_model``: every file checked against its
    recorded digests, nothing unpickled or executed) and scored as its pyfunc model
    would: preprocess, network, decode.

    Args:
        model_uri: the champion, e.g. ``models:/credit/3``.
        frame: the test rows with raw feature columns (not modified).
        y_true: their labels as the data holds them (classes are mapped by the champion's
            own preprocessor, so a champion with other class codes is judged fairly).
        task: ``binary``, ``multiclass`` or ``regression``.
        metric: the gate metric.
        architectures: the architectures the caller's spec allows besides the built-ins.
        client: the MLflow client (default: one on the configured registry).

    Returns:
        ``(value, None, False)``, or ``(None, reason, untrusted)`` when the model could not
        be loaded or scored or the metric is not finite (``untrusted``: it was refused
        because its files or architecture are not what Stemma recorded); pass the reason
        and the flag to :func:`decide_gate` so the gate fails closed and says why.
    """
    from stemma.components.runtime.loading import UntrustedModelError, load_scoring_model
    from stemma.components.training.metrics import evaluate_scores

    try:
        model = load_scoring_model(model_uri, client=client, architectures=architectures)
    except UntrustedModelError as error:
        return ChampionValue(None, f"cannot load {model_uri}: {_brief_stemma(error)}", True)
    except Exception as error:  # any failure of an old model means "cannot compare"
        return ChampionValue(None, f"cannot load {model_uri}: {_brief(error)}")
    missing = [column for column, _ in model.signature_columns if column not in frame.columns]
    if missing:
        return ChampionValue(
            None, f"{model_uri} needs columns the test rows lack: {', '.join(map(str, missing))}"
        )
    mismatched = _mismatched_columns(frame, model.signature_columns)
    if mismatched:
        return ChampionValue(
            None, f"{model_uri} failed to score the test rows: {'; '.join(mismatched)}"
        )
    try:
        matrix = np.ascontiguousarray(model.preprocessor.transform(frame), dtype=np.float32)
        raw = model.runtime.run(matrix)
        scores = np.asarray(model.preprocessor.decode_output(raw), dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
    except Exception as error:
        return ChampionValue(None, f"{model_uri} failed to score the test rows: {_brief(error)}")
    truth, unknown = _champion_truth(
        model.preprocessor, pd.Series(np.asarray(y_true, dtype=object))
    )
    if unknown:
        return ChampionValue(
            None,
            f"{model_uri} predicts {', '.join(map(str, model.preprocessor.class_names()))}; "
            f"the test rows hold labels it does not know ({unknown})",
        )
    try:
        classes = model.preprocessor.class_names() or None
        value = evaluate_scores(task, truth, scores, classes=classes)[metric]
    except Exception as error:  # e.g. a metric the evaluator does not know
        return ChampionValue(None, f"cannot compute {metric} of {model_uri}: {_brief(error)}")
    if _is_missing(value):
        return ChampionValue(None, f"{metric} of {model_uri} is {value}")
    return ChampionValue(float(value), None)


def _champion_truth(preprocessor: Any, labels: pd.Series) -> tuple[np.ndarray, str]:
    """The labels as the champion's class codes (or values), and the labels it does not
    know, described ("" when none)."""
    if preprocessor.task == "regression":
        return labels.to_numpy(dtype=np.float64), ""
    codes = preprocessor.class_codes(labels)
    if (codes < 0).any():
        counts = labels[codes < 0].astype(str).value_counts()
        return codes, ", ".join(f"{label}: {count} rows" for label, count in counts.head(5).items())
    return codes.astype(np.float64), ""


def judge_candidate(
    client: MlflowClient,
    spec: Spec,
    value: float,
    test_frame: pd.DataFrame,
    architectures: Sequence[str],
) -> GateDecision:
    """The gate's decision on a candidate scoring ``value`` on the test split.

    The champion, if any, is scored on the same rows (``test_frame``) with the gate's
    metric; a champion that cannot be scored or is untrusted is reported in the decision.
    """
    model_name = spec.pipeline.registered_model_name
    champion = find_champion(client, model_name)
    scored = ChampionValue(None, None)
    if champion is not None:
        scored = champion_value_on(
            format_model_ref(model_name, version=champion.version),
            test_frame,
            test_frame[spec.data.target],
            task=spec.data.task,
            metric=spec.gate.metric,
            architectures=list(architectures),
            client=client,
        )
    return decide_gate(
        spec.gate,
        spec.data.task,
        value,
        str(champion.version) if champion is not None else None,
        scored.value,
        champion_error=scored.error,
        champion_untrusted=scored.untrusted,
    )


#: Signature types and the pandas check a column of that type must pass.
_SIGNATURE_KINDS = {
    "string": pd.api.types.is_string_dtype,
    "double": pd.api.types.is_numeric_dtype,
    "float": pd.api.types.is_numeric_dtype,
    "long": pd.api.types.is_numeric_dtype,
    "integer": pd.api.types.is_numeric_dtype,
    "boolean": pd.api.types.is_bool_dtype,
}


def _mismatched_columns(frame: pd.DataFrame, signature: list[tuple[str, str]]) -> list[str]:
    """Columns whose dtype cannot hold the signature's type (as pyfunc would refuse them)."""
    return [
        f"column {column}: the model takes {kind}, the rows hold {frame[column].dtype}"
        for column, kind in signature
        if (check := _SIGNATURE_KINDS.get(kind)) is not None and not check(frame[column].dtype)
    ]


def _brief_stemma(error: StemmaError) -> str:
    """A refusal's headline and the files it names on one line (digests left to the error)."""
    details = [line.split(" (recorded", 1)[0] for line in error.details]
    text = "; ".join([error.headline, *details])
    if len(text) > MAX_UNTRUSTED_REASON_CHARS:
        text = text[: MAX_UNTRUSTED_REASON_CHARS - 3] + "..."
    return text


def _brief(error: Exception) -> str:
    """One line about an error, short enough for a tag and a reason."""
    text = getattr(error, "message", None) or str(error)
    # MLflow's schema errors embed the whole input frame before "Error: <the cause>".
    _, marker, cause = text.rpartition("Error: ")
    text = " ".join((cause if marker else text).split())
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version``; for the champion, also record that Stemma put it there."""
    client.set_registered_model_alias(name, alias, version)
    if alias == CHAMPION_ALIAS:
        client.set_registered_model_tag(name, CHAMPION_TAG, version)


def register_and_gate(
    *,
    client: MlflowClient,
    model_name: str,
    model_uri: str,
    run_id: str,
    decision: GateDecision,
    tags: dict[str, str],
    description: str,
) -> ModelVersion:
    """Register a model version carrying the gate's decision; alias it only if it passed.

    The registered model is created when missing (with ``description``). The decision is
    logged to the training run ``run_id`` (:data:`DECISION_ARTIFACT`); then the version gets
    the lineage ``tags`` (:func:`version_tags`), the logged model's manifest and hashes
    (``model.artifact.integrity_tags``) and :meth:`GateDecision.tags` in the one request
    that creates it, and the decision's summary as its description. ``model_uri`` is the
    logged model (``models:/m-...``). A decision made against another champion is stale.

    Returns:
        The new version, read back (with its aliases).

    Raises:
        RegistryError: the champion changed since the decision, or MLflow refused a step.
    """
    from mlflow.exceptions import MlflowException

    from stemma.components.model.artifact import integrity_tags

    current = find_champion(client, model_name)
    current_version = str(current.version) if current is not None else None
    decided_against = decision.decided_against
    if current_version != decided_against:
        raise RegistryError(
            f"{model_name}: the {CHAMPION_ALIAS} changed while the gate was deciding "
            f"(decided against {decided_against or 'none'}, now {current_version or 'none'})",
            [
                "nothing was registered; run the training flow again to gate against the new champion"
            ],
        )

    try:
        client.create_registered_model(model_name, description=description)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise registry_error(f"cannot create registered model {model_name!r}", error) from error

    try:
        client.log_dict(run_id, decision.record(), DECISION_ARTIFACT)
        recorded = integrity_tags(client, logged_model_id(model_uri))
        version = client.create_model_version(
            name=model_name,
            source=model_uri,
            run_id=run_id,
            tags={**tags, **recorded, **decision.tags()},
            description=decision.summary(),
            model_id=logged_model_id(model_uri),
        )
    except MlflowException as error:
        raise registry_error(f"cannot register {model_uri} as {model_name!r}", error) from error

    number = str(version.version)
    events = {number: f"registered from run {run_id}; {decision.summary().splitlines()[0]}"}
    if decision.passed and decision.alias is not None:
        holder = (client.get_registered_model(model_name).aliases or {}).get(decision.alias)
        try:
            set_alias(client, model_name, decision.alias, number)
        except MlflowException as error:
            raise registry_error(
                f"registered {model_name} v{version.version} but could not set alias "
                f"{decision.alias!r}",
                error,
            ) from error
        if holder is not None and str(holder) != number:
            events[str(holder)] = f"the {decision.alias} alias moved to v{number}"
    try:
        record_moves(client, model_name, events)
        return client.get_model_version(model_name, number)
    except MlflowException as error:
        raise registry_error(f"cannot read back {model_name} v{version.version}", error) from error


def find_run_version(client: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    """The version of ``model_name`` already registered from training run ``run_id``, if any.

    A training run registers at most one version; a run resumed after a kill finds the
    one it registered here and completes it (:func:`complete_registration`) instead of
    registering another.

    Raises:
        RegistryError: the registry could not be searched.
    """
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"run_id = '{run_id}'")
    except MlflowException as error:
        raise registry_error(f"cannot search the versions of run {run_id}", error) from error
    mine = sorted(
        (version for version in found if version.name == model_name), key=lambda v: int(v.version)
    )
    return mine[0] if mine else None


def complete_registration(
    *, client: MlflowClient, version: ModelVersion, task: str, tags: dict[str, str]
) -> tuple[ModelVersion, GateDecision]:
    """Finish a version an interrupted training run registered: tags and the gate's alias.

    The decision is the one recorded when the version was created (its tags, and the
    training run's :data:`DECISION_ARTIFACT` logged just before), so the gate is not run
    again against a champion that may now be this very version. The alias is set only when the decision passed, is not set yet, and the
    registry still holds the champion the decision was made against.

    Args:
        client: an MLflow client on the registry.
        version: from :func:`find_run_version`.
        task: ``binary``, ``multiclass`` or ``regression``.
        tags: lineage tags to set where the version lacks them.

    Returns:
        The version read back, and its decision.

    Raises:
        RegistryError: it records no decision, the champion changed since, or MLflow
            refused a step.
    """
    from mlflow.exceptions import MlflowException

    name, number = version.name, str(version.version)
    existing = dict(version.tags or {})
    decision = GateDecision.from_tags(existing, task, recorded_decision(client, version.run_id))
    if decision is None:
        raise RegistryError(
            f"{name} v{number} was registered by this training run but records no gate decision",
            ["delete the version and run the training flow again"],
        )
    try:
        for key, value in tags.items():
            if existing.get(key) != value:
                client.set_model_version_tag(name, number, key, value)
        aliases = dict(client.get_registered_model(name).aliases or {})
        alias = decision.alias
        if decision.passed and alias is not None and str(aliases.get(alias)) != number:
            current = aliases.get(CHAMPION_ALIAS)
            current = None if current is None else str(current)
            if current != decision.decided_against:
                raise RegistryError(
                    f"{name} v{number}: the {CHAMPION_ALIAS} changed since its gate decided "
                    f"(decided against {decision.decided_against or 'none'}, now {current or 'none'})",
                    ["the version stays registered without an alias; run the training flow again"],
                )
            set_alias(client, name, alias, number)
            record_moves(client, name, {number: f"alias {alias} set as its gate decided"})
        return client.get_model_version(name, number), decision
    except MlflowException as error:
        raise registry_error(
            f"cannot complete the registration of {name} v{number}", error
        ) from error


def version_tags(facts: TrainingLineage) -> dict[str, str]:
    """The lineage tags of a trained version: its data version and weights hash.

    Its run is the version's ``run_id``; the data file, checks and commit are in that
    run's lineage record (``tags.VERSION_TAGS`` lists everything a version carries).
    """
    found = {tag_names.DATA_MD5: facts.data_md5, tag_names.WEIGHTS_SHA256: facts.weights_sha256}
    return {key: value for key, value in found.items() if value}


def recorded_decision(client: MlflowClient, run_id: str | None) -> dict[str, Any]:
    """The decision a training run logged (:data:`DECISION_ARTIFACT`), or {} without one
    (a run of an older Stemma version, or one gone from the store)."""
    import json

    from stemma.components.platform.tracking import read_run_artifact

    if not run_id:
        return {}
    try:
        found = json.loads(read_run_artifact(client, run_id, DECISION_ARTIFACT) or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def registered_model_facts(
    client: MlflowClient, existing: ModelVersion, profile_file: str
) -> tuple[str, str, dict[str, str]]:
    """Weights hash, reference-profile hash and artifact digests of a registered version.

    A resumed run that had registered its version before it was interrupted takes these
    from the registry instead of logging the model again. ``profile_file`` is the profile's
    artifact path in the run.
    """
    from stemma.components.model.artifact import decode_manifest
    from stemma.components.runtime.loading import logged_model_id as version_model_id

    model_id = version_model_id(existing)
    logged: dict[str, Any] = client.get_logged_model(model_id).tags if model_id else {}
    recorded = {**logged, **(existing.tags or {})}
    manifest = decode_manifest(recorded.get(tag_names.MODEL_FILES)) or {}
    artifacts = {
        f"model/{Path(path).name}": digest
        for path, digest in manifest.items()
        if path.startswith("artifacts/")
    }
    profile_sha256 = recorded.get(tag_names.PROFILE_SHA256, "")
    if profile_sha256:
        artifacts[profile_file] = profile_sha256
    weights = recorded.get(tag_names.WEIGHTS_SHA256) or recorded.get(
        tag_names.LOGGED_MODEL_WEIGHTS_SHA256, ""
    )
    return weights, profile_sha256, artifacts
