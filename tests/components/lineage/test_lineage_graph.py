"""The lineage walker against a real MLflow store on SQLite, filled the way the flows fill it.

The store holds two training runs on one data version (one indexed as older Stemma versions
did, one tag per node), a scoring run, a drift-report run and a retraining run caused by the
report (node kinds the walker was not written for), a run recorded before records were
indexed, and a version registered outside Stemma.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import RunTag

from stemma.components.errors import LineageError
from stemma.components.lineage.graph import (
    DOWNSTREAM,
    SUMMARY_WIDTH,
    UPSTREAM,
    GraphNode,
    LineageGraph,
    RecordIndex,
    render_mermaid,
    render_summary,
    render_tree,
    walk,
)
from stemma.components.lineage.index import key_metrics
from stemma.components.lineage.picture import render_svg
from stemma.components.platform import lineage
from tests.support import isolated_mlflow, legacy_index_tags

MODEL = "credit"
DATA_1 = "a" * 32 + ".dir"
DATA_2 = "b" * 32 + ".dir"
FILE_1 = "1" * 32
FILE_2 = "2" * 32


@dataclass
class Store:
    client: MlflowClient
    root: Path
    experiment: str
    runs: dict[str, str]
    predictions: str
    drift_report: str
    manifest: Path


def _index(
    client: MlflowClient, run_id: str, record: dict, extra: dict[str, str], *, legacy=False
) -> None:
    """Log the record and its index tags as the flows do (``legacy``: as older versions did)."""
    client.log_dict(run_id, record, lineage.RECORD_ARTIFACT)
    index = legacy_index_tags(record, run_id) if legacy else lineage.index_tags(record, run_id)
    tags = {**extra, **index}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.set_terminated(run_id)


def _train(
    client, experiment, name, data_md5, file_md5, version, *, index=True, legacy=False
) -> str:
    run = client.create_run(experiment, run_name=name)
    run_id = run.info.run_id
    facts = lineage.TrainingLineage(
        pipeline="credit",
        data_pointer="data.dvc",
        data_md5=data_md5,
        data_path="data",
        file_path="data/credit/train.parquet",
        file_md5=file_md5,
        git_rev=None,
        git_dirty=False,
        validation_digest=hashlib.sha256(file_md5.encode()).hexdigest(),
        validation_success=True,
        run_id=run_id,
        experiment_id=experiment,
        flow_run_id=f"flow-run-of-{name}",
        config_path="configs/credit.yaml",
        config_sha256="c" * 64,
        model_name=MODEL,
        model_version=version,
        weights_sha256=hashlib.sha256(name.encode()).hexdigest(),
    )
    record = lineage.build_training_record(facts).to_dict()
    tags = {
        **lineage.run_tags(facts),
        "stemma.flow": "train",
        "stemma.prefect.flow_run_id": f"flow-run-of-{name}",
    }
    if index:
        _index(client, run_id, record, tags, legacy=legacy)
    else:  # recorded before the index tags existed: the artifact only
        client.log_dict(run_id, record, lineage.RECORD_ARTIFACT)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id)
    client.create_model_version(
        MODEL, f"runs:/{run_id}/model", run_id=run_id, tags=_older_version_tags(facts)
    )
    return run_id


def _older_version_tags(facts: lineage.TrainingLineage) -> dict[str, str]:
    """The tags versions carried before the tag budget (run id, data, checks, commit):
    what resolving and walking still read in stores an older Stemma wrote."""
    found = {
        "stemma.run_id": facts.run_id,
        "stemma.data.md5": facts.data_md5,
        "stemma.data.file_md5": facts.file_md5,
        "stemma.checks.digest": facts.validation_digest,
        "stemma.weights.sha256": facts.weights_sha256,
        "stemma.git.rev": facts.git_rev,
    }
    return {key: value for key, value in found.items() if value}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    tmp_path = tmp_path_factory.mktemp("lineage-store")
    root = tmp_path / "project"
    output = root / "outputs" / "scores"
    output.mkdir(parents=True)
    part = output / "part-00000-00000.parquet"
    part.write_bytes(b"scored rows")
    manifest = output / "_SUCCESS"
    manifest.write_text(
        json.dumps(
            {"parts": [{"name": part.name, "sha256": hashlib.sha256(b"scored rows").hexdigest()}]}
        )
    )
    manifest_sha256 = hashlib.sha256(manifest.read_bytes()).hexdigest()

    with isolated_mlflow():
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment(
            "credit", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        client.create_registered_model(MODEL)
        runs = {
            "train-1": _train(client, experiment, "train-1", DATA_1, FILE_1, "1"),
            # indexed by an older Stemma: one tag per node, the node's body in it
            "train-2": _train(client, experiment, "train-2", DATA_1, FILE_1, "2", legacy=True),
        }
        client.set_registered_model_alias(MODEL, "champion", "2")

        score = client.create_run(experiment, run_name="score-1")
        scoring = lineage.ScoringLineage(
            pipeline="credit",
            input_path="data/credit/batches",
            input_digest="d" * 32,
            input_files={"data/credit/batches/day-01.parquet": "e" * 32},
            data_pointer="data.dvc",
            data_md5=DATA_1,
            model_name=MODEL,
            model_version="2",
            weights_sha256=hashlib.sha256(b"train-2").hexdigest(),
            run_id=score.info.run_id,
            experiment_id=experiment,
            flow_run_id="flow-run-of-score-1",
            output_path="outputs/scores",
            manifest_sha256=manifest_sha256,
            parts={part.name: hashlib.sha256(b"scored rows").hexdigest()},
            rows_scored=1000,
            rows_rejected=0,
        )
        predictions = lineage.predictions_node_id("outputs/scores", manifest_sha256)
        _index(
            client,
            score.info.run_id,
            lineage.build_scoring_record(scoring).to_dict(),
            {
                "stemma.flow": "score",
                "stemma.pipeline": "credit",
                "stemma.output.sha256": manifest_sha256,
                "stemma.data.md5": DATA_1,
                "stemma.prefect.flow_run_id": "flow-run-of-score-1",
            },
        )
        runs["score-1"] = score.info.run_id

        # A kind of node written by a flow the walker knows nothing about.
        drift = client.create_run(experiment, run_name="monitor-1")
        drift_run = lineage.run_node_id(drift.info.run_id)
        report = f"drift-report:credit@{'f' * 64}"
        _index(
            client,
            drift.info.run_id,
            {
                "schema": lineage.RECORD_SCHEMA,
                "flow": "monitor",
                "nodes": [
                    {
                        "kind": "predictions",
                        "id": predictions,
                        "digest": f"sha256:{manifest_sha256}",
                    },
                    {"kind": "run", "id": drift_run, "digest": None, "attributes": {}},
                    {
                        "kind": "drift_report",
                        "id": report,
                        "digest": f"sha256:{'f' * 64}",
                        "attributes": {"psi_max": 0.31, "drifted": True},
                    },
                ],
                "edges": [
                    {"source": predictions, "target": drift_run, "relation": "monitored"},
                    {"source": drift_run, "target": report, "relation": "produced"},
                ],
            },
            {"stemma.flow": "monitor", "stemma.pipeline": "credit"},
        )
        runs["monitor-1"] = drift.info.run_id

        # Retraining caused by the report, on a new data version.
        retrain = _train(client, experiment, "train-3", DATA_2, FILE_2, "3", index=False)
        record = lineage.build_training_record(
            lineage.TrainingLineage(
                pipeline="credit",
                data_pointer="data.dvc",
                data_md5=DATA_2,
                data_path="data",
                file_path="data/credit/train.parquet",
                file_md5=FILE_2,
                git_rev=None,
                git_dirty=False,
                validation_digest=hashlib.sha256(FILE_2.encode()).hexdigest(),
                validation_success=True,
                run_id=retrain,
                experiment_id=experiment,
                flow_run_id="flow-run-of-train-3",
                config_path="configs/credit.yaml",
                config_sha256="c" * 64,
                model_name=MODEL,
                model_version="3",
                weights_sha256=hashlib.sha256(b"train-3").hexdigest(),
            )
        ).to_dict()
        record["nodes"].append(
            {"kind": "drift_report", "id": report, "digest": f"sha256:{'f' * 64}", "attributes": {}}
        )
        record["edges"].append(
            {"source": report, "target": lineage.run_node_id(retrain), "relation": "triggered"}
        )
        _index(client, retrain, record, {})
        runs["train-3"] = retrain

        # Recorded before the index tags existed: reachable by its version's run tag.
        runs["legacy"] = _train(client, experiment, "legacy", DATA_1, FILE_1, "4", index=False)
        # Registered by hand, outside Stemma.
        plain = client.create_run(experiment, run_name="by-hand")
        client.create_model_version(
            MODEL, f"runs:/{plain.info.run_id}/model", run_id=plain.info.run_id
        )

        yield Store(client, root, experiment, runs, predictions, report, manifest)


def _walk(store: Store, reference: str, direction: str = UPSTREAM, **options):
    return walk(
        reference, RecordIndex(store.client), root=store.root, direction=direction, **options
    )


def _edges(graph) -> set[tuple[str, str, str]]:
    return {(edge.source, edge.target, edge.relation) for edge in graph.edges}


def test_upstream_of_an_old_style_champion_reaches_data_checks_and_run_from_tags_alone(store):
    # Runs indexed by older Stemma versions answer from their tags: the artifact store may
    # be gone entirely.
    artifacts = Path(store.client.get_experiment(store.experiment).artifact_location[7:])
    hidden = artifacts.with_name("hidden")
    artifacts.rename(hidden)
    try:
        graph = _walk(store, "models:/credit@champion")
    finally:
        hidden.rename(artifacts)
    train = lineage.run_node_id(store.runs["train-2"])
    model = "models:/credit/2"
    data = lineage.data_node_id("data.dvc", DATA_1)
    data_file = lineage.file_node_id("data/credit/train.parquet", FILE_1)
    assert graph.root == model
    assert {node.kind for node in graph.nodes.values()} == {
        "model_version",
        "run",
        "data_file",
        "validation",
        "data_version",
    }
    assert (train, model, "produced") in _edges(graph)
    assert (data, data_file, "contains") in _edges(graph)
    # the other training run on the same data is no ancestor of this version
    assert lineage.run_node_id(store.runs["train-1"]) not in graph.nodes
    version = graph.nodes[model]
    assert version.made_by == train
    assert version.flow_run_id == "flow-run-of-train-2"
    assert version.attributes["aliases"] == ["champion"]
    assert version.digest == f"sha256:{hashlib.sha256(b'train-2').hexdigest()}"
    assert version.created is not None
    assert graph.nodes[train].flow_run_id == "flow-run-of-train-2"
    assert graph.nodes[data].digest == f"md5:{DATA_1}"


def test_new_node_kinds_appear_upstream_without_code_for_them(store):
    graph = _walk(store, "models:/credit/3")
    report = graph.nodes[store.drift_report]
    assert report.kind == "drift_report"
    assert report.attributes == {"psi_max": 0.31, "drifted": True}
    assert report.made_by == lineage.run_node_id(store.runs["monitor-1"])
    # through the report: the predictions it monitored, the scoring run, the champion
    # that scored them, and the data both trainings read
    assert store.predictions in graph.nodes
    assert "models:/credit/2" in graph.nodes
    assert lineage.data_node_id("data.dvc", DATA_1) in graph.nodes
    assert lineage.data_node_id("data.dvc", DATA_2) in graph.nodes
    assert (store.drift_report, lineage.run_node_id(store.runs["train-3"]), "triggered") in _edges(
        graph
    )


def test_downstream_of_a_data_version_reaches_models_predictions_and_reports(store):
    graph = _walk(store, DATA_1, DOWNSTREAM)
    assert graph.root == lineage.data_node_id("data.dvc", DATA_1)
    for name in ("train-1", "train-2", "score-1", "monitor-1", "train-3"):
        assert lineage.run_node_id(store.runs[name]) in graph.nodes, name
    assert {"models:/credit/1", "models:/credit/2", "models:/credit/3"} <= set(graph.nodes)
    assert store.predictions in graph.nodes and store.drift_report in graph.nodes
    assert graph.nodes[store.predictions].made_by == lineage.run_node_id(store.runs["score-1"])
    # the new data version is no descendant of the old one
    assert lineage.data_node_id("data.dvc", DATA_2) not in graph.nodes


def test_downstream_follows_at_most_max_runs_per_node_and_says_so(store):
    second = store.client.create_run(store.experiment, run_name="score-2")
    record = {
        "schema": lineage.RECORD_SCHEMA,
        "flow": "score",
        "nodes": [
            {"kind": "model_version", "id": "models:/credit/2", "digest": None},
            {"kind": "run", "id": lineage.run_node_id(second.info.run_id), "digest": None},
            {"kind": "predictions", "id": "predictions:elsewhere@" + "9" * 64, "digest": None},
        ],
        "edges": [
            {
                "source": "models:/credit/2",
                "target": lineage.run_node_id(second.info.run_id),
                "relation": "scored_with",
            },
            {
                "source": lineage.run_node_id(second.info.run_id),
                "target": "predictions:elsewhere@" + "9" * 64,
                "relation": "produced",
            },
        ],
    }
    _index(store.client, second.info.run_id, record, {"stemma.flow": "score"})
    try:
        everything = _walk(store, "models:/credit/2", DOWNSTREAM, max_runs=None)
        assert {"predictions:elsewhere@" + "9" * 64, store.predictions} <= set(everything.nodes)
        assert not everything.truncated
        newest = _walk(store, "models:/credit/2", DOWNSTREAM, max_runs=1)
        assert "predictions:elsewhere@" + "9" * 64 in newest.nodes  # newest first
        assert store.predictions not in newest.nodes
        assert newest.truncated == {"models:/credit/2": True}
        assert "--all" in render_tree(newest)
    finally:
        store.client.delete_run(second.info.run_id)  # the other tests see the store as built


def test_a_run_recorded_before_indexing_is_read_from_its_artifact(store):
    graph = _walk(store, "models:/credit/4")
    legacy = lineage.run_node_id(store.runs["legacy"])
    assert (legacy, "models:/credit/4", "produced") in _edges(graph)
    assert lineage.data_node_id("data.dvc", DATA_1) in graph.nodes


@pytest.mark.parametrize(
    "form",
    ["folder", "manifest", "part", "node id"],
    ids=["folder", "manifest", "part", "node-id"],
)
def test_a_prediction_output_resolves_in_every_form(store, form):
    folder = store.manifest.parent
    reference = {
        "folder": str(folder),
        "manifest": str(store.manifest),
        "part": str(folder / "part-00000-00000.parquet"),
        "node id": store.predictions,
    }[form]
    graph = _walk(store, reference)
    assert graph.root == store.predictions
    assert "models:/credit/2" in graph.nodes
    assert lineage.run_node_id(store.runs["train-2"]) in graph.nodes


def test_a_run_id_and_a_dvc_file_at_a_git_revision_resolve(store, tmp_path):
    graph = _walk(store, store.runs["score-1"])
    assert graph.root == lineage.run_node_id(store.runs["score-1"])
    assert "models:/credit/2" in graph.nodes

    root = tmp_path
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t.invalid",
    }
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    (root / "data.dvc").write_text(f"outs:\n- md5: {DATA_1}\n  path: data\n  hash: md5\n")
    subprocess.run(["git", "add", "data.dvc"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=root, check=True, env=env)
    (root / "data.dvc").write_text(f"outs:\n- md5: {DATA_2}\n  path: data\n  hash: md5\n")
    subprocess.run(["git", "commit", "-qam", "new data"], cwd=root, check=True, env=env)

    old = walk("data.dvc@HEAD~1", RecordIndex(store.client), root=root, direction=DOWNSTREAM)
    assert old.root == lineage.data_node_id("data.dvc", DATA_1)
    assert "models:/credit/2" in old.nodes
    new = walk("data.dvc@HEAD", RecordIndex(store.client), root=root, direction=DOWNSTREAM)
    assert new.root == lineage.data_node_id("data.dvc", DATA_2)
    assert set(new.nodes) >= {"models:/credit/3"} and "models:/credit/2" not in new.nodes


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (
            "credit",
            ["names nothing Stemma can trace", "models:/<name>@<alias>", "data.dvc@<git rev>"],
        ),
        ("0123456789abcdef0123456789abcdef", ["no MLflow run with this id", "no data version"]),
        ("mlflow-run:0123456789abcdef0123456789abcdef", ["no MLflow run with this id"]),
        ("models:/credit/5", ["models:/credit/5 carries no lineage", "outside Stemma"]),
        ("models:/credit/99", ["no such model version", "its versions: 1, 2, 3, 4, 5"]),
        ("models:/credit@nope", ["no such model alias", "champion -> v2"]),
        ("models:/other@champion", ["no registered model named 'other'"]),
        ("data.dvc@no-such-rev", ["cannot read it", "git show no-such-rev:data.dvc"]),
    ],
    ids=[
        "unknown-form",
        "missing-run-or-md5",
        "missing-run-node",
        "version-without-lineage",
        "missing-version",
        "missing-alias",
        "missing-model",
        "bad-git-rev",
    ],
)
def test_references_that_name_nothing_are_clear_errors(store, reference, expected):
    with pytest.raises(LineageError) as caught:
        _walk(store, reference)
    message = caught.value.render()
    for text in expected:
        assert text in message, message
    assert caught.value.exit_code == 6


def test_a_part_file_changed_after_scoring_is_refused(store, tmp_path):
    copy = tmp_path / "scores"
    shutil.copytree(store.manifest.parent, copy)
    part = copy / "part-00000-00000.parquet"
    part.write_bytes(b"tampered")
    with pytest.raises(LineageError, match="changed since it was written"):
        _walk(store, str(part))


def test_renderings_name_every_node_and_edge(store):
    graph = _walk(store, "models:/credit/3")
    tree = render_tree(graph)
    for node_id in graph.nodes:
        assert node_id in tree, node_id
    assert "flow run flow-run-of-train-3" in tree
    assert "(see above)" in tree  # the data version is reached twice
    mermaid = render_mermaid(graph)
    assert mermaid.startswith("flowchart LR")
    assert mermaid.count("-->|") == len(graph.edges)
    document = json.loads(json.dumps(graph.to_dict()))
    assert document["root"] == "models:/credit/3"
    assert {node["id"] for node in document["nodes"]} == set(graph.nodes)
    assert all(node["asset_key"].startswith("stemma://") for node in document["nodes"])


def test_index_tags_split_a_record_into_what_the_run_made_and_used():
    record = lineage.build_training_record(
        lineage.TrainingLineage(
            pipeline="p",
            data_pointer="data.dvc",
            data_md5=DATA_1,
            data_path="data",
            file_path="data/x.parquet",
            file_md5=FILE_1,
            git_rev="abc",
            git_dirty=False,
            validation_digest="v" * 64,
            validation_success=True,
            run_id="r" * 32,
            experiment_id="1",
            flow_run_id=None,
            config_path="c.yaml",
            config_sha256="c" * 64,
            model_name="m",
            model_version="1",
            weights_sha256="w" * 64,
        )
    ).to_dict()
    made, used = lineage.record_roles(record, "r" * 32)
    assert made == {"models:/m/1"}
    assert used == {
        lineage.data_node_id("data.dvc", DATA_1),
        lineage.file_node_id("data/x.parquet", FILE_1),
        lineage.validation_node_id("v" * 64),
    }
    tags = lineage.index_tags(record, "r" * 32)

    def entries(ids: set[str]) -> str:
        listed = [
            f"{n['kind']}:{lineage.index_key(n['id'])}" for n in record["nodes"] if n["id"] in ids
        ]
        return "|" + "|".join(listed) + "|"

    # two tags, whatever the record holds: bodies and edges stay in the artifact
    assert tags == {lineage.MADE_NODES_TAG: entries(made), lineage.USED_NODES_TAG: entries(used)}
    assert tags[lineage.MADE_NODES_TAG] == f"|model_version:{lineage.index_key('models:/m/1')}|"


def _wide_record(run_id: str, files: int) -> dict:
    """A run that read ``files`` data files and made one model version."""
    run = lineage.run_node_id(run_id)
    nodes = [{"kind": "run", "id": run, "digest": None}]
    edges = []
    for number in range(files):
        node = lineage.file_node_id(f"wide/part-{number:04d}.parquet", f"{number:032x}")
        nodes.append({"kind": "data_file", "id": node, "digest": f"md5:{number:032x}"})
        edges.append({"source": node, "target": run, "relation": "used"})
    nodes.append({"kind": "model_version", "id": "models:/wide/1", "digest": None})
    edges.append({"source": run, "target": "models:/wide/1", "relation": "produced"})
    return {"schema": lineage.RECORD_SCHEMA, "flow": "train", "nodes": nodes, "edges": edges}


def test_a_record_too_wide_for_one_tag_continues_in_numbered_tags():
    record = _wide_record("w" * 32, 600)
    tags = lineage.index_tags(record, "w" * 32)
    used = lineage.USED_NODES_TAG
    assert sorted(tags) == sorted([lineage.MADE_NODES_TAG, used, f"{used}.2", f"{used}.3"])
    assert all(len(value) <= lineage.MAX_INDEX_TAG_CHARS for value in tags.values())
    listed = [entry for value in tags.values() for entry in lineage.index_entries(value)]
    assert len(listed) == len(record["nodes"]) - 1  # every node but the run's own, once
    assert ("data_file", lineage.index_key(record["nodes"][-2]["id"])) in listed


def test_a_node_in_a_continued_index_tag_is_found_both_ways(store):
    run = store.client.create_run(store.experiment, run_name="wide")
    record = _wide_record(run.info.run_id, 600)
    _index(store.client, run.info.run_id, record, {"stemma.flow": "train"})
    last_file = record["nodes"][-2]["id"]  # listed in the last continuation tag
    try:
        downstream = _walk(store, last_file, DOWNSTREAM)
        assert "models:/wide/1" in downstream.nodes
        assert downstream.nodes["models:/wide/1"].made_by == lineage.run_node_id(run.info.run_id)
        upstream = RecordIndex(store.client)
        assert [r.run_id for r in upstream.runs_that_used(last_file)] == [run.info.run_id]
        assert upstream.index_parts(lineage.USED_NODES_TAG)[-1] == (f"{lineage.USED_NODES_TAG}.3")
        # a key is never matched across two entries, nor by a node the run did not read
        assert not upstream.runs_that_used(lineage.file_node_id("wide/other.parquet", "0" * 32))
    finally:
        store.client.delete_run(run.info.run_id)  # the other tests see the store as built


def test_asset_keys_are_valid_prefect_keys():
    from prefect.assets import Asset

    for node_id in (
        "models:/credit/7",
        lineage.data_node_id("data.dvc", DATA_1),
        "predictions:out dir/with space@" + "0" * 64,
        "input:" + "x" * 600,
    ):
        key = lineage.asset_key(node_id)
        assert Asset(key=key).key == key
    assert lineage.asset_key("models:/credit/7") == "stemma://models:/credit/7"
    assert lineage.asset_key("input:" + "x" * 600) != lineage.asset_key("input:" + "x" * 601)


def test_the_run_that_made_a_version_directly_is_its_maker(store):
    # A retraining run that started earlier and triggered the training run also lists the
    # version among what it made; the training run, with the direct edge, stays its maker.
    retrain = store.client.create_run(store.experiment, run_name="retrain", start_time=1000)
    retrain_node = lineage.run_node_id(retrain.info.run_id)
    train = lineage.run_node_id(store.runs["train-3"])
    record = {
        "schema": lineage.RECORD_SCHEMA,
        "flow": "retrain",
        "nodes": [
            {"kind": "run", "id": retrain_node, "digest": None},
            {"kind": "training_run", "id": train, "digest": None},
            {"kind": "model_version", "id": "models:/credit/3", "digest": None},
        ],
        "edges": [
            {"source": retrain_node, "target": train, "relation": "triggered"},
            {"source": train, "target": "models:/credit/3", "relation": "produced"},
        ],
    }
    _index(store.client, retrain.info.run_id, record, {"stemma.flow": "retrain"})
    try:
        graph = _walk(store, "models:/credit/3")
        assert graph.nodes["models:/credit/3"].made_by == train
        assert (retrain_node, train, "triggered") in _edges(graph)
        assert graph.nodes[retrain_node].attributes["flow"] == "retrain"
        # the run's own record calls it a run; a record naming it more specifically wins
        assert graph.nodes[train].kind == "training_run"
    finally:
        store.client.delete_run(retrain.info.run_id)


def _retraining_chain(retrainings: int) -> LineageGraph:
    """A champion trained on the last of ``retrainings + 1`` data versions, each made by a
    retraining run from the one before; the last data version is reached twice (checked
    by the validation and read by the training run)."""
    model, train = "models:/credit/9", lineage.run_node_id("a" * 32)
    validation = f"gx-validation:{'5' * 64}"
    md5s = [f"{i}" * 32 + ".dir" for i in range(retrainings + 1)]
    data = [lineage.data_node_id("data.dvc", md5) for md5 in md5s]
    retrains = [lineage.run_node_id(f"{i}" * 32) for i in range(1, retrainings + 1)]
    decision = f"decision:{'6' * 32}"
    graph = LineageGraph(reference="models:/credit@champion", root=model, direction=UPSTREAM)
    for node in (
        GraphNode(
            model,
            "model_version",
            f"sha256:{'8' * 64}",
            "2026-12-06T18:07:51+00:00",
            attributes={"aliases": ["champion"], "gate": "passed", "role": "challenger"},
        ),
        GraphNode(
            train,
            "run",
            created="2026-12-06T18:07:45+00:00",
            attributes={
                "flow": "train",
                "status": "FINISHED",
                "metrics": {"test_roc_auc": 0.93712, "test_f1": 0.8},
            },
        ),
        GraphNode(validation, "validation", f"sha256:{'5' * 64}", attributes={"success": True}),
        GraphNode(decision, "decision", attributes={"decision": "promote"}),
        *(GraphNode(n, "data_version", f"md5:{md5}") for n, md5 in zip(data, md5s, strict=True)),
        *(GraphNode(run, "run", attributes={"flow": "retrain"}) for run in retrains),
    ):
        graph.nodes[node.id] = node
    graph.edges = [
        lineage.Edge(train, model, "produced"),
        lineage.Edge(decision, model, "promote"),
        lineage.Edge(validation, train, "gated"),
        lineage.Edge(data[-1], train, "input_of"),
        lineage.Edge(data[-1], validation, "checked_by"),
    ]
    for before, run, after in zip(data[:-1], retrains, data[1:], strict=True):
        graph.edges += [lineage.Edge(before, run, "input_of"), lineage.Edge(run, after, "produced")]
    return graph


def test_the_summary_folds_a_chain_of_retrainings_and_shows_each_node_once():
    graph = _retraining_chain(8)
    summary = render_summary(graph)
    lines = summary.splitlines()
    assert lines[0] == "upstream of models:/credit@champion (models:/credit/9)"
    assert lines[2].startswith("model version credit v9 · 2026-12-06 18:07 · @champion")
    assert "gate passed · role challenger" in lines[2]
    assert "produced: train run aaaaaaaa · 2026-12-06 18:07 · test_roc_auc 0.937" in summary
    assert "gated: validation 55555555 · passed" in summary
    assert "promote: decision 66666666 · decision promote" in summary
    # model → train run → validation → data v8 → retrain run → data v7, then the third run
    # on the path folds: runs 1 to 7 and data versions 0 to 6 are the 14 nodes beyond.
    (fold,) = [line for line in lines if "…" in line]
    assert fold.endswith("└── … 14 more upstream nodes (stemma lineage --full)")
    body = summary.split("\n\n")[1].splitlines()  # between the header and the note
    assert len(body) - 1 + 14 == len(graph.nodes)  # every node printed once or folded
    # the last data version is reached twice and printed once
    assert summary.count("data.dvc@88888888.dir") == 1
    assert "(1 link to nodes above not repeated; --full shows every node and edge)" in summary
    assert not re.search(r"[0-9a-f]{32,}", summary), summary
    assert len(lines) <= 30 and max(len(line) for line in lines) <= SUMMARY_WIDTH
    tree = render_tree(graph)
    assert all(node_id in tree for node_id in graph.nodes)
    assert len(tree.splitlines()) > len(lines)


def test_the_lineage_picture_draws_the_summary_tree_as_boxes():
    from xml.etree import ElementTree

    graph = _retraining_chain(8)
    svg = render_svg(graph)
    document = ElementTree.fromstring(svg)  # well-formed, self-contained: no external href
    namespace = "{http://www.w3.org/2000/svg}"
    boxes = document.findall(f"{namespace}rect")
    body = render_summary(graph).split("\n\n")[1].splitlines()
    assert len(boxes) == len(body)  # one box per summary line: each node once, or a fold
    assert [box.get("stroke-width") for box in boxes].count("3") == 1  # the start: credit v9
    texts = [text.text for text in document.iter(f"{namespace}text")]
    assert "credit v9" in texts and "train run aaaaaaaa" in texts
    assert "… and 14 more nodes beyond" in texts and "promote" in texts  # the decision's edge
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # data flows left to right: the model version stands right of the run that made it
    x = {text.text: float(text.get("x")) for text in document.iter(f"{namespace}text")}
    assert x["credit v9"] > x["train run aaaaaaaa"] > x["55555555"]


def test_the_summary_folds_downstream_too_and_counts_each_hidden_node_once():
    upstream = _retraining_chain(8)
    root = lineage.data_node_id("data.dvc", "0" * 32 + ".dir")
    graph = LineageGraph(
        reference=root, root=root, direction=DOWNSTREAM, nodes=upstream.nodes, edges=upstream.edges
    )
    summary = render_summary(graph)
    body = summary.split("\n\n")[1].splitlines()
    folds = [int(line.split("… ")[1].split()[0]) for line in body if "… " in line]
    assert folds == [16] and "more downstream nodes" in summary
    # every node but the decision (upstream of the model only) is printed or folded
    assert len(body) - len(folds) + sum(folds) == len(graph.nodes) - 1
    assert not re.search(r"[0-9a-f]{32,}", "\n".join(body)), summary  # the header quotes REF


def test_run_nodes_carry_at_most_three_key_metrics_test_first(store):
    run_id = store.runs["train-1"]
    for name, value in {
        "train/loss": 0.4,
        "val/loss": 0.39,
        "gate/passed": 1.0,
        "test/roc_auc": 0.93712,
        "test/f1": 0.81,
        "train/seconds": 3.2,
    }.items():
        store.client.log_metric(run_id, name, value)
    graph = _walk(store, "models:/credit/1")
    metrics = graph.nodes[lineage.run_node_id(run_id)].attributes["metrics"]
    assert list(metrics) == ["test/f1", "test/roc_auc", "gate/passed"]
    assert metrics["test/roc_auc"] == pytest.approx(0.93712)
    json.loads(json.dumps(graph.to_dict(), allow_nan=False))
    assert "test/roc_auc 0.937" in render_summary(graph)
    # a shadow run shows its agreement, not its latencies
    shadow = {"shadow/challenger_latency_ms_p50": 2.0, "shadow/agreement": 0.98}
    assert key_metrics(shadow) == {"shadow/agreement": 0.98}
    # a run an older Stemma logged with flat names ranks the same; not finite values and
    # metrics no decision rests on are left out
    assert key_metrics({"val_auc": math.nan, "epoch": 3.0, "gate_passed": 1.0}) == {
        "gate_passed": 1.0
    }
    assert list(key_metrics({"train_loss": 0.4, "gate_passed": 1.0, "test_f1": 0.8})) == [
        "test_f1",
        "gate_passed",
    ]
