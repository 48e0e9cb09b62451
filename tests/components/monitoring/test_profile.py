"""Reference profiles: what they hold, their JSON round trip, and loading them via a model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError
from stemma.components.monitoring.profile import (
    PROFILE_FILE,
    PROFILE_SHA256_TAG,
    CategoricalProfile,
    MissingProfileError,
    NumericProfile,
    ReferenceProfile,
    bin_counts_sorted,
    build_reference_profile,
    load_model_profile,
    profile_categorical,
    profile_numeric,
    read_profile,
    save_with_model,
    tag_model_version,
    write_profile,
)
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.spec import DataSpec, FeaturesSpec
from tests.support import isolated_mlflow, log_trained_model

DATA = DataSpec(
    path="data/x.parquet",
    target="approved",
    id="application_id",
    features=FeaturesSpec(numeric=["salary", "age"], categorical=["car"]),
)


def frame(rows: int, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    salary = rng.lognormal(11, 0.4, rows)
    return pd.DataFrame(
        {
            "application_id": np.arange(rows),
            "salary": salary,
            "age": rng.integers(20, 80, rows),
            "car": rng.choice(["coupe", "sedan", "van"], rows, p=[0.2, 0.5, 0.3]),
            "approved": (salary > 60_000).astype(np.int64),
        }
    )


def test_numeric_profile_bins_by_quantile_and_counts_missing_apart():
    values = np.concatenate([np.arange(1000, dtype=float), [np.nan, np.inf, -np.inf]])
    profile = profile_numeric(values, bins=4, sample_size=10_000)
    assert profile.rows == 1003 and profile.missing == 3
    assert profile.edges == pytest.approx((249.75, 499.5, 749.25))
    assert profile.counts == (250, 250, 250, 250)
    assert profile.sample.tolist() == list(range(1000))  # smaller than the cap: all of it
    assert profile.minimum == 0 and profile.maximum == 999


def test_numeric_profile_of_few_distinct_values_merges_repeated_edges():
    values = np.repeat([1.0, 2.0, 3.0], [700, 200, 100])
    profile = profile_numeric(values, bins=10)
    assert len(profile.edges) == len(set(profile.edges)) < 9
    assert sum(profile.counts) == 1000
    # counting the column again on the profile's bins gives its counts back
    assert bin_counts_sorted(np.sort(values), profile.edges).tolist() == list(profile.counts)


def test_numeric_sample_is_capped_sorted_drawn_from_the_column_and_reproducible():
    values = np.random.default_rng(0).normal(size=50_000)
    first = profile_numeric(values, sample_size=1_000)
    again = profile_numeric(values, sample_size=1_000)
    assert first.sample.size == 1_000
    assert np.all(np.diff(first.sample) >= 0)
    assert np.isin(first.sample, values).all()
    assert np.array_equal(first.sample, again.sample)
    # a sample, not the smallest values
    assert first.sample[0] < -2 and first.sample[-1] > 2


def test_numeric_profile_refuses_text():
    with pytest.raises(DataError, match="non-numeric"):
        profile_numeric(np.array(["a", "b"], dtype=object))


def test_categorical_profile_counts_each_category_most_frequent_first():
    profile = profile_categorical(pd.Series(["van", "sedan", None, "sedan", "van", "sedan"]))
    assert profile.categories == ("sedan", "van")
    assert profile.counts == (3, 2)
    assert profile.missing == 1 and profile.rows == 6
    assert profile_categorical(pd.Series([2, 1, 2], dtype="int64")).categories == (2, 1)


def test_reference_profile_round_trips_through_json_exactly(tmp_path):
    rows = frame(3_000)
    scores = np.random.default_rng(1).random(600)
    built = build_reference_profile(
        rows,
        DATA,
        scores=scores,
        performance={"roc_auc": 0.91, "log_loss": float("nan")},
        bins=8,
        sample_size=500,
        source={"data_md5": "abc.dir"},
    )
    path = tmp_path / PROFILE_FILE
    sha256 = write_profile(built, path)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = read_profile(path, sha256)

    assert loaded.to_dict() == built.to_dict()
    salary = loaded.features["salary"]
    assert isinstance(salary, NumericProfile) and salary.sample.dtype == np.float64
    assert np.array_equal(salary.sample, built.features["salary"].sample)  # bit for bit
    assert isinstance(loaded.features["car"], CategoricalProfile)
    assert loaded.label_rate == pytest.approx(rows["approved"].mean())
    assert loaded.performance == {"roc_auc": 0.91}  # NaN metrics are left out
    assert loaded.scores is not None and loaded.scores.rows == 600
    assert loaded.source == {"data_md5": "abc.dir"}


def test_reference_profile_needs_every_feature():
    with pytest.raises(DataError, match="missing age"):
        build_reference_profile(frame(100).drop(columns=["age"]), DATA)


def test_read_profile_refuses_altered_bytes_and_other_documents(tmp_path):
    path = tmp_path / PROFILE_FILE
    sha256 = write_profile(build_reference_profile(frame(200), DATA), path)
    document = json.loads(path.read_text())
    document["features"]["age"]["counts"][0] += 1
    path.write_text(json.dumps(document))
    with pytest.raises(RegistryError, match="does not match the sha256"):
        read_profile(path, sha256)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(RegistryError, match="not a reference profile"):
        read_profile(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["features"]["age"].update(counts=[1]), "counts for"),
        (lambda d: d["features"]["age"].update(sample=[3.0, 1.0]), "sorted"),
        (lambda d: d["features"]["car"].update(kind="text"), "kind must be"),
        (lambda d: d["features"].clear(), "non-empty"),
    ],
    ids=["counts", "unsorted-sample", "kind", "no-features"],
)
def test_malformed_profiles_are_refused(change, message):
    document = build_reference_profile(frame(200), DATA).to_dict()
    change(document)
    with pytest.raises(ValueError, match=message):
        ReferenceProfile.from_dict(document)


@pytest.fixture
def registry(tmp_path):
    with isolated_mlflow():
        configure_tracking(tmp_path)
        yield tmp_path


def register(tmp_path, name: str, *, with_profile: bool):
    """A logged model registered as version 1 of ``name``, with or without its profile."""
    rows = frame(500)
    _, _, info, _, run_id = log_trained_model(
        rows,
        DATA.features,
        task="binary",
        target="approved",
        experiment_id=ensure_experiment(name, tmp_path),
        workdir=tmp_path / name,
    )
    client = MlflowClient()
    sha256 = None
    if with_profile:
        path = tmp_path / f"{name}-profile" / PROFILE_FILE
        sha256 = write_profile(build_reference_profile(rows, DATA), path)
        save_with_model(client, info.model_id, path, sha256)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, info.model_uri, run_id=run_id, model_id=info.model_id
    )
    if with_profile:
        tag_model_version(client, name, version.version, sha256)
    return client, sha256


def test_profile_travels_with_the_model_version(registry):
    client, sha256 = register(registry, "profiled", with_profile=True)
    profile, found = load_model_profile(client, "profiled", "1")
    assert found == sha256
    assert client.get_model_version("profiled", "1").tags[PROFILE_SHA256_TAG] == sha256
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("profiled", "1"),
        dst_path=str(registry / "download"),
    )
    copy = Path(folder) / PROFILE_FILE
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha256
    assert set(profile.features) == {"salary", "age", "car"}


def test_a_version_without_profile_is_reported_as_such(registry):
    client, _ = register(registry, "legacy", with_profile=False)
    with pytest.raises(MissingProfileError) as caught:
        load_model_profile(client, "legacy", "1")
    assert caught.value.headline.startswith("legacy v1 has no reference profile")
    assert "train the model again" in caught.value.render()
    assert caught.value.exit_code == RegistryError.exit_code


def test_a_profile_tag_whose_file_is_gone_is_an_error(registry):
    client, _ = register(registry, "orphan", with_profile=False)
    tag_model_version(client, "orphan", "1", "0" * 64)
    with pytest.raises(RegistryError, match="cannot be found"):
        load_model_profile(client, "orphan", "1")
