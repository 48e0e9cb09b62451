"""Shadow evaluation and its statistics, on real registered models in a real MLflow store.

The models are linear (``hidden: []``) with weights set by hand, so "better", "worse" and
"broken" are known without training: the label follows the salary, the champion also
listens to the age (noise), the better challenger to the salary alone, the worse one
mostly to the age, and the broken ones answer NaN or one constant score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError
from stemma.components.evaluation import comparison
from stemma.components.evaluation.rows import (
    build_shadow_rows,
    load_labels,
    read_batch_columns,
    read_scores,
)
from stemma.components.evaluation.shadow import (
    PROMOTE,
    REJECT,
    WAIT,
    ShadowLineage,
    build_shadow_record,
    default_served_output,
    plot_shadow,
    promote_challenger,
    score_pair,
    shadow_evaluate,
    shadow_output_dir,
)
from stemma.components.platform.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.registry.promotion import PromotionError
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.scoring.engine import score_files
from stemma.components.scoring.inputs import input_files
from stemma.components.spec import EvaluateSpec, FeaturesSpec
from stemma.components.training.metrics import evaluate_scores
from tests.support import isolated_mlflow

MODEL = "shadowed"
ID = "application_id"
TARGET = "approved"
FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["elevel"])
ROWS = 2_400

#: The NaN model's outputs go through a sigmoid, which says so; the NaN is the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
#: Weights on (standardised salary, standardised age) of each kind of model.
WEIGHTS = {
    "champion": (1.0, 0.8),
    "better": (1.0, 0.0),
    "worse": (0.3, 1.0),
    "twin": (1.0, 0.8),
    "nan": (float("nan"), 0.0),
    "constant": (0.0, 0.0),
}


def credit_frame(rows: int, seed: int, first_id: int = 1) -> pd.DataFrame:
    """Applications whose approval follows the salary, blurred by noise."""
    rng = np.random.default_rng(seed)
    salary = rng.normal(60_000, 15_000, rows)
    age = rng.integers(20, 70, rows)
    elevel = rng.integers(0, 3, rows)
    signal = (salary - 60_000) / 15_000 + rng.normal(0, 0.9, rows)
    return pd.DataFrame(
        {
            ID: np.arange(first_id, first_id + rows, dtype=np.int64),
            "salary": salary,
            "age": age,
            "elevel": elevel,
            TARGET: (signal > 0).astype(np.int64),
        }
    )


def register_linear_model(
    client: MlflowClient,
    experiment_id: str,
    workdir: Path,
    *,
    name: str,
    weights: Sequence[float],
    frame: pd.DataFrame,
    bias: float = 0.0,
    features: FeaturesSpec = FEATURES,
    gate: str = "passed",
    alias: str | None = None,
    task: str = "binary",
    target: str = TARGET,
) -> str:
    """Log a linear model with the given weights on its first inputs; register it.

    ``weights`` are the weights of the first encoded inputs (numeric features first, then
    one-hot columns); the others are 0. A regression model's output (and ``bias``) is in
    standard deviations of the training target around its mean.

    Returns:
        The new version.
    """
    import mlflow

    from stemma.components.model.artifact import log_pyfunc_model
    from stemma.components.model.networks import build_network, network_config
    from stemma.components.model.preprocessing import fit_preprocessor
    from stemma.components.spec import ModelSpec

    preprocessor = fit_preprocessor(frame, features, task=task, target=target)
    config = network_config(ModelSpec(hidden=[], dropout=0.0))
    network = build_network(config, preprocessor.n_inputs, seed=0)
    with torch.no_grad():
        layer = network.layers[0]
        layer.weight.zero_()
        layer.weight[0, : len(weights)] = torch.tensor(list(weights), dtype=layer.weight.dtype)
        layer.bias.fill_(bias)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info, sha256 = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame[features.all].head(5),
            task=task,
            workdir=workdir,
        )
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run.info.run_id,
        model_id=info.model_id,
        tags={WEIGHTS_TAG: sha256, "stemma.gate.decision": gate},
    )
    if alias is not None:
        client.set_registered_model_alias(name, alias, str(version.version))
    return str(version.version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A store with one version of every kind; `champion` and `challenger` (better) aliased."""
    root = tmp_path_factory.mktemp("shadow-store")
    with isolated_mlflow():
        configure_tracking(root)
        experiment_id = ensure_experiment("shadow", root)
        client = MlflowClient()
        train = credit_frame(1_000, seed=1)
        versions = {
            kind: register_linear_model(
                client,
                experiment_id,
                root / kind,
                name=MODEL,
                weights=weights,
                frame=train,
                alias={"champion": "champion", "better": "challenger"}.get(kind),
            )
            for kind, weights in WEIGHTS.items()
        }
        batch = credit_frame(ROWS, seed=2, first_id=10_000)
        batch_path = root / "batches" / "day_01.parquet"
        batch_path.parent.mkdir()
        batch.drop(columns=[TARGET]).to_parquet(batch_path, index=False)
        labels_path = root / "labels" / "day_01.parquet"
        labels_path.parent.mkdir()
        batch[[ID, TARGET]].to_parquet(labels_path, index=False)
        yield {
            "root": root,
            "client": client,
            "experiment_id": experiment_id,
            "versions": versions,
            "batch": batch,
            "batch_path": batch_path,
            "labels_path": labels_path,
        }


