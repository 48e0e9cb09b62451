"""The batch-scoring flow end to end: a trained champion scores the example's daily batches."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stemma.components.errors import DataError, RegistryError

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]


@pytest.fixture(scope="module")
def trained_project(template_project, tmp_path_factory) -> Path:
    """A project whose model `scoring` has a champion."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("scoring") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(
        config=str(root / "configs" / "credit.yaml"),
        overrides=[*TRAIN, "pipeline.name=scoring", "pipeline.model_name=scoring"],
    )
    return root


@pytest.fixture
def scoring_project(trained_project, tmp_path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(trained_project, target, symlinks=True)
    return target


def run_score(project: Path, *overrides: str, **parameters) -> dict:
    from stemma.flows.score import score_flow

    return score_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=["pipeline.name=scoring", "pipeline.model_name=scoring", *overrides],
        **parameters,
    )


def read_output(folder: Path) -> pd.DataFrame:
    parts = sorted(folder.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True)


def test_score_writes_every_row_once_and_records_the_run(scoring_project, tmp_path):
    summary = run_score(scoring_project, "score.chunk_rows=300")
    output = Path(summary["output"])
    batches = sorted((scoring_project / "data/credit/batches").glob("*.parquet"))
    inputs = pd.concat([pd.read_parquet(path) for path in batches], ignore_index=True)

    scored = read_output(output)
    assert summary["rows"] == {"input": len(inputs), "scored": len(inputs), "rejected": 0}
    assert sorted(scored["application_id"]) == sorted(inputs["application_id"])
    assert scored["application_id"].is_unique
    assert set(scored.columns) >= {"application_id", "prediction", "score"}
    assert scored["score"].between(0, 1).all()
    assert summary["extra_columns"] == ["applied_at"]

    # the same numbers as the registered model loaded the standard way
    champion = mlflow.pyfunc.load_model("models:/scoring@champion")
    expected = champion.predict(inputs)
    merged = inputs[["application_id"]].assign(expected=expected["score"].to_numpy())
    merged = merged.merge(scored, on="application_id")
    np.testing.assert_allclose(merged["score"], merged["expected"], rtol=1e-5, atol=1e-7)

    # the part files name the model version and the input digest
    manifest = json.loads((output / "_SUCCESS").read_text())
    metadata = pq.read_metadata(next(output.glob("part-*.parquet"))).metadata
    assert metadata[b"stemma.model_version"].decode() == summary["model_version"]
    assert metadata[b"stemma.input_digest"].decode() == manifest["input"]["digest"]

    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["score/rows_scored"] == len(inputs)
    assert run.data.metrics["score/rows_per_second"] > 0
    assert "score/chunk_latency_ms_p95" in run.data.metrics
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "dvc"
    assert json.loads(dataset_input.dataset.source)["path"] == "data/credit/batches"

    manifest_sha = hashlib.sha256((output / "_SUCCESS").read_bytes()).hexdigest()
    assert run.data.tags["stemma.output.sha256"] == manifest_sha == summary["output_digest"]
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    )
    distribution = json.loads((artifacts / "scores/distribution.json").read_text())
    assert sum(distribution["counts"]) == len(inputs)
    assert (artifacts / "scores/histogram.png").is_file()
    record = json.loads((artifacts / "lineage/record.json").read_text())
    nodes = {node["kind"]: node for node in record["nodes"]}
    assert nodes["predictions"]["digest"] == f"sha256:{manifest_sha}"
    assert nodes["model_version"]["id"] == f"models:/scoring/{summary['model_version']}"
    version = mlflow.MlflowClient().get_model_version("scoring", summary["model_version"])
    assert nodes["model_version"]["digest"] == f"sha256:{version.tags['stemma.weights.sha256']}"
    assert nodes["data_version"]["digest"].startswith("md5:")
    assert {edge["relation"] for edge in record["edges"]} >= {
        "input_of",
        "scored_with",
        "produced",
        "contains",
    }

    # running it again finds the finished output and leaves it alone
    again = run_score(scoring_project, "score.chunk_rows=300")
    assert again["already_complete"] is True
    assert again["output_digest"] == summary["output_digest"]


def test_rows_that_cannot_be_scored_go_to_rejects_with_reasons(scoring_project):
    batch = scoring_project / "data/credit/batches/day_01.parquet"
    frame = pd.read_parquet(batch)
    frame["salary"] = frame["salary"].astype("float64")
    frame.loc[frame.index[:3], "salary"] = np.nan
    frame.loc[frame.index[3], "car"] = 99
    broken = scoring_project / "incoming" / "broken.parquet"
    broken.parent.mkdir()
    frame.to_parquet(broken, index=False)

    summary = run_score(scoring_project, input=str(broken), output=str(scoring_project / "out"))
    assert summary["rows"] == {"input": len(frame), "scored": len(frame) - 4, "rejected": 4}
    rejects = read_output(scoring_project / "out" / "rejects")
    assert len(rejects) == 4
    assert rejects["reason"].str.contains("salary").sum() == 3
    assert rejects["reason"].str.contains("car").sum() == 1

    with pytest.raises(DataError, match="salary"):
        run_score(
            scoring_project,
            "score.invalid_rows=error",
            input=str(broken),
            output=str(scoring_project / "out-strict"),
        )


