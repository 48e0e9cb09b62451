"""Canary release: routing, guards, the state machine and its resumption, on a real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError
from stemma.components.evaluation import canary, canary_guards, canary_steps
from stemma.components.evaluation.comparison import route_buckets, route_to_challenger
from stemma.components.evaluation.rows import load_labels
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import EvaluateSpec
from tests.components.evaluation.test_shadow import (
    FEATURES,
    ID,
    TARGET,
    credit_frame,
    register_linear_model,
)
from tests.support import isolated_mlflow

MODEL = "canaried"
ROWS = 1_600
WEIGHTS = {
    "champion": (1.0, 0.8),
    "better": (1.0, 0.0),
    "worse": (0.2, 1.0),
    "nan": (float("nan"), 0.0),
    "constant": (0.0, 0.0),
}

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# ---------------------------------------------------------------------------------------
# Routing


def test_routing_is_stable_monotone_and_close_to_the_fraction():
    ids = np.arange(1, 200_001, dtype=np.int64)
    salt = "credit/v7"
    first = route_buckets(ids, salt)
    assert np.array_equal(first, route_buckets(ids.copy(), salt))
    assert ((first >= 0) & (first < 1)).all()
    # in any order, the same id gets the same bucket
    shuffled = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(route_buckets(shuffled, salt), first[shuffled - 1])
    arms = {f: route_to_challenger(ids, f, salt) for f in (0.05, 0.25, 0.5, 1.0)}
    for smaller, larger in ((0.05, 0.25), (0.25, 0.5), (0.5, 1.0)):
        assert not (arms[smaller] & ~arms[larger]).any(), "an entity left the challenger's arm"
    for fraction, arm in arms.items():
        # within 5 standard deviations of a binomial share
        tolerance = 5 * np.sqrt(fraction * (1 - fraction) / ids.size) + 1e-12
        assert abs(arm.mean() - fraction) <= tolerance
    assert arms[1.0].all() and not route_to_challenger(ids, 0.0, salt).any()
    # another canary routes other entities
    other = route_to_challenger(ids, 0.25, "credit/v8")
    assert 0.15 < (other & arms[0.25]).mean() / 0.25 < 0.35


def test_routing_is_the_same_in_another_process():
    """Python's own hash() changes between processes; the routing must not."""
    ids = ["app-1", "app-2", "zz-999", "ü-42"]
    numbers = [5, 10_000_000_001, -3]
    here = [*route_buckets(ids, "s").tolist(), *route_buckets(np.array(numbers), "s").tolist()]
    code = (
        "import json, numpy as np\n"
        "from stemma.components.evaluation.comparison import route_buckets\n"
        f"ids = {ids!r}; numbers = {numbers!r}\n"
        "print(json.dumps([*route_buckets(ids, 's').tolist(),"
        " *route_buckets(np.array(numbers), 's').tolist()]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(there.stdout) == here


def test_a_fraction_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        route_to_challenger([1, 2], 1.5, "s")


# ---------------------------------------------------------------------------------------
# The state machine


def state(**changes) -> canary.CanaryState:
    settings = EvaluateSpec.model_validate(
        {"canary": {"steps": [0.05, 0.25, 1.0], "bake_batches": 1, "max_holds": 1}}
    )
    return replace(canary.start_state("m", "5", "4", settings), **changes)


@pytest.mark.parametrize(
    ("before", "decision", "action", "after"),
    [
        ({}, "advance", "none", {"step": 1, "status": "running"}),
        ({"step": 1, "holds": 1}, "advance", "none", {"step": 2, "holds": 0}),
        ({"step": 2}, "advance", "promote", {"phase": "bake", "status": "running"}),
        ({"step": 2, "bake_batches": 0}, "advance", "promote", {"status": "completed"}),
        ({"step": 1}, "rollback", "retire", {"status": "rolled_back", "step": 1}),
        ({"step": 2}, "rollback", "retire", {"status": "rolled_back"}),
        ({}, "hold", "none", {"step": 0, "holds": 1, "status": "running"}),
        ({"holds": 1}, "hold", "retire", {"status": "rolled_back"}),
        ({"phase": "bake"}, "advance", "none", {"baked": 1, "status": "completed"}),
        ({"phase": "bake"}, "rollback", "rollback", {"status": "rolled_back"}),
        ({"phase": "bake"}, "hold", "none", {"holds": 1, "status": "running"}),
        ({"phase": "bake", "holds": 1}, "hold", "none", {"status": "completed"}),
    ],
    ids=[
        "advance",
        "advance-resets-holds",
        "promote-at-100",
        "promote-without-bake",
        "breach-before-promotion",
        "breach-at-100",
        "hold",
        "too-many-holds",
        "bake-done",
        "breach-after-promotion",
        "bake-hold",
        "bake-without-evidence",
    ],
)
def test_transitions(before, decision, action, after):
    transition = canary.plan_transition(state(**before), decision, ["why"])
    assert transition.action == action
    for key, value in after.items():
        assert getattr(transition.state, key) == value, key


def test_the_state_round_trips_through_json_and_refuses_a_concurrent_writer(store):
    client = store["client"]
    fresh = canary.start_state(MODEL, store["versions"]["better"], "1", EvaluateSpec())
    entry = canary.StepEntry(
        "day_01.parquet", "abc", "canary", 0, 0.05, "advance", "none", "none", None, "t"
    )
    first = canary.write_state(client, replace(fresh, history=(entry,)))
    try:
        read = canary.read_state(client, MODEL)
        assert read == first and read.revision == 1 and read.processed("abc") == entry
        stale = replace(read, revision=0)
        with pytest.raises(RegistryError, match="changed while this run worked"):
            canary.write_state(client, stale)
    finally:
        client.delete_registered_model_tag(MODEL, canary.STATE_TAG)


# ---------------------------------------------------------------------------------------
# Steps on real models


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("canary-store")
    with isolated_mlflow():
        configure_tracking(root)
        experiment_id = ensure_experiment("canary", root)
        client = MlflowClient()
        train = credit_frame(800, seed=1)
        versions = {
            kind: register_linear_model(
                client,
                experiment_id,
                root / kind,
                name=MODEL,
                weights=weights,
                frame=train,
                alias={"champion": "champion"}.get(kind),
            )
            for kind, weights in WEIGHTS.items()
        }
        batch = credit_frame(ROWS, seed=3, first_id=50_000)
        batch_path = root / "batches" / "day_01.parquet"
        batch_path.parent.mkdir()
        batch.drop(columns=[TARGET]).to_parquet(batch_path, index=False)
        labels_path = root / "labels.parquet"
        batch[[ID, TARGET]].to_parquet(labels_path, index=False)
        models = {
            kind: load_scoring_model(f"models:/{MODEL}/{version}")
            for kind, version in versions.items()
        }
        yield {
            "root": root,
            "client": client,
            "experiment_id": experiment_id,
            "versions": versions,
            "models": models,
            "batch_path": batch_path,
            "labels": load_labels(labels_path, id_column=ID, target=TARGET, task="binary"),
        }


def guards(**changes) -> EvaluateSpec:
    return EvaluateSpec.model_validate(
        {
            "bootstrap_resamples": 300,
            "canary": {
                "guards": {
                    "min_rows": 50,
                    "min_labelled_rows": 100,
                    "max_score_psi": 2.0,
                    **changes,
                }
            },
        }
    )


def step(store, kind, tmp_path, *, fraction=0.25, labels=None, settings=None, promoting=False):
    models = store["models"]
    scores = canary_steps.score_step(
        models["champion"],
        models[kind],
        store["batch_path"],
        tmp_path / "step",
        fraction=fraction,
        salt=f"{MODEL}/v{models[kind].version}",
        id_column=ID,
        chunk_rows=1_000,
    )
    evaluation = canary_guards.evaluate_step(
        scores,
        labels=labels,
        id_column=ID,
        task="binary",
        metric="roc_auc",
        settings=settings or guards(),
        control=models["champion"],
        challenger=models[kind],
        promoting=promoting,
    )
    return scores, evaluation


def test_served_predictions_name_the_arm_and_the_version_of_every_row(store, tmp_path):
    scores, evaluation = step(store, "better", tmp_path, fraction=0.25)
    served = pq.read_table(scores.predictions).to_pandas()
    batch = pd.read_parquet(store["batch_path"])
    assert sorted(served[ID]) == sorted(batch[ID]) and served[ID].is_unique
    routed = route_to_challenger(
        served[ID].to_numpy(), 0.25, f"{MODEL}/v{store['versions']['better']}"
    )
    assert (served[canary_steps.ARM_COLUMN] == np.where(routed, "challenger", "champion")).all()
    expected_version = np.where(routed, store["versions"]["better"], store["versions"]["champion"])
    assert (served[canary_steps.VERSION_COLUMN] == expected_version).all()
    assert not served[canary_steps.FALLBACK_COLUMN].any()
    assert evaluation.arm_rows == routed.sum() and evaluation.decision == canary_guards.ADVANCE
    # the challenger scored only its arm
    arm_rows = pq.read_metadata(scores.folder / canary_steps.ARM_INPUT).num_rows
    assert arm_rows == routed.sum() == scores.challenger.rows_scored
    assert scores.control.rows_scored == ROWS


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_a_broken_challenger_breaches_at_the_first_step_and_the_champion_stands_in(
    store, tmp_path, kind
):
    scores, evaluation = step(store, kind, tmp_path, fraction=0.05, settings=guards(min_rows=10))
    assert evaluation.decision == canary.ROLLBACK
    assert evaluation.failures.error_rate == 1.0
    assert any("error_rate" in reason for reason in evaluation.reasons)
    served = pq.read_table(scores.predictions).to_pandas()
    arm = served[served[canary_steps.ARM_COLUMN] == "challenger"]
    if kind == "nan":
        # every row the challenger failed on was served by the champion instead
        assert arm[canary_steps.FALLBACK_COLUMN].all() and len(arm) == evaluation.arm_rows
        assert (arm[canary_steps.VERSION_COLUMN] == store["versions"]["champion"]).all()
        assert np.isfinite(served["score"]).all()


def test_a_worse_challenger_breaches_the_metric_guard_once_labels_arrive(store, tmp_path):
    _, before = step(store, "worse", tmp_path, fraction=0.5, settings=guards(max_score_psi=50))
    assert before.decision == canary_guards.ADVANCE and before.comparison is None
    metric = next(g for g in before.guards if g.name == "metric")
    assert metric.status == canary_guards.GUARD_PENDING
    _, after = step(
        store,
        "worse",
        tmp_path,
        fraction=0.5,
        labels=store["labels"],
        settings=guards(max_score_psi=50),
    )
    assert after.decision == canary.ROLLBACK
    assert after.comparison.improvement_high < -0.02
    assert any(reason.startswith("metric:") for reason in after.reasons)


def test_too_few_rows_hold_and_a_promotion_waits_for_labels(store, tmp_path):
    _, tiny = step(store, "better", tmp_path, fraction=0.01, settings=guards(min_rows=200))
    assert tiny.decision == canary.HOLD and "guards.min_rows 200" in tiny.reasons[0]
    _, waiting = step(store, "better", tmp_path, fraction=1.0, promoting=True)
    assert waiting.decision == canary.HOLD and "waits for labels" in waiting.reasons[0]
    _, ready = step(store, "better", tmp_path, fraction=1.0, promoting=True, labels=store["labels"])
    assert ready.decision == canary_guards.ADVANCE and ready.comparison.improvement_low > 0


def test_drift_against_the_control_arm_breaches(store, tmp_path):
    _, evaluation = step(
        store, "worse", tmp_path, fraction=0.5, settings=guards(max_score_psi=0.05)
    )
    drift = next(g for g in evaluation.guards if g.name == "score_drift")
    assert drift.status == canary_guards.GUARD_BREACH and drift.value > 0.05
    assert "control arm" in drift.detail


def test_a_score_shift_counts_only_while_no_label_vouches_for_the_challenger(store, tmp_path):
    strict = guards(max_score_psi=0.01)
    _, unlabelled = step(store, "better", tmp_path, fraction=0.5, settings=strict)
    drift = next(g for g in unlabelled.guards if g.name == "score_drift")
    assert drift.status == canary_guards.GUARD_BREACH and unlabelled.decision == canary.ROLLBACK
    assert "no labels to vouch" in drift.detail
    _, labelled = step(
        store, "better", tmp_path, fraction=0.5, settings=strict, labels=store["labels"]
    )
    drift = next(g for g in labelled.guards if g.name == "score_drift")
    assert drift.status == canary_guards.GUARD_OK and drift.value > 0.01
    assert labelled.decision == canary_guards.ADVANCE and "not worse" in drift.detail
    # a worse challenger gets no such pass
    _, worse = step(store, "worse", tmp_path, fraction=0.5, settings=strict, labels=store["labels"])
    assert worse.decision == canary.ROLLBACK
    assert {g.name for g in worse.guards if g.status == canary_guards.GUARD_BREACH} == {
        "score_drift",
        "metric",
    }


class SlowNetwork(torch.nn.Module):
    """A linear network that waits before answering: a challenger too slow to serve."""

    def __init__(self, n_inputs: int, n_outputs: int = 1, delay_ms: float = 0.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_inputs, n_outputs)
        self.delay_s = delay_ms / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.linear(x)


def register_slow_model(store, tmp_path) -> str:
    import mlflow

    from stemma.components.model.artifact import log_pyfunc_model
    from stemma.components.model.networks import build_network, network_config
    from stemma.components.model.preprocessing import fit_preprocessor
    from stemma.components.platform.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
    from stemma.components.spec import ModelSpec

    frame = credit_frame(200, seed=1)
    preprocessor = fit_preprocessor(frame, FEATURES, task="binary", target=TARGET)
    spec = ModelSpec(architecture=f"{__name__}:SlowNetwork", params={"delay_ms": 5})
    config = network_config(spec)
    network = build_network(config, preprocessor.n_inputs, seed=0)
    with torch.no_grad():  # the champion's weights: as good, only slower
        network.linear.weight.zero_()
        network.linear.bias.zero_()
        network.linear.weight[0, :2] = torch.tensor(WEIGHTS["champion"])
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        info, sha256 = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame[FEATURES.all].head(5),
            task="binary",
            workdir=tmp_path / "slow",
        )
    version = store["client"].create_model_version(
        MODEL,
        source=info.model_uri,
        run_id=run.info.run_id,
        model_id=info.model_id,
        tags={WEIGHTS_TAG: sha256, "stemma.gate.decision": "passed"},
    )
    return str(version.version)


