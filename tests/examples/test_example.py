"""The worked example's generator: reproducible bytes, sane columns, learnable, drifting."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from stemma.components.data.tables import file_md5, resolve_data_version
from stemma.components.errors import DataError
from stemma.examples.credit import FIRST_PRODUCTION_DAY, generate_credit_data

NUMERIC = ["salary", "commission", "age", "hvalue", "hyears", "loan"]
CATEGORICAL = ["elevel", "car", "zipcode"]
FEATURES = [*NUMERIC, *CATEGORICAL]
DAYS = 14


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The default generation (about 0.2 s), shared by the read-only tests."""
    out_dir = tmp_path_factory.mktemp("data")
    return out_dir, generate_credit_data(out_dir)


def _day(out_dir: Path, day: int) -> pd.DataFrame:
    """A day's batch joined with its labels."""
    batch = pd.read_parquet(out_dir / f"credit/batches/day_{day:02d}.parquet")
    labels = pd.read_parquet(out_dir / f"credit/labels/day_{day:02d}.parquet")
    return batch.merge(labels, on="application_id", validate="one_to_one")


@pytest.fixture(scope="module")
def trained(generated: tuple[Path, list[Path]]) -> tuple[Pipeline, float]:
    """A logistic regression fitted on 80% of the training table, and its held-out AUC."""
    out_dir, _ = generated
    train = pd.read_parquet(out_dir / "credit/train.parquet")
    fit_rows = int(len(train) * 0.8)
    model = Pipeline(
        [
            (
                "encode",
                ColumnTransformer(
                    [
                        ("numeric", StandardScaler(), NUMERIC),
                        ("categorical", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
                    ]
                ),
            ),
            ("classify", LogisticRegression(max_iter=500)),
        ]
    )
    model.fit(train.iloc[:fit_rows][FEATURES], train.iloc[:fit_rows]["approved"])
    held_out = train.iloc[fit_rows:]
    auc = roc_auc_score(held_out["approved"], model.predict_proba(held_out[FEATURES])[:, 1])
    return model, float(auc)


def test_writes_the_training_table_batches_and_labels(generated: tuple[Path, list[Path]]) -> None:
    out_dir, paths = generated

    expected = sorted(
        [out_dir / "credit/train.parquet"]
        + [
            out_dir / f"credit/{kind}/day_{day:02d}.parquet"
            for kind in ("batches", "labels")
            for day in range(1, DAYS + 1)
        ]
    )
    assert paths == expected
    assert sorted(out_dir.rglob("*")) == sorted(
        {*paths, *(p.parent for p in paths)}
    )  # no temp files left

    train_schema = pq.read_schema(out_dir / "credit/train.parquet")
    assert train_schema.names == [
        "application_id",
        "applied_at",
        "salary",
        "commission",
        "age",
        "elevel",
        "car",
        "zipcode",
        "hvalue",
        "hyears",
        "loan",
        "approved",
    ]
    assert train_schema.metadata is None  # no pandas metadata: bytes do not depend on pandas
    assert (
        pq.read_schema(out_dir / "credit/batches/day_01.parquet").names == train_schema.names[:-1]
    )
    assert pq.read_schema(out_dir / "credit/labels/day_01.parquet").names == [
        "application_id",
        "approved",
    ]


def test_columns_have_the_documented_types_and_ranges(generated: tuple[Path, list[Path]]) -> None:
    out_dir, _ = generated
    train = pd.read_parquet(out_dir / "credit/train.parquet")

    assert len(train) == 40_000
    assert train[["salary", "commission", "hvalue", "loan"]].dtypes.eq("float64").all()
    assert (
        train[["application_id", "age", "elevel", "car", "zipcode", "hyears", "approved"]]
        .dtypes.eq("int64")
        .all()
    )
    assert train["applied_at"].dtype == "datetime64[us]"
    assert train["salary"].between(20_000, 150_000).all()
    assert (train.loc[train["salary"] >= 75_000, "commission"] == 0).all()
    assert train.loc[train["commission"] > 0, "commission"].between(10_000, 75_000).all()
    assert train["age"].between(20, 80).all()
    assert set(train["elevel"]) == set(range(5))
    assert set(train["car"]) == set(range(1, 21))
    assert set(train["zipcode"]) == set(range(9))
    assert train["hyears"].between(1, 30).all()
    assert train["loan"].between(0, 500_000).all()
    assert set(train["approved"]) == {0, 1}
    # house values follow the zip code: the cheapest zip code is dearer than the dearest
    by_zip = train.groupby("zipcode")["hvalue"].median()
    assert by_zip.is_monotonic_decreasing
    assert not train.isna().any().any()


def test_ids_are_unique_and_times_are_ordered(generated: tuple[Path, list[Path]]) -> None:
    out_dir, _ = generated
    train = pd.read_parquet(out_dir / "credit/train.parquet")
    days = [_day(out_dir, day) for day in range(1, DAYS + 1)]

    ids = pd.concat([train["application_id"], *(frame["application_id"] for frame in days)])
    assert ids.is_unique
    assert len(ids) == 40_000 + DAYS * 5_000
    assert train["applied_at"].max() < pd.Timestamp(FIRST_PRODUCTION_DAY)
    for day, frame in enumerate(days, start=1):
        start = pd.Timestamp(FIRST_PRODUCTION_DAY) + pd.Timedelta(days=day - 1)
        assert (
            frame["applied_at"].between(start, start + pd.Timedelta(days=1), inclusive="left").all()
        )
        assert frame["applied_at"].is_monotonic_increasing


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    arguments = {"train_rows": 2_000, "days": 3, "batch_rows": 500}
    first = generate_credit_data(tmp_path / "a", seed=11, **arguments)
    second = generate_credit_data(tmp_path / "b", seed=11, **arguments)
    other = generate_credit_data(tmp_path / "c", seed=12, **arguments)

    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in second
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    assert all(a.read_bytes() != c.read_bytes() for a, c in zip(first, other, strict=True))


def test_files_do_not_depend_on_each_other(tmp_path: Path) -> None:
    """Each file has its own child seed: more days or rows elsewhere leave a file's bytes alone."""
    short = generate_credit_data(tmp_path / "short", train_rows=1_000, days=2, batch_rows=300)
    long = generate_credit_data(tmp_path / "long", train_rows=1_000, days=5, batch_rows=300)

    day_two = "credit/batches/day_02.parquet"
    assert (tmp_path / "short" / day_two).read_bytes() == (tmp_path / "long" / day_two).read_bytes()
    assert len(short) == 5 and len(long) == 11


def test_label_is_learnable_from_the_training_table(trained: tuple[Pipeline, float]) -> None:
    _, auc = trained

    assert 0.85 < auc < 0.97  # clearly learnable, but noisy like real decisions


def test_population_shift_changes_who_applies(generated: tuple[Path, list[Path]]) -> None:
    out_dir, _ = generated
    before = pd.concat(_day(out_dir, day) for day in range(1, 6))
    after = pd.concat(_day(out_dir, day) for day in range(6, 10))

    assert before["age"].mean() - after["age"].mean() > 10
    assert after["loan"].mean() - before["loan"].mean() > 50_000
    assert before["salary"].mean() - after["salary"].mean() > 10_000
    assert before["approved"].mean() - after["approved"].mean() > 0.15


def test_concept_shift_degrades_a_model_trained_before_it(
    generated: tuple[Path, list[Path]], trained: tuple[Pipeline, float]
) -> None:
    out_dir, _ = generated
    model, _ = trained

    def auc(days: range) -> float:
        frame = pd.concat(_day(out_dir, day) for day in days)
        return roc_auc_score(frame["approved"], model.predict_proba(frame[FEATURES])[:, 1])

    assert auc(range(1, 6)) > 0.9  # same population, same rule
    assert auc(range(6, 10)) > 0.8  # new population, same rule: still ranks well
    assert auc(range(10, 15)) < 0.65  # new rule


def test_no_shift_when_the_shift_days_are_past_the_end(tmp_path: Path) -> None:
    generate_credit_data(
        tmp_path,
        train_rows=1_000,
        days=3,
        batch_rows=2_000,
        population_shift_day=99,
        concept_shift_day=99,
    )
    train = pd.read_parquet(tmp_path / "credit/train.parquet")
    last = _day(tmp_path, 3)

    assert abs(train["age"].mean() - last["age"].mean()) < 2
    assert abs(train["approved"].mean() - last["approved"].mean()) < 0.06


def test_a_shorter_run_removes_only_stale_day_files(tmp_path: Path) -> None:
    generate_credit_data(tmp_path, train_rows=500, days=4, batch_rows=100)
    notes = tmp_path / "credit" / "batches" / "README.md"
    notes.write_text("kept\n", encoding="utf-8")

    paths = generate_credit_data(tmp_path, train_rows=500, days=2, batch_rows=100)

    assert sorted(p.name for p in (tmp_path / "credit/labels").iterdir()) == [
        "day_01.parquet",
        "day_02.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "credit/batches").iterdir()) == [
        "README.md",
        "day_01.parquet",
        "day_02.parquet",
    ]
    assert len(paths) == 5


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        ({"train_rows": 0}, "train_rows must be at least 1, got 0"),
        ({"days": -1}, "days must be at least 0, got -1"),
        ({"batch_rows": 0}, "batch_rows must be at least 1, got 0"),
        ({"seed": -3}, "seed must be at least 0, got -3"),
        ({"concept_shift_day": 0}, "concept_shift_day must be at least 1, got 0"),
    ],
    ids=["no-train-rows", "negative-days", "no-batch-rows", "negative-seed", "shift-day-zero"],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, arguments: dict, detail: str
) -> None:
    with pytest.raises(DataError) as caught:
        generate_credit_data(tmp_path, **arguments)

    assert caught.value.headline == "cannot generate the credit data"
    assert caught.value.details == [detail]
    assert list(tmp_path.iterdir()) == []


def test_regenerating_keeps_the_dvc_version(tmp_path: Path) -> None:
    """`stemma data generate` twice must not look like new data to DVC."""
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    generate_credit_data(tmp_path / "data", train_rows=1_000, days=2, batch_rows=200)
    with contextlib.chdir(tmp_path), Repo(str(tmp_path)) as repo:
        repo.add("data")

    before = file_md5(tmp_path / "data/credit/train.parquet")
    generate_credit_data(tmp_path / "data", train_rows=1_000, days=2, batch_rows=200)
    version = resolve_data_version(tmp_path, Path("data/credit/train.parquet"))  # raises if changed

    assert version.file_md5 == before
