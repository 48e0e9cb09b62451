"""The registration gate: does a new model earn an alias, and its entry in the registry.

:func:`decide_gate` is pure: it compares the candidate's test metric with the spec's bound
and with the current champion *scored on the same test rows* (:func:`champion_value_on`),
and fails closed whenever it cannot decide (a NaN metric, a champion that could not be
scored). :func:`register_and_gate` then registers the version with the decision in its
tags and description, and gives it an alias only when it passed: ``champion`` for the
first model of a name, ``challenger`` when a champion exists. Promoting a challenger is
the promote flow's job, not this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import RegistryError, SpecError
from .spec import METRIC_DIRECTIONS, GateSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
#: Prefix of the version tags that record the gate's decision.
TAG_PREFIX = "stemma.gate."
#: Decimals shown for metric values in reasons and descriptions.
SHOWN_DECIMALS = 4
#: Longest error text quoted in a reason (reasons also go into a version tag).
MAX_REASON_CHARS = 300


def _shown(value: float) -> str:
    return f"{value:.{SHOWN_DECIMALS}f}"


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

    def tags(self) -> dict[str, str]:
        """The decision as ``stemma.gate.*`` model version tags (absent fields are left out)."""
        fields: dict[str, Any] = {
            "decision": "passed" if self.passed else "failed",
            "alias": self.alias,
            "metric": self.metric,
            "value": self.value,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "champion_version": self.champion_version,
            "champion_value": self.champion_value,
            "margin": self.margin,
            "reasons": "; ".join(self.reasons),
        }
        return {TAG_PREFIX + key: str(value) for key, value in fields.items() if value is not None}

    def summary(self) -> str:
        """A readable account of the decision, for the model version's description."""
        if self.passed:
            headline = f"Gate passed on {self.metric} = {_shown(self.value)}: alias `{self.alias}`."
        else:
            headline = f"Gate failed on {self.metric} = {_shown(self.value)}: no alias."
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
) -> GateDecision:
    """Decide whether a model passes the gate; every check is reported, passed or not.

    The candidate must lie within the spec's ``minimum``/``maximum`` and, when a champion
    exists, be at least as good as the champion's value on the same rows plus
    ``margin_over_champion`` (``value >= champion + margin`` when higher is better,
    ``value <= champion - margin`` when lower is); a negative margin tolerates a slightly
    worse model. It fails closed: a non-finite value, or a champion whose value is
    missing, fails with a "cannot decide" reason.

    Args:
        gate: the spec's gate section.
        task: ``binary`` or ``regression`` (decides the metric's direction).
        value: the candidate's metric on the test split.
        champion_version: the version holding the ``champion`` alias, or None.
        champion_value: the champion's metric on the same rows (None: not evaluated).
        champion_error: why the champion could not be evaluated, shown in the reason.

    Raises:
        SpecError: the metric is not one of the task's metrics.
    """
    directions = METRIC_DIRECTIONS.get(task, {})
    if gate.metric not in directions:
        raise SpecError(
            f"gate.metric: {gate.metric!r} is not a {task} metric; "
            f"choose one of {', '.join(directions) or '(unknown task)'}"
        )
    higher_is_better = directions[gate.metric]
    metric = gate.metric
    margin = gate.margin_over_champion
    reasons: list[str] = []
    passed = True

    if _is_missing(value):
        passed = False
        reasons.append(f"cannot decide: {metric} of the model is {value} on the test split")
    else:
        if gate.minimum is not None:
            ok = value >= gate.minimum
            passed &= ok
            relation = ">=" if ok else "is below"
            reasons.append(f"{metric} {_shown(value)} {relation} minimum {_shown(gate.minimum)}")
        if gate.maximum is not None:
            ok = value <= gate.maximum
            passed &= ok
            relation = "<=" if ok else "is above"
            reasons.append(f"{metric} {_shown(value)} {relation} maximum {_shown(gate.maximum)}")

    if champion_version is not None:
        if _is_missing(champion_value):
            passed = False
            why = f": {champion_error}" if champion_error else ""
            reasons.append(
                f"cannot decide: champion v{champion_version} could not be evaluated "
                f"on the same test rows{why}"
            )
        elif not _is_missing(value):
            assert champion_value is not None
            # Ties pass: with margin 0 a retrained model that matches the champion may
            # become the challenger; a positive margin demands a real improvement.
            if higher_is_better:
                ok = value >= champion_value + margin
                word, sign = "at least", "+"
            else:
                ok = value <= champion_value - margin
                word, sign = "at most", "-"
            passed &= ok
            reasons.append(
                f"{metric} {_shown(value)} is {'' if ok else 'not '}{word} champion "
                f"v{champion_version}'s {_shown(champion_value)} {sign} margin {_shown(margin)}"
            )
    else:
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
    )


def _registry_error(action: str, error: Exception) -> RegistryError:
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
        raise _registry_error(f"cannot read registered model {model_name!r}", error) from error
    # Reading the alias map avoids telling "no alias" apart by error code, which MLflow
    # reports as INVALID_PARAMETER_VALUE.
    version = (registered.aliases or {}).get(CHAMPION_ALIAS)
    if version is None:
        return None
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as error:
        raise _registry_error(
            f"cannot read {model_name} v{version}, which holds the {CHAMPION_ALIAS} alias", error
        ) from error


