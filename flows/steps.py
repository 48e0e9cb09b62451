"""What several flows share: the flow run's name and id, their tracked MLflow run, and
loading the spec and the model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from stemma.components.platform import tags, tracking
from stemma.components.platform.metric_names import metric_rank
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.refs import parse_model_ref
from stemma.components.platform.tracked_run import LineageWriter, TrackedRun, tracked_run
from stemma.components.registry import promotion
from stemma.components.registry.gate import CHAMPION_ALIAS
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.spec import LoadedSpec, load_spec

#: Set by `stemma serve`: the project root its served runs resolve a relative spec path
#: against (they run in whatever folder `stemma serve` was started in).
PROJECT_ROOT_VARIABLE = "STEMMA_PROJECT_ROOT"
#: A flow's step: a Prefect task without Prefect's result cache. Steps take models, tables
#: and ONNX Runtime sessions, which Prefect cannot hash (it would log an ERROR with a
#: traceback for every step), and Stemma resumes interrupted work itself (checkpoints,
#: finished parts), so a cache would add nothing.
step = partial(task, cache_policy=NO_CACHE)
#: Metrics listed in a flow run's summary artifact.
SUMMARY_METRICS = 12


def config_location(config: str) -> str:
    """The spec path a flow opens: ``config`` itself, or, in a run `stemma serve` started,
    a relative ``config`` under the served project's root."""
    root = os.environ.get(PROJECT_ROOT_VARIABLE)
    if not root or Path(config).is_absolute():
        return config
    return str(Path(root) / config)


