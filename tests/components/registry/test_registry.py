"""The registration gate: decisions (pure) and the registry writes (real MLflow on SQLite)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.errors import RegistryError, SpecError
from stemma.components.model.artifact import decode_manifest
from stemma.components.platform.tags import MODEL_FILES as MODEL_FILES_TAG
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.registry.gate import (
    DECISION_ARTIFACT,
    GateDecision,
    champion_value_on,
    complete_registration,
    decide_gate,
    find_champion,
    find_run_version,
    recorded_decision,
    register_and_gate,
)
from stemma.components.spec import FeaturesSpec, GateSpec
from stemma.components.training.loop import predict_raw
from stemma.components.training.metrics import evaluate_scores
from tests.support import isolated_mlflow, log_trained_model

FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["car"])
AUC_GATE = GateSpec(metric="roc_auc", minimum=0.8, margin_over_champion=0.0)
RMSE_GATE = GateSpec(metric="rmse", maximum=2.0, margin_over_champion=0.05)
LINEAGE_TAGS = {"stemma.data.md5": "0f343b0931126a20f133d67c2b018a3b", "stemma.git_rev": "abc123"}

# ---------------------------------------------------------------------------------------
# decide_gate

TOLERANT_GATE = GateSpec(metric="roc_auc", margin_over_champion=-0.01)

# fmt: off
DECISIONS = [
    # id, gate, task, value, champion version, champion value, alias (None: failed), a reason
    ("first-model-becomes-champion", AUC_GATE, "binary", 0.912, None, None, "champion",
     "roc_auc 0.9120 >= minimum 0.8000"),
    ("better-than-champion-is-challenger", AUC_GATE, "binary", 0.920, "3", 0.915, "challenger",
     "roc_auc 0.9200 is at least champion v3's 0.9150 + margin 0.0000"),
    ("worse-than-champion-fails", AUC_GATE, "binary", 0.901, "3", 0.915, None,
     "roc_auc 0.9010 is not at least champion v3's 0.9150 + margin 0.0000"),
    ("equal-to-champion-passes-with-zero-margin", AUC_GATE, "binary", 0.915, "3", 0.915, "challenger",
     "roc_auc 0.9150 is at least champion v3's 0.9150 + margin 0.0000"),
    ("below-minimum-fails", AUC_GATE, "binary", 0.75, None, None, None,
     "roc_auc 0.7500 is below minimum 0.8000"),
    ("below-minimum-fails-even-when-better", AUC_GATE, "binary", 0.79, "2", 0.70, None,
     "roc_auc 0.7900 is below minimum 0.8000"),
    ("nan-value-fails-closed", AUC_GATE, "binary", math.nan, None, None, None,
     "cannot decide: roc_auc of the model is nan"),
    ("unevaluable-champion-fails-closed", AUC_GATE, "binary", 0.95, "3", None, None,
     "cannot decide: champion v3 could not be evaluated on the same test rows"),
    ("nan-champion-fails-closed", AUC_GATE, "binary", 0.95, "3", math.nan, None,
     "cannot decide: champion v3 could not be evaluated"),
    ("negative-margin-tolerates-slightly-worse", TOLERANT_GATE, "binary", 0.91, "3", 0.915,
     "challenger", "roc_auc 0.9100 is at least champion v3's 0.9150 + margin -0.0100"),
    ("lower-is-better-beats-champion-by-margin", RMSE_GATE, "regression", 1.50, "2", 1.60,
     "challenger", "rmse 1.5000 is at most champion v2's 1.6000 - margin 0.0500"),
    ("lower-is-better-within-margin-fails", RMSE_GATE, "regression", 1.58, "2", 1.60, None,
     "rmse 1.5800 is not at most champion v2's 1.6000 - margin 0.0500"),
    ("above-maximum-fails", RMSE_GATE, "regression", 2.5, None, None, None,
     "rmse 2.5000 is above maximum 2.0000"),
]
# fmt: on


@pytest.mark.parametrize(
    "gate,task,value,champion_version,champion_value,alias,reason",
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decide_gate(gate, task, value, champion_version, champion_value, alias, reason):
    decision = decide_gate(gate, task, value, champion_version, champion_value)

    assert decision.passed is (alias is not None)
    assert decision.alias == alias
    assert any(line.startswith(reason) for line in decision.reasons), decision.reasons
    assert decision.tags()["stemma.gate.decision"] == ("passed" if alias else "failed")


def test_decide_gate_shows_why_the_champion_could_not_be_evaluated():
    decision = decide_gate(
        AUC_GATE, "binary", 0.95, "3", None, champion_error="Model is missing inputs ['zipcode']"
    )

    assert not decision.passed
    assert "could not be evaluated on the same test rows: Model is missing inputs ['zipcode']" in (
        "; ".join(decision.reasons)
    )


UNTRUSTED = "cannot load models:/m/3: m v3: its files differ; serving.py: changed"


@pytest.mark.parametrize(
    "policy,alias,reason",
    [
        (
            "fail",
            None,
            "cannot decide: champion v3 could not be evaluated on the same test rows: "
            "it is not trusted (" + UNTRUSTED + "); set gate.untrusted_champion: ignore",
        ),
        (
            "ignore",
            "champion",
            "champion v3 ignored (gate.untrusted_champion: ignore): " + UNTRUSTED,
        ),
    ],
    ids=["fails-closed-by-default", "ignored-when-the-spec-says-so"],
)
def test_decide_gate_on_an_untrusted_champion(policy, alias, reason):
    gate = AUC_GATE.model_copy(update={"untrusted_champion": policy})

    decision = decide_gate(
        gate, "binary", 0.95, "3", None, champion_error=UNTRUSTED, champion_untrusted=True
    )

    assert decision.alias == alias
    assert any(line.startswith(reason) for line in decision.reasons), decision.reasons
    assert decision.decided_against == "3"  # what the registry held, trusted or not
    if policy == "ignore":
        assert decision.champion_version is None
        assert decision.record()["ignored_champion"] == "3"


def old_store_tags(decision: GateDecision) -> dict[str, str]:
    """The ``stemma.gate.*`` tags Stemma wrote on versions before the decision moved to the
    training run's gate/decision.json: every field that was set."""
    fields = {**decision.record(), "reasons": "; ".join(decision.reasons)}
    return {f"stemma.gate.{key}": str(value) for key, value in fields.items() if value is not None}