def test_a_challenger_too_slow_to_serve_breaches_the_latency_guard(store, tmp_path):
    version = register_slow_model(store, tmp_path)
    # The delay is Python, which the exported ONNX graph leaves out: run it eagerly.
    store["models"]["slow"] = load_scoring_model(
        f"models:/{MODEL}/{version}", architectures=[f"{__name__}:SlowNetwork"], backend="eager"
    )
    _, unchecked = step(store, "slow", tmp_path)
    latency = next(g for g in unchecked.guards if g.name == "latency")
    assert latency.status == canary_guards.GUARD_OFF and unchecked.decision == canary_guards.ADVANCE
    timings = unchecked.latency
    assert timings["challenger"]["latency_ms_p50"] >= 5.0 > timings["champion"]["latency_ms_p50"]
    _, checked = step(store, "slow", tmp_path, settings=guards(max_latency_ratio=3.0))
    latency = next(g for g in checked.guards if g.name == "latency")
    assert latency.status == canary_guards.GUARD_BREACH and latency.value > 3.0
    assert checked.decision == canary.ROLLBACK and checked.reasons[0].startswith("latency:")


def test_a_batch_with_repeated_ids_is_refused(store, tmp_path):
    batch = pd.read_parquet(store["batch_path"])
    path = tmp_path / "dup.parquet"
    pd.concat([batch, batch.head(2)]).to_parquet(path, index=False)
    models = store["models"]
    with pytest.raises(DataError, match="2 ids repeat"):
        canary_steps.score_step(
            models["champion"],
            models["better"],
            path,
            tmp_path / "s",
            fraction=0.5,
            salt="s",
            id_column=ID,
            chunk_rows=1_000,
        )


