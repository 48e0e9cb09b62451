"""Drift of a classifier's predicted classes and of the labels, on scikit-learn's wine table
(three cultivars, named by a label map) and its breast-cancer table (binary): the profile
records the classes predicted on held-out rows and the labels as the model's classes; a
batch is compared with them by chi-square, in the same Bonferroni family as the rest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.monitoring.drift import DriftMonitor
from stemma.components.monitoring.profile import (
    ReferenceProfile,
    build_reference_profile,
    predicted_classes,
)
from stemma.components.monitoring.records import drift_event
from stemma.components.monitoring.report import PREDICTED_CLASS
from stemma.components.spec import DataSpec, FeaturesSpec, MonitorSpec
from tests.components.monitoring.test_drift import facts

#: The wine table's cultivars as its label column holds them, and the classes they map to.
CULTIVARS = {"c0": "barolo", "c1": "grignolino", "c2": "barbera"}
#: Rows drawn (with replacement) for each batch of the wine table.
BATCH_ROWS = 600


class Wine:
    """The wine table, a classifier of it, and what the monitor compares with."""

    def __init__(self) -> None:
        table = load_wine(as_frame=True)
        frame = table.data.rename(columns=lambda name: name.replace("/", "_"))
        frame["cultivar"] = [f"c{code}" for code in table.target]
        self.frame = frame
        self.features = [column for column in frame.columns if column != "cultivar"]
        self.data = DataSpec(
            path="data/wine.parquet",
            task="multiclass",
            target="cultivar",
            labels=CULTIVARS,
            features=FeaturesSpec(numeric=self.features),
        )
        self.preprocessor = fit_preprocessor(
            frame, self.data.features, task="multiclass", target="cultivar", labels=CULTIVARS
        )
        codes = self.preprocessor.class_codes(frame["cultivar"])
        # A linear model of the codes stands in for the network: its classes' probabilities.
        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=500))
        self.model.fit(frame[self.features], codes)

    def scores(self, rows: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(rows[self.features])

    def profile(self) -> ReferenceProfile:
        return build_reference_profile(
            self.frame,
            self.data,
            scores=self.scores(self.frame),
            preprocessor=self.preprocessor,
            performance={"accuracy": 0.95},
        )

    def batch(self, seed: int, *, only: str | None = None) -> pd.DataFrame:
        rows = self.frame if only is None else self.frame[self.frame["cultivar"] == only]
        return rows.sample(n=BATCH_ROWS, replace=True, random_state=seed, ignore_index=True)


@pytest.fixture(scope="module")
def wine() -> Wine:
    return Wine()


def judge(profile: ReferenceProfile, wine: Wine, batch: pd.DataFrame, labelled: bool = False):
    monitor = DriftMonitor(profile, MonitorSpec())
    monitor.add({name: batch[name].to_numpy() for name in monitor.columns}, wine.scores(batch))
    if labelled:
        codes = wine.preprocessor.class_codes(batch["cultivar"])
        monitor.add_labels(codes, wine.scores(batch))
    return monitor.report(metric="accuracy" if labelled else None, labelled=labelled)


def test_the_profile_records_the_predicted_classes_and_the_labels_as_classes(wine):
    profile = wine.profile()
    assert profile.classes == wine.preprocessor.class_names()
    assert set(profile.classes) == set(CULTIVARS.values())
    predicted = dict(zip(profile.predictions.categories, profile.predictions.counts, strict=True))
    expected = pd.Series(
        np.asarray(profile.classes, dtype=object)[wine.scores(wine.frame).argmax(axis=1)]
    ).value_counts()
    assert predicted == expected.to_dict()
    # the labels through the label map: the model's classes, not the raw c0, c1, c2
    labels = dict(zip(profile.label.categories, profile.label.counts, strict=True))
    assert labels == wine.frame["cultivar"].map(CULTIVARS).value_counts().to_dict()
    again = ReferenceProfile.from_dict(profile.to_dict())
    assert again.classes == profile.classes and again.predictions == profile.predictions


def test_a_batch_like_the_reference_keeps_its_classes(wine):
    profile = wine.profile()
    report = judge(profile, wine, wine.batch(seed=1), labelled=True)
    assert report.predicted_class is not None and report.predicted_class.role == PREDICTED_CLASS
    assert report.predicted_class.statistics["chi2_pvalue"] > report.thresholds["chi2_pvalue"]
    assert not report.prediction_drift and not report.label_drift
    assert report.label.statistics["chi2_pvalue"] > report.thresholds["chi2_pvalue"]
    assert report.performance.current > 0.9 and not report.performance.decayed
    assert "predicted_class.chi2_pvalue" in report.metrics()


def test_a_batch_of_one_cultivar_drifts_in_its_predicted_classes_and_labels(wine):
    profile = wine.profile()
    report = judge(profile, wine, wine.batch(seed=2, only="c0"), labelled=True)
    assert report.detected
    assert report.predicted_class.drifted and report.predicted_class.breaches == ("chi2",)
    assert report.label_drift and "chi2" in report.label.breaches
    assert {"prediction", "label"} <= set(report.kinds)
    assert "the predicted classes" in report.summary()
    shares = dict(zip(report.predicted_class.bins, report.predicted_class.current, strict=True))
    assert shares["barolo"] > 0.9
    payload = drift_event(report, facts())["payload"]
    assert payload["predicted_class"]["drifted"] is True
    assert payload["predicted_class"]["chi2_pvalue"] < 1e-6


def test_a_profile_without_predicted_classes_says_they_are_not_compared(wine):
    old = wine.profile()
    old = ReferenceProfile.from_dict({**old.to_dict(), "predictions": None})
    report = judge(old, wine, wine.batch(seed=3))
    assert report.predicted_class is None
    assert "predicted class" in report.prediction.not_assessed
    line = next(line for line in report.reasons() if line.startswith("predicted class"))
    assert "train it again" in line


def test_a_binary_model_predicts_its_class_from_the_threshold():
    table = load_breast_cancer(as_frame=True)
    frame = table.data.iloc[:, :8].rename(columns=lambda name: name.replace(" ", "_"))
    frame["malignant"] = 1 - table.target  # scikit-learn's 1 is benign
    data = DataSpec(
        path="data/cells.parquet",
        target="malignant",
        features=FeaturesSpec(numeric=list(frame.columns[:8])),
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    model.fit(frame[data.features.numeric], frame["malignant"])
    scores = model.predict_proba(frame[data.features.numeric])[:, 1]
    profile = build_reference_profile(frame, data, scores=scores, threshold=0.3)
    assert profile.classes == (0, 1) and profile.threshold == 0.3
    expected = {1: int((scores >= 0.3).sum()), 0: int((scores < 0.3).sum())}
    counted = zip(profile.predictions.categories, profile.predictions.counts, strict=True)
    assert dict(counted) == expected
    assert predicted_classes(np.array([0.2, np.nan, 0.3]), threshold=0.3).tolist() == [0, 1]

    monitor = DriftMonitor(profile, MonitorSpec())
    benign = frame[frame["malignant"] == 0].sample(n=300, replace=True, random_state=4)
    monitor.add(
        {name: benign[name].to_numpy() for name in monitor.columns},
        model.predict_proba(benign[data.features.numeric])[:, 1],
    )
    report = monitor.report()
    # benign cells only: far fewer predicted malignant than on the whole table
    assert report.predicted_class.drifted
    assert report.predicted_class.current[report.predicted_class.bins.index("1")] < 0.1
