"""One comparison of a version with all its variants, the cheapest alias, and serving it.

The models are real and registered in a real MLflow store on SQLite: a multiclass MLP on
sklearn's wine with two quantized variants, a hand-registered smaller MLP tagged as a
pruned variant, and an int8 variant of that pruned one; and a regression MLP on sklearn's
diabetes with no variant at all.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.compression import comparison as compare
from stemma.components.compression.plots import plot_comparison
from stemma.components.errors import CompressionError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.quantization import heldout, methods, registering
from stemma.components.quantization.registering import served_reference
from stemma.components.runtime.backends import set_threads
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import CompressSpec, QuantizeSpec, load_spec
from tests.support import build_multiclass_project, git, isolated_mlflow, log_trained_model

WINE = "wine-compare"
DIABETES = "diabetes-compare"
#: A fast probe: the figures' shape is tested, not their size.
PROBE = {"warmup": 1, "repeats": 5}
DIABETES_SPEC = """\
pipeline: {{name: diabetes, model_name: {name}}}
data:
  path: data/diabetes/train.parquet
  task: regression
  target: progression
  features:
    numeric: [{features}]
  split: {{method: random, test_fraction: 0.2, seed: 7}}
model: {{architecture: mlp, hidden: [16]}}
train: {{epochs: 2, batch_size: 32, seed: 7}}
gate: {{metric: rmse}}
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    set_threads(1)


def log_mlp(root: Path, spec, name: str, *, task: str, hidden, seed=7):
    """A seeded MLP on the spec's table, logged as a model: ``(info, sha256, run_id)``."""
    frame = pd.read_parquet(root / spec.data.path)
    _, _, info, sha256, run_id = log_trained_model(
        frame,
        spec.data.features,
        task=task,
        target=spec.data.target,
        experiment_id=ensure_experiment(name, root),
        workdir=root / ".work" / f"{name}-{len(hidden)}-{seed}",
        hidden=hidden,
        seed=seed,
    )
    return info, sha256, run_id


def register_fp32(client, root: Path, spec, name: str, *, task: str, hidden) -> str:
    """A seeded MLP registered as an fp32 version whose training run recorded the spec's
    data section (so its held-out rows can be recomputed)."""
    from stemma.components.data.tables import resolve_data_version

    info, sha256, run_id = log_mlp(root, spec, name, task=task, hidden=hidden)
    client.log_dict(
        run_id, {"data": spec.data.model_dump(mode="json")}, heldout.RESOLVED_SPEC_ARTIFACT
    )
    md5 = resolve_data_version(root, root / spec.data.path).md5
    version = client.create_model_version(
        name,
        info.model_uri,
        run_id=run_id,
        model_id=info.model_id,
        tags={tag_names.WEIGHTS_SHA256: sha256, tag_names.DATA_MD5: md5},
    )
    return str(version.version)


def register_quantized(client, root, name: str, parent: str, method: str) -> str:
    """A torchao variant of ``parent`` logged and registered as ``stemma run quantize`` does."""
    fp32 = load_scoring_model(f"models:/{name}/{parent}", client=client)
    files = heldout.download_model_files(client, name, parent, root / ".work" / f"p{parent}")
    variant = methods.build_variant(fp32.network, method)
    frame = pd.read_parquet(root / "data" / "wine" / "train.parquet")
    with mlflow.start_run(experiment_id=ensure_experiment(name, root)) as run:
        info, sha256 = registering.log_variant_model(
            variant=variant,
            parent_files=files,
            parent={"version": parent, "weights_sha256": fp32.weights_sha256},
            input_example=frame[fp32.feature_columns],
            workdir=root / ".work" / f"{parent}-{method}",
        )
    return register(client, name, parent, method, info.model_uri, run.info.run_id, sha256)


