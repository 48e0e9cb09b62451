"""Data checks: the catalogue, the fast and deep spec checks, validation with real GX, docs."""

from __future__ import annotations

import re

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import yaml

from stemma.components.data.checks import (
    CATALOG_PATH,
    build_data_docs,
    deep_expectation_problems,
    validate_table,
    write_catalog,
)
from stemma.components.errors import SpecError
from stemma.components.spec.expectations import expectation_problems

ROWS = 200
#: `stemma validate` must finish in 0.5 s; the fast check is a small part of that.
FAST_CHECK_BUDGET_S = 0.5


@pytest.fixture(scope="module")
def credit_checks(repo_root) -> list[dict[str, dict]]:
    return yaml.safe_load((repo_root / "configs" / "credit.yaml").read_text())["checks"]


def make_frame(rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """A table that passes the credit checks, except the row count (at least 1000)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "application_id": np.arange(rows),
            "salary": rng.uniform(0, 150_000, rows),
            "loan": rng.uniform(0, 500_000, rows),
            "age": rng.integers(18, 90, rows),
            "elevel": rng.integers(0, 5, rows),
            "approved": rng.integers(0, 2, rows),
        }
    )


def make_bad_frame() -> pd.DataFrame:
    frame = make_frame()
    frame.loc[[3, 10, 11], "age"] = [7, 12, 150]
    frame.loc[5, "salary"] = None
    frame.loc[6, "application_id"] = 0  # duplicates row 0's id
    return frame


@pytest.fixture(scope="module")
def good_report(credit_checks):
    return validate_table(make_frame(rows=1000), credit_checks, suite_name="credit")


@pytest.fixture(scope="module")
def bad_report(credit_checks):
    return validate_table(make_bad_frame(), credit_checks, suite_name="credit")


# ----------------------------------------------------------------------------- catalogue


def test_committed_catalog_equals_installed_gx(tmp_path):
    written = tmp_path / "gx_catalog.json"
    catalog = write_catalog(written)
    assert json.loads(CATALOG_PATH.read_text()) == catalog, (
        "components/gx_catalog.json is stale for the installed great_expectations; "
        "regenerate it with `python -m stemma.components.data.checks`"
    )
    assert written.read_text() == CATALOG_PATH.read_text()  # byte-for-byte: deterministic


def test_catalog_describes_kwargs_but_not_internal_fields():
    catalog = json.loads(CATALOG_PATH.read_text())
    between = catalog["expectations"]["expect_column_values_to_be_between"]["kwargs"]
    assert between["column"] == {"required": True, "types": ["string"]}
    assert {"number", "null"} <= set(between["min_value"]["types"])
    assert between["severity"]["choices"] == ["critical", "info", "warning"]
    assert "result_format" in between and "meta" in between
    assert not {"id", "batch_id", "rendered_content", "windows"} & set(between)
    assert len(catalog["expectations"]) > 50


# ----------------------------------------------------------------------------- fast check


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (
            {"expect_column_values_to_not_be_nul": {"column": "salary"}},
            "unknown expectation type `expect_column_values_to_not_be_nul`; "
            "did you mean `expect_column_values_to_not_be_null`",
        ),
        (
            {"expect_column_values_to_be_between": {"column": "age", "min_val": 18}},
            "unknown argument `min_val`; did you mean `min_value`",
        ),
        (
            {"expect_column_values_to_be_in_set": {"column": "car", "valueset": [1]}},
            "unknown argument `valueset`; did you mean `value_set`",
        ),
        (
            {"expect_column_values_to_be_in_set": {"value_set": [0, 1]}},
            "missing required argument `column`",
        ),
        (
            {"expect_table_row_count_to_be_between": {"min_value": "many"}},
            "`min_value` must be an integer, a date-time (ISO 8601), a mapping or null, "
            "not the string 'many'",
        ),
        (
            {"expect_column_values_to_be_between": {"column": "age", "min_value": "eighteen"}},
            "`min_value` must be a number, a date (YYYY-MM-DD)",
        ),
        (
            {"expect_table_row_count_to_be_between": {"min_value": 10.5}},
            "`min_value` must be an integer",
        ),
        (
            {"expect_column_values_to_be_unique": {"column": 5}},
            "`column` must be a string, not the number 5",
        ),
        (
            {"expect_column_values_to_be_in_set": {"column": "car", "value_set": "abc"}},
            "`value_set` must be a list or a mapping, not the string 'abc'",
        ),
        (
            {"expect_column_values_to_be_unique": {"column": "id", "severity": "fatal"}},
            "`severity` must be one of 'critical', 'info', 'warning', not 'fatal'",
        ),
        (
            {"expect_column_values_to_be_unique": ["id"]},
            "the arguments of expect_column_values_to_be_unique must be a mapping",
        ),
        (
            {"expect_column_to_exist": {"column": "a"}, "expect_column_values_to_be_unique": {}},
            "each check is a one-key mapping",
        ),
    ],
    ids=[
        "unknown-type",
        "unknown-kwarg",
        "unknown-kwarg-2",
        "missing-required",
        "string-for-integer",
        "string-for-number",
        "float-for-integer",
        "number-for-string",
        "string-for-list",
        "not-a-choice",
        "kwargs-not-a-mapping",
        "two-keys",
    ],
)
def test_fast_check_reports_problem(check, expected):
    checks = [{"expect_column_to_exist": {"column": "age"}}, check]
    problems = expectation_problems(checks)
    assert {index for index, _ in problems} == {1}, problems
    assert problems[0][1].startswith(expected), problems


def test_fast_check_reports_every_problem_of_an_entry():
    problems = expectation_problems([{"expect_column_values_to_be_in_set": {"colum": "car"}}])
    assert [message for _, message in problems] == [
        "unknown argument `colum`; did you mean `column`?",
        "missing required argument `column`",
        "missing required argument `value_set`",
    ]


@pytest.mark.parametrize(
    "check",
    [
        {"expect_column_values_to_be_between": {"column": "d", "min_value": "2024-01-01"}},
        {"expect_column_values_to_be_between": {"column": "a", "max_value": 1.5, "mostly": 0.9}},
        {"expect_column_values_to_be_unique": {"column": "id", "result_format": "COMPLETE"}},
        {"expect_column_values_to_be_unique": {"column": "id", "meta": {"owner": "risk"}}},
    ],
    ids=["date-string", "float-and-mostly", "result-format", "meta"],
)
def test_fast_check_accepts_valid_kwargs(check):
    assert expectation_problems([check]) == []


def test_fast_check_accepts_the_worked_example(credit_checks):
    assert expectation_problems(credit_checks) == []


def test_fast_check_imports_no_gx_and_is_quick(repo_root):
    code = textwrap.dedent(
        """
        import sys, time
        import yaml
        checks = yaml.safe_load(open("configs/credit.yaml"))["checks"]
        start = time.perf_counter()
        from stemma.components.spec.expectations import expectation_problems
        problems = expectation_problems(checks)
        elapsed = time.perf_counter() - start
        print(elapsed, problems, "great_expectations" in sys.modules, "pandas" in sys.modules)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    elapsed, rest = completed.stdout.split(" ", 1)
    assert rest.strip() == "[] False False", completed.stdout
    assert float(elapsed) < FAST_CHECK_BUDGET_S, completed.stdout


# ----------------------------------------------------------------------------- deep check


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (
            {"expect_column_values_to_not_be_nul": {"column": "salary"}},
            "did you mean `expect_column_values_to_not_be_null`",
        ),
        (
            {"expect_column_values_to_be_between": {"column": "age", "min_val": 18}},
            "unknown argument `min_val`; did you mean `min_value`",
        ),
        (
            {"expect_column_values_to_be_in_set": {"value_set": [0, 1]}},
            "missing required argument `column`",
        ),
        ({"expect_table_row_count_to_be_between": {"min_value": "many"}}, "`min_value`"),
        ({"expect_column_values_to_be_unique": {"column": "id"}}, None),
    ],
    ids=["unknown-type", "unknown-kwarg", "missing-required", "wrong-type", "valid"],
)
def test_deep_check_agrees_with_fast_check(check, expected):
    fast = expectation_problems([check])
    deep = deep_expectation_problems([check])
    if expected is None:
        assert fast == deep == []
    else:
        assert [i for i, _ in fast] == [i for i, _ in deep] == [0], (fast, deep)
        assert expected in fast[0][1] and expected in deep[0][1], (fast, deep)


