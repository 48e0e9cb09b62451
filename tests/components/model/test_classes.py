"""Classes and label maps in the preprocessor: multiclass targets, string labels mapped by
``data.labels``, the answer table, and the errors that name what is wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stemma.components.errors import DataError
from stemma.components.model.preprocessing import Preprocessor, fit_preprocessor
from stemma.components.spec import DataSpec, FeaturesSpec

FEATURES = FeaturesSpec(numeric=["x"], categorical=["colour"])


def _frame(labels: list) -> pd.DataFrame:
    rows = len(labels)
    return pd.DataFrame(
        {
            "x": np.linspace(0.0, 1.0, rows),
            "colour": (["red", "blue"] * rows)[:rows],
            "y": labels,
        }
    )


def test_multiclass_classes_are_the_training_labels_sorted_and_travel_in_json():
    frame = _frame(["virginica", "setosa", "versicolor", "setosa", "virginica", "versicolor"])
    pre = fit_preprocessor(frame, FEATURES, task="multiclass", target="y")

    assert pre.classes == ("setosa", "versicolor", "virginica")
    assert pre.n_outputs == 3
    one_hot = pre.encode_target(frame, "y")
    assert one_hot.shape == (6, 3) and one_hot.dtype == np.float32
    assert one_hot.argmax(axis=1).tolist() == [2, 0, 1, 0, 2, 1]
    assert Preprocessor.from_dict(pre.to_dict()) == pre


def test_spec_classes_fix_the_output_order_even_for_a_class_the_split_lacks():
    frame = _frame([2, 0, 2, 0])
    pre = fit_preprocessor(frame, FEATURES, task="multiclass", target="y", classes=[2, 1, 0])

    assert pre.classes == (2, 1, 0)
    assert pre.class_codes(pd.Series([0, 1, 2, 3, None])).tolist() == [2, 1, 0, -1, -1]


def test_a_label_map_turns_strings_into_binary_classes_and_names_unmapped_labels():
    frame = _frame(["yes", "no", "yes", "no"])
    pre = fit_preprocessor(frame, FEATURES, task="binary", target="y", labels={"yes": 1, "no": 0})

    assert pre.encode_target(frame, "y").tolist() == [1.0, 0.0, 1.0, 0.0]
    assert pre.class_codes(pd.Series(["no", "maybe", "yes"])).tolist() == [0, -1, 1]
    with pytest.raises(DataError, match="not classes of the binary task: maybe") as raised:
        pre.encode_target(_frame(["yes", "maybe", "no", "maybe"]), "y")
    assert "data.labels" in str(raised.value)
    assert Preprocessor.from_dict(pre.to_dict()) == pre


def test_labels_match_however_the_file_typed_them():
    """1, 1.0 and "1" are one label; booleans match true/false keys."""
    pre = fit_preprocessor(
        _frame([1.0, 2.0, 3.0, 1.0]),
        FEATURES,
        task="multiclass",
        target="y",
        labels={1: "low", 2: "mid", 3: "high"},
    )
    assert pre.classes == ("high", "low", "mid")
    assert pre.class_codes(pd.Series(["1", 3, 2.0])).tolist() == [1, 0, 2]


def test_a_multiclass_split_with_one_class_is_refused_by_name():
    with pytest.raises(DataError, match=r"at least two classes.*only 'a'"):
        fit_preprocessor(_frame(["a", "a", "a"]), FEATURES, task="multiclass", target="y")


def test_the_answer_table_names_the_class_and_each_probability():
    pre = fit_preprocessor(_frame(["b", "a", "c", "a"]), FEATURES, task="multiclass", target="y")
    raw = np.array([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]], dtype=np.float32)

    probabilities = pre.decode_output(raw)
    table = pre.output_frame(probabilities)

    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert list(table.columns) == pre.output_columns()
    assert list(table.columns) == [
        "score",
        "prediction",
        "probability_a",
        "probability_b",
        "probability_c",
    ]
    assert table["prediction"].tolist() == ["b", "a"]
    np.testing.assert_allclose(table["score"], probabilities.max(axis=1))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        pre.decode_output(raw[:, :2])


def test_binary_and_regression_answers_keep_their_columns():
    binary = fit_preprocessor(_frame([0, 1, 0, 1]), FEATURES, task="binary")
    table = binary.output_frame(np.array([0.2, 0.7]), threshold=0.5)
    assert list(table.columns) == ["score", "prediction"]
    assert table["prediction"].tolist() == [0, 1]
    regression = fit_preprocessor(
        _frame([1.0, 2.0, 3.0, 4.0]), FEATURES, task="regression", target="y"
    )
    assert regression.output_columns() == ["score"]


def test_a_preprocessor_written_before_classes_existed_still_loads():
    pre = fit_preprocessor(_frame([0, 1, 0, 1]), FEATURES, task="binary")
    old = {key: value for key, value in pre.to_dict().items() if key not in ("classes", "labels")}
    assert Preprocessor.from_dict(old) == pre


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "binary", "classes": ["a", "b"]}, "for `task: multiclass` only"),
        ({"task": "regression", "labels": {"a": 1}}, "a regression target takes numbers"),
        ({"task": "binary", "labels": {"yes": "good"}}, "map to 0 or 1"),
        ({"task": "multiclass", "classes": ["a", "b", "a"]}, "repeated"),
        ({"task": "multiclass", "classes": ["a", "b"], "labels": {"x": "c"}}, "not in `classes`"),
    ],
)
def test_the_spec_refuses_classes_and_labels_that_cannot_hold(fields, message):
    with pytest.raises(ValueError, match=message):
        DataSpec(path="data.csv", target="y", features={"numeric": ["x"]}, **fields)