@pytest.fixture(scope="module")
def models(store):
    return {
        kind: load_scoring_model(f"models:/{MODEL}/{version}")
        for kind, version in store["versions"].items()
    }


def settings(**shadow) -> EvaluateSpec:
    return EvaluateSpec.model_validate(
        {"bootstrap_resamples": 400, "shadow": {"min_labelled_rows": 500, **shadow}}
    )


def run_shadow(store, models, kind, tmp_path, *, labels=None, rule=None, champion="champion"):
    """Score the batch with the champion and a challenger and compare them."""
    pair = score_pair(
        models[champion],
        models[kind],
        input_files(store["batch_path"]),
        tmp_path / "scores",
        id_column=ID,
        chunk_rows=1_000,
    )
    rows = build_shadow_rows(
        read_batch_columns(pair.files, [ID, "elevel"]),
        read_scores(pair.served, ID),
        read_scores(pair.shadow, ID),
        id_column=ID,
        labels=labels,
    )
    report = shadow_evaluate(
        rows,
        task="binary",
        metric="roc_auc",
        settings=rule or settings(segments=["elevel"]),
        champion=models[champion],
        challenger=models[kind],
    )
    return pair, rows, report


def all_labels(store) -> pd.DataFrame:
    return load_labels(store["labels_path"], id_column=ID, target=TARGET, task="binary")


# ---------------------------------------------------------------------------------------
# Decisions


def test_a_better_challenger_waits_for_evidence_then_is_promoted(store, models, tmp_path):
    labels = all_labels(store)
    _, _, early = run_shadow(store, models, "better", tmp_path, labels=labels.head(120))
    assert early.decision == WAIT
    assert "120 labelled rows" in early.reasons[0] and "500" in early.reasons[0]

    _, _, later = run_shadow(store, models, "better", tmp_path, labels=labels)
    assert later.decision == PROMOTE, later.reasons
    assert later.labelled_rows == ROWS
    assert later.comparison is not None and later.comparison.improvement_low > 0
    assert f"{later.comparison.low:+.4f}" in later.reasons[1] or "lower bound" in later.reasons[1]
    # the numbers the decision rests on are those of the metric on the same rows
    batch = store["batch"]
    rows_scored = later.comparison
    assert rows_scored.champion == pytest.approx(
        evaluate_scores("binary", batch[TARGET].to_numpy(), champion_scores(store, models))[
            "roc_auc"
        ]
    )


