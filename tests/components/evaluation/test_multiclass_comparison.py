"""Multiclass shadow and canary statistics on seeded synthetic tables (no credit columns):
the bootstrap's metrics against scikit-learn's, its interval against a known difference,
agreement by predicted class, and production labels that are text or no class at all."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stemma.components.data.labels import read_labels
from stemma.components.errors import DataError
from stemma.components.evaluation import live
from stemma.components.evaluation.comparison import (
    decision_agreement,
    metric_values,
    paired_bootstrap,
)
from stemma.components.evaluation.log_rows import open_log, read_log_labels
from stemma.components.evaluation.rows import (
    CHALLENGER_SCORE,
    CHAMPION_SCORE,
    LABEL,
    UNKNOWN_LABEL,
    add_labels,
    encode_labels,
    known_labels,
    load_labels,
    probability_columns,
    unknown_labels,
)
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.spec import METRIC_DIRECTIONS, FeaturesSpec
from stemma.components.training.metrics import multiclass_metrics
from tests.support import write_log_part

#: The metrics a shadow or canary most often decides on, one of each kind: a weighted
#: mean, confusion counts, a ranking, and a loss where lower is better.
DECIDING = ["accuracy", "f1_macro", "roc_auc", "log_loss"]
FRUITS = ("apple", "cherry", "pear")


def probabilities(codes: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A model's class probabilities: softmax of ``strength`` on the true class plus noise."""
    logits = rng.normal(0.0, 1.0, (codes.size, 3))
    logits[np.arange(codes.size), codes] += strength
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def population(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of three unbalanced classes, a weak champion and a stronger challenger."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(3, size=rows, p=[0.5, 0.3, 0.2])
    return codes, probabilities(codes, 1.0, rng), probabilities(codes, 1.6, rng)


@pytest.mark.parametrize("classes", [3, 5], ids=["3-classes", "5-classes"])
def test_metrics_from_weights_equal_scikit_learns(classes):
    rng = np.random.default_rng(classes)
    codes = rng.integers(0, classes, 400)
    scores = rng.dirichlet(np.ones(classes), 400)
    scores[:20] = np.round(scores[:20], 1)  # ties, for the ranking metrics
    scores[:20] /= scores[:20].sum(axis=1, keepdims=True)
    counts = rng.integers(0, 3, 400)  # a bootstrap resample: each row drawn 0, 1 or 2 times
    drawn = np.repeat(np.arange(400), counts)
    plain = multiclass_metrics(codes, scores)
    resampled = multiclass_metrics(codes[drawn], scores[drawn])
    weights = np.stack([np.ones(400), counts.astype(np.float64)])
    for metric in METRIC_DIRECTIONS["multiclass"]:
        values = metric_values(metric, "multiclass", codes, scores, weights)
        assert values == pytest.approx([plain[metric], resampled[metric]], abs=1e-9), metric


@pytest.mark.parametrize("metric", DECIDING)
def test_the_interval_covers_the_true_difference(metric):
    """The true difference is the metric's on a large population; intervals from samples
    of it cover it at about their level (the percentile bootstrap runs a little narrow)."""
    codes, champion, challenger = population(60_000, seed=1)
    truth = (
        multiclass_metrics(codes, challenger)[metric] - multiclass_metrics(codes, champion)[metric]
    )
    rng = np.random.default_rng(2)
    covered = []
    for replicate in range(40):
        rows = rng.choice(codes.size, 300, replace=False)
        found = paired_bootstrap(
            metric,
            "multiclass",
            codes[rows],
            champion[rows],
            challenger[rows],
            resamples=200,
            seed=replicate,
        )
        covered.append(found.low <= truth <= found.high)
    assert np.mean(covered) >= 0.85, (metric, truth, np.mean(covered))

    rows = rng.choice(codes.size, 2_000, replace=False)
    found = paired_bootstrap(
        metric, "multiclass", codes[rows], champion[rows], challenger[rows], resamples=300
    )
    assert found.low <= truth <= found.high
    assert found.improvement_low > 0, "the stronger challenger is better with confidence"
    assert found.defined == found.resamples


def test_identical_models_and_seeds_give_the_same_interval_at_zero():
    codes, champion, _ = population(500, seed=3)
    first = paired_bootstrap("f1_macro", "multiclass", codes, champion, champion, resamples=100)
    again = paired_bootstrap("f1_macro", "multiclass", codes, champion, champion, resamples=100)
    assert first == again
    assert first.difference == first.low == first.high == 0.0


def test_a_class_missing_from_a_resample_leaves_its_auc_out_of_the_mean():
    """ROC AUC is the mean over the classes with both labels drawn: a rare class drawn in no
    resample row does not make the metric undefined."""
    codes = np.array([0] * 30 + [1] * 30 + [2])
    scores = np.random.default_rng(4).dirichlet(np.ones(3), codes.size)
    found = paired_bootstrap("roc_auc", "multiclass", codes, scores, scores[::-1], resamples=200)
    assert found.decidable and found.defined == 200


def test_agreement_is_the_same_predicted_class():
    champion = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2]])
    challenger = np.array([[0.5, 0.4, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [np.nan] * 3])
    # rows 0 and 2 agree, row 1 does not, row 3 is not finite and never agrees
    assert decision_agreement(champion, challenger, task="multiclass") == 0.5


@pytest.mark.parametrize(
    ("codes", "scores", "message"),
    [
        ([0, 1, 3], np.full((3, 3), 1 / 3), "class codes 0 to 2"),
        ([0, 1, 2], np.full(3, 0.5), r"\(rows, classes\)"),
        ([0, 1], np.full((3, 3), 1 / 3), "differ in shape"),
    ],
    ids=["code-outside-the-classes", "one-score-per-row", "lengths-differ"],
)
def test_malformed_multiclass_inputs_are_refused(codes, scores, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap("accuracy", "multiclass", np.array(codes), scores, scores)


def fruit_preprocessor(labels: dict[str, str] | None = None):
    """A fitted preprocessor of a seeded fruit table whose classes are names; with a label
    map, the table's labels are its raw values."""
    rng = np.random.default_rng(5)
    raw = (
        {fruit: fruit for fruit in FRUITS} if labels is None else {v: k for k, v in labels.items()}
    )
    frame = pd.DataFrame(
        {"weight": rng.normal(150, 30, 60), "fruit": [raw[f] for f in np.repeat(FRUITS, 20)]}
    )
    return fit_preprocessor(
        frame, FeaturesSpec(numeric=["weight"]), task="multiclass", target="fruit", labels=labels
    )


def test_text_labels_are_read_as_classes_and_unknown_ones_counted(tmp_path):
    path = tmp_path / "labels.parquet"
    pd.DataFrame(
        {"key": [1, 2, 3, 4, 5, 6], "fruit": ["pear", "apple", "kiwi", None, "plum", "kiwi"]}
    ).to_parquet(path)
    with pytest.raises(DataError, match="not numbers") as refused:
        read_labels(path, "key", "fruit")
    assert "data.task: multiclass" in str(refused.value)

    labels = load_labels(path, id_column="key", target="fruit", task="multiclass", classes=True)
    assert labels[LABEL].tolist() == ["pear", "apple", "kiwi", "plum", "kiwi"]
    preprocessor = fruit_preprocessor()
    encoded = encode_labels(labels, preprocessor)
    assert encoded[LABEL].tolist() == [2.0, 0.0, UNKNOWN_LABEL, UNKNOWN_LABEL, UNKNOWN_LABEL]
    assert labels[LABEL].tolist()[0] == "pear", "the input is not changed"

    # joined to a batch: ids 1 to 7, of which 3 and 5 are labelled with no class, 4 and 7 not
    rows = pd.DataFrame({"key": range(1, 8)})
    add_labels(rows, encoded, "key")
    unknown, note = unknown_labels(rows, "multiclass")
    assert rows.loc[unknown, "key"].tolist() == [3, 5, 6]
    assert rows[LABEL].isna().sum() == 2, "a label that has not arrived is not an unknown one"
    assert note.startswith("3 rows hold a label that is no class of the model ('kiwi', 'plum')")
    assert unknown_labels(rows.assign(**{LABEL: 1.0}), "multiclass")[1] == ""
    assert not unknown_labels(rows, "regression")[0].any(), "-1 is a value of a regression"

    # the monitor's check takes the known labels only, and says how many it left out
    known, left_out, said = known_labels(
        read_labels(path, "key", "fruit", classes=True), preprocessor, column="fruit"
    )
    assert known["key"].tolist() == [1, 2] and known["fruit"].tolist() == [2.0, 0.0]
    assert left_out == 3 and said.startswith("3 labels are no class of the model ('kiwi', 'plum')")


def test_a_label_map_maps_production_labels_before_they_are_compared(tmp_path):
    preprocessor = fruit_preprocessor(labels={"P": "pear", "A": "apple", "C": "cherry"})
    path = tmp_path / "labels.csv"
    pd.DataFrame({"key": [1, 2, 3, 4], "fruit": ["P", "A", "C", "X"]}).to_csv(path, index=False)
    labels = load_labels(path, id_column="key", target="fruit", task="multiclass", classes=True)
    assert encode_labels(labels, preprocessor)[LABEL].tolist() == [2.0, 0.0, 1.0, UNKNOWN_LABEL]

    # a binary label map: yes/no become 1/0, anything else is unknown, never an error
    rng = np.random.default_rng(6)
    binary = fit_preprocessor(
        pd.DataFrame({"weight": rng.normal(size=10), "ripe": ["yes", "no"] * 5}),
        FeaturesSpec(numeric=["weight"]),
        task="binary",
        target="ripe",
        labels={"yes": 1, "no": 0},
    )
    answers = pd.DataFrame({"key": [1, 2, 3], LABEL: ["no", "yes", "maybe"]})
    assert encode_labels(answers, binary)[LABEL].tolist() == [0.0, 1.0, UNKNOWN_LABEL]


def test_text_labels_the_endpoint_logged_are_read_as_classes(tmp_path):
    log = tmp_path / "log"
    first = pd.DataFrame({"key": [1, 2, 3], "fruit": ["pear", "apple", "kiwi"]})
    write_log_part(log, "labels", first, at="2026-03-01T10:00:00", id_column="key")
    correction = pd.DataFrame({"key": [3], "fruit": ["cherry"]})
    write_log_part(log, "labels", correction, at="2026-03-02T10:00:00", id_column="key")
    with pytest.raises(DataError, match="not numbers"):
        read_log_labels(open_log(log), id_column="key", target="fruit", task="multiclass")
    labels, days = read_log_labels(
        open_log(log), id_column="key", target="fruit", task="multiclass", classes=True
    )
    assert len(days) == 2
    by_id = dict(zip(labels["key"], labels[LABEL], strict=True))
    assert by_id == {"1": "pear", "2": "apple", "3": "cherry"}  # the later label wins
    assert encode_labels(labels, fruit_preprocessor())[LABEL].tolist() == [2.0, 0.0, 1.0]


def test_live_shadow_pairs_each_class_probability_with_the_champions_answer():
    """Judged from the endpoint's log, both models' probabilities of each class pair up by
    request and row, in the champion's class order, and the labels join by id."""
    rng = np.random.default_rng(7)
    champion, challenger = rng.dirichlet(np.ones(3), 6), rng.dirichlet(np.ones(3), 6)
    logged = [f"probability_{fruit}" for fruit in FRUITS]
    keys = {"stemma_request_id": ["r-1"] * 6, "stemma_row": range(6)}
    served = pd.DataFrame(
        {
            **keys,
            "key": [str(k) for k in range(6)],
            "stemma_time": pd.Timestamp("2026-03-01", tz="UTC"),
            "stemma_model_version": "3",
            "stemma_variant": "champion",
            "score": champion.max(axis=1),
            **dict(zip(logged, champion.T, strict=True)),
        }
    )
    shadowed = pd.DataFrame(
        {
            **keys,
            "stemma_model_version": "5",
            "score": challenger.max(axis=1),
            # the shadow's part may order its columns otherwise: they pair by name
            **dict(zip(logged[::-1], challenger.T[::-1], strict=True)),
        }
    )
    labels = pd.DataFrame({"key": ["0", "1", "2"], LABEL: ["pear", "apple", "kiwi"]})
    pairs = live.pair_shadow_rows(
        served,
        shadowed,
        id_column="key",
        champion_version="3",
        challenger_version="5",
        labels=encode_labels(labels, fruit_preprocessor()),
        segments=[],
        classes=FRUITS,
    )
    rows = pairs.rows.sort_values("key")
    assert np.allclose(rows[probability_columns(CHAMPION_SCORE, 3)].to_numpy(), champion)
    assert np.allclose(rows[probability_columns(CHALLENGER_SCORE, 3)].to_numpy(), challenger)
    assert rows[LABEL].tolist()[:3] == [2.0, 0.0, UNKNOWN_LABEL]
    assert rows[LABEL].isna().sum() == 3
    unknown, note = unknown_labels(rows, "multiclass")
    assert unknown.sum() == 1 and "('kiwi')" in note
