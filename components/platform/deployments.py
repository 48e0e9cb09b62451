"""What `stemma serve` deploys: the Prefect deployments of a spec, as plain data.

Each flow of a pipeline becomes one deployment titled after the pipeline and what it does
(``credit · training``, ``credit · nightly scoring``, ...: the Prefect UI lists deployments
by that name, with the flow's in small print), with its schedule and event triggers taken
from the spec and a description that says what it does, when it runs and the command
that does the same by hand. This
module only *describes* them, so the plan can be printed (`stemma serve --dry-run`),
tested, and compared with ``infra/prefect.yaml`` without Prefect; ``flows/serve.py``
turns the plan into Prefect deployments.

Events that connect the flows (names and resources are part of Stemma's interface):

- ``stemma.batch.scored``: the scoring flow finished a batch; the monitoring deployment
  runs on it with the batch as its parameter ("monitoring after scoring").
- ``stemma.drift.detected``: the drift monitor found drift; the retraining deployment
  runs on it with the drift report as its cause.

Both carry the resource ``stemma.pipeline.<name>``, so a trigger fires only for its own
pipeline.

With ``endpoint.log`` in a project folder, a second monitoring deployment compares the
online endpoint's prediction log with the reference on ``monitor.log_schedule``: the last
``monitor.log_days`` complete days (UTC) of ``<endpoint.log.path>/predictions``, joined
with the labels the endpoint received; its drift events start retraining like any other.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from stemma.components.platform import tags as tag_names

#: Event the scoring flow emits when a batch is scored.
BATCH_SCORED_EVENT = tag_names.BATCH_SCORED_EVENT
#: Event the drift monitor emits when drift is over the spec's thresholds.
DRIFT_DETECTED_EVENT = tag_names.DRIFT_DETECTED


#: When the endpoint's prediction log is monitored, and how many complete days each run
#: reads (``monitor.log_schedule``, ``monitor.log_days``): half an hour after midnight UTC,
#: once the day's last part is written, the day before.
LOG_MONITOR_SCHEDULE = "30 0 * * *"
LOG_MONITOR_DAYS = 1
#: Where the prediction log keeps scored rows and labels (``data.prediction_log``).
LOG_PREDICTIONS = "predictions"
LOG_LABELS = "labels"

#: A validated spec (``stemma.components.spec.LoadedSpec``). Not imported: the spec package
#: validates model references with :mod:`.refs`, so platform importing spec would be a cycle.
LoadedSpec = Any


#: What each flow's deployment does, after the pipeline's name in its title.
TITLES = {
    "train": "training",
    "score": "batch scoring",
    "monitor": "drift monitoring",
    "retrain": "retraining",
    "quantize": "quantization",
    "shadow": "shadow scoring",
    "canary": "canary rollout",
}
_DAILY = re.compile(r"^\d+ (\d+) \* \* \*$")


def deployment_title(pipeline: str, flow_name: str, cron: str | None = None) -> str:
    """``credit · nightly scoring``: the pipeline, then what the deployment does; a daily
    run between 20:00 and 06:59 is nightly, another daily one daily.

    >>> deployment_title("credit", "score", "0 2 * * *")
    'credit · nightly scoring'
    """
    title = TITLES.get(flow_name, flow_name)
    daily = _DAILY.match(cron or "")
    if daily and title.startswith("batch "):
        hour = int(daily.group(1))
        title = ("nightly " if hour >= 20 or hour < 7 else "daily ") + title.split(" ", 1)[1]
    return f"{pipeline} · {title}"


def pipeline_resource_id(pipeline: str) -> str:
    """The Prefect event resource id of a pipeline (``stemma.pipeline.<name>``)."""
    return f"{tag_names.PIPELINE}.{pipeline}"


@dataclass(frozen=True)
class EventTrigger:
    """Run a deployment when an event about this pipeline arrives.

    ``parameters`` may use Prefect's templates (``{{ event.payload.x }}``).
    """

    name: str
    event: str
    resource_id: str
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class DeploymentPlan:
    """One Prefect deployment of a pipeline's flow."""

    flow_name: str
    entrypoint: str
    name: str
    description: str
    parameters: dict[str, Any]
    cron: str | None = None
    timezone: str = "UTC"
    triggers: tuple[EventTrigger, ...] = ()
    #: At most this many runs at once; further runs are cancelled, not queued.
    concurrency_limit: int | None = None
    tags: tuple[str, ...] = ()

    @property
    def full_name(self) -> str:
        """``<flow>/<deployment>``, as Prefect names a deployment."""
        return f"{self.flow_name}/{self.name}"

    @property
    def module(self) -> str:
        return self.entrypoint.split(":", 1)[0]

    @property
    def function(self) -> str:
        return self.entrypoint.split(":", 1)[1]


