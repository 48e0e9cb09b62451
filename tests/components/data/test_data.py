"""Data versions against a real DVC repository, table checks and splits."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stemma.components.platform import digests
from stemma.components.data.tables import (
    DataVersion,
    dir_md5,
    file_md5,
    load_table,
    resolve_data_version,
    split_table,
)
from stemma.components.errors import DataError, DataVersionError
from stemma.components.spec import DataSpec, SplitSpec

# ---------------------------------------------------------------------------------------
# A real DVC repository


def _write_tree(folder: Path) -> None:
    """Files that exercise DVC's listing: nesting, sort order of '-' vs '/', CRLF, binary."""
    (folder / "credit" / "batches").mkdir(parents=True)
    (folder / "credit-old").mkdir()
    (folder / "empty").mkdir()
    (folder / "credit" / "train.csv").write_bytes(b"a,b\r\n1,2\r\n")
    (folder / "credit" / "batches" / "day_01.bin").write_bytes(bytes(range(256)) * 3)
    (folder / "credit-old" / "notes.txt").write_text("older data\n", encoding="utf-8")
    (folder / "README").write_text("", encoding="utf-8")


def _dvc_add(root: Path, *targets: str) -> None:
    from dvc.repo import Repo

    # DVC resolves targets and writes .dvc files relative to the working directory
    with contextlib.chdir(root), Repo(str(root)) as repo:
        for target in targets:
            repo.add(target)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project whose `data/` folder is tracked by `data.dvc`."""
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    _write_tree(tmp_path / "data")
    _dvc_add(tmp_path, "data")
    return tmp_path


def _recorded(dvc_file: Path) -> dict:
    return yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"][0]


def test_dir_md5_equals_what_dvc_add_records(project: Path) -> None:
    digest, entries = dir_md5(project / "data")

    out = _recorded(project / "data.dvc")
    assert digest == out["md5"]
    assert len(entries) == out["nfiles"] == 4
    # '-' sorts before '/', as in DVC's listing; the empty file and folder behave as in DVC
    assert [entry["relpath"] for entry in entries] == [
        "README",
        "credit-old/notes.txt",
        "credit/batches/day_01.bin",
        "credit/train.csv",
    ]
    cached = project / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
    assert entries == yaml.safe_load(cached.read_text(encoding="utf-8"))


def test_dir_md5_skips_the_folders_dvc_ignores(tmp_path: Path) -> None:
    _write_tree(tmp_path / "plain")
    _write_tree(tmp_path / "with_git")
    (tmp_path / "with_git" / ".git").mkdir()
    (tmp_path / "with_git" / ".git" / "HEAD").write_text("ref: x\n", encoding="utf-8")

    assert dir_md5(tmp_path / "with_git") == dir_md5(tmp_path / "plain")


@pytest.mark.parametrize("dos2unix", [False, True], ids=["md5", "md5-dos2unix"])
def test_file_md5_equals_dvc_data_hash(tmp_path: Path, dos2unix: bool) -> None:
    from dvc_data.hashfile.hash import fobj_md5

    path = tmp_path / "table.csv"
    # more than one 1 MiB chunk, CRLF line ends: DVC 2 hashes the LF version
    path.write_bytes(b"salary,loan\r\n" + b"52000.5,120000\r\n" * 90_000)

    with open(path, "rb") as stream:
        expected = fobj_md5(stream, name="md5-dos2unix" if dos2unix else "md5")
    assert file_md5(path, dos2unix=dos2unix) == expected
    assert file_md5(path) != file_md5(path, dos2unix=True)


def test_resolve_data_version_of_a_file_in_a_tracked_folder(project: Path) -> None:
    version = resolve_data_version(project, Path("data/credit/train.csv"))

    assert version == DataVersion(
        dvc_file=project.resolve() / "data.dvc",
        out_path=project.resolve() / "data",
        md5=_recorded(project / "data.dvc")["md5"],
        file_path=project.resolve() / "data/credit/train.csv",
        file_md5=file_md5(project / "data/credit/train.csv"),
        relpath="data/credit/train.csv",
    )


def test_resolve_data_version_of_a_tracked_subfolder(project: Path) -> None:
    version = resolve_data_version(project, project / "data" / "credit" / "batches")

    assert version.file_md5 == dir_md5(project / "data/credit/batches")[0]
    assert version.md5.endswith(".dir")


def test_resolve_data_version_finds_a_dvc_file_beside_the_file(tmp_path: Path) -> None:
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    Repo.init(str(tmp_path)).close()
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "loans.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    _dvc_add(tmp_path, "tables/loans.csv")

    version = resolve_data_version(tmp_path, Path("tables/loans.csv"))

    assert version.dvc_file == tmp_path.resolve() / "tables" / "loans.csv.dvc"
    assert version.md5 == version.file_md5 == _recorded(version.dvc_file)["md5"]


def _change(data: Path) -> None:
    (data / "credit" / "train.csv").write_bytes(b"a,b\r\n1,3\r\n")


def _add(data: Path) -> None:
    (data / "credit" / "batches" / "day_02.bin").write_bytes(b"\x00new")


def _remove(data: Path) -> None:
    (data / "credit-old" / "notes.txt").unlink()


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (_change, "changed: credit/train.csv"),
        (_add, "added: credit/batches/day_02.bin"),
        (_remove, "removed: credit-old/notes.txt"),
    ],
    ids=["changed", "added", "removed"],
)
def test_tampered_data_names_the_file_when_the_cache_has_the_listing(
    project: Path, tamper, named: str
) -> None:
    tamper(project / "data")

    with pytest.raises(DataVersionError) as caught:
        resolve_data_version(project, Path("data/credit/batches"))

    error = caught.value
    assert error.headline == "data differs from the version recorded in data.dvc"
    assert error.details[0] == named
    assert error.details[-1] == (
        "fix: `dvc checkout data.dvc` to restore the recorded version, "
        "or `dvc add data` to record the new data as a new version"
    )


def test_tampered_data_without_the_cache_names_the_digests(project: Path) -> None:
    recorded = _recorded(project / "data.dvc")["md5"]
    shutil.rmtree(project / ".dvc" / "cache")
    _change(project / "data")

    with pytest.raises(DataVersionError) as caught:
        resolve_data_version(project, Path("data/credit/train.csv"))

    actual = dir_md5(project / "data")[0]
    assert caught.value.details[0] == f"recorded md5 {recorded}, the bytes on disk hash to {actual}"


def test_a_settled_folder_is_hashed_once_and_a_later_change_is_still_found(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(digests.CACHE_DIR_ENV, str(tmp_path / "digests"))
    monkeypatch.setattr(digests, "SETTLE_NS", 50_000_000)
    time.sleep(0.075)
    digests.reset_stats()
    files = 4  # train.csv, day_01.bin, notes.txt, README

    # the tracked folder's files are hashed once; the batches subfolder's own digest then
    # reads day_01.bin's from the store
    first = resolve_data_version(project, Path("data/credit/batches"))
    assert digests.stats() == digests.DigestStats(hits=1, misses=files, stored=files)
    assert resolve_data_version(project, Path("data/credit/batches")) == first
    assert digests.stats() == digests.DigestStats(hits=1 + files + 1, misses=files, stored=files)

    # the same size, and the old modification time put back: still found
    train = project / "data" / "credit" / "train.csv"
    before = train.stat()
    _change(project / "data")
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert train.stat().st_size == before.st_size
    with pytest.raises(DataVersionError) as caught:
        resolve_data_version(project, Path("data/credit/batches"))
    assert caught.value.details[0] == "changed: credit/train.csv"


def test_many_changed_files_are_summarised(project: Path) -> None:
    for index in range(12):
        (project / "data" / f"extra_{index:02d}.txt").write_text(str(index), encoding="utf-8")

    with pytest.raises(DataVersionError) as caught:
        resolve_data_version(project, Path("data/README"))

    details = caught.value.details
    assert details[:2] == ["added: extra_00.txt", "added: extra_01.txt"]
    assert details[10] == "... and 2 more files"


def test_data_dvc_is_re_recorded_after_dvc_add(project: Path) -> None:
    _change(project / "data")
    _dvc_add(project, "data")

    version = resolve_data_version(project, Path("data/credit/train.csv"))

    assert version.file_md5 == file_md5(project / "data/credit/train.csv")


def test_a_folder_replaced_by_a_file_is_named(project: Path) -> None:
    shutil.rmtree(project / "data")
    (project / "data").write_text("not a folder\n", encoding="utf-8")

    with pytest.raises(DataVersionError) as caught:
        resolve_data_version(project, Path("data"))

    assert caught.value.headline == "data.dvc records data as a folder, but it is a file"


def test_untracked_data_says_to_dvc_add(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("a\n1\n", encoding="utf-8")

    with pytest.raises(DataVersionError) as caught:
        resolve_data_version(tmp_path, Path("data/train.csv"))

    assert caught.value.headline == "data/train.csv is not tracked by DVC"
    assert caught.value.details[-1] == (
        "fix: `dvc add data` to record the data as a version, then commit the .dvc file"
    )


def test_missing_file_is_a_data_error_not_a_version_error(project: Path) -> None:
    with pytest.raises(DataError) as caught:
        resolve_data_version(project, Path("data/credit/nope.parquet"))

    assert not isinstance(caught.value, DataVersionError)
    assert caught.value.headline == "data/credit/nope.parquet: no such file"
    assert "dvc pull" in caught.value.details[0]


def test_unreadable_dvc_file_is_named(project: Path) -> None:
    (project / "data.dvc").write_text("outs: [\n", encoding="utf-8")

    with pytest.raises(DataVersionError, match=r"data\.dvc: cannot read the DVC file"):
        resolve_data_version(project, Path("data/README"))


# ---------------------------------------------------------------------------------------
# Tables

SPEC = DataSpec.model_validate(
    {
        "path": "data/table.parquet",
        "target": "approved",
        "id": "application_id",
        "features": {"numeric": ["salary", "loan"], "categorical": ["elevel", "city"]},
    }
)


def _table(rows: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "application_id": np.arange(rows, dtype="int64"),
            "salary": np.linspace(20_000, 90_000, rows),
            "loan": np.linspace(0, 400_000, rows),
            "elevel": np.arange(rows, dtype="int64") % 5,
            "city": ["Lyon", "Oslo"] * (rows // 2),
            "approved": np.arange(rows, dtype="int64") % 2,
        }
    )


def _with(**columns) -> pd.DataFrame:
    return _table().assign(**columns)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"], ids=["parquet", "csv"])
def test_load_table_reads_a_good_table(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"table{suffix}"
    table = _table()
    table.to_parquet(path) if suffix == ".parquet" else table.to_csv(path, index=False)

    loaded = load_table(path, SPEC)

    pd.testing.assert_frame_equal(loaded, table, check_dtype=False)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (_table().iloc[:0], ["the table has no rows"]),
        (
            _table().drop(columns=["loan", "approved", "application_id"]),
            [
                "missing column 'loan' (numeric feature)",
                "missing column 'approved' (target)",
                "missing column 'application_id' (id column)",
                "the table's columns are: salary, elevel, city",
            ],
        ),
        (
            _with(salary=["52k"] * 8),
            [
                "numeric feature 'salary' has dtype str, not a number "
                "(fix the values, or declare it under features.categorical)"
            ],
        ),
        (
            _with(elevel=np.arange(8) * 0.5),
            [
                "categorical feature 'elevel' has dtype float64; expected integers or strings "
                "(cast the column, or declare it under features.numeric)"
            ],
        ),
        (
            _with(loan=[1.0, np.nan, 3.0, np.inf, -np.inf, 6.0, np.nan, np.nan]),
            ["feature 'loan' has 5 missing or infinite values (rows 1, 3, 4, 6, 7)"],
        ),
        (
            _with(city=["Lyon", None, "Oslo", None, "Lyon", "Oslo", "Lyon", "Oslo"]),
            ["feature 'city' has 2 missing values (rows 1, 3)"],
        ),
        (
            _with(approved=[0, 1, None, 1, 0, 1, 0, 1]),
            ["target 'approved' has 1 missing value (rows 2)"],
        ),
        (
            _with(approved=[1] * 8),
            [
                "target 'approved' has only one class: all 8 labelled rows are 1; "
                "a binary model needs both 0 and 1"
            ],
        ),
        (
            _with(approved=["yes", "no"] * 4),
            ["target 'approved' must hold 0/1 (or booleans) for a binary task; found 'no', 'yes'"],
        ),
        (
            _with(approved=[1, 2] * 4),
            ["target 'approved' must hold 0/1 (or booleans) for a binary task; found 1, 2"],
        ),
        (
            _with(salary=["x"] * 8, approved=[0] * 8, loan=[np.nan] * 7 + [1.0]),
            [
                "numeric feature 'salary' has dtype str, not a number "
                "(fix the values, or declare it under features.categorical)",
                "feature 'loan' has 7 missing or infinite values (rows 0, 1, 2, 3, 4, ...)",
                "target 'approved' has only one class: all 8 labelled rows are 0; "
                "a binary model needs both 0 and 1",
            ],
        ),
    ],
    ids=[
        "empty",
        "missing-columns",
        "numeric-feature-not-numeric",
        "categorical-feature-float",
        "nan-and-inf-in-feature",
        "missing-categorical",
        "target-nan",
        "one-class",
        "target-strings",
        "target-not-0-1",
        "all-problems-at-once",
    ],
)
def test_load_table_reports_every_problem(
    tmp_path: Path, frame: pd.DataFrame, expected: list[str]
) -> None:
    path = tmp_path / "table.parquet"
    frame.to_parquet(path)

    with pytest.raises(DataError) as caught:
        load_table(path, SPEC)

    noun = "problem" if len(expected) == 1 else "problems"
    assert caught.value.headline == f"{path}: {len(expected)} {noun} with the table"
    assert caught.value.details == expected


@pytest.mark.parametrize(
    "target",
    [[True, False] * 4, [0.0, 1.0] * 4],
    ids=["booleans", "floats-0-1"],
)
def test_load_table_accepts_other_binary_encodings(tmp_path: Path, target: list) -> None:
    path = tmp_path / "table.parquet"
    _with(approved=target).to_parquet(path)

    assert load_table(path, SPEC)["approved"].tolist() == target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (np.linspace(0, 1, 8), []),
        (["a"] * 8, ["target 'approved' has dtype str; a regression target must be numeric"]),
        ([1.0, np.inf, *[2.0] * 6], ["target 'approved' has 1 infinite value (rows 1)"]),
    ],
    ids=["numeric", "strings", "infinite"],
)
def test_load_table_checks_a_regression_target(
    tmp_path: Path, target: list, expected: list[str]
) -> None:
    path = tmp_path / "table.parquet"
    _with(approved=target).to_parquet(path)
    spec = SPEC.model_copy(update={"task": "regression"})

    if not expected:
        assert len(load_table(path, spec)) == 8
        return
    with pytest.raises(DataError) as caught:
        load_table(path, spec)
    assert caught.value.details == expected


def test_load_table_requires_the_time_column_of_a_time_split(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    _table().to_parquet(path)
    spec = SPEC.model_copy(update={"split": SplitSpec(method="time", time_column="applied_at")})

    with pytest.raises(DataError) as caught:
        load_table(path, spec)

    assert caught.value.details[0] == "missing column 'applied_at' (time column)"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("table.parquet", b"PAR1 not really parquet", "cannot read the file as parquet"),
        ("table.csv", b"", "cannot read the file as csv"),
        ("table.xlsx", b"", "cannot tell the file format from the extension '.xlsx'"),
    ],
    ids=["corrupt-parquet", "empty-csv", "unknown-extension"],
)
def test_load_table_names_an_unreadable_file(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(DataError) as caught:
        load_table(path, SPEC)

    assert caught.value.headline == f"{path}: {expected}"


def test_load_table_does_not_touch_its_input(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    _table().to_parquet(path)
    before = path.read_bytes()

    load_table(path, SPEC)

    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------
# Splits


def _timed(rows: int = 100) -> pd.DataFrame:
    order = np.random.default_rng(0).permutation(rows)
    return pd.DataFrame(
        {
            "applied_at": pd.Timestamp("2026-01-01") + pd.to_timedelta(order, unit="h"),
            "value": order,
        },
        index=pd.RangeIndex(1000, 1000 + rows),
    )


@pytest.mark.parametrize("method", ["random", "time"], ids=["random", "time"])
def test_split_table_is_deterministic_and_partitions_the_rows(method: str) -> None:
    frame = _timed()
    split = SplitSpec(
        method=method, test_fraction=0.2, validation_fraction=0.125, time_column="applied_at"
    )

    first = split_table(frame, split)
    second = split_table(frame.copy(), split)

    assert [len(part) for part in first] == [70, 10, 20]
    for a, b in zip(first, second, strict=True):
        pd.testing.assert_frame_equal(a, b)
    combined = pd.concat(first).index
    assert sorted(combined) == list(frame.index)
    for part in first:
        assert part.index.is_monotonic_increasing  # the table's order is kept


def test_random_split_depends_on_the_seed() -> None:
    frame = _timed()

    seven = split_table(frame, SplitSpec(seed=7))[2]
    eight = split_table(frame, SplitSpec(seed=8))[2]

    assert list(seven.index) != list(eight.index)


def test_time_split_puts_the_latest_rows_last() -> None:
    frame = _timed()

    train, validation, test = split_table(
        frame,
        SplitSpec(
            method="time", test_fraction=0.2, validation_fraction=0.125, time_column="applied_at"
        ),
    )

    assert train["applied_at"].max() < validation["applied_at"].min()
    assert validation["applied_at"].max() < test["applied_at"].min()
    assert sorted(test["value"]) == list(range(80, 100))


def test_split_table_does_not_modify_its_input() -> None:
    frame = _timed()
    before = frame.copy()

    split_table(frame, SplitSpec(method="time", time_column="applied_at"))

    pd.testing.assert_frame_equal(frame, before)


@pytest.mark.parametrize(
    ("frame", "split", "expected"),
    [
        (
            _timed(3),
            SplitSpec(test_fraction=0.1, validation_fraction=0.5),
            "cannot split 3 rows: the test split would be empty",
        ),
        (
            _timed(3),
            SplitSpec(test_fraction=0.1, validation_fraction=0.1),
            "cannot split 3 rows: the validation and test splits would be empty",
        ),
        (
            _timed(4),
            SplitSpec(test_fraction=0.5, validation_fraction=0.9),
            "cannot split 4 rows: the train split would be empty",
        ),
        (
            _timed().assign(applied_at=pd.NaT),
            SplitSpec(method="time", time_column="applied_at"),
            "cannot split by time: column 'applied_at' has missing values",
        ),
        (
            _timed(),
            SplitSpec(method="time", time_column="when"),
            "cannot split by time: the table has no column 'when'",
        ),
    ],
    ids=[
        "empty-test",
        "empty-validation-and-test",
        "empty-train",
        "time-column-missing-values",
        "no-time-column",
    ],
)
def test_split_table_refuses_an_impossible_split(
    frame: pd.DataFrame, split: SplitSpec, expected: str
) -> None:
    with pytest.raises(DataError) as caught:
        split_table(frame, split)

    assert caught.value.headline == expected