def champion_scores(store, models) -> np.ndarray:
    """The champion's scores of the batch, in batch order, the standard way."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{models['champion'].version}")
    return model.predict(store["batch"])["score"].to_numpy()


@pytest.mark.parametrize("labelled", [200, 800, ROWS], ids=["few", "some", "all"])
def test_a_worse_challenger_is_never_promoted(store, models, tmp_path, labelled):
    labels = all_labels(store).head(labelled)
    _, _, report = run_shadow(store, models, "worse", tmp_path, labels=labels)
    assert report.decision != PROMOTE
    if labelled >= 500:
        assert report.decision == REJECT, report.reasons
        assert report.comparison.improvement_high <= 0
    with pytest.raises(ValueError, match="not 'promote'"):
        promote_challenger(
            store["client"],
            report,
            model_name=MODEL,
            run_id="r",
            flow_run_id=None,
            experiment_id=None,
        )


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_a_broken_challenger_is_rejected_without_labels(store, models, tmp_path, kind):
    _, _, report = run_shadow(store, models, kind, tmp_path)
    assert report.decision == REJECT
    assert report.challenger_failures.error_rate == 1.0
    expected = "NaN/inf" if kind == "nan" else "constant"
    assert expected in report.reasons[0] and "max_error_rate" in report.reasons[0]
    assert report.champion_failures.error_rate == 0.0


def test_identical_models_give_an_interval_at_zero_and_are_not_promoted(store, models, tmp_path):
    _, _, report = run_shadow(store, models, "twin", tmp_path, labels=all_labels(store))
    assert report.comparison.low == report.comparison.high == report.comparison.difference == 0
    assert report.agreement == 1.0 and report.distances["psi"] == pytest.approx(0.0, abs=1e-9)
    assert report.decision == REJECT


def test_only_the_champion_serves_and_the_challenger_scores_beside_it(store, models, tmp_path):
    pair, _, report = run_shadow(store, models, "better", tmp_path)
    served = tmp_path / "scores"
    assert pair.served.output_dir == served and pair.shadow.output_dir == shadow_output_dir(served)
    assert shadow_output_dir(served).name == "scores-shadow"
    assert pair.served.manifest["model"]["version"] == models["champion"].version
    assert pair.shadow.manifest["model"]["version"] == models["better"].version
    # the served folder is byte for byte what batch scoring writes for the champion
    alone = score_files(
        models["champion"],
        input_files(store["batch_path"]),
        tmp_path / "alone",
        id_column=ID,
        chunk_rows=1_000,
        progress=False,
    )
    assert alone.output_digest == pair.served.output_digest
    assert report.rows == ROWS and report.compared_rows == ROWS
    assert report.decision == WAIT and "0 labelled rows" in report.reasons[0]


def test_default_served_output_never_replaces_the_whole_input_scores(tmp_path):
    output, folder = tmp_path / "outputs" / "scores", tmp_path / "batches"
    folder.mkdir()
    day = folder / "day_03.parquet"
    day.write_bytes(b"")
    assert default_served_output(output, folder, folder) == output
    assert default_served_output(output, folder, day) == tmp_path / "outputs" / "scores-day_03"


def test_segments_are_compared_per_value(store, models, tmp_path):
    _, _, report = run_shadow(store, models, "better", tmp_path, labels=all_labels(store))
    values = {segment.value: segment for segment in report.segments}
    counts = store["batch"]["elevel"].value_counts()
    assert set(values) == {str(value) for value in counts.index}
    for value, segment in values.items():
        assert segment.rows == counts[int(value)]
        assert segment.comparison is not None and segment.comparison.rows == segment.rows
    metrics = report.metrics()
    assert metrics["segment.elevel.0.metric_difference"] == values["0"].comparison.difference


def test_plots_and_lineage_link_the_decision_to_both_models_and_the_batch(store, models, tmp_path):
    pair, rows, report = run_shadow(store, models, "better", tmp_path, labels=all_labels(store))
    plots = plot_shadow(rows, report, tmp_path / "plots")
    assert [plot.name for plot in plots] == ["score_scatter.png", "metric_difference.png"]
    assert all(plot.read_bytes()[:4] == b"\x89PNG" for plot in plots)
    facts = ShadowLineage(
        pipeline="p",
        model_name=MODEL,
        champion_version=report.champion_version,
        champion_weights=models["champion"].weights_sha256,
        challenger_version=report.challenger_version,
        challenger_weights=models["better"].weights_sha256,
        input_path="batches/day_01.parquet",
        input_digest=pair.served.manifest["input"]["digest"],
        input_files={},
        served_path="scores",
        served_sha256=pair.served.output_digest,
        shadow_path="scores-shadow",
        shadow_sha256=pair.shadow.output_digest,
        labels_path="labels",
        labels_digest="abc",
        run_id="run1",
        experiment_id="1",
        flow_run_id=None,
        decision=report.decision,
        reasons=report.reasons,
    )
    record = json.loads(build_shadow_record(facts, report).to_json())
    kinds = {node["kind"] for node in record["nodes"]}
    assert {"shadow_evaluation", "decision", "model_version", "input", "labels"} <= kinds
    edges = {(edge["source"], edge["relation"], edge["target"]) for edge in record["edges"]}
    evaluation = "shadow-evaluation:run1"
    assert (f"models:/{MODEL}/{report.champion_version}", "champion_of", evaluation) in edges
    assert (f"models:/{MODEL}/{report.challenger_version}", "challenger_of", evaluation) in edges
    batch_node = f"input:batches/day_01.parquet@{facts.input_digest}"
    assert (batch_node, "evaluated_on", evaluation) in edges
    assert (evaluation, "decided", "decision:run1") in edges
    assert ("decision:run1", PROMOTE, f"models:/{MODEL}/{report.challenger_version}") in edges


def test_promotion_is_compare_and_set_against_the_shadowed_champion(store, models, tmp_path):
    client = store["client"]
    _, _, report = run_shadow(store, models, "better", tmp_path, labels=all_labels(store))
    assert report.decision == PROMOTE
    champion, better = store["versions"]["champion"], store["versions"]["better"]
    # someone else moves the champion after the shadow decided: the promotion loses
    client.set_registered_model_alias(MODEL, "champion", store["versions"]["twin"])
    try:
        with pytest.raises(PromotionError, match="expected v" + champion):
            promote_challenger(
                client, report, model_name=MODEL, run_id="r", flow_run_id=None, experiment_id=None
            )
        assert (
            str(client.get_registered_model(MODEL).aliases["champion"]) == store["versions"]["twin"]
        )
        client.set_registered_model_alias(MODEL, "champion", champion)
        record = promote_challenger(
            client,
            report,
            model_name=MODEL,
            run_id="r",
            flow_run_id=None,
            experiment_id=store["experiment_id"],
        )
        aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
        assert aliases["champion"] == better and aliases["previous-champion"] == champion
        assert record.evidence["shadow_run_id"] == "r" and record.record_run_id
    finally:
        client.set_registered_model_alias(MODEL, "champion", champion)
        client.set_registered_model_alias(MODEL, "challenger", better)


# ---------------------------------------------------------------------------------------
# Broken inputs


def test_the_challenger_cannot_be_the_champion(store, models, tmp_path):
    with pytest.raises(RegistryError, match="the challenger is the champion"):
        run_shadow(store, models, "champion", tmp_path)


def test_a_missing_challenger_reference_names_what_exists(store):
    with pytest.raises(RegistryError, match="has no alias 'nobody'") as error:
        load_scoring_model(f"models:/{MODEL}@nobody")
    assert "champion -> v" in error.value.render()


def write_labels(tmp_path: Path, frame: pd.DataFrame, name: str = "labels.parquet") -> Path:
    path = tmp_path / name
    frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.rename(columns={ID: "id"}), "no id column 'application_id'"),
        (lambda f: f.drop(columns=[TARGET]), "no target column 'approved'"),
        (lambda f: f.assign(approved=2), "binary labels must be 0 or 1"),
        (
            lambda f: pd.concat([f, f.head(3).assign(approved=1 - f.head(3)[TARGET])]),
            "3 ids have two different labels",
        ),
    ],
    ids=["no-id-column", "no-target", "not-binary", "conflicting"],
)
def test_malformed_labels_are_clear_errors(store, tmp_path, change, message):
    labels = pd.read_parquet(store["labels_path"])
    path = write_labels(tmp_path, change(labels))
    with pytest.raises(DataError, match=message) as error:
        load_labels(path, id_column=ID, target=TARGET, task="binary")
    assert str(path) in error.value.render() or path.name in error.value.render()


def test_labels_that_match_no_row_are_an_error_when_named(store, models, tmp_path):
    pair, _, _ = run_shadow(store, models, "better", tmp_path)
    other = credit_frame(50, seed=9, first_id=900_000)[[ID, TARGET]].rename(
        columns={TARGET: "label"}
    )
    args = (
        read_batch_columns(pair.files, [ID]),
        read_scores(pair.served, ID),
        read_scores(pair.shadow, ID),
    )
    with pytest.raises(DataError, match="none of the 50 labelled ids is in the batch") as error:
        build_shadow_rows(*args, id_column=ID, labels=other, labels_required=True)
    assert "10000 to 12399" in error.value.render()
    # labels from the spec's folder may simply not have arrived: no error, no label
    rows = build_shadow_rows(*args, id_column=ID, labels=other, labels_required=False)
    assert rows["label"].isna().all()


def test_missing_labels_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such labels file or folder"):
        load_labels(tmp_path / "nowhere", id_column=ID, target=TARGET, task="binary")


def test_repeated_ids_in_the_batch_are_refused(store, models, tmp_path):
    pair, _, _ = run_shadow(store, models, "better", tmp_path)
    batch = read_batch_columns(pair.files, [ID])
    with pytest.raises(DataError, match="repeats 1 ids"):
        build_shadow_rows(
            pd.concat([batch, batch.head(1)]),
            read_scores(pair.served, ID),
            read_scores(pair.shadow, ID),
            id_column=ID,
        )


# ---------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_metrics_from_weights_equal_the_evaluation_metrics(task):
    rng = np.random.default_rng(3)
    n = 700
    if task == "binary":
        y = (rng.random(n) < 0.35).astype(float)
        scores = np.round(np.clip(0.4 * y + 0.6 * rng.random(n), 0, 1), 2)  # with ties
    else:
        y = rng.normal(size=n)
        scores = y + rng.normal(scale=0.6, size=n)
    expected = evaluate_scores(task, y, scores, threshold=0.5)
    for metric, value in expected.items():
        got = comparison.metric_values(metric, task, y, scores, np.ones((1, n)), threshold=0.5)
        assert got[0] == pytest.approx(value, rel=1e-9, abs=1e-12), metric
    # weights that duplicate rows equal the metric on the duplicated rows
    counts = rng.integers(0, 3, n).astype(float)
    repeated = np.repeat(np.arange(n), counts.astype(int))
    expected = evaluate_scores(task, y[repeated], scores[repeated], threshold=0.5)
    for metric, value in expected.items():
        got = comparison.metric_values(metric, task, y, scores, counts[None, :], threshold=0.5)
        assert got[0] == pytest.approx(value, rel=1e-9, abs=1e-12), metric


def noisy_scores(y: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(2.0 * y - 1.0 + rng.normal(scale=noise, size=y.size))))


def test_bootstrap_is_seeded_and_identical_models_give_zero():
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.4).astype(float)
    a, b = noisy_scores(y, rng, 1.2), noisy_scores(y, rng, 1.0)
    first = comparison.paired_bootstrap("roc_auc", "binary", y, a, b, resamples=300, seed=11)
    again = comparison.paired_bootstrap("roc_auc", "binary", y, a, b, resamples=300, seed=11)
    other = comparison.paired_bootstrap("roc_auc", "binary", y, a, b, resamples=300, seed=12)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)
    assert first.low < first.difference < first.high
    same = comparison.paired_bootstrap("log_loss", "binary", y, a, a, resamples=300, seed=11)
    assert same.low <= 0 <= same.high and same.low == same.high == 0


def test_bootstrap_interval_covers_a_zero_difference_at_about_its_level():
    """Two equally good models (independent noise): the 90% interval holds 0 ~90% of the time."""
    rng = np.random.default_rng(2024)
    trials, covered = 150, 0
    for trial in range(trials):
        y = (rng.random(300) < 0.5).astype(float)
        a, b = noisy_scores(y, rng, 1.5), noisy_scores(y, rng, 1.5)
        result = comparison.paired_bootstrap(
            "roc_auc", "binary", y, a, b, confidence=0.9, resamples=300, seed=trial
        )
        covered += result.low <= 0 <= result.high
    assert 0.82 <= covered / trials <= 0.97, covered / trials


def delong_difference_sd(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong's standard error of AUC(b) - AUC(a) on the same rows (an independent check)."""
    positives, negatives = y == 1, y == 0

    def components(scores):
        p, n = scores[positives][:, None], scores[negatives][None, :]
        kernel = (p > n) + 0.5 * (p == n)
        return kernel.mean(axis=1), kernel.mean(axis=0)

    (va, wa), (vb, wb) = components(a), components(b)
    sp = np.cov(np.vstack([va, vb]))
    sn = np.cov(np.vstack([wa, wb]))
    var = (sp[0, 0] + sp[1, 1] - 2 * sp[0, 1]) / va.size
    var += (sn[0, 0] + sn[1, 1] - 2 * sn[0, 1]) / wa.size
    return float(np.sqrt(var))