def register(client, name, parent, method, uri, run_id, sha256) -> str:
    version = registering.register_variant(
        client=client,
        model_name=name,
        parent_version=parent,
        method=method,
        model_uri=uri,
        run_id=run_id,
        tags={
            registering.METHOD_TAG: method,
            registering.PARENT_VERSION_TAG: parent,
            tag_names.WEIGHTS_SHA256: sha256,
        },
        description=f"{method} of v{parent}",
        verify=lambda number: None,
    )
    return str(version.version)


@pytest.fixture(scope="module")
def family(tmp_path_factory, empty_store) -> dict:
    """wine v1 (fp32, 64x64), its int8_weight_only and bf16 variants, a smaller MLP
    registered as its pruned variant, and that pruned variant's int8_weight_only variant."""
    root = build_multiclass_project(tmp_path_factory.mktemp("compare") / "project")
    spec = load_spec(root / "configs" / "wine.yaml", [f"pipeline.model_name={WINE}"]).spec
    with isolated_mlflow():
        (root / ".stemma").mkdir(exist_ok=True)
        shutil.copyfile(empty_store, root / ".stemma" / "mlflow.db")
        configure_tracking(root)
        client = MlflowClient()
        client.create_registered_model(WINE)
        parent = register_fp32(client, root, spec, WINE, task="multiclass", hidden=(64, 64))
        client.set_registered_model_alias(WINE, "champion", parent)
        versions = {"parent": parent}
        for method in ("int8_weight_only", "bf16"):
            versions[method] = register_quantized(client, root, WINE, parent, method)
        # a smaller MLP on the same preprocessing, registered as v1's pruned variant
        info, sha256, run_id = log_mlp(root, spec, WINE, task="multiclass", hidden=(8,), seed=3)
        versions["prune"] = register(client, WINE, parent, "prune", info.model_uri, run_id, sha256)
        versions["prune+int8"] = register_quantized(
            client, root, WINE, versions["prune"], "int8_weight_only"
        )
        yield {"root": root, "spec": spec, "client": client, "versions": versions}


@pytest.fixture(scope="module")
def compared(family) -> compare.VersionComparison:
    return compare.compare_versions(
        WINE,
        family["versions"]["parent"],
        root=family["root"],
        metric="accuracy",
        client=family["client"],
        **PROBE,
    )


def test_every_variant_and_variant_of_a_variant_is_compared_with_its_chain(compared, family):
    versions = family["versions"]
    rows = {row["version"]: row for row in compared.table()}
    assert next(iter(rows)) == versions["parent"]  # the parent first
    assert set(rows) == set(versions.values())
    chains = {key: rows[number]["chain"] for key, number in versions.items()}
    assert chains == {
        "parent": "fp32 (parent)",
        "int8_weight_only": "int8_weight_only",
        "bf16": "bf16",
        "prune": "prune",
        "prune+int8": "prune → int8_weight_only",
    }
    assert rows[versions["prune+int8"]]["method"] == "int8_weight_only"
    assert rows[versions["int8_weight_only"]]["aliases"] == registering.method_alias(
        versions["parent"], "int8_weight_only"
    )
    assert rows[versions["parent"]]["status"] == "parent"
    assert {rows[n]["status"] for n in rows if n != versions["parent"]} == {"passed"}
    # drops are against the parent, in the metric's direction (accuracy: higher is better)
    parent = rows[versions["parent"]]
    assert parent["metric_drop"] == 0.0 and compared.parent_value == parent["accuracy"]
    for row in rows.values():
        assert row["metric_drop"] == pytest.approx(parent["accuracy"] - row["accuracy"])


def test_latency_size_and_cost_are_measured_for_every_model(compared, family):
    rows = {row["version"]: row for row in compared.table()}
    machine = family["spec"].cost.machine("scoring")
    for variant in compared.variants:
        row = rows[variant.version]
        for batch in (1, 64, 4096):
            p50, p95, p99 = (row[f"{p}_ms_b{batch}"] for p in ("p50", "p95", "p99"))
            assert 0 < p50 <= p95 <= p99
        assert row["rows_per_s"] > 0 and row["cpu_s_per_million"] > 0
        assert row["size_bytes"] > row["weights_bytes"] > 0
        assert row["cost_per_million"] == pytest.approx(variant.profile.cost_per_million(machine))
        assert row["cost_ratio"] == pytest.approx(
            row["cost_per_million"] / rows[compared.parent_version]["cost_per_million"]
        )
    # the pruned MLP is smaller than its 64x64 parent, in parameters and on disk
    parent, pruned = rows[family["versions"]["parent"]], rows[family["versions"]["prune"]]
    assert pruned["parameters"] < parent["parameters"]
    assert pruned["weights_bytes"] < parent["weights_bytes"]