@pytest.mark.parametrize("layout", ["tags and record", "older store"])
def test_a_decision_reads_back_from_its_tags_and_record(layout):
    for decision in (
        decide_gate(AUC_GATE, "binary", 0.92, "3", 0.915),
        decide_gate(RMSE_GATE, "regression", 2.5, None, None),
        decide_gate(AUC_GATE, "binary", 0.7, None, None),  # failed: no alias
    ):
        task = "binary" if decision.metric == "roc_auc" else "regression"
        if layout == "older store":
            read = GateDecision.from_tags(old_store_tags(decision), task)
        else:  # the record as the training run logged it, through JSON
            recorded = json.loads(json.dumps(decision.record()))
            read = GateDecision.from_tags(decision.tags(), task, recorded)
        assert read == decision
    assert GateDecision.from_tags({"stemma.data.md5": "x"}, "binary") is None


def test_a_passed_verdict_without_its_alias_is_no_decision():
    """The version's tags alone do not say which alias a passed decision earned."""
    decision = decide_gate(AUC_GATE, "binary", 0.92, "3", 0.915)
    assert GateDecision.from_tags(decision.tags(), "binary") is None


def test_decide_gate_rejects_a_metric_of_another_task():
    with pytest.raises(SpecError, match="'rmse' is not a binary metric"):
        decide_gate(GateSpec(metric="rmse"), "binary", 0.5, None, None)


def test_gate_tags_are_the_verdict_and_the_record_every_number():
    decision = decide_gate(AUC_GATE, "binary", 0.92, "3", 0.915)

    assert decision.tags() == {
        "stemma.gate.decision": "passed",
        "stemma.gate.metric": "roc_auc",
        "stemma.gate.value": "0.92",
    }
    assert decision.record() == {
        "decision": "passed",
        "alias": "challenger",
        "metric": "roc_auc",
        "value": 0.92,
        "minimum": 0.8,
        "maximum": None,
        "champion_version": "3",
        "champion_value": 0.915,
        "margin": 0.0,
        "reasons": list(decision.reasons),
        "ignored_champion": None,
    }
    assert decision.threshold == 0.8


# ---------------------------------------------------------------------------------------
# The registry


