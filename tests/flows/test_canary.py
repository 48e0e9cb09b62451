"""The canary flow end to end: nightly steps, promotion, rollback, and a killed run resumed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError, SpecError
from stemma.components.evaluation import canary
from stemma.components.evaluation.comparison import route_to_challenger
from tests.flows.test_shadow import (
    FAST,
    aliases,
    day,
    fitted_weights,
    production_project,
    register_models,
)

pytestmark = [
    pytest.mark.usefixtures("prefect_api", "mlflow_uri"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

GUARDS = [
    "evaluate.canary.guards.min_rows=100",
    "evaluate.canary.guards.min_labelled_rows=100",
    "evaluate.canary.guards.max_score_psi=2.0",
]
#: Longest the kill test waits for the first step's decision to appear.
STEP_WAIT_S = 300


@pytest.fixture(scope="module")
def production(template_project, tmp_path_factory) -> Path:
    return production_project(template_project, tmp_path_factory.mktemp("canary"))


@pytest.fixture(scope="module")
def weights(production):
    return fitted_weights(production)


@pytest.fixture
def project(production, tmp_path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(production, target, symlinks=True)
    return target


def run_canary(project: Path, name: str, *overrides: str, **parameters) -> dict:
    from stemma.flows.canary import canary_flow

    return canary_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[
            f"pipeline.name={name}",
            f"pipeline.model_name={name}",
            f"pipeline.experiment={name}",
            *FAST,
            *GUARDS,
            *overrides,
        ],
        **parameters,
    )


def labels_folder(project: Path) -> str:
    return str(project / "production" / "credit" / "labels")


def lineage(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/lineage/record.json")


def test_a_better_challenger_walks_the_steps_night_by_night_and_is_promoted(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    steps = ["evaluate.canary.steps=[0.5,1.0]", "evaluate.canary.bake_batches=1"]
    labels = labels_folder(project)
    first = run_canary(project, name, *steps, batches=[day(project, 1)], labels=labels)
    assert first["started"] and [s["decision"] for s in first["steps"]] == ["advance"]
    assert first["state"]["step"] == 1 and first["state"]["status"] == "running"

    # day 1's served predictions: one per row, the arm by the stable hash, the version that served
    served = pd.read_parquet(first["steps"][0]["predictions"])
    batch = pd.read_parquet(day(project, 1))
    assert sorted(served["application_id"]) == sorted(batch["application_id"])
    routed = route_to_challenger(served["application_id"].to_numpy(), 0.5, first["state"]["salt"])
    assert (served["arm"] == np.where(routed, "challenger", "champion")).all()
    assert (
        served["model_version"] == np.where(routed, versions["better"], versions["champion"])
    ).all()
    assert 0.4 < routed.mean() < 0.6

    # the next night continues; a batch already processed is skipped
    second = run_canary(
        project, name, *steps, batches=[day(project, 1), day(project, 2)], labels=labels
    )
    assert not second["started"] and second["skipped"] == ["day_01.parquet (step 1, advance)"]
    (step,) = second["steps"]
    assert (step["fraction"], step["decision"], step["action"], step["outcome"]) == (
        1.0,
        "advance",
        "promote",
        "done",
    )
    assert aliases(name) == {
        "champion": versions["better"],
        "previous-champion": versions["champion"],
    }
    third = run_canary(project, name, *steps, batches=[day(project, 3)], labels=labels)
    assert third["state"]["status"] == "completed" and third["state"]["phase"] == "bake"
    assert [entry["decision"] for entry in third["history"]] == ["advance"] * 3

    client = MlflowClient()
    for entry in third["history"]:
        run = client.get_run(entry["run_id"])
        assert run.data.tags["stemma.flow"] == "canary"
        assert run.data.metrics["canary/fraction"] == entry["fraction"]
        record = lineage(entry["run_id"])
        by_kind = {node["kind"]: node for node in record["nodes"]}
        assert {"canary_step", "decision", "input", "predictions"} <= set(by_kind)
        step_id = by_kind["canary_step"]["id"]
        edges = {(e["source"], e["relation"], e["target"]) for e in record["edges"]}
        assert (f"models:/{name}/{versions['champion']}", "control_of", step_id) in edges
        assert (f"models:/{name}/{versions['better']}", "challenger_of", step_id) in edges
        assert (by_kind["input"]["id"], "evaluated_on", step_id) in edges
    promoted = lineage(third["history"][1]["run_id"])
    decision = next(node for node in promoted["nodes"] if node["kind"] == "decision")
    assert decision["attributes"]["action"] == "promote"
    promotion = client.get_run(decision["attributes"]["action_run_id"])
    evidence = lineage(promotion.info.run_id)["decision"]["evidence"]
    assert evidence["step_run_id"] == third["history"][1]["run_id"]
    assert promotion.data.tags["stemma.promotion.outcome"] == "done"
    # the promotion run is a child of the canary step's run in MLflow's runs table
    assert promotion.data.tags["mlflow.parentRunId"] == third["history"][1]["run_id"]


def test_a_broken_challenger_is_rolled_back_within_one_step(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "nan": "challenger"}
    )
    steps = "evaluate.canary.steps=[0.25,0.5,1.0]"
    summary = run_canary(project, name, steps, batches=[day(project, 1), day(project, 2)])
    (step,) = summary["steps"]
    assert (step["decision"], step["action"], step["outcome"]) == ("rollback", "retire", "done")
    assert any(reason.startswith("error_rate:") for reason in step["reasons"])
    assert summary["state"]["status"] == "rolled_back" and "error_rate" in summary["state"]["cause"]
    assert summary["left"] == [day(project, 2)]
    assert aliases(name) == {"champion": versions["champion"]}  # the challenger is dropped
    served = pd.read_parquet(step["predictions"])
    assert np.isfinite(served["score"]).all()
    arm = served[served["arm"] == "challenger"]
    assert len(arm) and arm["fallback"].all()
    assert (arm["model_version"] == versions["champion"]).all()
    record = lineage(step["run_id"])
    decision = next(node for node in record["nodes"] if node["kind"] == "decision")
    assert decision["attributes"]["decision"] == "rollback"
    assert "error_rate" in decision["attributes"]["reasons"][0]
    retired = MlflowClient().get_run(decision["attributes"]["action_run_id"])
    assert retired.data.tags["stemma.promotion.action"] == "retire"

    again = run_canary(project, name, steps, batches=[day(project, 2)])
    assert again["steps"] == [] and again["left"] == [day(project, 2)]


def test_a_breach_after_the_promotion_rolls_the_champion_back(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    steps = ["evaluate.canary.steps=[1.0]", "evaluate.canary.bake_batches=2"]
    first = run_canary(
        project, name, *steps, batches=[day(project, 1)], labels=labels_folder(project)
    )
    assert (
        first["steps"][0]["action"] == "promote" and aliases(name)["champion"] == versions["better"]
    )

    # labels of day 2 on which the old champion is right every time: the new one is worse
    control = mlflow.pyfunc.load_model(f"models:/{name}/{versions['champion']}")
    batch = pd.read_parquet(day(project, 2))
    skewed = project / "day_02_labels.parquet"
    batch[["application_id"]].assign(
        approved=control.predict(batch)["prediction"].to_numpy()
    ).to_parquet(skewed)
    second = run_canary(project, name, *steps, batches=[day(project, 2)], labels=str(skewed))
    (step,) = second["steps"]
    assert (step["decision"], step["action"], step["outcome"]) == ("rollback", "rollback", "done")
    assert any(reason.startswith("metric:") for reason in step["reasons"])
    assert aliases(name) == {
        "champion": versions["champion"],
        "previous-champion": versions["better"],
    }
    assert second["state"]["status"] == "rolled_back"
    assert "after the promotion" in second["state"]["cause"]


def test_broken_inputs_are_clear_errors(project, weights):
    name, versions = register_models(project, weights, {"champion": "champion", "worse": None})
    with pytest.raises(RegistryError, match="no challenger to canary"):
        run_canary(project, name, batches=[day(project, 1)])
    with pytest.raises(SpecError, match=r"must end at 1\.0"):
        run_canary(project, name, "evaluate.canary.steps=[0.1,0.5]", batches=[day(project, 1)])
    elsewhere = project / "labels.parquet"
    pd.DataFrame({"application_id": [1, 2], "approved": [0, 1]}).to_parquet(elsewhere)
    with pytest.raises(DataError, match="none of the 2 labelled ids is in the batch"):
        run_canary(
            project,
            name,
            challenger=f"models:/{name}/{versions['worse']}",
            batches=[day(project, 1)],
            labels=str(elsewhere),
        )
    # a canary under way (holding: 5% of 800 rows is fewer than guards.min_rows)...
    held = run_canary(
        project, name, challenger=f"models:/{name}/{versions['worse']}", batches=[day(project, 1)]
    )
    assert held["steps"][0]["decision"] == "hold" and held["state"]["status"] == "running"
    # ...cannot be replaced by another challenger
    with pytest.raises(RegistryError, match="is under way"):
        run_canary(
            project,
            name,
            challenger=f"models:/{name}/{versions['champion']}",
            batches=[day(project, 1)],
        )


def _history(name: str) -> list[tuple]:
    state = canary.read_state(MlflowClient(), name)
    return [(e.batch, e.fraction, e.decision, e.action, e.outcome) for e in state.history]


@pytest.mark.slow
def test_a_killed_canary_resumes_to_the_same_decisions_and_moves(
    stemma_exe, project, weights, prefect_api
):
    overrides = [
        "evaluate.canary.steps=[0.5,1.0]",
        "evaluate.canary.bake_batches=1",
        *FAST,
        *GUARDS,
    ]
    batches = [day(project, n) for n in (1, 2, 3)]
    # the same models twice: one canary is killed and resumed, the other runs uninterrupted
    reference, _ = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    command = [*stemma_exe, "run", "canary", "configs/credit.yaml"]
    names = [f"pipeline.name={name}", f"pipeline.model_name={name}", f"pipeline.experiment={name}"]
    for override in [*names, *overrides]:
        command += ["--set", override]
    command += ["--labels", labels_folder(project), "--batches", *batches]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first_step = project / "outputs" / "credit" / "scores-canary" / f"v{versions['better']}"
    process = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + STEP_WAIT_S
    while not (first_step / "day_01" / canary.STEP_FILE).exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the first step never decided"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    state = canary.read_state(MlflowClient(), name)
    assert state is not None and len(state.history) < 3, "the run finished before its kill"

    resumed = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # the uninterrupted canary, in this process while the command resumes
        run_canary(
            project,
            reference,
            *overrides[:2],
            batches=batches,
            labels=labels_folder(project),
            output=str(project / "reference-canary"),
        )
        stdout, stderr = resumed.communicate(timeout=600)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.communicate()
    assert resumed.returncode == 0, stderr[-3000:]
    assert "canary:" in stdout

    assert _history(name) == _history(reference)
    state = canary.read_state(MlflowClient(), name)
    assert state.status == "completed"
    assert aliases(name) == {
        "champion": versions["better"],
        "previous-champion": versions["champion"],
    }
    client = MlflowClient()
    # exactly one move of the champion, and one step run per batch
    assert client.get_registered_model(name).tags["stemma.promotion.generation"] == "1"
    runs = client.search_runs(
        [client.get_experiment_by_name(name).experiment_id],
        filter_string="tags.`stemma.flow` = 'canary'",
    )
    steps = [
        next(n for n in lineage(run.info.run_id)["nodes"] if n["kind"] == "canary_step")
        for run in runs
    ]
    assert sorted(step["attributes"]["step"] for step in steps) == [0, 1, 1]
    assert {run.info.status for run in runs} == {"FINISHED"}