def test_bootstrap_interval_width_agrees_with_delong():
    rng = np.random.default_rng(5)
    y = (rng.random(1_500) < 0.3).astype(float)
    a, b = noisy_scores(y, rng, 1.4), noisy_scores(y, rng, 1.1)
    result = comparison.paired_bootstrap("roc_auc", "binary", y, a, b, resamples=2_000, seed=1)
    expected_width = 2 * 1.959964 * delong_difference_sd(y, a, b)
    assert (result.high - result.low) == pytest.approx(expected_width, rel=0.15)


def test_a_metric_undefined_in_resamples_leaves_the_interval_undecided():
    y = np.array([1.0] + [0.0] * 99)  # one positive: most resamples draw none
    scores = np.linspace(0, 1, 100)
    result = comparison.paired_bootstrap("roc_auc", "binary", y, scores, scores[::-1], seed=0)
    assert not result.decidable and np.isnan(result.low)


def test_score_distances_see_a_shift_and_not_its_absence():
    rng = np.random.default_rng(1)
    reference = rng.beta(2, 5, 5_000)
    same = comparison.score_distances(reference, rng.beta(2, 5, 5_000), task="binary")
    shifted = comparison.score_distances(reference, rng.beta(5, 2, 5_000), task="binary")
    assert same["psi"] < 0.02 and same["ks"] < 0.05 and same["js"] < 0.05
    assert shifted["psi"] > 1.0 and shifted["ks"] > 0.5 and shifted["js"] > 0.5
    assert shifted["ks_pvalue"] < 1e-6 < same["ks_pvalue"]


