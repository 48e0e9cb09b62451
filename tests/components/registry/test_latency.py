"""Latency and cost per model version: probed at registration, stated on the version, kept
through alias moves, and drawn across versions (real MLflow on SQLite, real models)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.registry import latency, text
from stemma.components.registry.gate import decide_gate, register_and_gate
from stemma.components.registry.promotion import promote
from stemma.components.runtime.backends import Runtime, build_runtime
from stemma.components.spec import FeaturesSpec, GateSpec
from stemma.components.spec.compress import PROBE_BATCH_SIZES, CostSpec, MachineSpec
from tests.support import isolated_mlflow, log_trained_model, wine_frame

ACCURACY_GATE = GateSpec(metric="accuracy", minimum=0.1, margin_over_champion=-1.0)
RMSE_GATE = GateSpec(metric="rmse", maximum=1000.0)
#: A spec's own machine and currency: no illustrative prices.
OWN_COST = CostSpec(
    currency="EUR",
    machines={"edge": MachineSpec(price_per_hour=0.36, cpus=4, description="4-core box")},
    scoring="edge",
    serving="edge",
)


def _log(root: Path, frame, features, *, task, target, hidden, seed):
    preprocessor, _, info, _, run_id = log_trained_model(
        frame,
        features,
        task=task,
        target=target,
        experiment_id=ensure_experiment("latency", root),
        workdir=root / f"work-{seed}",
        hidden=hidden,
        seed=seed,
    )
    x = preprocessor.transform(frame[[*features.numeric, *features.categorical]])
    return {"uri": info.model_uri, "run_id": run_id, "x": np.asarray(x, dtype=np.float32)}


def _store(root: Path, empty_store: Path) -> None:
    """Track under ``root`` in a copy of the migrated empty store."""
    (root / ".stemma").mkdir()
    shutil.copyfile(empty_store, root / ".stemma" / "mlflow.db")
    configure_tracking(root)


@pytest.fixture(scope="module")
def wine_store(tmp_path_factory, empty_store):
    """Two multiclass wine models logged in one store (logging costs ~1 s each)."""
    root = tmp_path_factory.mktemp("latency")
    frame = wine_frame()
    features = FeaturesSpec(numeric=[c for c in frame.columns if c not in ("wine_id", "cultivar")])
    with isolated_mlflow():
        _store(root, empty_store)
        logged = [
            _log(root, frame, features, task="multiclass", target="cultivar", hidden=h, seed=s)
            for h, s in (((8,), 3), ((32, 16), 4))
        ]
        yield {"root": root, "logged": logged}


def _register(name: str, logged: dict, decision) -> str:
    version = register_and_gate(
        client=MlflowClient(),
        model_name=name,
        model_uri=logged["uri"],
        run_id=logged["run_id"],
        decision=decision,
        tags={"stemma.data.md5": "0f343b0931126a20f133d67c2b018a3b"},
        description="Wine cultivars.",
    )
    return str(version.version)


@pytest.fixture(scope="module")
def two_versions(wine_store):
    """`wine-latency` v1 (champion) and v2 (challenger), each probed at registration."""
    client, name, timed = MlflowClient(), "wine-latency", []
    for logged, champion in zip(wine_store["logged"], (None, "1"), strict=True):
        decision = decide_gate(
            ACCURACY_GATE, "multiclass", 0.9, champion, 0.8 if champion else None
        )
        number = _register(name, logged, decision)
        timed.append(
            latency.record_version_latency(
                client, name, number, run_id=logged["run_id"], x=logged["x"], cost=OWN_COST
            )
        )
    return {"name": name, "timed": timed, **wine_store}


def test_version_gets_its_probe_metrics_and_figures_that_survive_promotion(two_versions):
    client, name = MlflowClient(), two_versions["name"]
    first = two_versions["timed"][0]
    assert first.error is None
    document = first.document
    assert [batch["rows"] for batch in document["batches"]] == list(PROBE_BATCH_SIZES)
    for batch in document["batches"]:
        assert 0 < batch["p50_ms"] <= batch["p95_ms"] <= batch["p99_ms"]
    assert document["backend"] == "onnxruntime"  # what batch scoring runs it on
    assert document["model"] == {"name": name, "version": "1"}
    assert document["machine"] and document["threads"] >= 1
    cost = document["cost"]
    assert (cost["currency"], cost["illustrative"]) == ("EUR", False)
    expected = document["batches"][-1]["cpu_seconds_per_million"] / 4 * 0.36 / 3600
    assert cost["serving"]["cost_per_million"] == pytest.approx(expected)
    assert cost["scoring"]["machine"] == "edge"

    run_id = two_versions["logged"][0]["run_id"]
    logged = json.loads(
        Path(
            client.download_artifacts(run_id, latency.PROBE_ARTIFACT, str(two_versions["root"]))
        ).read_text()
    )
    assert logged["batches"] == document["batches"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["latency/p50_ms_b4096"] == pytest.approx(document["batches"][-1]["p50_ms"])
    assert {"latency/p99_ms_b1", "latency/rows_per_s", "latency/cost_per_million"} <= set(metrics)

    def figures(number: str) -> str:
        description = client.get_model_version(name, number).description
        block = next(b for b in description.split("\n\n") if b.startswith("Latency and cost"))
        return block

    before = {number: figures(number) for number in ("1", "2")}
    assert "- 4,096 rows a call: p50 " in before["1"] and "p99 " in before["1"]
    assert "rows/s" in before["1"]
    assert "EUR per million predictions on edge" in before["1"]
    assert "illustrative" not in before["1"]
    assert "Champion's cost: " in client.get_registered_model(name).description

    promote(client, name, "2", reason="faster and as good")

    # the moves rewrote both descriptions; each still states its own figures
    assert {number: figures(number) for number in ("1", "2")} == before
    assert client.get_model_version(name, "2").description.startswith("champion")
    model = client.get_registered_model(name).description
    assert model.startswith("**Champion: v2**")
    assert f"Champion's cost: {text.stated_cost(before['2'])}" in model


def test_plot_versions_draws_every_measured_version(two_versions, tmp_path):
    client, name = MlflowClient(), two_versions["name"]

    measured = latency.version_latencies(client, name)
    path = latency.plot_versions(client, name, tmp_path / "plots" / "versions.png")

    assert [document["model"]["version"] for document in measured] == ["1", "2"]
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    # the registering run of v2 logged the plot as it stood then (both versions)
    run_id = two_versions["logged"][1]["run_id"]
    logged = {item.path for item in client.list_artifacts(run_id, latency.LATENCY_DIR)}
    assert logged == {latency.PROBE_ARTIFACT, latency.PLOT_ARTIFACT}


class BrokenRuntime(Runtime):
    """A runtime whose every call fails, as a model with a broken kernel would."""

    backend = "eager"
    device = "cpu"
    reason = None
    width = 4

    def _run(self, matrix: np.ndarray) -> np.ndarray:
        raise RuntimeError("kernel crashed on the probe batch")


def test_a_failed_probe_keeps_the_registration_and_says_why(tmp_path, empty_store):
    from sklearn import datasets

    frame = datasets.load_diabetes(as_frame=True).frame.head(120)
    features = FeaturesSpec(numeric=["age", "bmi", "bp", "s1"])
    with isolated_mlflow():
        _store(tmp_path, empty_store)
        logged = _log(
            tmp_path, frame, features, task="regression", target="target", hidden=(4,), seed=1
        )
        client, name = MlflowClient(), "diabetes-latency"
        number = _register(name, logged, decide_gate(RMSE_GATE, "regression", 50.0, None, None))

        timed = latency.record_version_latency(
            client,
            name,
            number,
            run_id=logged["run_id"],
            x=logged["x"],
            cost=CostSpec(),
            runtime=BrokenRuntime(),
        )

        assert timed.document is None
        assert "kernel crashed on the probe batch" in timed.error
        version = client.get_model_version(name, number)
        assert version.aliases == ["champion"]  # registered and aliased all the same
        assert "not measured at registration" in version.description
        assert "kernel crashed on the probe batch" in version.description
        artifacts = {item.path for item in client.list_artifacts(logged["run_id"], "latency")}
        assert artifacts == {latency.ERROR_ARTIFACT}
        assert latency.version_latencies(client, name) == []


class TinyTabularNet(nn.Module):
    """A custom module: a gated linear unit over the inputs."""

    def __init__(self, n_inputs: int) -> None:
        super().__init__()
        self.value = nn.Linear(n_inputs, 16)
        self.gate = nn.Linear(n_inputs, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.value(x) * torch.sigmoid(self.gate(x)))


def test_probe_of_a_custom_module_is_quick_and_ordered():
    torch.manual_seed(0)
    runtime = build_runtime(TinyTabularNet(9).eval(), width=9, eager_reason="custom module")
    x = np.random.default_rng(0).normal(size=(50, 9)).astype(np.float32)

    began = time.perf_counter()
    profile = latency.probe_version(runtime, x)
    elapsed = time.perf_counter() - began

    assert elapsed < 2.0
    assert [batch.rows for batch in profile.batches] == list(PROBE_BATCH_SIZES)
    assert all(b.p50_ms <= b.p95_ms <= b.p99_ms for b in profile.batches)
    assert profile.backend == "eager"
    document = latency.probe_document(profile, CostSpec(), model_name="m", version="1")
    assert document["cost"]["illustrative"] is True
    assert "(illustrative prices)" in latency.figures_text(document, CostSpec())