def test_the_cheapest_passing_model_is_the_lowest_cost_per_million(compared):
    rows = compared.table()
    lowest = min(row["cost_per_million"] for row in rows)
    (marked,) = [row for row in rows if row["cheapest"]]
    assert marked["cost_per_million"] == lowest
    assert compared.cheapest.version == marked["version"]


def test_the_alias_follows_the_cheapest_and_is_removed_when_the_parent_is(compared, family):
    from dataclasses import replace

    client, parent = family["client"], compared.parent_version
    alias = registering.cheapest_alias(parent)
    # a variant a hundred times cheaper than anything: it gets the alias
    cheap = replace(compared.variants[-1], cost_per_million=compared.parent.cost_per_million / 100)
    chosen = replace(compared, variants=(*compared.variants[:-1], cheap))
    assert compare.update_cheapest_alias(client, chosen) == cheap.version
    assert str(client.get_registered_model(WINE).aliases[alias]) == cheap.version
    # every variant dearer than the parent: the parent is cheapest, and the alias goes
    dear = tuple(
        v if v.is_parent else replace(v, cost_per_million=v.cost_per_million + math.inf)
        for v in compared.variants
    )
    assert replace(compared, variants=dear).cheapest.is_parent
    assert compare.update_cheapest_alias(client, replace(compared, variants=dear)) is None
    assert alias not in client.get_registered_model(WINE).aliases


def test_a_variant_cannot_be_compared_as_a_parent(family):
    versions = family["versions"]
    with pytest.raises(CompressionError, match=r"is itself a variant \(prune of v1\)") as caught:
        compare.compare_versions(
            WINE,
            versions["prune"],
            root=family["root"],
            metric="accuracy",
            client=family["client"],
            **PROBE,
        )
    assert f"models:/{WINE}/{versions['parent']}" in " ".join(caught.value.details)


def test_the_plot_draws_every_model(compared, tmp_path):
    out = plot_comparison(compared, tmp_path / "tradeoff.png", title="wine v1: variants")
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------
# Serving the cheapest


def test_served_reference_with_cheapest(compared, family):
    client, parent = family["client"], compared.parent_version
    champion = f"models:/{WINE}@champion"
    cheapest = CompressSpec(serve="cheapest")
    # never compared: the version itself, and why
    if registering.cheapest_alias(parent) in client.get_registered_model(WINE).aliases:
        client.delete_registered_model_alias(WINE, registering.cheapest_alias(parent))
    reference, note = served_reference(None, champion, client=client, compress=cheapest)
    assert reference == champion
    assert f"serving fp32 {WINE} v{parent}" in note and "stemma run compare" in note
    # compared: the alias
    target = family["versions"]["prune"]
    client.set_registered_model_alias(WINE, registering.cheapest_alias(parent), target)
    reference, note = served_reference(None, champion, client=client, compress=cheapest)
    assert reference == f"models:/{WINE}@v{parent}-cheapest"
    assert f"prune variant {WINE} v{target} of {WINE} v{parent}" in note
    # by version number too, and an explicit reference is served as given
    by_number = f"models:/{WINE}/{parent}"
    assert served_reference(None, by_number, client=client, compress=cheapest)[0] == reference
    assert served_reference(None, champion, explicit=True, client=client, compress=cheapest) == (
        champion,
        None,
    )
    # quantize.serve alone still means the quantized alias; compress.serve set wins over it
    quantized = QuantizeSpec(serve=True)
    assert "v1-quantized" not in served_reference(quantized, champion, client=client)[0]
    assert served_reference(quantized, champion, client=client, compress=cheapest)[0] == reference
    parent_only = CompressSpec(serve="parent")
    assert served_reference(quantized, champion, client=client, compress=parent_only) == (
        champion,
        None,
    )


