"""`stemma reproduce`: a model trained here is rebuilt from its lineage alone, and compared.

Real Prefect API, MLflow store, DVC cache and git project. The rebuild must be
bit-identical on CPU and must leave the project's registry untouched; changed data bytes
are refused with both md5s named, and a changed seed gives a verdict naming the tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from stemma.components.data.tables import file_md5
from stemma.components.errors import DataVersionError, LineageError
from stemma.components.lineage import reproduce
from tests.support import dvc_add, git

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "reproduce"
TRAIN = [
    "train.epochs=2",
    "train.early_stopping=null",
    "train.batch_size=256",
    f"pipeline.name={NAME}",
    f"pipeline.model_name={NAME}",
]


@pytest.fixture(scope="module")
def trained(template_project, tmp_path_factory) -> tuple[Path, dict]:
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("reproduce") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    summary = train_flow(config=str(root / "configs" / "credit.yaml"), overrides=TRAIN)
    return root, summary


@pytest.fixture
def project(trained, tmp_path) -> Path:
    """A private copy of the trained project (git, DVC cache, data), free to change."""
    target = tmp_path / "project"
    shutil.copytree(trained[0], target, symlinks=True)
    return target


def registry_state() -> tuple[list, dict, int]:
    client = mlflow.MlflowClient()
    versions = sorted(
        (v.version, v.run_id) for v in client.search_model_versions(f"name = '{NAME}'")
    )
    aliases = dict(client.get_registered_model(NAME).aliases)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`stemma.pipeline` = '{NAME}'",
    )
    return versions, aliases, len(runs)


def test_a_model_is_rebuilt_bit_for_bit_from_the_dvc_cache_without_touching_the_registry(
    trained, project
):
    from stemma.flows.reproduce import run_reproduce

    _, summary = trained
    # The working tree moves on to a new data version; the old one stays in DVC's cache.
    path = project / "data" / "credit" / "train.parquet"
    frame = pd.read_parquet(path)
    pq.write_table(pa.Table.from_pandas(frame.iloc[:-10], preserve_index=False), path)
    dvc_add(project)
    before = registry_state()

    report = run_reproduce(f"models:/{NAME}@champion", project)

    assert report.reproduced, report.render()
    assert report.verdict.reproduced_sha256 == summary["weights_sha256"]
    assert report.verdict.tensors_compared >= 4  # two hidden layers and the output: weight, bias
    assert report.verdict.metrics_compared >= 6  # test metrics, best_epoch, epochs_run
    assert report.restored.source == "the DVC cache"
    text = report.render()
    assert f"REPRODUCED models:/{NAME}/{summary['model_version']}" in text
    assert report.verdict.files_compared >= 10 and report.verdict.files == []
    assert f"{report.verdict.files_compared} model files match" in text
    assert f"md5 {summary['data_md5']}, restored from the DVC cache, bytes verified" in text
    assert "train.seed=7, data.split.seed=7" in text
    # the code is a commit behind the working tree's data.dvc change: said loudly
    assert "WARNING" in text and "data.dvc" in text
    assert registry_state() == before  # no version, alias or run was added to the store


def test_a_changed_seed_gives_a_verdict_naming_the_tensors_and_exit_7(
    trained, stemma_exe, prefect_api
):
    root, summary = trained
    before = registry_state()
    result = subprocess.run(
        [
            *stemma_exe,
            "reproduce",
            f"models:/{NAME}/{summary['model_version']}",
            "--set",
            "train.seed=8",
        ],
        cwd=root,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 7, result.stderr[-3000:]
    out = result.stdout
    assert f"NOT REPRODUCED models:/{NAME}/{summary['model_version']}" in out
    assert "changed on purpose: --set train.seed=8" in out
    assert f"weights sha256: recorded {summary['weights_sha256']}, rebuilt " in out
    assert "values differ:" in out and "max abs diff" in out
    assert "metric test/" in out
    assert "restored from the working tree (data)" in out
    assert "WARNING" not in out  # same commit, clean tree
    assert "Traceback" not in result.stderr
    assert registry_state() == before


def test_data_bytes_changed_after_training_are_refused_naming_the_md5s(trained, project):
    from stemma.flows.reproduce import run_reproduce

    _, summary = trained
    # A workspace linked to the DVC cache (cache.type hardlink) edited in place: both the
    # file and its cached copy now hold other bytes.
    listing = json.loads(reproduce._cache_path(project, summary["data_md5"]).read_text())
    recorded = next(e["md5"] for e in listing if e["relpath"] == "credit/train.parquet")
    cached = reproduce._cache_path(project, recorded)
    path = project / "data" / "credit" / "train.parquet"
    frame = pd.read_parquet(path)
    frame.loc[frame.index[0], "salary"] = frame["salary"].iloc[0] + 1
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    cached.chmod(0o644)
    shutil.copy(path, cached)
    changed = file_md5(path)
    before = registry_state()

    with pytest.raises(DataVersionError) as caught:
        run_reproduce(f"models:/{NAME}/{summary['model_version']}", project)
    message = caught.value.render()
    assert f"data version {summary['data_md5']} (data.dvc) cannot be restored" in message
    assert f"recorded md5 {summary['data_md5']}" in message
    assert "the working tree's data hashes to " in message
    assert f"credit/train.parquet: recorded md5 {recorded}, the cached bytes hash to {changed}" in (
        message
    )
    assert caught.value.exit_code == 3
    assert registry_state() == before


def test_a_version_without_lineage_cannot_be_reproduced(trained):
    from stemma.flows.reproduce import run_reproduce

    root, _ = trained
    client = mlflow.MlflowClient()
    run = client.create_run(client.get_experiment_by_name("credit").experiment_id)
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    with pytest.raises(LineageError, match="carries no lineage"):
        run_reproduce(f"models:/{NAME}/{version.version}", root)
    client.set_model_version_tag(NAME, version.version, "stemma.run_id", run.info.run_id)
    with pytest.raises(LineageError) as caught:
        run_reproduce(f"models:/{NAME}/{version.version}", root)
    assert "lineage is incomplete" in caught.value.headline
    assert "missing version tag: stemma.data.md5" in caught.value.render()
    client.delete_model_version(NAME, version.version)


def test_code_warnings_name_the_commit_and_the_files_that_differ(trained, project):
    _, summary = trained
    rev = mlflow.MlflowClient().get_run(summary["run_id"]).data.tags["stemma.git.rev"]
    assert reproduce.code_revision_warnings(project, rev, False) == []
    config = project / "configs" / "credit.yaml"
    config.write_text(config.read_text() + "\n# edited\n")
    warnings = reproduce.code_revision_warnings(project, rev, False)
    assert warnings[0] == "the working tree has uncommitted changes to tracked files"
    assert "configs/credit.yaml" in warnings[-1]
    git(project, "commit", "-qam", "edit the spec")
    warnings = reproduce.code_revision_warnings(project, rev, True)
    assert any("trained from a working tree with uncommitted changes" in w for w in warnings)
    assert any(f"the model was trained at {rev}" in w for w in warnings)
    assert any("configs/credit.yaml" in w for w in warnings)


def test_tensor_and_metric_comparison_is_bit_exact(tmp_path):
    weights = {"a.weight": torch.zeros(3, 2), "a.bias": torch.ones(3)}
    save_file(weights, str(tmp_path / "one.safetensors"))
    same, differs = dict(weights), dict(weights)
    differs["a.bias"] = torch.tensor([1.0, np.nextafter(np.float32(1), np.float32(2)), 1.0])
    save_file(same, str(tmp_path / "same.safetensors"))
    save_file(differs, str(tmp_path / "differs.safetensors"))
    assert reproduce.compare_tensors(
        tmp_path / "one.safetensors", tmp_path / "same.safetensors"
    ) == (
        2,
        [],
    )
    count, found = reproduce.compare_tensors(
        tmp_path / "one.safetensors", tmp_path / "differs.safetensors"
    )
    assert count == 2 and [d.name for d in found] == ["a.bias"]
    assert found[0].differing == 1 and 0 < found[0].max_abs_diff < 1e-6
    assert reproduce.compare_metrics(
        {"x": float("nan"), "y": 1.0}, {"x": float("nan"), "y": 1.0}
    ) == (
        2,
        [],
    )
    _, metrics = reproduce.compare_metrics({"y": 1.0, "z": 2.0}, {"y": 1.0 + 1e-12})
    assert [(m.name, m.reproduced) for m in metrics] == [("y", 1.0 + 1e-12), ("z", None)]


def test_files_that_differ_from_their_digests_are_not_reproduced(trained):
    """A version whose recorded manifest disagrees with its files: refused before retraining."""
    from stemma.components.model.artifact import decode_manifest, encode_manifest
    from stemma.components.platform.tags import MODEL_FILES as MODEL_FILES_TAG
    from stemma.flows.reproduce import run_reproduce

    root, summary = trained
    client = mlflow.MlflowClient()
    original = client.get_model_version(NAME, summary["model_version"])
    manifest = decode_manifest(original.tags[MODEL_FILES_TAG])
    tags = {
        **original.tags,
        MODEL_FILES_TAG: encode_manifest({**manifest, "serving.py": "0" * 64}),
    }
    version = client.create_model_version(NAME, original.source, original.run_id, tags=tags)
    try:
        with pytest.raises(LineageError) as caught:
            run_reproduce(f"models:/{NAME}/{version.version}", root)
    finally:
        client.delete_model_version(NAME, version.version)
    assert caught.value.headline.startswith(f"NOT REPRODUCED models:/{NAME}/{version.version}")
    assert f"serving.py: changed (recorded {'0' * 64}, found {manifest['serving.py']})" in (
        caught.value.details
    )


def test_every_model_file_is_compared_less_what_names_the_run(tmp_path):
    recorded, rebuilt = tmp_path / "recorded", tmp_path / "rebuilt"
    for folder, run_id in ((recorded, "a" * 32), (rebuilt, "b" * 32)):
        (folder / "artifacts").mkdir(parents=True)
        (folder / "MLmodel").write_text(f"run_id: {run_id}\nflavors: {{}}\n")
        (folder / "artifacts" / "network.json").write_text("{}")
        (folder / "reference_profile.json").write_text(json.dumps({"created": run_id, "n": 1}))
    (rebuilt / "serving.py").write_text("changed")

    compared, problems = reproduce.compare_model_files(recorded, rebuilt)

    assert compared == 4
    assert problems == ["serving.py: not in the recorded model"]