def config_run_name(kind: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<kind>-<config stem>-<scheduled start>``."""

    def name() -> str:
        config = Path(str(flow_run.parameters.get("config", "spec"))).stem
        return f"{kind}-{config}-{flow_run.scheduled_start_time.strftime('%Y%m%d-%H%M%S')}"

    return name


def flow_run_id() -> str | None:
    """Prefect's id of the flow run in progress, or None outside one."""
    return str(flow_run.get_id() or "") or None


@contextmanager
def tracked(
    loaded: LoadedSpec,
    flow: str,
    experiment_id: str | None,
    lineage: LineageWriter | None,
    run_id: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    detached: bool = False,
) -> Iterator[TrackedRun]:
    """The flow's MLflow run (see :func:`.tracked_run.tracked_run`), named after the flow
    run unless ``name`` says otherwise, tagged with the pipeline, the flow and the flow run.
    Once the block has recorded the run's lineage, the flow run gets the same summary as a
    Prefect artifact."""
    run_tags = {
        tags.PIPELINE: loaded.spec.pipeline.name,
        tags.FLOW: flow,
        tags.PREFECT_FLOW_RUN_ID: flow_run_id() or "",
        **(extra_tags or {}),
    }
    with tracked_run(
        name if name is not None else flow_run.get_name(),
        experiment_id=experiment_id,
        tags=run_tags,
        run_id=run_id,
        lineage=lineage,
        detached=detached,
        links=flow_run_links(),
    ) as run:
        yield run
        publish_summary(run, flow)


def publish_summary(run: TrackedRun, flow: str) -> str | None:
    """The run's description and key metrics as a markdown artifact of the flow run in
    progress, with a link to the MLflow run; its id, or None outside a flow run or before
    the run recorded its lineage."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    if run.document is None or flow_run.get_id() is None:
        return None
    uri = mlflow.get_tracking_uri()
    page = tracking.run_page_url(uri, run.experiment_id, run.run_id)
    base = page.split("#", 1)[0] if page else ""
    text = run.description(run.document, base=base) if page else run.description(run.document)
    recorded = run.client.get_run(run.run_id).data.metrics.items()
    metrics = sorted(recorded, key=lambda item: metric_rank(item[0]))[:SUMMARY_METRICS]
    if metrics:
        rows = "\n".join(f"| {key} | {value:.6g} |" for key, value in metrics)
        text += f"\n| metric | value |\n|---|---|\n{rows}\n"
    where = f"[MLflow run {run.run_id[:8]}]({page})" if page else f"MLflow run `{run.run_id}`"
    text += f"\n{where} in {redact_url(uri)}\n"
    return str(
        create_markdown_artifact(
            markdown=redact_url(text),
            key=f"{flow}-summary",
            description=f"What the {flow} run read, made and decided",
        )
    )


def flow_run_links() -> dict[str, str]:
    """The Prefect UI's page of the flow run in progress, when a Prefect server with a UI
    is configured (a temporary server's pages are gone once the command ends)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    flow_run_id = flow_run.get_id()
    ui = PREFECT_UI_URL.value() if PREFECT_API_URL.value() else None
    if not flow_run_id or not ui:
        return {}
    url = f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run_id}"
    return {"Prefect flow run": f"[{flow_run.get_name() or flow_run_id}]({url})"}


def relative(path: Path, root: Path) -> str:
    """``path`` relative to the project root, as lineage and tags name it, else as given."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@step(name="load spec")
def load_spec_step(config: str, overrides: list[str]) -> LoadedSpec:
    return load_spec(config_location(config), overrides)


@step(name="load model")
def load_model_step(reference: str, loaded: LoadedSpec) -> ScoringModel:
    """The model, checked against its recorded digests; only the spec's architecture may load."""
    check_champion(reference, loaded)
    return load_scoring_model(reference, architectures=spec_architectures(loaded))


def check_champion(reference: str, loaded: LoadedSpec) -> None:
    """Before reading ``@champion``: warn when the alias was moved outside Stemma, or refuse
    to go on when the spec's ``gate.outside_alias_moves`` says so."""
    import mlflow

    parsed = parse_model_ref(reference)
    if parsed.alias != CHAMPION_ALIAS:
        return
    problem = promotion.moved_outside(mlflow.MlflowClient(), parsed.name)
    if problem is None:
        return
    if loaded.spec.gate.outside_alias_moves == "refuse":
        raise problem
    get_run_logger().warning(problem.render())


def spec_architectures(loaded: LoadedSpec) -> list[str]:
    """The architectures a model loaded for this spec may name, besides the built-ins: its
    network's, and its distillation student's (a distilled variant is built from it)."""
    found = [loaded.spec.model.architecture]
    compress = loaded.spec.compress
    if compress is not None and compress.distill.student.architecture not in found:
        found.append(compress.distill.student.architecture)
    return found


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


def loaded_back_check(
    model: ScoringModel, method: str, runtime: Any, x: Any, expected: Any
) -> Callable[[str], None]:
    """``verify`` for ``registering.register_variant``: the version, loaded back as scoring
    loads it, runs on ``runtime``'s backend and gives exactly ``expected`` on ``x``.

    Raises (from the returned check):
        RegistryError: it runs elsewhere or gives other outputs; nothing is registered.
    """
    import mlflow
    import numpy as np

    from stemma.components.errors import RegistryError

    def verify(number: str) -> None:
        loaded = load_scoring_model(
            f"models:/{model.name}/{number}",
            client=mlflow.MlflowClient(),
            architectures=model.architectures,
        )
        if loaded.runtime.backend != runtime.backend or not np.array_equal(
            loaded.runtime.run(x), expected
        ):
            raise RegistryError(
                f"{model.name} v{number}: the registered {method} variant, loaded back, "
                "does not give the outputs that were measured",
                [f"it runs on {loaded.runtime.label}; nothing was registered"],
            )

    return verify


def parent_reference(loaded: LoadedSpec, model: str | None, configured: str | None) -> str:
    """The model a quantize, compress or compare run takes: the one named on the command
    line, else the spec's section's ``model``, else the newest version that passed its gate.

    Raises:
        RegistryError: no such registered model, or none of its fp32 versions passed.
    """
    import mlflow

    from stemma.components.quantization.heldout import default_parent_reference

    name = loaded.spec.pipeline.registered_model_name
    return model or configured or default_parent_reference(mlflow.MlflowClient(), name)


def check_gate_metric(loaded: LoadedSpec, model: ScoringModel) -> str:
    """The spec's gate metric, when it is a metric of ``model``'s task.

    Raises:
        SpecError: it is not (a regression metric for a classifier, say).
    """
    from stemma.components.errors import SpecError
    from stemma.components.spec import METRIC_DIRECTIONS

    metric, metrics = loaded.spec.gate.metric, METRIC_DIRECTIONS.get(model.task, {})
    if metric not in metrics:
        raise SpecError(
            f"gate.metric {metric!r} is not a metric of {model.label}, a {model.task} model; "
            f"choose one of {', '.join(metrics)}"
        )
    return metric