def test_deep_check_sees_cross_field_rules():
    check = {"expect_column_values_to_be_between": {"column": "age"}}
    assert expectation_problems([check]) == []  # the catalogue knows types, not rules
    assert deep_expectation_problems([check]) == [
        (0, "min_value and max_value cannot both be None")
    ]


# ----------------------------------------------------------------------------- validation


def test_good_data_passes(good_report, credit_checks):
    assert good_report.success
    assert good_report.summary() == "8 of 8 expectations passed"
    assert good_report.failures == [] and good_report.render_failure() == []
    assert [(o.index, o.type, o.kwargs) for o in good_report.outcomes] == [
        (i, *next(iter(c.items()))) for i, c in enumerate(credit_checks)
    ]
    assert good_report.outcomes[7].observed_value == 1000
    assert good_report.statistics["successful_expectations"] == 8


def test_bad_data_fails_with_counts_and_examples_in_spec_order(bad_report):
    assert not bad_report.success
    assert bad_report.summary() == "4 of 8 expectations passed (4 failed)"
    assert [o.index for o in bad_report.failures] == [0, 2, 6, 7]
    nulls, _, ages, _, _, _, ids, rows = bad_report.outcomes
    assert (nulls.unexpected_count, nulls.element_count, nulls.examples) == (1, ROWS, (None,))
    assert (ages.unexpected_count, ages.examples) == (3, (7, 12, 150))
    assert ages.unexpected_percent == pytest.approx(1.5)
    assert (ids.unexpected_count, ids.examples) == (2, (0,))
    assert (rows.observed_value, rows.unexpected_count, rows.exception) == (ROWS, None, None)
    indices = [
        r["expectation_config"]["meta"]["stemma_check_index"]
        for r in bad_report.result_json["results"]
    ]
    assert indices == list(range(8))