@pytest.mark.parametrize(
    ("scores", "rows", "expected"),
    [
        (np.linspace(0, 1, 20), 20, (0, 0, False, 0.0)),
        (np.r_[np.linspace(0, 1, 18), np.nan, np.inf], 20, (0, 2, False, 0.1)),
        (np.linspace(0, 1, 15), 20, (5, 0, False, 0.25)),
        (np.full(20, 0.5), 20, (0, 0, True, 1.0)),
    ],
    ids=["fine", "non-finite", "not-scored", "constant"],
)
def test_failures_count_every_way_a_model_can_fail(scores, rows, expected):
    failures = comparison.count_failures(scores, rows=rows)
    assert (
        failures.not_scored,
        failures.non_finite,
        failures.constant,
        failures.error_rate,
    ) == expected


def test_spec_problems_of_the_evaluate_section_are_reported_together(repo_root, tmp_path):
    from stemma.components.errors import SpecError
    from stemma.components.spec import load_spec

    config = tmp_path / "credit.yaml"
    config.write_text((repo_root / "configs" / "credit.yaml").read_text())
    overrides = [
        "data.id=null",
        "evaluate.shadow.segments=[elevel, nope, elevel]",
        "evaluate.canary.steps=[0.5, 0.25]",
    ]
    with pytest.raises(SpecError) as error:
        load_spec(config, overrides, check_paths=False, check_expectations=False)
    text = error.value.render()
    assert "data.id: required by `evaluate`" in text
    assert "evaluate.shadow.segments[1]: 'nope' is not a feature column" in text
    assert "evaluate.shadow.segments[2]: 'elevel' is listed more than once" in text
    assert "evaluate.canary.steps: must increase step by step" in text
    assert "evaluate.canary.steps: must end at 1.0" in text
    assert "5 problems" in error.value.headline
    with pytest.raises(SpecError, match=r"evaluate\.confidence: must be less than 1"):
        load_spec(config, ["evaluate.confidence=1.5"], check_paths=False, check_expectations=False)
    # the worked example's section is valid, and absent it defaults apply
    assert load_spec(
        repo_root / "configs" / "credit.yaml", check_paths=False, check_expectations=False
    ).spec.evaluate
