"""A starting spec inferred from a table: roles of columns, the task, checks, the YAML text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import datasets

from stemma.components.data import inference, starter_spec
from stemma.components.errors import DataError, SpecError
from stemma.components.spec.document import Spec
from stemma.components.spec.loading import load_yaml


def sklearn_table(name: str) -> pd.DataFrame:
    """A scikit-learn table with its target as the column `target` (text labels for
    `*_text`; two classes only for `iris_two`)."""
    loader = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}
    loader |= {"iris": datasets.load_iris, "iris_text": datasets.load_iris}
    loader |= {"iris_two": datasets.load_iris, "wine_text": datasets.load_wine}
    if name == "diabetes":
        return datasets.load_diabetes(as_frame=True, scaled=False).frame
    bunch = loader[name](as_frame=True)
    frame = bunch.frame.copy()
    if name.endswith(("_text", "_two")):
        frame["target"] = frame["target"].map(dict(enumerate(bunch.target_names)))
    if name == "iris_two":
        frame = frame[frame["target"] != "setosa"].reset_index(drop=True)
    return frame


def infer(frame: pd.DataFrame, **roles) -> inference.InferredSpec:
    target, id_column, notes = inference.choose_columns(
        frame,
        target=roles.get("target", "target"),
        id_column=roles.get("id_column"),
        ask=None,
        source="table.csv",
    )
    return inference.infer_spec(
        frame, name="t", data_path="data/table.csv", target=target, id_column=id_column, notes=notes
    )


def written_spec(inferred: inference.InferredSpec) -> Spec:
    """The spec as `stemma validate` reads the written text."""
    text = starter_spec.render_spec(inferred)
    starter_spec.check_spec_text(text, "table.csv")
    raw, _ = load_yaml(text)
    return Spec.model_validate(raw)


@pytest.mark.parametrize(
    ("table", "task", "classes", "labels"),
    [
        ("breast_cancer", "binary", None, None),
        ("diabetes", "regression", None, None),
        ("wine", "multiclass", [0, 1, 2], None),
        ("wine_text", "multiclass", ["class_0", "class_1", "class_2"], None),
        ("iris_text", "multiclass", ["setosa", "versicolor", "virginica"], None),
        ("iris_two", "binary", None, {"versicolor": 0, "virginica": 1}),
    ],
    ids=["breast-cancer", "diabetes", "wine-integers", "wine-text", "iris-text", "iris-two-text"],
)
def test_the_task_and_the_written_spec_follow_the_target(table, task, classes, labels):
    frame = sklearn_table(table)
    inferred = infer(frame)
    spec = written_spec(inferred)
    assert (spec.data.task, spec.data.classes, spec.data.labels) == (task, classes, labels)
    features = [c for c in frame.columns if c != "target"]
    assert sorted(spec.data.features.all) == sorted(features)
    assert spec.gate.metric == starter_spec.GATE_METRICS[task]
    assert spec.score.input == "production/batches"  # production data is not training data


def test_suggested_checks_pass_on_the_table_they_come_from():
    from stemma.components.data.checks import validate_table

    frame = mixed_table()
    inferred = infer(frame, target="churned")
    report = validate_table(frame, inferred.checks, suite_name="inferred")
    assert report.success, [o for o in report.outcomes if not o.success]
    # and fail on rows outside what was seen
    changed = frame.assign(region=frame["region"].replace(0, 9), tenure=frame["tenure"] * 100)
    outcomes = validate_table(changed, inferred.checks, suite_name="changed").outcomes
    failed = {(o.type, o.kwargs["column"]) for o in outcomes if not o.success}
    assert failed == {
        ("expect_column_values_to_be_in_set", "region"),
        ("expect_column_values_to_be_between", "tenure"),
    }


def mixed_table(rows: int = 400, seed: int = 3) -> pd.DataFrame:
    """A seeded customer table holding every kind of column the rules sort."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "Unnamed: 0": np.arange(rows),  # an index written by pandas
            "customer_id": rng.permutation(rows) + 10_000,
            "region": rng.integers(0, 5, rows),
            "tenure": rng.integers(0, 120, rows),
            "spend": rng.gamma(2.0, 50.0, rows),
            "plan": rng.choice(["basic", "plus", "pro"], rows),
            "note": [f"free text {i}" for i in range(rows)],
            "income": np.where(rng.random(rows) < 0.1, np.nan, rng.normal(50, 10, rows)),
            "country": ["NL"] * rows,
            "joined": pd.date_range("2024-01-01", periods=rows, freq="h"),
            "mobile": rng.random(rows) < 0.5,
            "churned": rng.choice(["no", "yes"], rows),
        }
    )


def test_columns_are_sorted_by_kind_and_the_rest_left_out_with_reasons():
    inferred = infer(mixed_table(), target="churned")
    assert inferred.id_column == "customer_id"  # named like an id, unique
    assert inferred.notes and "customer_id" in inferred.notes[0]
    assert inferred.numeric == ("tenure", "spend")
    assert inferred.categorical == ("region", "plan", "mobile")
    assert inferred.integer_codes == {"region": 5}
    reasons = dict(inferred.left_out)
    assert set(reasons) == {"Unnamed: 0", "note", "income", "country", "joined"}
    assert "every row" in reasons["Unnamed: 0"]
    assert "free text" in reasons["note"]
    assert "missing" in reasons["income"]
    assert "single value" in reasons["country"]
    assert "time_column" in reasons["joined"]
    assert inferred.task == "binary" and inferred.labels == {"no": 0, "yes": 1}
    text = starter_spec.render_spec(inferred)
    assert "# left out: income: " in text and "region (5)" in text
    written_spec(inferred)