def champion_value_on(
    model_uri: str,
    frame: pd.DataFrame,
    y_true: np.ndarray,
    *,
    task: str,
    metric: str,
) -> tuple[float | None, str | None]:
    """Score a registered model on the candidate's test rows and compute the gate metric.

    Loading and scoring the champion here, rather than reading the metric it logged when
    it was trained, compares both models on the same rows.

    Args:
        model_uri: the champion, e.g. ``models:/credit/3``.
        frame: the test rows with raw feature columns (not modified).
        y_true: their labels.
        task: ``binary`` or ``regression``.
        metric: the gate metric.

    Returns:
        ``(value, None)``, or ``(None, reason)`` when the model could not be loaded or
        scored or the metric is not finite; pass the reason to :func:`decide_gate` as
        ``champion_error`` so the gate fails closed and says why.
    """
    import mlflow

    from .evaluation import evaluate_scores

    try:
        model = mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)
    except Exception as error:  # any failure of an old model means "cannot compare"
        return None, f"cannot load {model_uri}: {_brief(error)}"
    schema = model.metadata.get_input_schema()
    if schema is not None and schema.has_input_names():
        missing = [name for name in schema.input_names() if name not in frame.columns]
        if missing:
            return (
                None,
                f"{model_uri} needs columns the test rows lack: {', '.join(map(str, missing))}",
            )
    try:
        output = model.predict(frame)
    except Exception as error:
        return None, f"{model_uri} failed to score the test rows: {_brief(error)}"
    if not isinstance(output, pd.DataFrame) or "score" not in output.columns:
        return None, f"{model_uri} did not return a `score` column"
    scores = output["score"].to_numpy(dtype=np.float64)
    try:
        value = evaluate_scores(task, np.asarray(y_true), scores)[metric]
    except Exception as error:  # e.g. a metric the evaluator does not know
        return None, f"cannot compute {metric} of {model_uri}: {_brief(error)}"
    if _is_missing(value):
        return None, f"{metric} of {model_uri} is {value}"
    return float(value), None


def _brief(error: Exception) -> str:
    """One line about an error, short enough for a tag and a reason."""
    text = getattr(error, "message", None) or str(error)
    # MLflow's schema errors embed the whole input frame before "Error: <the cause>".
    _, marker, cause = text.rpartition("Error: ")
    text = " ".join((cause if marker else text).split())
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _model_id(model_uri: str) -> str | None:
    """The logged model id in a ``models:/m-...`` URI, or None for any other URI."""
    rest = model_uri.removeprefix("models:/")
    if rest != model_uri and rest.startswith("m-") and "/" not in rest:
        return rest
    return None


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

    The registered model is created when missing (with ``description``). The version gets
    the lineage ``tags`` plus :meth:`GateDecision.tags`, and the decision's summary as its
    description. Before anything is written, the current champion is checked against the
    one the decision was made against: if it changed, the decision is stale and nothing
    is registered.

    Args:
        client: an MLflow client on the registry.
        model_name: the registered model name.
        model_uri: the logged model (``models:/m-...``).
        run_id: the training run.
        decision: from :func:`decide_gate`.
        tags: lineage tags for the version.
        description: the registered model's description, used when it is created.

    Returns:
        The new version, read back (with its aliases).

    Raises:
        RegistryError: the champion changed since the decision, or MLflow refused a step.
    """
    from mlflow.exceptions import MlflowException

    current = find_champion(client, model_name)
    current_version = str(current.version) if current is not None else None
    decided_against = None if decision.champion_version is None else str(decision.champion_version)
    if current_version != decided_against:
        raise RegistryError(
            f"{model_name}: the {CHAMPION_ALIAS} changed while the gate was deciding "
            f"(decided against {decision.champion_version or 'none'}, now {current_version or 'none'})",
            [
                "nothing was registered; run the training flow again to gate against the new champion"
            ],
        )

    try:
        client.create_registered_model(model_name, description=description)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise _registry_error(
                f"cannot create registered model {model_name!r}", error
            ) from error

    try:
        version = client.create_model_version(
            name=model_name,
            source=model_uri,
            run_id=run_id,
            tags={**tags, **decision.tags()},
            description=decision.summary(),
            model_id=_model_id(model_uri),
        )
    except MlflowException as error:
        raise _registry_error(f"cannot register {model_uri} as {model_name!r}", error) from error

    if decision.passed and decision.alias is not None:
        try:
            client.set_registered_model_alias(model_name, decision.alias, str(version.version))
        except MlflowException as error:
            raise _registry_error(
                f"registered {model_name} v{version.version} but could not set alias "
                f"{decision.alias!r}",
                error,
            ) from error
    try:
        return client.get_model_version(model_name, str(version.version))
    except MlflowException as error:
        raise _registry_error(f"cannot read back {model_name} v{version.version}", error) from error
