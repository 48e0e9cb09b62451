"""`stemma serve`: create the Prefect deployments of a spec and serve them.

The deployments (see :mod:`stemma.components.platform.deployments`) appear in the Prefect UI with a
form for their parameters (the flows' typed signatures), run on their cron schedules and
on Stemma's events, and execute in this process's project folder. They are created
unpaused and left unpaused when this process stops (Prefect's runner pauses them on
shutdown by default), so a restart of the server or of `stemma serve` never silently
stops the nightly runs.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from stemma.components.errors import StemmaError
from stemma.components.platform.deployments import DeploymentPlan, deployment_plans, describe_plans
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.services import environment_for, service_status
from stemma.components.spec import LoadedSpec


class ServeError(StemmaError):
    """`stemma serve` cannot start: no Prefect server to serve to."""

    exit_code = 6


def server_environment(root: Path) -> dict[str, str]:
    """Where the deployments go: ``PREFECT_API_URL`` if set, else `stemma up`'s servers.

    Returns:
        The variables to set (``PREFECT_API_URL`` and, when `stemma up` runs an MLflow
        server and ``MLFLOW_TRACKING_URI`` is unset, that too).

    Raises:
        ServeError: no Prefect server is configured or running. Deployments served to an
            ephemeral Prefect would vanish with this process and no UI could show them.
    """
    running = [service for service in service_status(root) if service.pid and service.healthy]
    found = environment_for(running)
    environment = {}
    if not os.environ.get("PREFECT_API_URL"):
        if "PREFECT_API_URL" not in found:
            raise ServeError(
                "no Prefect server to serve the deployments to",
                [
                    "start the project's servers with `stemma up`, or",
                    "point at a server with `export PREFECT_API_URL=http://host:4200/api`",
                ],
            )
        environment["PREFECT_API_URL"] = found["PREFECT_API_URL"]
    if not os.environ.get("MLFLOW_TRACKING_URI") and "MLFLOW_TRACKING_URI" in found:
        environment["MLFLOW_TRACKING_URI"] = found["MLFLOW_TRACKING_URI"]
    return environment


def prefect_deployments(plans: list[DeploymentPlan]) -> list[Any]:
    """Prefect ``RunnerDeployment`` objects for the plans (imports each flow)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    deployments = []
    for plan in plans:
        flow = getattr(importlib.import_module(plan.module), plan.function)
        triggers = [
            DeploymentEventTrigger(
                name=trigger.name,
                description=trigger.description,
                expect={trigger.event},
                match={"prefect.resource.id": trigger.resource_id},
                parameters=trigger.parameters,
            )
            for trigger in plan.triggers
        ]
        concurrency = (
            ConcurrencyLimitConfig(
                limit=plan.concurrency_limit,
                collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW,
            )
            if plan.concurrency_limit
            else None
        )
        deployments.append(
            flow.to_deployment(
                name=plan.name,
                description=plan.description,
                parameters=plan.parameters,
                schedules=[CronSchedule(cron=plan.cron, timezone=plan.timezone)]
                if plan.cron
                else None,
                triggers=triggers or None,
                concurrency_limit=concurrency,
                tags=list(plan.tags),
                paused=False,
                # `stemma.flows.train.train_flow`, not a file path: works wherever Stemma is
                # installed (a worker image, a wheel), not only in this checkout.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def run_serve(loaded: LoadedSpec, config: str, overrides: list[str], *, dry_run: bool) -> str:
    """Create and serve the deployments until interrupted; returns the closing message.

    With ``dry_run`` only the plan is returned, nothing is created.
    """
    plans = deployment_plans(loaded, config, overrides)
    table = describe_plans(plans)
    if dry_run:
        return f"deployments of {loaded.spec.pipeline.name} (not created):\n{table}"
    from prefect import serve

    from stemma.flows.steps import PROJECT_ROOT_VARIABLE

    os.environ.update(server_environment(loaded.root))
    # Served runs execute in this process's folder: they resolve the spec path from the root.
    os.environ[PROJECT_ROOT_VARIABLE] = str(loaded.root)

    deployments = prefect_deployments(plans)
    print(
        f"serving {len(deployments)} deployments of {loaded.spec.pipeline.name} to "
        f"{redact_url(os.environ['PREFECT_API_URL'])} (MLflow: "
        f"{redact_url(os.environ.get('MLFLOW_TRACKING_URI', 'the local store under .stemma/'))}"
        f"):\n{table}\n"
        "Start them from the Prefect UI (Deployments); stop serving with Ctrl-C "
        "(schedules stay active for the next `stemma serve`).",
        flush=True,
    )
    serve(*deployments, pause_on_shutdown=False, print_starting_message=False)
    return "stopped serving; the deployments stay unpaused"