def test_alias_moves_go_through_promotion_and_are_not_repeated_on_resume(store):
    client, versions = store["client"], store["versions"]
    champion, better = versions["champion"], versions["better"]
    client.set_registered_model_alias(MODEL, "challenger", better)
    settings = EvaluateSpec.model_validate({"canary": {"steps": [1.0], "bake_batches": 1}})
    at_full = canary.start_state(MODEL, better, champion, settings)
    promote = canary.plan_transition(at_full, canary_guards.ADVANCE, ["green"])
    arguments = {"evidence": {"x": 1}, "flow_run_id": None, "experiment_id": store["experiment_id"]}
    try:
        done = canary.apply_transition(client, at_full, promote, **arguments)
        assert (done.action, done.outcome) == ("promote", "done") and done.record.record_run_id
        # a run killed before it recorded the step makes the same move again: nothing happens
        again = canary.apply_transition(client, at_full, promote, **arguments)
        assert again.outcome == "already" and again.record is None
        aliases = canary.model_aliases(client, MODEL)
        assert aliases["champion"] == better and aliases["previous-champion"] == champion
        assert "challenger" not in aliases
        generation = client.get_registered_model(MODEL).tags["stemma.promotion.generation"]

        baking = promote.state
        back = canary.plan_transition(baking, canary.ROLLBACK, ["metric: worse"])
        rolled = canary.apply_transition(client, baking, back, **arguments)
        assert (rolled.action, rolled.outcome) == ("rollback", "done")
        assert canary.model_aliases(client, MODEL)["champion"] == champion
        assert canary.apply_transition(client, baking, back, **arguments).outcome == "already"
        assert int(client.get_registered_model(MODEL).tags["stemma.promotion.generation"]) == (
            int(generation) + 1
        )

        client.set_registered_model_alias(MODEL, "challenger", versions["worse"])
        early = canary.start_state(MODEL, versions["worse"], champion, settings)
        retire = canary.plan_transition(early, canary.ROLLBACK, ["error_rate: broken"])
        retired = canary.apply_transition(client, early, retire, **arguments)
        assert (retired.action, retired.outcome) == ("retire", "done")
        assert "challenger" not in canary.model_aliases(client, MODEL)
        run = client.get_run(retired.record.record_run_id)
        assert run.data.tags["stemma.promotion.action"] == "retire"
        assert canary.apply_transition(client, early, retire, **arguments).outcome == "already"
    finally:
        client.set_registered_model_alias(MODEL, "champion", champion)


