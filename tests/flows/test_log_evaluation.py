"""`stemma run shadow --log` and `stemma run canary --log`: judging what the online endpoint
served, from its prediction log, with real Prefect and a real MLflow store.

The log's parts are written as the endpoint writes them (``log_parts``), with the scores
the registered models give the worked example's production rows: the champion, a better
challenger (ROC AUC about 0.94 against 0.85), a worse one, and a challenger whose logged
scores are wrong (its scores turned upside down).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError, SpecError
from stemma.components.evaluation import canary
from stemma.components.evaluation.comparison import route_to_challenger
from stemma.components.platform.tags import INPUT_DIGEST, MAX_TAGS, OUTPUT_SHA256
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.spec import EvaluateSpec, load_spec
from tests.components.evaluation.log_parts import (
    day_name,
    labels_table,
    predictions_table,
    shadow_table,
    write_part,
)
from tests.flows.test_shadow import (
    FAST,
    aliases,
    day,
    fitted_weights,
    production_project,
    register_models,
)
from tests.flows.test_tag_budget import documented, stemma_tags
from tests.support import run_side_by_side

pytestmark = [
    pytest.mark.usefixtures("prefect_api", "mlflow_uri"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

ID = "application_id"
TARGET = "approved"
GUARDS = [
    "evaluate.canary.guards.min_rows=100",
    "evaluate.canary.guards.min_labelled_rows=100",
    "evaluate.canary.guards.max_score_psi=2.0",
]


@pytest.fixture(scope="module")
def production(template_project, tmp_path_factory) -> Path:
    return production_project(template_project, tmp_path_factory.mktemp("log-evaluation"))


@pytest.fixture(scope="module")
def weights(production):
    return fitted_weights(production)


@pytest.fixture
def project(production, tmp_path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(production, target, symlinks=True)
    return target


def model(name: str, version: str) -> ScoringModel:
    return load_scoring_model(f"models:/{name}/{version}")


def scores_of(scoring: ScoringModel, frame: pd.DataFrame) -> np.ndarray:
    """The scores the endpoint answers with: the model's runtime on the encoded rows."""
    encoded = scoring.preprocessor.transform(frame[list(scoring.feature_columns)])
    return scoring.preprocessor.decode_output(scoring.runtime.run(encoded))


def batch(project: Path, number: int) -> pd.DataFrame:
    return pd.read_parquet(day(project, number))


def log_labels(project: Path, log: Path, number: int, when: str, rows: int | None = None) -> None:
    """The labels of production day ``number`` (its first ``rows``), as POST /v1/labels logs them."""
    labels = pd.read_parquet(day(project, number, "labels")).head(rows)
    table = labels_table(labels[ID], labels[TARGET], id_column=ID, target=TARGET, day=when)
    write_part(log, "labels", when, table)


def overrides(name: str, *more: str) -> list[str]:
    names = [f"pipeline.{key}={name}" for key in ("name", "model_name", "experiment")]
    return [*names, *FAST, *GUARDS, *more]


def run_shadow(project: Path, name: str, *more: str, **parameters) -> dict:
    from stemma.flows.shadow import shadow_flow

    config = str(project / "configs" / "credit.yaml")
    return shadow_flow(config=config, overrides=overrides(name, *more), **parameters)


def run_canary(project: Path, name: str, *more: str, **parameters) -> dict:
    from stemma.flows.canary import canary_flow

    config = str(project / "configs" / "credit.yaml")
    return canary_flow(config=config, overrides=overrides(name, *more), **parameters)