def test_render_failure_lines(bad_report):
    assert bad_report.render_failure() == [
        "#0 expect_column_values_to_not_be_null(column=salary): 1 of 200 rows (0.5%) unexpected, e.g. null",
        "#2 expect_column_values_to_be_between(column=age, min_value=18, max_value=100): "
        "3 of 200 rows (1.5%) unexpected, e.g. 7, 12, 150",
        "#6 expect_column_values_to_be_unique(column=application_id): 2 of 200 rows (1.0%) unexpected, e.g. 0",
        "#7 expect_table_row_count_to_be_between(min_value=1000): observed 200",
    ]


def test_render_failure_is_bounded():
    frame = pd.DataFrame({"code": [f"value-{i}" for i in range(50)]})
    long_set = [f"allowed-{i}" for i in range(100)]
    checks = [{"expect_column_values_to_be_in_set": {"column": "code", "value_set": long_set}}] * 30
    report = validate_table(frame, checks, suite_name="many")
    lines = report.render_failure(max_lines=5)
    assert len(lines) == 5
    assert lines[-1] == "... and 26 more failed checks"
    assert all(len(line) < 200 for line in lines), lines
    assert lines[0].endswith(
        "50 of 50 rows (100.0%) unexpected, e.g. value-0, value-1, value-2, value-3, value-4"
    )
    assert [o.index for o in report.outcomes] == list(range(30))  # identical checks stay apart


def test_check_that_raises_is_a_failure_with_its_error():
    checks = [
        {"expect_column_mean_to_be_between": {"column": "missing", "min_value": 1}},
        {"expect_column_values_to_be_unique": {"column": "application_id"}},
    ]
    report = validate_table(make_frame(), checks, suite_name="credit")
    broken, fine = report.outcomes
    assert not report.success and fine.success and not broken.success
    assert 'The column "missing" in BatchData does not exist' in broken.exception
    assert report.render_failure() == [
        "#0 expect_column_mean_to_be_between(column=missing, min_value=1): "
        'error: Error: The column "missing" in BatchData does not exist.'
    ]


def test_unknown_expectation_is_an_error_not_dropped():
    checks = [{"expect_column_values_to_not_be_nul": {"column": "salary"}}]
    with pytest.raises(SpecError, match=r"checks\[0\] expect_column_values_to_not_be_nul: unknown"):
        validate_table(make_frame(), checks, suite_name="credit")


def test_input_frame_and_checks_are_not_modified(credit_checks):
    frame = make_bad_frame()
    frame_before, checks_before = frame.copy(), json.dumps(credit_checks)
    validate_table(frame, credit_checks, suite_name="credit")
    pd.testing.assert_frame_equal(frame, frame_before)
    assert json.dumps(credit_checks) == checks_before


def test_digest_is_stable_and_tracks_data_and_checks(bad_report, credit_checks):
    again = validate_table(make_bad_frame(), credit_checks, suite_name="credit")
    assert again.digest == bad_report.digest
    assert again.result_json["meta"]["batch_markers"]["ge_load_time"]  # volatile, yet same digest
    other_data = make_bad_frame()
    other_data.loc[0, "salary"] += 1.0  # passes the same checks, but is other data
    assert (
        validate_table(other_data, credit_checks, suite_name="credit").digest != bad_report.digest
    )
    fewer_checks = validate_table(make_bad_frame(), credit_checks[:-1], suite_name="credit")
    assert fewer_checks.digest != bad_report.digest


# ----------------------------------------------------------------------------- data docs


def test_data_docs_show_the_validation(bad_report, tmp_path):
    out_dir = tmp_path / "docs"
    out_dir.mkdir()
    (out_dir / "stale.html").write_text("from an earlier build")
    index = build_data_docs(
        bad_report, out_dir, asset="data/credit/train.parquet", run="mlflow-run-0123abcd"
    )
    assert index == out_dir / "index.html" and index.is_file()
    assert not (out_dir / "stale.html").exists()
    (page,) = (out_dir / "validations" / "credit").rglob("*.html")
    assert str(page.relative_to(out_dir)) in index.read_text()
    html = page.read_text()
    assert "values must be greater than or equal to" in html and "age" in html
    assert (out_dir / "expectations" / "credit.html").is_file()
    # the page names what was checked and by which run, and loads nothing from a network
    assert "data/credit/train.parquet" in html and "mlflow-run-0123abcd" in html
    for page in out_dir.rglob("*.html"):
        loads = re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="(https?://[^"]*)"', page.read_text())
        assert loads == [], (page, loads)
    assert [p.name for p in tmp_path.iterdir()] == ["docs"]  # no staging folders left behind