def synthetic_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    salary = rng.uniform(20_000, 150_000, rows)
    return pd.DataFrame(
        {
            "salary": salary,
            "age": rng.integers(18, 80, rows),
            "car": rng.choice(["sedan", "van", "coupe"], rows),
            "approved": ((salary + rng.normal(0, 20_000, rows)) > 80_000).astype(np.int64),
        }
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A local store with one logged binary model (logging costs ~1 s; done once)."""
    root = tmp_path_factory.mktemp("registry")
    with isolated_mlflow():
        configure_tracking(root)
        frame = synthetic_frame(80, seed=1)
        preprocessor, network, info, _, run_id = log_trained_model(
            frame,
            FEATURES,
            task="binary",
            target="approved",
            experiment_id=ensure_experiment("registry", root),
            workdir=root / "work",
            seed=5,
        )
        yield {
            "model_uri": info.model_uri,
            "run_id": run_id,
            "preprocessor": preprocessor,
            "network": network,
        }


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered model name of its own for each test in the shared store."""
    return f"credit-{request.node.name}".replace("[", "-").replace("]", "")[:100]


def register(store, model_name: str, decision: GateDecision):
    return register_and_gate(
        client=MlflowClient(),
        model_name=model_name,
        model_uri=store["model_uri"],
        run_id=store["run_id"],
        decision=decision,
        tags=LINEAGE_TAGS,
        description="Loan approval classifier.",
    )


def test_first_passing_model_becomes_champion_with_tags_and_description(store, model_name):
    decision = decide_gate(AUC_GATE, "binary", 0.91, None, None)

    version = register(store, model_name, decision)

    client = MlflowClient()
    assert version.aliases == ["champion"]
    assert find_champion(client, model_name).version == version.version
    assert version.tags["stemma.gate.decision"] == "passed"
    assert version.tags["stemma.data.md5"] == LINEAGE_TAGS["stemma.data.md5"]
    assert version.run_id == store["run_id"]
    md5 = LINEAGE_TAGS["stemma.data.md5"][:8]
    lines = version.description.splitlines()
    assert lines[0] == f"champion · gate passed on roc_auc 0.91 · data `{md5}`"
    assert lines[2] == "History:"
    assert lines[3].endswith(
        f": registered from run {store['run_id']}; Gate passed on roc_auc = 0.9100: alias `champion`."
    )
    assert "- roc_auc 0.9100 >= minimum 0.8000" in version.description
    assert client.get_registered_model(model_name).description.startswith(
        f"**Champion: v{version.version}**, trained on data version `{md5}`"
    )


def test_failed_model_is_registered_without_an_alias(store, model_name):
    decision = decide_gate(AUC_GATE, "binary", 0.70, None, None)

    version = register(store, model_name, decision)

    assert version.aliases == []
    assert version.tags["stemma.gate.decision"] == "failed"
    assert "- roc_auc 0.7000 is below minimum 0.8000" in version.description
    # the whole decision is on the training run, logged before the version was created
    assert recorded_decision(MlflowClient(), version.run_id) == decision.record()
    assert find_champion(MlflowClient(), model_name) is None


def test_passing_model_beside_a_champion_becomes_challenger(store, model_name):
    first = register(store, model_name, decide_gate(AUC_GATE, "binary", 0.90, None, None))

    second = register(store, model_name, decide_gate(AUC_GATE, "binary", 0.93, "1", 0.90))

    assert second.aliases == ["challenger"]
    assert find_champion(MlflowClient(), model_name).version == first.version
    recorded = GateDecision.from_tags(
        second.tags, "binary", recorded_decision(MlflowClient(), second.run_id)
    )
    assert (recorded.alias, recorded.champion_version) == ("challenger", "1")


def test_promotion_refuses_a_failed_version_with_the_reasons_its_run_recorded(store, model_name):
    from stemma.components.registry.promotion import PromotionError, promote

    register(store, model_name, decide_gate(AUC_GATE, "binary", 0.90, None, None))
    failed = register(store, model_name, decide_gate(AUC_GATE, "binary", 0.70, "1", 0.90))

    with pytest.raises(PromotionError, match="its gate did not pass") as caught:
        promote(MlflowClient(), model_name, str(failed.version), reason="try")
    assert "roc_auc 0.7000 is below minimum 0.8000" in caught.value.render()


def test_stale_decision_registers_nothing(store, model_name):
    register(store, model_name, decide_gate(AUC_GATE, "binary", 0.90, None, None))
    stale = decide_gate(AUC_GATE, "binary", 0.95, None, None)  # decided before v1 existed

    with pytest.raises(RegistryError, match="champion changed while the gate was deciding"):
        register(store, model_name, stale)
    versions = MlflowClient().search_model_versions(f"name = '{model_name}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_registry_refusal_becomes_a_registry_error(store, model_name):
    decision = decide_gate(AUC_GATE, "binary", 0.91, None, None)

    with pytest.raises(
        RegistryError, match=f"cannot register models:/m-missing as '{model_name}'"
    ) as caught:
        register_and_gate(
            client=MlflowClient(),
            model_name=model_name,
            model_uri="models:/m-missing",
            run_id=store["run_id"],
            decision=decision,
            tags={},
            description="",
        )
    assert "not found" in str(caught.value)


def test_find_champion_without_model_or_alias(store, model_name):
    client = MlflowClient()
    assert find_champion(client, model_name) is None
    client.create_registered_model(model_name)
    assert find_champion(client, model_name) is None


def test_champion_value_on_scores_the_same_rows(store, model_name):
    version = register(store, model_name, decide_gate(AUC_GATE, "binary", 0.9, None, None))
    rows = synthetic_frame(60, seed=9)
    y_true = rows["approved"].to_numpy()
    scores = store["preprocessor"].decode_output(
        predict_raw(store["network"], store["preprocessor"].transform(rows))
    )

    value, error, untrusted = champion_value_on(
        f"models:/{model_name}@champion", rows, y_true, task="binary", metric="roc_auc"
    )

    assert error is None and untrusted is False
    assert value == pytest.approx(evaluate_scores("binary", y_true, scores)["roc_auc"], abs=1e-12)
    assert version.aliases == ["champion"]


FAILURES = [
    (
        "rows-lack-a-feature",
        "@champion",
        lambda rows: rows.drop(columns=["car"]),
        "needs columns the test rows lack: car",
    ),
    (
        "rows-of-the-wrong-type",
        "@champion",
        lambda rows: rows.assign(car=1.5),
        "failed to score the test rows: column car: the model takes string, the rows hold float64",
    ),
    ("no-such-version", "/99", lambda rows: rows, "cannot load models:/"),
]


@pytest.mark.parametrize(
    "uri_suffix,change,expected",
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_champion_value_on_reports_why_it_failed(store, model_name, uri_suffix, change, expected):
    register(store, model_name, decide_gate(AUC_GATE, "binary", 0.9, None, None))
    rows = synthetic_frame(30, seed=9)

    value, error, untrusted = champion_value_on(
        f"models:/{model_name}{uri_suffix}",
        change(rows),
        rows["approved"].to_numpy(),
        task="binary",
        metric="roc_auc",
    )

    assert value is None and untrusted is False
    assert expected in error
    assert "\n" not in error and len(error) < 500


def test_a_registered_version_records_every_file_of_its_model(store, model_name):
    version = register(store, model_name, decide_gate(AUC_GATE, "binary", 0.9, None, None))

    manifest = decode_manifest(version.tags[MODEL_FILES_TAG])
    assert {"MLmodel", "serving.py", "artifacts/weights.safetensors"} <= set(manifest)
    assert all(len(digest) == 64 for digest in manifest.values())
    assert version.tags["stemma.weights.sha256"] == manifest["artifacts/weights.safetensors"]


def test_a_tampered_champion_is_untrusted_and_named(tmp_path, model_name):
    """A file changed in the artifact store after registration: refused, file named."""
    with isolated_mlflow():
        configure_tracking(tmp_path)
        frame = synthetic_frame(80, seed=1)
        _, _, info, _, run_id = log_trained_model(
            frame,
            FEATURES,
            task="binary",
            target="approved",
            experiment_id=ensure_experiment("tamper", tmp_path),
            workdir=tmp_path / "work",
        )
        register(
            {"model_uri": info.model_uri, "run_id": run_id},
            model_name,
            decide_gate(AUC_GATE, "binary", 0.9, None, None),
        )
        location = MlflowClient().get_logged_model(info.model_id).artifact_location
        serving = tmp_path.joinpath(location.removeprefix("file://"), "serving.py")
        serving.write_text(serving.read_text() + "\n# changed\n")

        value, error, untrusted = champion_value_on(
            f"models:/{model_name}@champion",
            frame,
            frame["approved"].to_numpy(),
            task="binary",
            metric="roc_auc",
        )

    assert value is None and untrusted is True
    assert "its files differ from the digests recorded" in error
    assert "serving.py: changed" in error


def test_an_interrupted_registration_is_completed_not_repeated(store, model_name):
    client = MlflowClient()
    decision = decide_gate(AUC_GATE, "binary", 0.91, None, None)
    # What a run killed between creating the version and aliasing it leaves behind: the
    # decision logged to the run, the version with its tags.
    client.log_dict(store["run_id"], decision.record(), DECISION_ARTIFACT)
    client.create_registered_model(model_name)
    client.create_model_version(
        model_name,
        store["model_uri"],
        run_id=store["run_id"],
        tags={**LINEAGE_TAGS, **decision.tags()},
    )

    found = find_run_version(client, model_name, store["run_id"])
    version, recorded = complete_registration(
        client=client, version=found, task="binary", tags={"stemma.weights.sha256": "ab" * 32}
    )

    assert recorded == decision
    assert version.version == found.version and version.aliases == ["champion"]
    assert version.tags["stemma.weights.sha256"] == "ab" * 32
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    assert find_run_version(client, model_name, "0" * 32) is None