def deployment_plans(
    loaded: LoadedSpec, config: str, overrides: tuple[str, ...] | list[str] = ()
) -> list[DeploymentPlan]:
    """The deployments of every flow the spec uses, in the order a user reads them.

    Args:
        loaded: the validated spec.
        config: the spec's path as the served flows receive it (relative to the project
            root, where `stemma serve` runs them).
        overrides: `--set` overrides that every deployment passes on.

    Returns:
        Training (by hand), nightly scoring, monitoring after each scored batch (and of the
        endpoint's log on a schedule), retraining (scheduled and on drift, one at a time)
        and, where their flows exist, quantization, shadow and canary evaluation (by hand).
    """
    spec = loaded.spec
    pipeline = spec.pipeline.name
    resource = pipeline_resource_id(pipeline)
    base = {"config": config, "overrides": list(overrides)}
    plan = partial(_plan, pipeline, base)
    plans = [
        plan("train", f"Validate the data, train, evaluate, register and gate `{pipeline}`."),
        plan(
            "score",
            f"Nightly batch scoring of `{spec.score.input}` with the champion.",
            cron=spec.score.schedule,
        ),
        # Monitoring: after each scored batch (and on the spec's schedule, if any).
        plan(
            "monitor",
            "Drift report of each scored batch against the model's reference profile.",
            cron=getattr(getattr(spec, "monitor", None), "schedule", None),
            triggers=(
                EventTrigger(
                    name=f"monitor {pipeline} after scoring",
                    event=BATCH_SCORED_EVENT,
                    resource_id=resource,
                    parameters={
                        **base,
                        "batch": "{{ event.payload.input }}",
                        "model": "{{ event.payload.model }}",
                    },
                    description="Monitor every batch the scoring flow finished.",
                ),
            ),
        ),
    ]
    plans += _log_monitor_plans(spec, plan)
    # Retraining: scheduled and on drift, one run at a time; none without `retrain`.
    retrain = spec.retrain
    if retrain is not None:
        on_drift = EventTrigger(
            name=f"retrain {pipeline} on drift",
            event=DRIFT_DETECTED_EVENT,
            resource_id=resource,
            parameters={**base, "cause": "{{ event.payload.report_run_id }}"},
            description="Retrain when the monitor reports drift over the thresholds.",
        )
        description = (
            "Add newly labelled production rows as a new data version, retrain, gate, "
            "quantize, shadow, and promote when the shadow evaluation says so."
        )
        triggers = (on_drift,) if retrain.on_drift else ()
        plans.append(
            plan(
                "retrain",
                description,
                cron=retrain.schedule,
                triggers=triggers,
                concurrency_limit=1,
            )
        )
    # By hand; a canary moves aliases step by step, so one canary run at a time.
    plans += [
        plan("quantize", "Build, measure and gate quantized variants of a model."),
        plan("shadow", "Score a batch with challenger and champion and compare."),
        plan("canary", "Route a growing share of a batch to the challenger.", concurrency_limit=1),
    ]
    return [entry for entry in plans if _module_exists(entry.module)]


def _log_monitor_plans(spec: Any, plan: Any) -> list[DeploymentPlan]:
    """The scheduled monitor of the endpoint's prediction log, when the spec has a log in a
    project folder (the monitor reads local files) and ``monitor.log_schedule``."""
    endpoint = getattr(spec, "endpoint", None)
    log = getattr(endpoint, "log", None)
    monitor = getattr(spec, "monitor", None)
    cron = getattr(monitor, "log_schedule", LOG_MONITOR_SCHEDULE)
    if log is None or "://" in log.path or cron is None:
        return []
    folder = log.path.rstrip("/")
    parameters: dict[str, Any] = {
        "batch": f"{folder}/{LOG_PREDICTIONS}",
        "days": getattr(monitor, "log_days", LOG_MONITOR_DAYS),
    }
    if getattr(monitor, "labels", None) is None:
        parameters["labels"] = f"{folder}/{LOG_LABELS}"
    days = parameters["days"]
    window = "the day before" if days == 1 else f"the {days} days before"
    description = (
        f"Drift report of the online endpoint's prediction log, `{folder}/{LOG_PREDICTIONS}`: "
        f"{window} (UTC) against the model's reference profile, with the labels received."
    )
    # Short enough for the Prefect UI's deployment list, which cuts titles at ~25 characters.
    name = f"{spec.pipeline.name} · endpoint drift"
    return [plan("monitor", description, cron=cron, name=name, extra=parameters)]


def _plan(
    pipeline: str,
    base: dict[str, Any],
    flow_name: str,
    description: str,
    *,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
    **more: Any,
) -> DeploymentPlan:
    """The deployment of ``stemma.flows.<flow_name>:<flow_name>_flow`` for ``pipeline``
    (titled ``name``, else after what the flow does), with ``extra`` parameters."""
    plan = DeploymentPlan(
        flow_name=flow_name,
        entrypoint=f"stemma.flows.{flow_name}:{flow_name}_flow",
        name=name or deployment_title(pipeline, flow_name, more.get("cron")),
        description=description,
        parameters={**base, **(extra or {})},
        tags=("stemma", f"pipeline:{pipeline}"),
        **more,
    )
    return replace(plan, description=f"{description}\n\n{_how_it_runs(plan)}")


def _when(plan: DeploymentPlan) -> list[str]:
    when = [f"cron '{plan.cron}' ({plan.timezone})"] if plan.cron else []
    when += [f"on {trigger.event}" for trigger in plan.triggers]
    return when or ["by hand"]


def _how_it_runs(plan: DeploymentPlan) -> str:
    """When the deployment runs, on which spec, and the command that does the same."""
    limit = f"; at most {plan.concurrency_limit} run at once" if plan.concurrency_limit else ""
    overrides = "".join(f" --set {item}" for item in plan.parameters.get("overrides", []))
    options = "".join(
        f" --{key} {value}"
        for key, value in plan.parameters.items()
        if key not in ("config", "overrides")
    )
    command = f"stemma run {plan.flow_name} {plan.parameters['config']}{overrides}{options}"
    return (
        f"**When:** {'; '.join(_when(plan))}{limit}  \n"
        f"**Spec:** `{plan.parameters['config']}`  \n"
        f"**By hand:** `{command}`"
    )


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def describe_plans(plans: list[DeploymentPlan]) -> str:
    """A table of the deployments: name, schedule, triggers, concurrency."""
    width = max((len(plan.full_name) for plan in plans), default=0) + 2
    lines = []
    for plan in plans:
        limit = f", at most {plan.concurrency_limit} at once" if plan.concurrency_limit else ""
        lines.append(f"  {plan.full_name:<{width}} {'; '.join(_when(plan))}{limit}")
    return "\n".join(lines)