def test_the_endpoint_serves_the_cheapest_variant(compared, family):
    from stemma.components.serving.server import EndpointServer, build_endpoint, max_connections

    client, parent = family["client"], compared.parent_version
    target = family["versions"]["prune+int8"]
    client.set_registered_model_alias(WINE, registering.cheapest_alias(parent), target)
    spec = load_spec(
        family["root"] / "configs" / "wine.yaml",
        [f"pipeline.model_name={WINE}", "compress.serve=cheapest"],
    ).spec
    endpoint = build_endpoint(
        spec,
        client=client,
        environ={},
        root=family["root"],
        served_alias=registering.alias_serving(spec.quantize, spec.compress),
    )
    rows = pd.read_parquet(family["root"] / "data" / "wine" / "batches" / "day_01.parquet")
    server = EndpointServer(
        endpoint.app, "127.0.0.1", 0, max_connections=max_connections(endpoint.settings)
    )
    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        ready = http.get("/ready").json()
        assert ready["version"] == target
        assert ready["serves_for"] == {"version": parent, "alias": f"v{parent}-cheapest"}
        assert f"v{target}" in http.get("/health").json()["serving"]
        answer = http.post("/v1/predict", json=rows.head(3).to_dict(orient="records")).json()
        assert answer["version"] == target
    # the same spec without compress.serve serves the champion itself
    plain = build_endpoint(
        load_spec(family["root"] / "configs" / "wine.yaml", [f"pipeline.model_name={WINE}"]).spec,
        client=client,
        environ={},
        root=family["root"],
    )
    assert plain.watch.current.model.version == parent


# ---------------------------------------------------------------------------------------
# A version without variants


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory, empty_store) -> dict:
    """A regression project on sklearn's diabetes, one fp32 version, no variant."""
    from dvc.repo import Repo
    from sklearn import datasets

    root = tmp_path_factory.mktemp("diabetes") / "project"
    root.mkdir(parents=True)
    git(root, "init", "-q")
    Repo.init(str(root))
    frame = datasets.load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"})
    (root / "data" / "diabetes").mkdir(parents=True)
    frame.to_parquet(root / "data" / "diabetes" / "train.parquet", index=False)
    features = [column for column in frame.columns if column != "progression"]
    (root / "configs").mkdir()
    (root / "configs" / "diabetes.yaml").write_text(
        DIABETES_SPEC.format(name=DIABETES, features=", ".join(features)), encoding="utf-8"
    )
    with Repo(str(root)) as repo:
        repo.add(str(root / "data"))
    spec = load_spec(root / "configs" / "diabetes.yaml").spec
    with isolated_mlflow():
        (root / ".stemma").mkdir(exist_ok=True)
        shutil.copyfile(empty_store, root / ".stemma" / "mlflow.db")
        configure_tracking(root)
        client = MlflowClient()
        client.create_registered_model(DIABETES)
        version = register_fp32(client, root, spec, DIABETES, task="regression", hidden=(16,))
        yield {"root": root, "client": client, "version": version}


def test_a_version_without_variants_is_compared_alone_and_is_its_own_cheapest(diabetes):
    result = compare.compare_versions(
        DIABETES,
        diabetes["version"],
        root=diabetes["root"],
        metric="rmse",
        client=diabetes["client"],
        **PROBE,
    )
    (row,) = result.table()
    assert row["chain"] == "fp32 (parent)" and row["cheapest"] and row["cost_ratio"] == 1.0
    assert result.notes == (f"{DIABETES} v{diabetes['version']} has no registered variant",)
    assert not result.higher_is_better and row["rmse"] > 0
    assert compare.update_cheapest_alias(diabetes["client"], result) is None
