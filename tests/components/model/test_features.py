"""Preprocessing: fitting, encoding, targets, and the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stemma.components.errors import DataError
from stemma.components.model.preprocessing import Preprocessor, fit_preprocessor
from stemma.components.spec import FeaturesSpec

FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["elevel", "car"])


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "salary": [10.0, 20.0, 30.0, 40.0],
            "age": [30, 30, 30, 30],  # constant: its spread must not divide by zero
            "elevel": [3, 0, 3, 1],
            "car": ["b", "a", None, "b"],
            "approved": [0, 1, 1, 0],
            "loan": [100.0, 200.0, 300.0, 400.0],
        }
    )


def test_fit_learns_scales_and_sorted_vocabularies() -> None:
    pre = fit_preprocessor(_frame(), FEATURES, task="binary")

    assert pre.means == (25.0, 30.0)
    assert pre.stds == pytest.approx((np.std([10, 20, 30, 40]), 1.0))
    assert pre.vocabularies == ((0, 1, 3), ("a", "b"))
    assert all(type(value) is int for value in pre.vocabularies[0])
    assert (pre.target_mean, pre.target_std) == (None, None)
    assert pre.n_inputs == 7
    assert pre.feature_names == [
        "salary",
        "age",
        "elevel=0",
        "elevel=1",
        "elevel=3",
        "car=a",
        "car=b",
    ]


def test_transform_standardises_then_one_hot_encodes() -> None:
    frame = _frame()
    pre = fit_preprocessor(frame, FEATURES, task="binary")

    matrix = pre.transform(frame)

    assert matrix.dtype == np.float32 and matrix.shape == (4, 7)
    scaled = (np.array([10, 20, 30, 40]) - 25) / np.std([10, 20, 30, 40])
    np.testing.assert_allclose(matrix[:, 0], scaled, rtol=1e-6)
    np.testing.assert_array_equal(matrix[:, 1], 0.0)
    np.testing.assert_array_equal(
        matrix[:, 2:],
        [
            [0, 0, 1, 0, 1],
            [1, 0, 0, 1, 0],
            [0, 0, 1, 0, 0],  # a missing car is an all-zero block
            [0, 1, 0, 0, 1],
        ],
    )


def test_unknown_categories_encode_as_zeros_and_other_columns_are_ignored() -> None:
    pre = fit_preprocessor(_frame(), FEATURES, task="binary")
    production = pd.DataFrame(
        {
            "car": ["z", "a"],
            "salary": [25.0, 25.0],
            "age": [30, 30],
            "elevel": [7, 1],
            "extra": ["x", "y"],
        }
    )

    matrix = pre.transform(production)

    np.testing.assert_array_equal(matrix, [[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1, 0]])


@pytest.mark.parametrize(
    ("elevel", "car"),
    [
        (pd.Series([1.0, np.nan]), pd.Series(["a", "b"])),
        (pd.Series([1, None], dtype="Int64"), pd.Series(["a", "b"], dtype=object)),
        (pd.Series(["1", "x"], dtype=object), pd.Series(["a", "b"], dtype="category")),
    ],
    ids=["float-with-nan", "nullable-int", "text-digits"],
)
def test_categories_match_across_dtypes(elevel: pd.Series, car: pd.Series) -> None:
    pre = fit_preprocessor(_frame(), FEATURES, task="binary")
    production = pd.DataFrame(
        {"salary": [25.0, 25.0], "age": [30, 30], "elevel": elevel, "car": car}
    )

    matrix = pre.transform(production)

    np.testing.assert_array_equal(matrix[:, 2:], [[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]])


def test_whole_float_categories_become_integers_and_text_stays_text() -> None:
    frame = pd.DataFrame(
        {"zip": [2.0, 1.0, np.nan], "grade": [1.5, 2.5, 1.5], "x": [1.0, 2.0, 3.0]}
    )

    pre = fit_preprocessor(
        frame, FeaturesSpec(numeric=["x"], categorical=["zip", "grade"]), task="binary"
    )

    assert pre.vocabularies == ((1, 2), ("1.5", "2.5"))
    np.testing.assert_array_equal(
        pre.transform(frame)[:, 1:], [[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 0]]
    )


def test_fit_and_transform_do_not_change_the_frame() -> None:
    frame = _frame()
    before = frame.copy()
    pre = fit_preprocessor(frame, FEATURES, task="regression", target="loan")
    pre.transform(frame)
    pre.encode_target(frame, "loan")
    pd.testing.assert_frame_equal(frame, before)


def test_transform_encodes_a_million_rows_one_hot() -> None:
    rows = 1_000_000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "salary": rng.normal(size=rows),
            "age": rng.integers(18, 90, rows),
            "elevel": rng.integers(0, 5, rows),
            "car": rng.choice(["a", "b", "c"], rows),
        }
    )
    pre = fit_preprocessor(frame, FEATURES, task="binary")

    matrix = pre.transform(frame)

    assert matrix.shape == (rows, 10)
    np.testing.assert_array_equal(matrix[:, 2:].sum(axis=1), 2.0)  # exactly one hot per column


# ---------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns=["age", "car"]), "the data lacks 2 feature columns: age, car"),
        (lambda f: f.assign(salary=[1.0, np.nan, np.inf, 2.0]), r"salary \(2 rows\)"),
        (lambda f: f.assign(age=["x", 1, 2, None]), r"age \(2 rows\)"),
        (
            lambda f: f.assign(salary=[np.nan, 1.0, 2.0, 3.0], age=[-np.inf, 1, 2, 3]),
            r"salary \(1 row\), age \(1 row\)",
        ),
    ],
    ids=["missing-columns", "nan-and-inf", "not-numbers", "several-columns"],
)
def test_unusable_numeric_data_is_a_data_error(change, message: str) -> None:
    pre = fit_preprocessor(_frame(), FEATURES, task="binary")
    broken = change(_frame())

    with pytest.raises(DataError, match=message):
        pre.transform(broken)
    with pytest.raises(DataError, match=message):
        fit_preprocessor(broken, FEATURES, task="binary")


def test_an_empty_categorical_column_cannot_be_fitted() -> None:
    frame = _frame().assign(car=[None, None, None, None])
    with pytest.raises(
        DataError, match="categorical feature columns with no values in the training split: car"
    ):
        fit_preprocessor(frame, FEATURES, task="binary")


def test_an_empty_training_split_cannot_be_fitted() -> None:
    with pytest.raises(DataError, match="the training split has no rows"):
        fit_preprocessor(_frame().iloc[:0], FEATURES, task="binary")


# ---------------------------------------------------------------------------------------
# Targets and outputs


def test_binary_targets_and_probabilities() -> None:
    frame = _frame()
    pre = fit_preprocessor(frame, FEATURES, task="binary")

    target = pre.encode_target(frame, "approved")
    probabilities = pre.decode_output(
        np.array([[-1000.0], [0.0], [1000.0], [-40.0]], dtype=np.float32)
    )

    assert target.dtype == np.float32 and target.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert probabilities.shape == (4,)
    assert probabilities[:3].tolist() == [0.0, 0.5, 1.0]
    assert probabilities[3] == pytest.approx(np.exp(-40.0))  # not rounded to 0


def test_decoded_outputs_can_be_written_into_a_given_array() -> None:
    frame = _frame()
    binary = fit_preprocessor(frame, FEATURES, task="binary")
    logits = np.array([-700.0, -2.0, 0.0, 3.5], dtype=np.float64)
    out = np.full(6, -1.0)

    written = binary.decode_output(logits.astype(np.float32), out=out[1:5])

    assert written.base is out and out[0] == out[5] == -1.0
    np.testing.assert_allclose(out[1:5], 1.0 / (1.0 + np.exp(-logits)), rtol=1e-15)
    assert 0.0 < out[1] < 1e-300  # a very negative logit keeps its tiny probability
    regression = fit_preprocessor(frame, FEATURES, task="regression", target="loan")
    assert regression.target_mean is not None and regression.target_std is not None
    expected = logits * regression.target_std + regression.target_mean
    assert regression.decode_output(logits, out=np.empty(4)).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="contiguous float64 of shape"):
        binary.decode_output(logits, out=np.empty(3))
    with pytest.raises(ValueError, match="contiguous float64 of shape"):
        binary.decode_output(logits, out=np.empty(8)[::2])


def test_boolean_binary_targets_are_accepted() -> None:
    frame = _frame().assign(approved=[True, False, False, True])
    pre = fit_preprocessor(frame, FEATURES, task="binary")
    assert pre.encode_target(frame, "approved").tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0, 1, 2, 1], r"must hold 0 and 1; 1 rows hold other values \(e.g. 2\)"),
        (["no", "yes", "yes", "no"], r"4 rows hold other values \(e.g. no, yes\)"),
        ([0, 1, None, 1], "has 1 missing values"),
    ],
    ids=["three-classes", "text", "missing"],
)
def test_bad_binary_targets_are_data_errors(values: list, message: str) -> None:
    frame = _frame().assign(approved=values)
    pre = fit_preprocessor(frame, FEATURES, task="binary")
    with pytest.raises(DataError, match=message):
        pre.encode_target(frame, "approved")


def test_regression_targets_are_standardised_and_decoded_back() -> None:
    frame = _frame()
    pre = fit_preprocessor(frame, FEATURES, task="regression", target="loan")

    encoded = pre.encode_target(frame, "loan")

    assert pre.target_mean == 250.0 and pre.target_std == pytest.approx(
        np.std([100, 200, 300, 400])
    )
    assert encoded.dtype == np.float32
    assert encoded.mean() == pytest.approx(0.0, abs=1e-6) and encoded.std() == pytest.approx(1.0)
    np.testing.assert_allclose(
        pre.decode_output(encoded.reshape(-1, 1)), [100, 200, 300, 400], rtol=1e-6
    )


def test_regression_needs_a_target_and_the_target_column() -> None:
    with pytest.raises(ValueError, match="needs the target column"):
        fit_preprocessor(_frame(), FEATURES, task="regression")
    with pytest.raises(DataError, match="the data lacks 1 target column: price"):
        fit_preprocessor(_frame(), FEATURES, task="regression", target="price")


# ---------------------------------------------------------------------------------------
# JSON


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    pre = fit_preprocessor(
        _frame().assign(salary=[0.1, 0.2, 0.3, 1e-7]), FEATURES, task="regression", target="loan"
    )

    path = pre.save_json(tmp_path / "deep" / "preprocess.json")

    assert json.loads(path.read_text()) == pre.to_dict()
    assert Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    loaded = Preprocessor.load_json(path)
    assert loaded == pre
    np.testing.assert_array_equal(loaded.transform(_frame()), pre.transform(_frame()))
    assert [p.name for p in path.parent.iterdir()] == ["preprocess.json"]


def _valid() -> dict:
    return fit_preprocessor(_frame(), FEATURES, task="binary").to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("means"), r"missing keys \['means'\]"),
        (lambda d: d.update(scale=2), r"unknown keys \['scale'\]"),
        (lambda d: d.update(task="ordinal"), "task must be one of"),
        (lambda d: d.update(task="multiclass"), "classes are required for multiclass only"),
        (lambda d: d.update(task="multiclass", classes=["a"]), "two or more"),
        (lambda d: d.update(task="multiclass", classes=["a", 1]), "all integers or all strings"),
        (lambda d: d.update(task="multiclass", classes=[1, 1]), "repeat a value"),
        (lambda d: d.update(labels=["yes"]), "labels must be a mapping"),
        (lambda d: d.update(means=[1.0]), "numeric, means and stds differ in length"),
        (lambda d: d.update(stds=[1.0, 0.0]), "stds must be positive"),
        (lambda d: d.update(means=[1.0, "x"]), "means must be finite numbers"),
        (
            lambda d: d.update(vocabularies=[[0, 1, 3]]),
            "categorical and vocabularies differ in length",
        ),
        (lambda d: d.update(vocabularies=[[0, "a"], ["a"]]), "all integers or all strings"),
        (lambda d: d.update(vocabularies=[[True], ["a"]]), "all integers or all strings"),
        (lambda d: d.update(vocabularies=[[], ["a"]]), "must be a non-empty list"),
        (lambda d: d.update(vocabularies="abc"), "vocabularies must be a list"),
        (lambda d: d.update(target_mean=1.0), "for regression only"),
    ],
    ids=[
        "missing-key",
        "unknown-key",
        "bad-task",
        "multiclass-without-classes",
        "one-class",
        "mixed-classes",
        "repeated-class",
        "labels-not-a-mapping",
        "short-means",
        "zero-std",
        "text-mean",
        "short-vocabularies",
        "mixed-vocabulary",
        "bool-vocabulary",
        "empty-vocabulary",
        "vocabularies-not-list",
        "stray-target-scale",
    ],
)
def test_malformed_dicts_are_refused(change, message: str) -> None:
    data = _valid()
    change(data)
    with pytest.raises(ValueError, match=message):
        Preprocessor.from_dict(data)


def test_a_file_that_is_not_json_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "preprocess.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocess\.json: not valid JSON"):
        Preprocessor.load_json(path)
