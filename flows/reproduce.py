"""`stemma reproduce REF`: rebuild a registered model from its lineage and compare.

The version's lineage names its data version, resolved spec (with the seeds), code
revision and training run; a custom architecture's module, which the model carries, is
compared file by file with the project's and copied into the rebuild. The data bytes are restored through DVC into a scratch
project beside the resolved spec, and the training flow itself retrains there, tracked
in an MLflow store of its own: nothing is registered in the project's store and no alias
moves. The registered version's files are first checked against the digests recorded
when it was logged; then the rebuilt weights are compared with the registered ones tensor
by tensor, the metrics value by value and every other file of the model folder byte by
byte (less what names the run or the moment); on CPU all must be identical.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stemma.components.lineage import rebuild, reproduce
from stemma.flows.lineage import ASSETS_VARIABLE, open_store

#: Exit code when the rebuilt model differs from the registered one.
EXIT_NOT_REPRODUCED = 7
#: Name of the spec file in the scratch project (the flow run is named after it).
SPEC_NAME = rebuild.SPEC_NAME
_STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", ASSETS_VARIABLE)


@dataclass
class ReproductionReport:
    """What was rebuilt from what, what differs in the code, and the verdict."""

    plan: reproduce.ReproductionPlan
    restored: reproduce.RestoredData
    code_warnings: list[str]
    verdict: reproduce.Verdict
    overrides: list[str] = field(default_factory=list)
    workspace: Path | None = None
    rebuilt_run_id: str | None = None

    @property
    def reproduced(self) -> bool:
        return self.verdict.reproduced

    def render(self) -> str:
        plan = self.plan
        seeds = ", ".join(f"{key}={value}" for key, value in plan.seeds.items())
        lines = [
            f"reproducing {plan.model_uri} (training run {plan.run_id})",
            f"  data   {plan.data_pointer} md5 {plan.data_md5}, restored from "
            f"{self.restored.source}, bytes verified",
            *(f"         {note}" for note in self.restored.notes),
            f"  spec   {reproduce.SPEC_ARTIFACT} of the run; seeds {seeds}",
            f"  code   git {plan.git_rev or 'unknown'}"
            + (" (trained with uncommitted changes)" if plan.git_dirty else ""),
        ]
        if plan.code_files:
            lines.append(
                f"         {plan.architecture}: the model carries its module "
                f"({', '.join(sorted(plan.code_files))}), compared with the project's"
            )
        if self.overrides:
            lines.append(f"  changed on purpose: {' '.join('--set ' + o for o in self.overrides)}")
        if self.code_warnings:
            lines += [
                "",
                "WARNING: the code here is not the code that trained the model; "
                "a difference may come from it:",
                *(f"  ! {warning}" for warning in self.code_warnings),
            ]
        where = f"kept in {self.workspace}" if self.workspace else "removed afterwards"
        lines += [
            "",
            f"retrained by the training flow in an isolated store ({where}, run "
            f"{self.rebuilt_run_id}); nothing was registered in the project's store",
            "",
            *self.verdict.render(),
        ]
        return "\n".join(lines)


@contextlib.contextmanager
def isolated_store(uri: str) -> Iterator[None]:
    """Point MLflow (and Stemma's tracking defaults) at ``uri`` for the block only."""
    import mlflow

    saved = {name: os.environ.get(name) for name in _STORE_VARIABLES}
    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_REGISTRY_URI"] = uri
    os.environ[ASSETS_VARIABLE] = "false"
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        for name, value in saved.items():  # set_tracking_uri writes the variable too
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _store(workspace: Path) -> str:
    """The isolated MLflow store of a reproduction."""
    return f"sqlite:///{workspace / 'mlflow.db'}"


def _rebuild(
    plan: reproduce.ReproductionPlan,
    config: str,
    overrides: list[str],
    workspace: Path,
    recorded: tuple[Path, Path],
) -> tuple[dict[str, Any], reproduce.Verdict]:
    """Retrain with the training flow into the workspace's store; judge the rebuilt model."""
    from mlflow import MlflowClient

    from stemma.flows.train import train_flow

    summary = train_flow(config=config, overrides=overrides)
    store = _store(workspace)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.get_run(summary["run_id"])
    rebuilt_folder, rebuilt = rebuild.model_weights(
        client, summary["model_name"], summary["model_version"], workspace / "rebuilt"
    )
    verdict = reproduce.judge(
        plan,
        recorded_weights=recorded[1],
        rebuilt_weights=rebuilt,
        rebuilt_sha256=summary["weights_sha256"],
        rebuilt_metrics=dict(run.data.metrics),
        rebuilt_checks_digest=reproduce.training_facts(client, run.info.run_id, run.data.tags)[
            "checks_digest"
        ],
        recorded_folder=recorded[0],
        rebuilt_folder=rebuilt_folder,
    )
    return summary, verdict


def run_reproduce(
    reference: str,
    root: Path,
    *,
    overrides: Sequence[str] = (),
    keep: Path | None = None,
) -> ReproductionReport:
    """Rebuild the model ``reference`` names and compare it with the registered one.

    Args:
        reference: ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or a training
            run id.
        root: the project root (its DVC cache, git history and MLflow store).
        overrides: ``section.key=value`` changes to the recorded spec, for asking whether
            a change alters the model; the report says they were applied.
        keep: a folder (new or empty) to keep the scratch project and store in.

    Raises:
        LineageError: the version lacks the lineage a rebuild needs.
        DataVersionError: the recorded data bytes cannot be restored.
    """
    client = open_store(root)
    plan = reproduce.plan_reproduction(client, reference)
    warnings = [
        *reproduce.code_revision_warnings(root, plan.git_rev, plan.git_dirty),
        *reproduce.network_code_warnings(root, plan),
    ]
    with contextlib.ExitStack() as stack:
        workspace = rebuild.workspace_folder(keep) or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="stemma-"))
        )
        recorded_folder, recorded = rebuild.recorded_model(client, plan, workspace / "recorded")
        restored, config = rebuild.scratch_project(root, plan, workspace / "project")
        # Bit-identity holds on the device that trained: pin it when that was the CPU.
        pinned = ["train.device=cpu"] if plan.device == "cpu" else []
        with isolated_store(_store(workspace)):
            summary, verdict = _rebuild(
                plan, str(config), [*pinned, *overrides], workspace, (recorded_folder, recorded)
            )
    return ReproductionReport(
        plan=plan,
        restored=restored,
        code_warnings=warnings,
        verdict=verdict,
        overrides=list(overrides),
        workspace=keep.resolve() if keep is not None else None,
        rebuilt_run_id=summary["run_id"],
    )