def test_ranges_have_a_margin_and_keep_a_sign():
    series = pd.Series([0.5, 2.0, 10.0])
    low, high = inference.padded_range(series)
    assert low == 0 and 10.95 <= high <= 11.0  # never negative: no negative bound
    low, high = inference.padded_range(pd.Series([-3.0, 7.0]))
    assert -4.0 <= low < -3.0 and 7.0 < high <= 8.0
    low, high = inference.padded_range(pd.Series([18, 95], dtype="int64"))
    assert (low, high) == (10, 103) and isinstance(low, int)
    low, high = inference.padded_range(pd.Series([1e-6, 3e-6]))
    assert low < 1e-6 and 3e-6 < high < 4e-6


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (pd.DataFrame({"a": range(40), "target": [1] * 40}), DataError, "a single value"),
        (
            pd.DataFrame({"a": range(40), "target": ["x"] * 40}),
            DataError,
            "nothing to predict",
        ),
        (pd.DataFrame({"a": range(10), "target": [0, 1] * 5}), DataError, "at least 30"),
        (
            pd.DataFrame({"a": range(40), "target": [0, 1, None, 1] * 10}),
            DataError,
            "10 missing value",
        ),
        (
            pd.DataFrame({"a": [np.nan] * 40, "target": [0, 1] * 20}),
            DataError,
            "no column can be a feature",
        ),
        (
            pd.DataFrame({"a": range(200), "target": [f"n{i}" for i in range(200)]}),
            DataError,
            "more than 100 classes",
        ),
    ],
    ids=["one-number", "one-class", "few-rows", "unlabelled", "no-feature", "names"],
)
def test_targets_and_tables_that_cannot_train_are_refused(frame, error, message):
    with pytest.raises(error, match=message):
        infer(frame)


def test_a_target_that_is_no_column_names_the_closest():
    with pytest.raises(SpecError, match="--target 'tagret' is not a column") as raised:
        infer(sklearn_table("iris"), target="tagret")
    assert "did you mean 'target'?" in raised.value.render()


def test_without_a_target_nobody_to_ask_is_an_error_listing_the_columns():
    frame = sklearn_table("wine")
    with pytest.raises(SpecError, match="Name it with --target") as raised:
        inference.choose_columns(frame, target=None, id_column=None, ask=None, source="w.csv")
    text = raised.value.render()
    assert "alcohol, malic_acid" in text and "named like a label: target" in text


def test_a_terminal_user_is_asked_and_asked_again_after_a_wrong_answer():
    answers = iter(["-", "alcohl", ""])  # no id; a typo; then the offered default
    questions: list[tuple[str, str | None]] = []

    def ask(question: str, default: str | None) -> str:
        questions.append((question, default))
        return next(answers)

    target, id_column, _ = inference.choose_columns(
        sklearn_table("wine"), target=None, id_column=None, ask=ask, source="w.csv"
    )
    assert (target, id_column) == ("target", None)
    assert questions[1][1] == "target"  # the column named like a label is offered
    assert questions[2][0].startswith("'alcohl' is not a column (did you mean 'alcohol'?)")


@pytest.mark.parametrize(
    "names",
    [["1.5", "2", "3"], ["0", "0.1", "7"], ["Unnamed: 0", "Unnamed: 1"]],
    ids=["numbers", "repeated-numbers", "empty-cells"],
)
def test_a_header_of_values_is_no_header(names):
    assert "no header row" in inference.header_problem(names)


def test_a_header_of_names_is_a_header():
    assert inference.header_problem(["age", "2024", "Unnamed: 0"]) is None


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"", "t.csv", "the file is empty"),
        (b"\n\n", "t.csv", "the file is empty"),
        (b"a,b,target\n", "t.csv", "a header but no rows"),
        (b"1.5,2,0\n3,4,1\n", "t.csv", "no header row"),
        (b"a,b\n1,2\n", "t.xlsx", "cannot tell the format"),
        (b"not parquet", "t.parquet", "cannot read the file as Parquet"),
    ],
    ids=["empty", "blank-lines", "header-only", "no-header", "extension", "bad-parquet"],
)
def test_unusable_files_are_refused(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        inference.read_table(path)


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        "no",
        "on",
        "null",
        "1",
        "1.5",
        "a: b",
        "#x",
        " lead",
        "-x",
        "it's",
        "mean radius",
        "",
        "true",
        "x,y",
        3,
        -2,
        1e20,
        1.5e-7,
        0.1,
        True,
        None,
    ],
)
def test_scalars_read_back_as_written(value):
    assert load_yaml(f"key: {starter_spec.scalar(value)}")[0] == {"key": value}


def test_commented_sections_are_yaml_that_reads_back():
    from stemma.components.spec.monitor import MonitorSpec
    from stemma.components.spec.operations import QuantizeSpec
    from stemma.components.spec.sections import RetrainSpec

    for section in (MonitorSpec(), QuantizeSpec(), RetrainSpec(labels="production/labels")):
        document = {"section": section.model_dump(mode="json", exclude_none=True)}
        assert load_yaml("\n".join(starter_spec.block(document)))[0] == document
    values = {"column": "a", "value_set": [f"value number {i}" for i in range(40)]}
    lines = starter_spec.wrapped("  - expect_column_values_to_be_in_set: ", values)
    assert len(lines) > 1 and max(map(len, lines)) <= starter_spec.LINE_WIDTH + 2
    assert load_yaml("\n".join(["checks:", *lines]))[0] == {
        "checks": [{"expect_column_values_to_be_in_set": values}]
    }


@pytest.mark.parametrize(("rows", "size"), [(100, 32), (20_000, 512), (5_000, 128)])
def test_the_batch_size_follows_the_rows(rows, size):
    assert starter_spec.batch_size(rows) == size