def record(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/lineage/record.json")


def assert_documented_tags(run, flow: str) -> None:
    """A run judged from the log carries the tags its flow documents, as a batch run does."""
    tags = stemma_tags(run.data.tags)
    assert len(tags) <= MAX_TAGS, sorted(tags)
    assert [key for key in tags if not documented(key, flow)] == []


# ---------------------------------------------------------------------------------------
# Shadow


def serve_with_shadow(
    project: Path, log: Path, number: int, when: str, versions: dict, served_by: str
) -> pd.DataFrame:
    """Day ``number`` answered by ``served_by`` and shadowed by the challenger; returns it."""
    frame = batch(project, number)
    name = versions["name"]
    answered = scores_of(model(name, versions[served_by]), frame)
    table = predictions_table(
        frame,
        features(project),
        id_column=ID,
        scores=answered,
        versions=[versions[served_by]] * len(frame),
        variants=["champion"] * len(frame),
        day=when,
        request_prefix=f"req-{when}",
    )
    write_part(log, "predictions", when, table)
    shadowed = scores_of(model(name, versions["shadow"]), frame)
    table = shadow_table(
        frame[ID].to_list(),
        id_column=ID,
        scores=shadowed,
        version=versions["shadow"],
        day=when,
        request_prefix=f"req-{when}",
    )
    write_part(log, "shadow", when, table)
    return frame


def features(project: Path) -> list[str]:
    spec = load_spec(project / "configs" / "credit.yaml", check_expectations=False).spec
    return list(spec.data.features.all)


def test_shadow_from_the_log_waits_for_labels_then_promotes(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger", "worse": None}
    )
    log = project / "outputs" / "endpoint-log"
    when = day_name(2)
    frame = serve_with_shadow(
        project, log, 1, when, {"name": name, "shadow": versions["better"], **versions}, "champion"
    )
    # an earlier challenger shadowed the first 30 requests: its scores are not counted
    earlier = shadow_table(
        frame[ID].to_list(),
        id_column=ID,
        scores=np.full(len(frame), 0.5),
        version=versions["worse"],
        day=when,
        request_prefix=f"req-{when}",
        positions=np.arange(300),
    )
    write_part(log, "shadow", when, earlier)
    promote = ["evaluate.shadow.min_labelled_rows=500", "evaluate.shadow.auto_promote=true"]

    waiting = run_shadow(project, name, *promote, log=str(log))
    assert waiting["decision"] == "wait" and waiting["labelled_rows"] == 0
    assert waiting["compared_rows"] == len(frame) and "no label in" in waiting["labels"]
    assert waiting["skipped"]["other_challenger"] == 300
    assert any(
        reason.startswith("300 shadow rows not counted: scored by another version")
        for reason in waiting["reasons"]
    )
    assert aliases(name)["champion"] == versions["champion"]

    log_labels(project, log, 1, day_name(1))
    summary = run_shadow(project, name, *promote, log=str(log))
    assert summary["decision"] == "promote", summary["reasons"]
    assert summary["labelled_rows"] == len(frame) and summary["promoted"]
    assert aliases(name)["champion"] == versions["better"]

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.tags["stemma.shadow.decision"] == "promote"
    assert_documented_tags(run, "shadow")
    assert run.data.metrics["shadow/skipped_other_challenger"] == 300
    assert run.data.metrics["shadow/roc_auc_difference_low"] > 0
    lineage = record(summary["run_id"])
    inputs = {n["attributes"]["path"]: n for n in lineage["nodes"] if n["kind"] == "input"}
    read = {f"outputs/endpoint-log/{kind}/{when}" for kind in ("predictions", "shadow")}
    assert set(inputs) == read
    for path, node in inputs.items():
        parts = sorted((project / path).glob("part-*.parquet"))
        assert set(node["attributes"]["files"]) == {part.name for part in parts}
        assert node["digest"].startswith("md5:")
    labels = next(n for n in lineage["nodes"] if n["kind"] == "labels")
    assert labels["attributes"]["path"] == "outputs/endpoint-log/labels"
    assert not any(n["kind"] == "predictions" for n in lineage["nodes"])
    decision = next(n for n in lineage["nodes"] if n["kind"] == "decision")
    assert decision["attributes"]["promotion_outcome"] == "done"
    # the run page lists the day folders it read, with their digests
    listed = sorted((d.dataset.source, d.dataset.digest) for d in run.inputs.dataset_inputs)
    assert [
        (f"{kind}/{when}" in source, digest)
        for (source, digest), kind in zip(listed, ("predictions", "shadow"), strict=True)
    ] == [(True, inputs[path]["digest"].removeprefix("md5:")) for path in sorted(read)]


def test_shadow_from_the_log_rejects_a_worse_challenger_and_counts_other_champions(
    project, weights
):
    name, versions = register_models(
        project, weights, {"better": None, "champion": "champion", "worse": "challenger"}
    )
    log = project / "endpoint-log"
    # the day before, the champion was another version: those answers are not compared
    old = serve_with_shadow(
        project,
        log,
        2,
        day_name(3),
        {"name": name, "shadow": versions["worse"], **versions},
        "better",
    )
    serve_with_shadow(
        project,
        log,
        1,
        day_name(2),
        {"name": name, "shadow": versions["worse"], **versions},
        "champion",
    )
    log_labels(project, log, 1, day_name(2))
    log_labels(project, log, 2, day_name(2))
    summary = run_shadow(
        project,
        name,
        "evaluate.shadow.min_labelled_rows=200",
        "evaluate.shadow.auto_promote=true",
        log=str(log),
    )
    assert summary["decision"] == "reject", summary["reasons"]
    assert summary["comparison"]["improvement_high"] <= 0 and not summary["promoted"]
    assert summary["skipped"]["other_champion"] == len(old)
    assert summary["compared_rows"] == len(batch(project, 1))
    assert aliases(name)["champion"] == versions["champion"]

    # one day folder judges that day only
    one_day = run_shadow(
        project,
        name,
        "evaluate.shadow.min_labelled_rows=200",
        log=str(log / "predictions" / day_name(3)),
    )
    assert one_day["decision"] == "wait" and one_day["compared_rows"] == 0
    assert one_day["skipped"]["other_champion"] == len(old)


# ---------------------------------------------------------------------------------------
# Canary


def start_canary(name: str, challenger: str, control: str, steps: list[float], **canary_spec):
    """A canary started five days ago, as `stemma run canary` records it on the model."""
    settings = EvaluateSpec.model_validate({"canary": {"steps": steps, **canary_spec}})
    state = canary.start_state(name, challenger, control, settings)
    started = (datetime.now(UTC) - timedelta(days=5)).isoformat()
    return canary.write_state(MlflowClient(), replace(state, started=started))


def serve_canary_day(
    project: Path,
    log: Path,
    number: int,
    when: str,
    name: str,
    *,
    wrong_scores: bool = False,
    also: tuple[str, int] | None = None,
) -> pd.DataFrame:
    """Day ``number`` as the endpoint serves it during the canary recorded on the model:
    the entities hashed into the share get the challenger, the others the control (after
    the promotion, the challenger as champion)."""
    state = canary.read_state(MlflowClient(), name)
    frame = batch(project, number)
    control = scores_of(model(name, state.control), frame)
    challenger = scores_of(model(name, state.challenger), frame)
    if wrong_scores:
        challenger = 1.0 - challenger
    if state.phase == canary.PHASE_BAKE:
        routed = np.ones(len(frame), dtype=bool)
        variants = np.full(len(frame), "champion")
    else:
        routed = route_to_challenger(frame[ID].to_numpy(), state.fraction, state.salt)
        variants = np.where(routed, "canary", "champion")
    versions = np.where(routed, state.challenger, state.control).astype(object)
    if also is not None:  # rows another version answered (before a restart, say)
        version, rows = also
        versions[:rows], variants[:rows] = version, "champion"
    table = predictions_table(
        frame,
        features(project),
        id_column=ID,
        scores=np.where(routed, challenger, control),
        versions=list(versions),
        variants=list(variants),
        day=when,
        latency_ms=np.where(routed, 4.0, 3.0),
    )
    write_part(log, "predictions", when, table)
    return frame


def test_a_live_canary_advances_day_by_day_and_a_judged_day_is_not_judged_again(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    start_canary(name, versions["better"], versions["champion"], [0.5, 1.0], bake_batches=1)
    log = project / "endpoint-log"
    first = day_name(4)
    served = serve_canary_day(project, log, 1, first, name)
    log_labels(project, log, 1, day_name(3))

    summary = run_canary(project, name, log=str(log))
    (step,) = summary["steps"]
    assert not summary["started"] and step["batch"].endswith(first)
    assert (step["fraction"], step["decision"], step["action"]) == (0.5, "advance", "none")
    routed = route_to_challenger(served[ID].to_numpy(), 0.5, summary["state"]["salt"])
    assert step["arm_rows"] == routed.sum() and step["rows"] == len(served)
    assert summary["state"]["step"] == 1 and summary["state"]["status"] == "running"

    client = MlflowClient()
    run = client.get_run(step["run_id"])
    assert_documented_tags(run, "canary")
    assert run.data.metrics["canary/labelled_rows"] >= 100
    assert run.data.metrics["canary/challenger_latency_ms_p50"] == 4.0
    assert run.data.metrics["canary/champion_latency_ms_p50"] == 3.0
    lineage = record(step["run_id"])
    (batch_node,) = [n for n in lineage["nodes"] if n["kind"] == "input"]
    (part,) = (log / "predictions" / first).glob("part-*.parquet")
    assert batch_node["attributes"]["path"] == f"endpoint-log/predictions/{first}"
    assert batch_node["attributes"]["files"] == {part.name: batch_node["digest"][4:]}
    assert batch_node["digest"] == f"md5:{canary.read_state(client, name).history[0].digest}"
    assert not any(n["kind"] == "predictions" for n in lineage["nodes"])
    assert any(n["kind"] == "labels" for n in lineage["nodes"])
    assert OUTPUT_SHA256 not in run.data.tags, "the run wrote no predictions"
    assert run.data.tags[INPUT_DIGEST] == batch_node["digest"].removeprefix("md5:")

    again = run_canary(project, name, log=str(log))
    assert again["steps"] == [] and again["skipped"] == [f"{first} (step 1, advance)"]
    assert len(canary.read_state(client, name).history) == 1

    # the endpoint now routes everyone to the challenger; the day promotes it
    serve_canary_day(project, log, 2, day_name(3), name)
    log_labels(project, log, 2, day_name(3))
    promoted = run_canary(project, name, log=str(log))
    (step,) = promoted["steps"]
    assert (step["fraction"], step["decision"], step["action"], step["outcome"]) == (
        1.0,
        "advance",
        "promote",
        "done",
    )
    assert aliases(name)["champion"] == versions["better"]
    # after the promotion it answers as the champion: its rows are the bake's evidence
    serve_canary_day(project, log, 3, day_name(2), name)
    log_labels(project, log, 3, day_name(2))
    baked = run_canary(project, name, log=str(log))
    assert [s["decision"] for s in baked["steps"]] == ["advance"]
    assert baked["state"]["status"] == "completed" and baked["state"]["phase"] == "bake"
    assert baked["steps"][0]["arm_rows"] == len(batch(project, 3))


def test_a_live_canary_whose_challenger_scores_wrong_is_rolled_back(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    start_canary(name, versions["better"], versions["champion"], [0.5, 1.0])
    log = project / "endpoint-log"
    serve_canary_day(project, log, 1, day_name(4), name, wrong_scores=True)
    serve_canary_day(project, log, 2, day_name(3), name, wrong_scores=True)
    log_labels(project, log, 1, day_name(3))
    summary = run_canary(project, name, log=str(log))
    (step,) = summary["steps"]
    assert (step["decision"], step["action"], step["outcome"]) == ("rollback", "retire", "done")
    assert any(reason.startswith("metric:") for reason in step["reasons"]), step["reasons"]
    assert summary["state"]["status"] == "rolled_back"
    assert summary["left"] == [str(log / "predictions" / day_name(3))]
    assert aliases(name) == {"champion": versions["champion"]}


def test_a_live_canary_holds_on_too_few_labelled_rows_and_counts_other_versions(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger", "worse": None}
    )
    start_canary(name, versions["better"], versions["champion"], [1.0])
    log = project / "endpoint-log"
    when = day_name(3)
    serve_canary_day(project, log, 1, when, name, also=(versions["worse"], 50))
    log_labels(project, log, 1, day_name(2), rows=40)
    (log / "predictions" / day_name(0)).mkdir(parents=True)
    serve_canary_day(project, log, 2, day_name(0), name)  # today: still being written

    summary = run_canary(project, name, log=str(log))
    (step,) = summary["steps"]
    assert step["decision"] == "hold", step["reasons"]
    assert any("the promotion waits for labels" in reason for reason in step["reasons"])
    assert step["log"]["skipped"] == {f"champion v{versions['worse']}": 50}
    assert summary["waiting"] == [day_name(0)]
    assert summary["state"]["holds"] == 1 and aliases(name)["champion"] == versions["champion"]
    metrics = MlflowClient().get_run(step["run_id"]).data.metrics
    assert metrics["canary/skipped_rows"] == 50

    again = run_canary(project, name, log=str(log / "predictions" / when))
    assert again["steps"] == [] and again["skipped"] == [f"{when} (step 1, hold)"]
    assert canary.read_state(MlflowClient(), name).holds == 1


def test_a_live_canary_starts_from_the_log_with_nothing_to_judge_yet(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    log = project / "endpoint-log"
    versions_served = {"name": name, "shadow": versions["better"], **versions}
    serve_with_shadow(project, log, 1, day_name(3), versions_served, "champion")
    serve_with_shadow(project, log, 2, day_name(0), versions_served, "champion")
    summary = run_canary(project, name, "evaluate.canary.steps=[0.25,1.0]", log=str(log))
    assert summary["started"] and summary["steps"] == []
    assert summary["before_start"] == [day_name(3)] and summary["waiting"] == [day_name(0)]
    state = canary.read_state(MlflowClient(), name)
    assert (state.challenger, state.control, state.fraction) == (
        versions["better"],
        versions["champion"],
        0.25,
    )
    assert state.history == () and aliases(name)["champion"] == versions["champion"]


# ---------------------------------------------------------------------------------------
# Broken inputs


def test_broken_logs_are_clear_errors_before_anything_moves(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    log = project / "endpoint-log"
    (log / "predictions" / day_name(3)).mkdir(parents=True)
    (log / "shadow" / day_name(3)).mkdir(parents=True)
    for run in (run_shadow, run_canary):
        with pytest.raises(DataError, match="the prediction log holds no finished part"):
            run(project, name, log=str(log))
    assert canary.read_state(MlflowClient(), name) is None, "no canary was started"

    with pytest.raises(DataError, match="not a prediction log"):
        run_canary(project, name, log=str(project / "configs"))
    with pytest.raises(SpecError, match="--batches does not apply"):
        run_canary(project, name, log=str(log), batches=[day(project, 1)])
    with pytest.raises(SpecError, match=r"endpoint\.log is not set"):
        run_shadow(project, name, log="endpoint.log.path")

    when = day_name(3)
    serve_with_shadow(
        project, log, 1, when, {"name": name, "shadow": versions["better"], **versions}, "champion"
    )
    (shadow_part,) = (log / "shadow" / when).glob("part-*.parquet")
    pq.write_table(pq.read_table(shadow_part).drop_columns(["stemma_row"]), shadow_part)
    with pytest.raises(DataError, match="parts of the prediction log lack columns") as caught:
        run_shadow(project, name, log=str(log))
    assert any(shadow_part.name in line and "stemma_row" in line for line in caught.value.details)
    shadow_part.unlink()
    with pytest.raises(DataError, match="the log holds no shadow score"):
        run_shadow(project, name, log=str(log))


def test_labels_that_cannot_be_read_are_clear_errors(project, weights):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    log = project / "outputs" / "endpoint-log"
    serve_with_shadow(
        project,
        log,
        1,
        day_name(3),
        {"name": name, "shadow": versions["better"], **versions},
        "champion",
    )
    with pytest.raises(DataError, match="no such labels file or folder"):
        run_shadow(project, name, log=str(log), labels=str(project / "labels-nowhere"))
    labels = pd.read_parquet(day(project, 1, "labels"))
    write_part(
        log,
        "labels",
        day_name(2),
        labels_table(
            labels[ID], labels[TARGET], id_column=ID, target=TARGET, day=day_name(2)
        ).drop_columns([TARGET]),
    )
    with pytest.raises(DataError, match="lack columns") as caught:
        run_shadow(project, name, "endpoint.log.path=outputs/endpoint-log", log="endpoint.log.path")
    assert any("no approved" in line for line in caught.value.details)


def test_cli_judges_from_the_log_and_exits_3_on_a_broken_one(
    stemma_exe, project, weights, prefect_api
):
    name, versions = register_models(
        project, weights, {"champion": "champion", "better": "challenger"}
    )
    log = project / "endpoint-log"
    serve_with_shadow(
        project,
        log,
        1,
        day_name(3),
        {"name": name, "shadow": versions["better"], **versions},
        "champion",
    )
    log_labels(project, log, 1, day_name(2))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    base = [*stemma_exe, "run", "shadow", "configs/credit.yaml"]
    for override in overrides(name, "evaluate.shadow.min_labelled_rows=500"):
        base += ["--set", override]
    # The broken log is refused before anything moves: both commands run side by side.
    done, broken = run_side_by_side(
        [[*base, "--log", "endpoint-log"], [*base, "--log", "configs"]],
        cwd=project, env=env, timeout_s=300, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"v{versions['better']} vs champion v{versions['champion']}: PROMOTE" in done.stdout
    assert broken.returncode == 3, broken.stderr[-3000:]
    assert "not a prediction log" in broken.stderr and "Traceback" not in broken.stderr


@pytest.mark.parametrize("flow", ["shadow", "canary"], ids=["shadow", "canary"])
def test_log_without_a_path_reads_the_specs_endpoint_log(flow):
    from stemma.components.evaluation.steps import ENDPOINT_LOG
    from stemma.flows.cli.parser import build_parser

    parser = build_parser()
    bare = parser.parse_args(["run", flow, "configs/credit.yaml", "--log"])
    named = parser.parse_args(["run", flow, "configs/credit.yaml", "--log", "logs/2026-03-02"])
    plain = parser.parse_args(["run", flow, "configs/credit.yaml"])
    assert (bare.log, named.log, plain.log) == (ENDPOINT_LOG, "logs/2026-03-02", None)