def test_a_promotion_that_loses_the_race_ends_the_canary_as_aborted(store):
    client, versions = store["client"], store["versions"]
    champion = versions["champion"]
    settings = EvaluateSpec.model_validate({"canary": {"steps": [1.0]}})
    at_full = canary.start_state(MODEL, versions["better"], champion, settings)
    transition = canary.plan_transition(at_full, canary_guards.ADVANCE, ["green"])
    client.set_registered_model_alias(MODEL, "champion", versions["worse"])  # someone else
    try:
        applied = canary.apply_transition(
            client, at_full, transition, evidence={}, flow_run_id=None, experiment_id=None
        )
        assert applied.outcome == "lost_race"
        assert canary.model_aliases(client, MODEL)["champion"] == versions["worse"]
        following = canary.record_step(
            at_full,
            transition,
            applied,
            batch=store["batch_path"],
            digest="d",
            decision="advance",
            run_id=None,
        )
        assert following.status == canary.ABORTED and "lost_race" in following.cause
        assert canary.check_aliases(client, at_full) is not None
    finally:
        client.set_registered_model_alias(MODEL, "champion", champion)


def test_a_step_decision_on_disk_is_reused_by_a_resumed_run(store, tmp_path):
    settings = EvaluateSpec()
    current = canary.start_state(MODEL, store["versions"]["better"], "1", settings)
    key = canary.step_key(current, "digest-1")
    assert canary.read_step_record(tmp_path, key) is None
    canary.write_step_record(tmp_path, {"key": key, "decision": "hold", "reasons": ["r"]})
    assert canary.read_step_record(tmp_path, key)["decision"] == "hold"
    # the same batch at another position of the canary, or in another canary, is another
    # decision
    restarted = replace(current, started="2030-01-01T00:00:00+00:00")
    assert canary.read_step_record(tmp_path, canary.step_key(restarted, "digest-1")) is None
    assert (
        canary.read_step_record(tmp_path, canary.step_key(replace(current, step=1), "digest-1"))
        is None
    )
    assert canary.read_step_record(tmp_path, canary.step_key(current, "digest-2")) is None
