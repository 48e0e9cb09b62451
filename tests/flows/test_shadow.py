"""The shadow flow end to end: real Prefect, real MLflow, the worked example's generator.

The registered models are linear networks whose weights come from a logistic regression
fitted on the project's training table ("better"), or the same weights without the salary
("champion": ROC AUC about 0.85 against 0.94) or without the loan ("worse": about 0.67),
so their ranking is known without training them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError, SpecError
from tests.components.evaluation.test_shadow import register_linear_model

pytestmark = [
    pytest.mark.usefixtures("prefect_api", "mlflow_uri"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

#: Days of production batches generated for the flow tests, and rows per day.
DAYS = 3
BATCH_ROWS = 800
#: Encoded inputs of the credit features: salary is input 0, loan input 5.
SALARY, LOAN = 0, 5
FAST = ["evaluate.bootstrap_resamples=200"]


def fitted_weights(root: Path) -> tuple[dict[str, np.ndarray], float]:
    """Weights of every kind of model from a logistic regression on the training table."""
    from sklearn.linear_model import LogisticRegression

    from stemma.components.model.preprocessing import fit_preprocessor
    from stemma.components.spec import load_spec

    spec = load_spec(root / "configs" / "credit.yaml", check_expectations=False).spec
    train = pd.read_parquet(root / spec.data.path)
    preprocessor = fit_preprocessor(
        train, spec.data.features, task="binary", target=spec.data.target
    )
    fitted = LogisticRegression(max_iter=2_000).fit(
        preprocessor.transform(train), train[spec.data.target]
    )
    full = fitted.coef_[0]
    no_salary, no_loan, broken = full.copy(), full.copy(), full.copy()
    no_salary[SALARY] = 0.0
    no_loan[LOAN] = 0.0
    broken[SALARY] = np.nan
    weights = {"champion": no_salary, "better": full, "worse": no_loan, "nan": broken}
    return weights, float(fitted.intercept_[0])


def production_project(template_project: Path, folder: Path) -> Path:
    """The template project plus three days of production batches and labels, no drift."""
    from stemma.examples.credit import generate_credit_data

    root = folder / "project"
    shutil.copytree(template_project, root, symlinks=True)
    generate_credit_data(
        root / "production",
        seed=11,
        train_rows=10,
        days=DAYS,
        batch_rows=BATCH_ROWS,
        population_shift_day=99,
        concept_shift_day=99,
    )
    return root


@pytest.fixture(scope="module")
def production(template_project, tmp_path_factory) -> Path:
    return production_project(template_project, tmp_path_factory.mktemp("shadow"))


@pytest.fixture(scope="module")
def weights(production):
    return fitted_weights(production)


@pytest.fixture
def project(production, tmp_path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(production, target, symlinks=True)
    return target


def register_models(project: Path, weights, kinds: dict[str, str | None]) -> tuple[str, dict]:
    """A fresh registered model holding the given kinds (kind -> alias); its name and versions."""
    from stemma.components.platform.tracking import configure_tracking, ensure_experiment
    from stemma.components.spec import load_spec

    vectors, bias = weights
    name = f"eval-{uuid.uuid4().hex[:8]}"
    spec = load_spec(project / "configs" / "credit.yaml", check_expectations=False).spec
    train = pd.read_parquet(project / spec.data.path)
    configure_tracking(project)
    experiment_id = ensure_experiment(name, project)
    client = MlflowClient()
    versions = {
        kind: register_linear_model(
            client,
            experiment_id,
            project / ".models" / kind,
            name=name,
            weights=vectors[kind],
            bias=bias,
            frame=train,
            features=spec.data.features,
            alias=alias,
        )
        for kind, alias in kinds.items()
    }
    return name, versions


def day(project: Path, number: int, kind: str = "batches") -> str:
    return str(project / "production" / "credit" / kind / f"day_{number:02d}.parquet")


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def run_shadow(project: Path, name: str, *overrides: str, **parameters) -> dict:
    from stemma.flows.shadow import shadow_flow

    return shadow_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[
            f"pipeline.name={name}",
            f"pipeline.model_name={name}",
            f"pipeline.experiment={name}",
            *FAST,
            *overrides,
        ],
        **parameters,
    )


def test_a_better_challenger_is_promoted_and_everything_is_recorded(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    summary = run_shadow(
        project,
        name,
        "evaluate.shadow.min_labelled_rows=500",
        "evaluate.shadow.auto_promote=true",
        "evaluate.shadow.segments=[elevel]",
        batch=day(project, 1),
        labels=day(project, 1, "labels"),
    )
    assert summary["decision"] == "promote", summary["reasons"]
    assert summary["labelled_rows"] == BATCH_ROWS
    assert summary["comparison"]["low"] > 0 and summary["promoted"]
    assert aliases(name)["champion"] == versions["better"]
    assert aliases(name)["previous-champion"] == versions["champion"]

    # served where batch scoring writes for another batch, the challenger's beside it
    served = Path(summary["served_output"])
    assert served.name == "scores-day_01" and Path(summary["shadow_output"]).name == (
        "scores-day_01-shadow"
    )
    assert (
        json.loads((served / "_SUCCESS").read_text())["model"]["version"] == (versions["champion"])
    )

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.tags["stemma.shadow.decision"] == "promote"
    assert run.data.metrics["shadow/agreement"] == pytest.approx(summary["agreement"])
    assert run.data.metrics["shadow/roc_auc_difference_low"] > 0
    assert "shadow/segment.elevel.0.metric_difference" in run.data.metrics
    for model in ("champion", "challenger"):
        p50, p99 = (run.data.metrics[f"shadow/{model}_latency_ms_p{q}"] for q in (50, 99))
        assert 0 < p50 <= p99
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "shadow")}
    assert {"shadow/score_scatter.png", "shadow/metric_difference.png", "shadow/report.json"} <= (
        listed
    )
    record = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/lineage/record.json")
    kinds = {node["kind"] for node in record["nodes"]}
    assert {"shadow_evaluation", "decision", "labels", "input", "model_version"} <= kinds
    decision = next(node for node in record["nodes"] if node["kind"] == "decision")
    promotion_run = decision["attributes"]["promotion_run_id"]
    assert decision["attributes"]["decision"] == "promote" and promotion_run
    promoted = client.get_run(promotion_run)
    promotion_record = mlflow.artifacts.load_dict(f"runs:/{promotion_run}/lineage/record.json")
    assert promoted.data.tags["stemma.promotion.outcome"] == "done"
    assert promotion_record["decision"]["evidence"]["shadow_run_id"] == run.info.run_id
    # the verdict is on the run, found by the challenger's version; not on the version
    assert run.data.tags["stemma.model.challenger"] == versions["better"]
    tags = client.get_model_version(name, versions["better"]).tags
    assert not {"stemma.shadow.decision", "stemma.shadow.run_id"} & set(tags)
    # the run page lists the batch it read (with its digest) and both model versions
    (dataset,) = run.inputs.dataset_inputs
    batch = next(node for node in record["nodes"] if node["kind"] == "input")
    assert dataset.dataset.digest == batch["digest"].removeprefix("md5:")
    assert "day_01" in dataset.dataset.source
    logged = {
        client.get_model_version(name, versions[model]).source.removeprefix("models:/")
        for model in ("champion", "better")
    }
    assert {model.model_id for model in run.inputs.model_inputs} == logged


def test_a_worse_challenger_is_never_promoted_even_with_auto_promote(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "worse": "challenger"}
    )
    summary = run_shadow(
        project,
        name,
        "evaluate.shadow.min_labelled_rows=200",
        "evaluate.shadow.auto_promote=true",
        batch=day(project, 2),
        labels=day(project, 2, "labels"),
    )
    assert summary["decision"] == "reject", summary["reasons"]
    assert summary["comparison"]["improvement_high"] <= 0 and not summary["promoted"]
    assert aliases(name) == {"champion": versions["champion"], "challenger": versions["worse"]}


def test_without_labels_yet_the_decision_is_wait(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    summary = run_shadow(
        project,
        name,
        "evaluate.labels=production/credit/labels-not-yet",
        "evaluate.shadow.auto_promote=true",
        batch=day(project, 1),
    )
    assert summary["decision"] == "wait" and summary["labelled_rows"] == 0
    assert "no labels at" in summary["labels"]
    assert aliases(name)["champion"] == versions["champion"]


def test_broken_inputs_fail_before_anything_is_scored(project, weights):
    name, _ = register_models(project, weights, {"champion": "champion"})
    with pytest.raises(RegistryError, match="has no alias 'challenger'"):
        run_shadow(project, name, batch=day(project, 1))
    bad = project / "labels-without-id.parquet"
    pd.read_parquet(day(project, 1, "labels")).rename(columns={"application_id": "id"}).to_parquet(
        bad
    )
    with pytest.raises(DataError, match=r"lack column\(s\) application_id"):
        run_shadow(
            project, name, challenger=f"models:/{name}/1", batch=day(project, 1), labels=str(bad)
        )
    with pytest.raises(
        SpecError, match=r"evaluate\.shadow\.segments\[0\]: .nope. is not a feature"
    ):
        run_shadow(project, name, "evaluate.shadow.segments=[nope]", batch=day(project, 1))
    assert not (project / "outputs" / "credit" / "scores-day_01").exists()


def test_cli_prints_the_decision_and_exits_5_without_a_challenger(
    stemma_exe, project, weights, prefect_api
):
    import os

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    base = [*stemma_exe, "run", "shadow", "configs/credit.yaml"]
    base += ["--set", f"pipeline.name={name}", "--set", f"pipeline.model_name={name}"]
    base += ["--set", "evaluate.shadow.min_labelled_rows=500", "--set", FAST[0]]
    done = subprocess.run(
        [*base, "--batch", day(project, 1), "--labels", day(project, 1, "labels")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"v{versions['better']} vs champion v{versions['champion']}: PROMOTE" in done.stdout
    assert "labelled" in done.stdout and "roc_auc: challenger" in done.stdout
    # auto_promote is off by default: the decision is only recorded
    assert aliases(name)["champion"] == versions["champion"]

    missing = subprocess.run(
        [*base, "--batch", day(project, 1), "--challenger", f"models:/{name}@nobody"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 5, missing.stderr[-3000:]
    assert "has no alias 'nobody'" in missing.stderr and "Traceback" not in missing.stderr
