"""Steps several flows share: the flow run's name, and loading the spec and the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.runtime import flow_run

from stemma.components.scoring import engine as scoring
from stemma.components.spec import LoadedSpec, load_spec


def config_run_name(kind: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<kind>-<config stem>-<scheduled start>``."""

    def name() -> str:
        config = Path(str(flow_run.parameters.get("config", "spec"))).stem
        return f"{kind}-{config}-{flow_run.scheduled_start_time.strftime('%Y%m%d-%H%M%S')}"

    return name


@task(name="load spec")
def load_spec_step(config: str, overrides: list[str]) -> LoadedSpec:
    return load_spec(config, overrides)


@task(name="load model")
def load_model_step(reference: str, loaded: LoadedSpec) -> scoring.ScoringModel:
    """The model, checked against its recorded digests; only the spec's architecture may load."""
    return scoring.load_scoring_model(reference, architectures=spec_architectures(loaded))


def spec_architectures(loaded: LoadedSpec) -> list[str]:
    """The architectures a model loaded for this spec may name, besides the built-ins."""
    return [loaded.spec.model.architecture]


def scoring_options(loaded: LoadedSpec) -> dict[str, Any]:
    """The spec's settings of the scoring engine, as keyword arguments of
    ``scoring.score_files`` (and of the shadow and canary scorers, which pass them on)."""
    score = loaded.spec.score
    return {
        "id_column": loaded.spec.data.id,
        "chunk_rows": score.chunk_rows,
        "invalid_rows": score.invalid_rows,
        "unknown_categories": score.unknown_categories,
        "threads": score.threads,
    }
