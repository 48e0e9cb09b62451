"""`stemma demo` on a small scale: drift appears on day 6 and triggers a retraining."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from stemma.flows.cli import main
from stemma.flows.demo import format_demo, run_demo


@pytest.fixture
def demo(tmp_path, repo_root, prefect_api, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return run_demo(
        repo_root, days=6, train_rows=3_000, batch_rows=1_000, location=tmp_path / "demo"
    )


def test_demo_plays_the_days_and_retrains_when_drift_appears(demo, capsys):
    days = {row.day: row for row in demo["days"]}
    assert sorted(days) == list(range(7))
    assert days[0].champion == "1"
    assert all(days[d].rows_scored == 1_000 for d in range(1, 7))
    # The generator shifts the population from day 6: the monitor sees it, a retraining
    # runs because of it; the quiet days before trigger nothing.
    assert all(days[d].drift == "no" for d in range(1, 6)), [days[d].drift for d in range(1, 6)]
    assert days[6].drift.startswith("yes")
    assert days[6].decision.startswith("retrained v2")

    root = demo["root"]
    mlflow.set_tracking_uri(f"sqlite:///{root}/.stemma/mlflow.db")
    client = mlflow.MlflowClient()
    version = client.get_model_version("credit", "2")
    # its training run is the retraining's child, and the retraining run holds the cause
    training = client.get_run(version.run_id)
    retraining = client.get_run(training.data.tags["mlflow.parentRunId"]).data.tags
    report = client.get_run(retraining["stemma.cause.run_id"])
    assert report.data.tags["stemma.flow"] == "monitor"
    record = mlflow.artifacts.load_dict(
        f"runs:/{training.data.tags['mlflow.parentRunId']}/lineage/record.json"
    )
    (cause,) = [node for node in record["nodes"] if node["kind"] == "drift_report"]
    assert "day_06" in cause["attributes"]["batch"]
    # The retraining recorded a new data version and committed its pointer.
    log = subprocess.run(
        ["git", "log", "--format=%s", "--", "data.dvc"], cwd=root, capture_output=True, text=True
    ).stdout.splitlines()
    assert len(log) == 2 and log[0].startswith("Record data version")
    md5 = yaml.safe_load(Path(root, "data.dvc").read_text())["outs"][0]["md5"]
    assert version.tags["stemma.data.md5"] == md5

    table = format_demo(demo)
    assert "champion" in table and "stemma lineage models:/credit@champion" in table
    assert "run `stemma up` before the demo" in table
    # with the flow runs on a lasting server, the table points at its UI instead
    kept = format_demo(demo, prefect_ui="http://127.0.0.1:4311")
    assert "Prefect UI: http://127.0.0.1:4311/runs" in kept and "before the demo" not in kept

    # `stemma lineage` on the champion: a summary that fits a screen, names the version
    # and the run that trained it; --full prints every node and edge.
    champion = client.get_model_version_by_alias("credit", "champion")
    capsys.readouterr()
    assert main(["lineage", "models:/credit@champion", "--root", str(root)]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert len(summary) <= 30, "\n".join(summary)
    assert summary[2].startswith(f"model version credit v{champion.version} · "), summary[2]
    assert any(f"train run {champion.run_id[:8]}" in line for line in summary[:15]), summary
    assert main(["lineage", "models:/credit@champion", "--root", str(root), "--full"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > len(summary)
