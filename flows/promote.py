"""`stemma promote` and `stemma rollback`: move the champion alias, compare-and-set.

Plain functions the CLI calls; the work is in :mod:`stemma.components.registry.promotion`. The
decision is logged as a run in the experiment of the promoted version's training run (the
pipeline's experiment), or in ``stemma-promotions`` when that run is unknown.
"""

from __future__ import annotations

import os
from pathlib import Path

from stemma.components.errors import RegistryError
from stemma.components.platform import tracking
from stemma.components.platform.refs import ModelRefError, parse_model_ref
from stemma.components.registry import promotion

#: Experiment for decisions about versions whose training run cannot be found.
FALLBACK_EXPERIMENT = "stemma-promotions"
#: Environment variable Prefect sets inside a flow run.
FLOW_RUN_VARIABLE = "PREFECT__FLOW_RUN_ID"


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` as (name, version, alias).

    Raises:
        RegistryError: the reference has neither shape.
    """
    try:
        name, version, alias = parse_model_ref(reference)
    except ModelRefError as error:
        raise RegistryError(error.headline, error.details) from None
    return name, version, alias


def _client_and_experiment(root: Path, model_name: str, version: str | None):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure_tracking(root)
    client = MlflowClient()
    if version is not None:
        try:
            run_id = client.get_model_version(model_name, version).run_id
            if run_id:
                return client, client.get_run(run_id).info.experiment_id
        except MlflowException:
            pass  # promote() reports a missing version; the record goes to the fallback
    return client, tracking.ensure_experiment(FALLBACK_EXPERIMENT, root)


def run_promote(
    reference: str, root: Path, *, reason: str, expected: str | None = None
) -> promotion.PromotionRecord:
    """Promote the version ``reference`` names to champion.

    Args:
        reference: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``
            (e.g. ``models:/credit@challenger``).
        root: the project root (for the local MLflow store).
        reason: why, recorded with the decision.
        expected: the champion version the caller expects to replace (``--expect-champion``);
            None: the champion read now. ``"none"`` expects no champion at all.

    Raises:
        RegistryError: a bad reference, an alias that points nowhere, or the promotion was
            refused or lost (:class:`~stemma.components.registry.promotion.PromotionError`).
    """
    name, version, alias = parse_reference(reference)
    client, experiment_id = _client_and_experiment(root, name, version)
    if version is None:
        from mlflow.exceptions import MlflowException

        try:
            version = str(client.get_model_version_by_alias(name, str(alias)).version)
        except MlflowException as error:
            raise RegistryError(
                f"{reference}: no such model or alias", [getattr(error, "message", str(error))]
            ) from error
        client, experiment_id = _client_and_experiment(root, name, version)
    expectation: str | promotion.Unset | None = promotion.UNSET
    if expected is not None:
        expectation = None if expected.lower() == "none" else expected.lstrip("v")
    return promotion.promote(
        client,
        name,
        version,
        expected_champion=expectation,
        reason=reason,
        flow_run_id=os.environ.get(FLOW_RUN_VARIABLE),
        experiment_id=experiment_id,
    )


def run_rollback(model_name: str, root: Path, *, reason: str) -> promotion.PromotionRecord:
    """Give the champion alias back to the previous champion.

    Raises:
        RegistryError: no previous champion, or the rollback was refused or lost.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure_tracking(root)
    try:
        previous = str(
            MlflowClient()
            .get_registered_model(model_name)
            .aliases.get(promotion.PREVIOUS_CHAMPION_ALIAS, "")
        )
    except MlflowException as error:
        raise RegistryError(
            f"no registered model {model_name!r}", [getattr(error, "message", str(error))]
        ) from error
    client, experiment_id = _client_and_experiment(root, model_name, previous or None)
    return promotion.rollback(
        client,
        model_name,
        reason=reason,
        flow_run_id=os.environ.get(FLOW_RUN_VARIABLE),
        experiment_id=experiment_id,
    )


def format_record(record: promotion.PromotionRecord) -> str:
    """One screen about a promotion or rollback that was done."""
    before = f"v{record.from_version}" if record.from_version else "(none)"
    lines = [
        f"{record.action}: {record.model} champion {before} -> v{record.to_version} "
        f"({record.outcome})",
        f"  previous-champion: {before}",
        f"  by {record.who} at {record.when}; generation {record.generation}",
        f"  reason: {record.reason or '(none given)'}",
    ]
    if record.took_over:
        lines.append(f"  took over an abandoned claim: {record.took_over}")
    if record.flow_run_id:
        lines.append(f"  Prefect flow run: {record.flow_run_id}")
    if record.record_run_id:
        lines.append(f"  recorded in MLflow run {record.record_run_id}")
    return "\n".join(lines)