def test_schema_problems_are_reported_together_before_scoring(scoring_project):
    frame = pd.read_parquet(scoring_project / "data/credit/batches/day_01.parquet")
    frame = frame.drop(columns=["loan"]).assign(age=frame["age"].astype(str))
    bad = scoring_project / "incoming" / "bad.parquet"
    bad.parent.mkdir()
    frame.to_parquet(bad, index=False)
    output = scoring_project / "out"
    with pytest.raises(DataError) as caught:
        run_score(scoring_project, input=str(bad), output=str(output))
    text = caught.value.render()
    assert "loan" in text and "age" in text
    assert not output.exists()


def test_a_missing_alias_is_a_clear_registry_error(scoring_project):
    with pytest.raises(RegistryError) as caught:
        run_score(scoring_project, model="models:/scoring@nonexistent")
    assert "nonexistent" in caught.value.render()
    assert "champion" in caught.value.render()  # the aliases that do exist


def test_cli_prints_a_one_line_summary(stemma_exe, scoring_project, prefect_api):
    import os

    result = subprocess.run(
        [
            *stemma_exe,
            "run",
            "score",
            "configs/credit.yaml",
            "--set",
            "pipeline.model_name=scoring",
            "--set",
            "pipeline.name=scoring",
            "--model",
            "models:/scoring/1",
        ],
        cwd=scoring_project,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("scored 1,000 rows") and "scoring v1" in first
    assert (scoring_project / "outputs/credit/scores/_SUCCESS").is_file()


def test_a_champion_moved_outside_stemma_warns_or_refuses(scoring_project):
    from stemma.flows.services import run_status

    client = mlflow.MlflowClient()
    first = client.get_model_version("scoring", "1")
    other = client.create_model_version(
        "scoring", source=first.source, run_id=first.run_id, tags=first.tags
    ).version
    client.set_registered_model_alias("scoring", "champion", str(other))  # the UI's pencil
    try:
        with pytest.raises(RegistryError) as caught:
            run_score(scoring_project, "gate.outside_alias_moves=refuse")
        assert f"points to v{other}, but Stemma last made v1 the champion" in (
            caught.value.render()
        )
        assert not (scoring_project / "outputs/credit/scores/_SUCCESS").exists()
        # by default the flow says so and goes on with the alias as it is
        assert run_score(scoring_project)["model_version"] == str(other)
        assert f"warning: scoring: the champion alias points to v{other}" in run_status(
            scoring_project
        )
    finally:
        client.set_registered_model_alias("scoring", "champion", "1")
    assert "warning" not in run_status(scoring_project)


def test_scoring_one_file_writes_beside_the_full_scoring_and_keeps_it(scoring_project):
    from stemma.flows.cli import format_score_summary

    full = run_score(scoring_project)
    full_dir = Path(full["output"])
    assert full_dir == scoring_project / "outputs/credit/scores" and not full["own_output"]
    before = {path.name: path.read_bytes() for path in full_dir.iterdir() if path.is_file()}
    assert any(name.startswith("part-") for name in before)

    day = scoring_project / "data/credit/batches/day_01.parquet"
    narrow = run_score(scoring_project, input=str(day))
    narrow_dir = Path(narrow["output"])
    # a folder of its own, named for the input, beside the full scoring's
    assert narrow_dir == scoring_project / "outputs/credit/scores-day_01" and narrow["own_output"]
    assert narrow["rows"]["input"] == len(pd.read_parquet(day))
    assert sorted(read_output(narrow_dir)["application_id"]) == sorted(
        pd.read_parquet(day)["application_id"]
    )
    # the full scoring's parts and manifest are untouched, byte for byte
    after = {path.name: path.read_bytes() for path in full_dir.iterdir() if path.is_file()}
    assert after == before
    text = format_score_summary(narrow)
    assert f"output: {narrow_dir} (a folder of its own for this input" in text
    assert f"output: {full_dir}\n" in format_score_summary(full)

    # another file of the same name would land in that folder: refused, nothing replaced
    elsewhere = scoring_project / "incoming" / "day_01.parquet"
    elsewhere.parent.mkdir()
    pd.read_parquet(day).head(50).to_parquet(elsewhere, index=False)
    manifest = (narrow_dir / "_SUCCESS").read_bytes()
    with pytest.raises(DataError) as caught:
        run_score(scoring_project, input=str(elsewhere))
    assert "holds the scores of another input" in caught.value.headline
    assert "--output" in caught.value.render()
    assert (narrow_dir / "_SUCCESS").read_bytes() == manifest
    # scoring the same file again finds its own folder complete
    assert run_score(scoring_project, input=str(day))["already_complete"] is True
