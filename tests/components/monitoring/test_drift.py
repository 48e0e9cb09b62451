"""Drift statistics against scipy and the textbook formulas, the monitor's verdicts, and the
report's event, lineage record, labels and plot."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from stemma.components.data.labels import read_labels
from stemma.components.errors import DataError
from stemma.components.evaluation.statistics import (
    PSI_FLOOR,
    chi_square,
    jensen_shannon,
    missing_rise_pvalue,
    pool_rare_categories,
    psi,
)
from stemma.components.monitoring.accumulators import NumericAccumulator, ks_2samp_sorted
from stemma.components.monitoring.drift import DriftMonitor, monitor_batch
from stemma.components.monitoring.profile import (
    ReferenceProfile,
    build_reference_profile,
    profile_numeric,
)
from stemma.components.monitoring.records import (
    DRIFT_EVENT,
    MonitorFacts,
    build_monitor_record,
    drift_event,
)
from stemma.components.monitoring.report import plot_drift_report
from stemma.components.platform import lineage
from stemma.components.spec import DataSpec, FeaturesSpec, MonitorSpec

DATA = DataSpec(
    path="data/x.parquet",
    target="approved",
    id="application_id",
    features=FeaturesSpec(numeric=["salary", "age"], categorical=["car"]),
)
CARS = ["coupe", "sedan", "van"]


def applicants(rows: int, seed: int, *, older: float = 0.0, vans: float = 0.3) -> pd.DataFrame:
    """Rows like a loan table; ``older`` shifts ages up, ``vans`` sets the share of vans."""
    rng = np.random.default_rng(seed)
    salary = rng.lognormal(11, 0.4, rows)
    shares = [(1 - vans) * 0.3, (1 - vans) * 0.7, vans]
    return pd.DataFrame(
        {
            "application_id": np.arange(rows) + seed * 1_000_000,
            "salary": salary,
            "age": rng.integers(20, 80, rows) + older,
            "car": rng.choice(CARS, rows, p=shares),
            "approved": (salary > 60_000).astype(np.int64),
        }
    )


@pytest.fixture(scope="module")
def reference() -> ReferenceProfile:
    rows = applicants(20_000, seed=1)
    scores = np.random.default_rng(2).beta(2, 3, 4_000)
    return build_reference_profile(
        rows, DATA, scores=scores, performance={"roc_auc": 0.9}, sample_size=5_000
    )


def compare(profile, batch, settings=None, scores=None, chunks=1, **report) -> object:
    monitor = DriftMonitor(profile, settings or MonitorSpec(), prediction=scores is not None)
    for part in np.array_split(np.arange(len(batch)), chunks):
        rows = batch.iloc[part]
        monitor.add(
            {name: rows[name].to_numpy() for name in monitor.columns},
            None if scores is None else scores[part],
        )
    return monitor.report(**report)


# ---------------------------------------------------------------------------------------
# Statistics


KS_CASES = {
    "continuous-asymptotic": (lambda r: r.normal(size=10_000), lambda r: r.normal(0.02, 1, 60_000)),
    "continuous-exact": (lambda r: r.normal(size=3_000), lambda r: r.normal(0.1, 1, 700)),
    "exact-at-the-limit": (lambda r: r.normal(size=10_000), lambda r: r.normal(0, 1, 10_000)),
    "just-past-the-limit": (lambda r: r.normal(size=10_000), lambda r: r.normal(0, 1, 10_001)),
    "integers-with-ties": (lambda r: r.integers(0, 30, 8_000), lambda r: r.integers(2, 33, 40_000)),
    "rounded-ties-exact": (
        lambda r: r.normal(size=900).round(1),
        lambda r: r.normal(size=99).round(1),
    ),
    "disjoint": (lambda r: r.uniform(0, 1, 500), lambda r: r.uniform(2, 3, 20_000)),
    "identical": (lambda r: np.arange(1_000.0), lambda r: np.arange(1_000.0)),
    "tiny": (lambda r: np.array([1.0, 2.0, 3.0]), lambda r: np.array([2.5])),
}


@pytest.mark.parametrize("case", list(KS_CASES), ids=list(KS_CASES))
def test_ks_equals_scipy_ks_2samp_on_the_same_sample(case):
    make_reference, make_batch = KS_CASES[case]
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    sample = np.sort(make_reference(rng).astype(np.float64))
    batch = make_batch(rng).astype(np.float64)
    expected = stats.ks_2samp(sample, batch)
    statistic, pvalue = ks_2samp_sorted(sample, batch)
    # the same differences of the same fractions, and scipy's own p-value: bit for bit
    assert statistic == expected.statistic
    assert pvalue == expected.pvalue
    assert abs(pvalue - expected.pvalue) <= 1e-9


def test_ks_over_chunks_equals_ks_over_the_whole_batch():
    rng = np.random.default_rng(5)
    sample = np.sort(rng.normal(size=12_000))
    batch = rng.standard_t(5, size=250_000)
    accumulator = NumericAccumulator(profile_numeric(sample, sample_size=12_000))
    for part in np.array_split(batch, 9):
        accumulator.add(part)
    expected = stats.ks_2samp(sample, batch)
    assert accumulator.ks() == (expected.statistic, expected.pvalue)


def test_ks_leaves_missing_values_out():
    rng = np.random.default_rng(6)
    sample = np.sort(rng.normal(size=2_000))
    batch = rng.normal(0.2, 1, 3_000)
    holed = batch.copy()
    holed[::7] = np.nan
    holed[1::11] = np.inf
    kept = holed[np.isfinite(holed)]
    expected = stats.ks_2samp(sample, kept)
    assert ks_2samp_sorted(sample, holed) == (expected.statistic, expected.pvalue)


def textbook_psi(expected_counts, actual_counts, floor=PSI_FLOOR):
    """PSI = sum over bins of (a - e) * ln(a / e), shares floored, written plainly."""
    expected_total, actual_total = sum(expected_counts), sum(actual_counts)
    total = 0.0
    for e_count, a_count in zip(expected_counts, actual_counts, strict=True):
        e = max(e_count / expected_total, floor)
        a = max(a_count / actual_total, floor)
        total += (a - e) * math.log(a / e)
    return total


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ([100, 100, 100, 100], [100, 100, 100, 100]),
        ([100, 100, 100, 100], [50, 150, 120, 80]),
        ([5000, 3000, 2000], [10, 20, 9970]),
        ([10, 0, 90], [30, 5, 65]),  # an empty reference bin: the floor keeps PSI finite
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
    ],
    ids=["same", "moderate", "large", "empty-bin", "reversed"],
)
def test_psi_equals_the_textbook_formula(expected, actual):
    assert abs(psi(expected, actual) - textbook_psi(expected, actual)) <= 1e-9


def test_psi_of_a_numeric_column_uses_the_profile_bins():
    rng = np.random.default_rng(7)
    reference_values = rng.normal(size=20_000)
    batch = rng.normal(0.5, 1.2, 30_000)
    profile = profile_numeric(reference_values, bins=10)
    accumulator = NumericAccumulator(profile)
    accumulator.add(batch)
    # the batch binned by hand on the same edges: bin j holds edges[j-1] <= x < edges[j]
    by_hand = np.bincount(np.searchsorted(profile.edges, batch, side="right"), minlength=10)
    assert accumulator.bins.tolist() == by_hand.tolist()
    assert (
        abs(psi(profile.counts, accumulator.bins) - textbook_psi(profile.counts, by_hand)) <= 1e-9
    )


@pytest.mark.parametrize(
    ("reference_counts", "current_counts"),
    [
        ([300, 500, 200], [310, 480, 210]),
        ([300, 500, 200, 0], [100, 100, 700, 40]),
        ([9, 1], [1, 9]),
    ],
    ids=["close", "new-category", "two-categories"],
)
def test_chi_square_equals_scipy_contingency_test(reference_counts, current_counts):
    table = np.array([reference_counts, current_counts])
    table = table[:, table.sum(axis=0) > 0]
    expected = stats.chi2_contingency(table, correction=False)
    statistic, pvalue = chi_square(reference_counts, current_counts)
    assert statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert abs(pvalue - expected.pvalue) <= 1e-9


def pooled_expected(reference, current):
    """What each cell of the pooled table can expect in the smaller sample, plainly."""
    smaller = min(sum(reference), sum(current))
    both = [r + c for r, c in zip(reference, current, strict=True)]
    return [
        smaller * max(r / sum(reference), b / sum(both)) if r else max(c, smaller * b / sum(both))
        for r, c, b in zip(reference, current, both, strict=True)
    ]


@pytest.mark.parametrize(
    ("reference_counts", "current_counts", "cells", "pooled"),
    [
        ([4000, 3000, 2000, 900, 60, 40], [40, 30, 20, 9, 1, 0], 4, 3),
        ([4000, 3000, 60], [100, 80, 0], 2, 2),
        ([5000, 0], [60, 1], 1, 2),
        ([5000, 0], [30, 30], 2, 0),
        ([5000, 200, 0, 0], [57, 1, 1, 1], 1, 4),
        ([12, 14, 10], [400, 0, 0], 3, 0),
        ([300, 500, 200], [310, 480, 210], 3, 0),
    ],
    ids=[
        "long-tail",
        "rare-pooled-with-next",
        "one-stray",
        "many-new",
        "few-new",
        "lost-classes",
        "none",
    ],
)
def test_rare_categories_are_pooled_until_each_cell_expects_enough(
    reference_counts, current_counts, cells, pooled
):
    reference, current, merged = pool_rare_categories(reference_counts, current_counts, 5)
    assert (reference.size, merged) == (cells, pooled)
    assert reference.sum() == sum(reference_counts) and current.sum() == sum(current_counts)
    if cells > 1:
        assert min(pooled_expected(reference, current)) >= 5


@pytest.mark.parametrize(
    ("reference", "current"),
    [((400, 20_000), (60, 1_000)), ((0, 40_000), (1, 5_000)), ((30, 300), (0, 50))],
    ids=["rise", "one-missing-after-none", "fewer"],
)
def test_the_missing_rate_test_is_fishers_one_sided(reference, current):
    (ref_missing, ref_rows), (cur_missing, cur_rows) = reference, current
    table = [[cur_missing, cur_rows - cur_missing], [ref_missing, ref_rows - ref_missing]]
    expected = stats.fisher_exact(table, alternative="greater").pvalue
    assert missing_rise_pvalue(ref_missing, ref_rows, cur_missing, cur_rows) == expected
    assert math.isnan(missing_rise_pvalue(ref_missing, ref_rows, 0, 0))


@pytest.mark.parametrize(
    ("reference_counts", "current_counts"),
    [([300, 500, 200], [310, 480, 210]), ([300, 500, 200, 0], [0, 100, 700, 40]), ([1, 0], [0, 1])],
    ids=["close", "disjoint-parts", "disjoint"],
)
def test_jensen_shannon_equals_scipy(reference_counts, current_counts):
    expected = jensenshannon(reference_counts, current_counts, base=2)
    assert abs(jensen_shannon(reference_counts, current_counts) - expected) <= 1e-9


# ---------------------------------------------------------------------------------------
# Verdicts


def test_a_batch_like_the_reference_does_not_drift(reference):
    report = compare(reference, applicants(5_000, seed=11))
    assert report.detected is False
    assert report.drifted_features == []
    assert report.rows == 5_000
    assert report.metrics()["features_drifted"] == 0


def test_shifted_features_drift_and_the_others_do_not(reference):
    report = compare(reference, applicants(5_000, seed=12, older=8, vans=0.6), chunks=3)
    assert report.detected is True
    assert set(report.drifted_features) == {"age", "car"}
    by_name = {column.name: column for column in report.features}
    # the tests decide; PSI is reported, and decides only with a threshold
    assert by_name["age"].breaches == ("ks",) and by_name["age"].statistics["psi"] > 0.2
    assert "chi2" in by_name["car"].breaches
    assert by_name["salary"].breaches == ()
    assert by_name["age"].current_mean == pytest.approx(reference.features["age"].mean + 8, abs=1.0)
    assert report.kinds == ["features"]


def test_chunked_and_whole_batches_give_the_same_report(reference):
    batch = applicants(7_000, seed=13, older=2)
    whole = compare(reference, batch).to_dict()
    chunked = compare(reference, batch, chunks=6).to_dict()
    assert whole == chunked


def test_thresholds_and_the_minimum_drifted_features_decide(reference):
    batch = applicants(5_000, seed=14, older=8)
    strict = compare(reference, batch)
    assert strict.drifted_features == ["age"] and strict.detected
    lenient = compare(reference, batch, MonitorSpec(thresholds={"psi": 10, "ks_pvalue": 1e-300}))
    assert lenient.drifted_features == [] and not lenient.detected
    two_needed = compare(reference, batch, MonitorSpec(min_drifted_features=2))
    assert two_needed.drifted_features == ["age"] and not two_needed.detected
    assert any("fewer than monitor.min_drifted_features" in line for line in two_needed.reasons())


def test_a_batch_with_no_rows_is_not_assessed_and_not_drift(reference, tmp_path):
    report = compare(reference, applicants(0, seed=15), scores=np.empty(0))
    assert report.rows == 0
    assert report.assessed is False and report.detected is False
    assert report.drifted_features == [] and report.kinds == []
    assert report.summary() == "the batch has no rows: nothing to compare, drift not assessed"
    assert report.reasons() == [report.summary()]
    assert report.to_dict()["assessed"] is False
    assert report.metrics()["assessed"] == 0.0
    plot_drift_report(report, tmp_path / "empty.png", title="empty")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_a_shifted_batch_under_min_rows_is_not_assessed(reference):
    batch = applicants(33, seed=16, older=30, vans=0.9)
    assert compare(reference, batch, MonitorSpec(min_rows=1)).detected is True
    small = compare(reference, batch)  # the default minimum: 100 rows
    assert small.assessed is False and small.detected is False
    assert small.features == () and small.drifted_features == []
    assert "33 rows, fewer than monitor.min_rows (100)" in small.summary()
    assert drift_event(small, facts()) is None


#: Batches drawn like the reference in the calibration test, and the level of the tests.
NULL_BATCHES = 150
ALPHA = 0.05


def test_p_value_thresholds_bound_false_alarms_per_batch(reference):
    """Batches drawn like the reference: with the Bonferroni correction a batch fails any of
    its three tests (KS on salary and age, chi-square on car) at most at the threshold's
    rate; without it, at nearly three times that rate."""
    thresholds = {"ks_pvalue": ALPHA, "chi2_pvalue": ALPHA}
    statistics = {"numeric": ["ks"], "categorical": ["chi2"]}
    alarms = {"bonferroni": 0, "none": 0}
    for index in range(NULL_BATCHES):
        batch = applicants(500, seed=1_000 + index)
        for correction in alarms:
            settings = MonitorSpec(
                thresholds=thresholds,
                statistics=statistics,
                pvalue_correction=correction,
                missing_drift=False,
            )
            alarms[correction] += compare(reference, batch, settings).detected
    # Binomial(150, p): with p <= 0.05 it stays at 17 or under with probability > 0.999;
    # with p = 1 - 0.95**3 (0.14, a little less for the tied integer ages) it exceeds 8
    # likewise.
    assert alarms["bonferroni"] <= 17
    assert alarms["none"] >= 9
    assert alarms["none"] > 1.5 * alarms["bonferroni"], alarms


def test_only_the_configured_statistics_are_computed_and_decide(reference):
    settings = MonitorSpec(statistics={"numeric": ["psi"], "categorical": ["jensen_shannon"]})
    report = compare(reference, applicants(5_000, seed=15, vans=0.9), settings)
    by_name = {column.name: column for column in report.features}
    assert set(by_name["age"].statistics) == {"psi", "missing_pvalue"}
    assert set(by_name["car"].statistics) == {"jensen_shannon", "missing_pvalue"}
    assert by_name["car"].breaches == ("jensen_shannon",)


def test_a_category_the_reference_never_saw_counts_as_drift(reference):
    batch = applicants(3_000, seed=16)
    batch.loc[batch.index[:600], "car"] = "tractor"
    report = compare(reference, batch)
    car = next(column for column in report.features if column.name == "car")
    assert "tractor" in car.bins and car.drifted
    assert car.reference[car.bins.index("tractor")] == 0.0


def test_missing_values_are_counted_and_an_empty_column_is_drift(reference):
    batch = applicants(2_000, seed=17).astype({"salary": float})
    batch.loc[batch.index[:500], "salary"] = np.nan
    batch["age"] = np.nan
    report = compare(reference, batch)
    by_name = {column.name: column for column in report.features}
    assert by_name["salary"].missing == 500
    assert report.metrics()["feature.salary.missing_share"] == 0.25
    assert by_name["age"].breaches == ("missing",)


def test_prediction_drift_compares_scores_with_the_reference_scores(reference):
    batch = applicants(4_000, seed=18)
    same = np.random.default_rng(19).beta(2, 3, len(batch))
    higher = np.random.default_rng(19).beta(4, 2, len(batch))
    assert compare(reference, batch, scores=same).prediction_drift is False
    drifted = compare(reference, batch, scores=higher)
    assert drifted.prediction_drift and drifted.kinds == ["prediction"]
    off = compare(reference, batch, MonitorSpec(prediction_drift=False), scores=higher)
    assert off.prediction is None and not off.detected


def test_labels_bring_label_drift_and_performance_decay(reference):
    batch = applicants(3_000, seed=20)
    settings = MonitorSpec()
    rng = np.random.default_rng(21)
    truth = batch["approved"].to_numpy()

    good = DriftMonitor(reference, settings)
    good.add({name: batch[name].to_numpy() for name in good.columns})
    good.add_labels(truth, np.clip(truth * 0.7 + rng.random(len(batch)) * 0.3, 0, 1))
    report = good.report(metric="roc_auc", labelled=True)
    assert report.performance.current > 0.95 and not report.performance.decayed
    assert not report.label_drift and report.labelled_rows == 3_000

    bad = DriftMonitor(reference, settings)
    bad.add({name: batch[name].to_numpy() for name in bad.columns})
    flipped = 1 - truth  # the rule changed, with a third more approvals, scored the old way
    flipped[::3] = 1
    bad.add_labels(flipped, np.clip(truth * 0.7 + rng.random(len(batch)) * 0.3, 0, 1))
    report = bad.report(metric="roc_auc", labelled=True)
    assert report.performance.decayed and report.performance.drop > 0.5
    assert report.label_drift
    assert report.label.reference_mean == pytest.approx(reference.label_rate)
    assert set(report.kinds) == {"label", "performance"}


def test_too_few_labelled_rows_leave_performance_unassessed(reference):
    monitor = DriftMonitor(reference, MonitorSpec(min_labelled_rows=500))
    batch = applicants(300, seed=22)
    monitor.add({name: batch[name].to_numpy() for name in monitor.columns})
    monitor.add_labels(batch["approved"].to_numpy(), np.full(300, 0.5))
    check = monitor.report(metric="roc_auc", labelled=True).performance
    assert check.current is None and not check.decayed
    assert "300 labelled rows" in check.note


def test_a_feature_missing_from_the_profile_is_a_clear_error(reference):
    with pytest.raises(DataError, match="the reference profile has no income"):
        DriftMonitor(reference, MonitorSpec(features=["salary", "income"]))


# ---------------------------------------------------------------------------------------
# Reading a batch and its labels


def write(frame: pd.DataFrame, path) -> object:
    frame.to_parquet(path, index=False)
    return path


def test_monitor_batch_reads_files_in_chunks_and_joins_labels_by_id(reference, tmp_path):
    batch = applicants(4_000, seed=23, older=8)
    files = [
        write(batch.iloc[:2_500], tmp_path / "a.parquet"),
        write(batch.iloc[2_500:], tmp_path / "b.parquet"),
    ]
    labels_file = write(
        batch[["application_id", "approved"]].iloc[::2], tmp_path / "labels.parquet"
    )
    labels = read_labels([labels_file], id_column="application_id", target="approved")

    def scorer(table: pa.Table) -> np.ndarray:
        return np.clip(table.column("salary").to_numpy() / 150_000, 0, 1)

    report = monitor_batch(
        files,
        reference,
        MonitorSpec(chunk_rows=700),
        scorer=scorer,
        score_columns=["salary"],
        labels=labels,
        id_column="application_id",
        metric="roc_auc",
    )
    assert report.rows == 4_000
    assert report.labelled_rows == 2_000
    assert report.drifted_features == ["age"]
    assert report.performance is not None and report.performance.current > 0.99
    whole = compare(reference, batch, scores=scorer(pa.Table.from_pandas(batch)))
    assert [c.statistics for c in report.features] == [c.statistics for c in whole.features]


def test_labels_without_the_id_column_name_the_file_and_its_columns(tmp_path):
    path = write(pd.DataFrame({"id": [1, 2], "approved": [0, 1]}), tmp_path / "day_03.parquet")
    with pytest.raises(DataError) as caught:
        read_labels([path], id_column="application_id", target="approved")
    text = caught.value.render()
    assert "day_03.parquet: no id column 'application_id' (its columns: approved, id)" in text


def test_labels_with_repeated_ids_or_missing_values_are_refused(tmp_path):
    repeated = write(
        pd.DataFrame({"application_id": [1, 1, 2], "approved": [0, 1, 1]}), tmp_path / "r.parquet"
    )
    with pytest.raises(DataError, match="1 ids have two different labels"):
        read_labels([repeated], id_column="application_id", target="approved")
    holes = write(
        pd.DataFrame({"application_id": [1, 2], "approved": [0.0, None]}), tmp_path / "h.parquet"
    )
    with pytest.raises(DataError, match="1 labels are missing"):
        read_labels([holes], id_column="application_id", target="approved", missing="error")


def test_labels_need_an_id_column_in_the_spec(tmp_path):
    path = write(pd.DataFrame({"approved": [0, 1]}), tmp_path / "l.parquet")
    with pytest.raises(DataError, match="the spec names none"):
        read_labels([path], id_column=None, target="approved")


# ---------------------------------------------------------------------------------------
# The event, the lineage record and the plot


def facts(**changes) -> MonitorFacts:
    values = {
        "pipeline": "credit",
        "model_name": "credit",
        "model_version": "3",
        "weights_sha256": "w" * 64,
        "profile_sha256": "p" * 64,
        "training_run_id": "train-run",
        "batch_path": "data/credit/batches/day_06.parquet",
        "batch_digest": "d" * 32,
        "batch_files": {"day_06.parquet": "d" * 32},
        "run_id": "monitor-run",
        "experiment_id": "1",
        "flow_run_id": None,
        "report_sha256": "r" * 64,
        "labels_path": "data/credit/labels/day_06.parquet",
        "labels_digest": "l" * 32,
        "event_id": "e",
    }
    return MonitorFacts(**{**values, **changes})


def test_the_drift_event_names_the_pipeline_model_report_and_batch(reference):
    report = compare(reference, applicants(3_000, seed=24, older=8))
    event = drift_event(report, facts())
    assert event["event"] == DRIFT_EVENT
    assert event["resource"]["prefect.resource.id"] == "stemma.pipeline.credit"
    (model, report_resource) = event["related"]
    assert model["prefect.resource.id"] == "stemma.model-version.credit.3"
    assert model["prefect.resource.role"] == "model-version"
    assert report_resource["mlflow.run_id"] == "monitor-run"
    payload = event["payload"]
    assert payload["report_run_id"] == "monitor-run"
    assert payload["batch_digest"] == "d" * 32
    assert payload["model"] == "models:/credit/3"
    assert payload["drifted_features"] == ["age"]
    assert set(payload["statistics"]) == {"age"}
    assert payload["statistics"]["age"]["psi"] >= 0.2


def test_no_event_under_the_thresholds(reference):
    assert drift_event(compare(reference, applicants(3_000, seed=25)), facts()) is None


def test_the_lineage_record_links_the_report_to_the_batch_and_the_model(reference):
    report = compare(reference, applicants(3_000, seed=26, older=8))
    record = build_monitor_record(report, facts()).to_dict()
    assert record["schema"] == lineage.RECORD_SCHEMA and record["flow"] == "monitor"
    nodes = {node["id"]: node for node in record["nodes"]}
    (report_node,) = [node for node in record["nodes"] if node["kind"] == "drift_report"]
    assert report_node["digest"] == "sha256:" + "r" * 64
    assert report_node["attributes"]["drifted_features"] == ["age"]
    batch_id = lineage.input_node_id("data/credit/batches/day_06.parquet", "d" * 32)
    edges = {(edge["source"], edge["relation"], edge["target"]) for edge in record["edges"]}
    assert (batch_id, "monitored_in", report_node["id"]) in edges
    assert ("models:/credit/3", "monitored_in", report_node["id"]) in edges
    # only the report is downstream of the run: the run made it and read the rest
    assert {target for source, _, target in edges if source == "mlflow-run:monitor-run"} == {
        report_node["id"]
    }
    assert (batch_id, "input_of", "mlflow-run:monitor-run") in edges
    assert nodes[batch_id]["digest"] == "md5:" + "d" * 32
    assert {node["kind"] for node in record["nodes"]} >= {"reference_profile", "model_version"}


def test_the_plot_is_written(reference, tmp_path):
    report = compare(
        reference,
        applicants(3_000, seed=27, older=8, vans=0.7),
        scores=np.random.default_rng(0).random(3_000),
    )
    path = plot_drift_report(report, tmp_path / "drift" / "summary.png", title="day 6 vs credit v3")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    assert not list(path.parent.glob(".*"))  # written atomically, nothing left behind


# ---------------------------------------------------------------------------------------
# The spec section


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"thresholds": {"psi": 0}}, "psi"),
        ({"thresholds": {"ks_pvalue": 1.0}}, "ks_pvalue"),
        ({"thresholds": {"chi2_pvalue": -0.5}}, "chi2_pvalue"),
        ({"thresholds": {"jensen_shannon": 2}}, "jensen_shannon"),
        ({"bins": 1}, "bins"),
        ({"sample_size": 10}, "sample_size"),
        ({"statistics": {"numeric": []}}, "numeric"),
        ({"statistics": {"numeric": ["psi", "psi"]}}, "statistics"),
        ({"schedule": "nightly"}, "schedule"),
    ],
    ids=["psi", "ks", "chi2", "js", "bins", "sample", "no-statistic", "twice", "cron"],
)
def test_monitor_settings_out_of_range_are_refused(section, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        MonitorSpec(**section)
    assert field in str(caught.value)
