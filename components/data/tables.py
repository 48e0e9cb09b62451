"""Data versions and tables: which DVC version a file belongs to, reading it, splitting it.

The digests here are DVC's own, computed without DVC (importing it costs a third of a
second), and remembered as DVC's state database remembers them (:mod:`.digests`):

* a file's digest is the md5 of its bytes (DVC 3; ``.dvc`` files written by DVC 2 say
  nothing about the hash and used md5 after turning CRLF into LF in text files, which
  :func:`file_md5` reproduces with ``dos2unix=True``);
* a directory's digest is the md5 of the JSON list ``[{"md5": ..., "relpath": ...}]`` of
  its files sorted by relative path, dumped with ``sort_keys=True``, plus ``.dir``. The
  same JSON is what DVC keeps in its cache under that digest, which lets
  :func:`resolve_data_version` name the files that changed since ``dvc add``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stemma.components.errors import DataError, DataVersionError
from stemma.components.platform import digests

if TYPE_CHECKING:  # pandas costs ~0.4 s to import; keep it off `stemma --help`
    import pandas as pd

    from stemma.components.platform.tracking import DVCDatasetSource
    from stemma.components.spec import DataSpec, SplitSpec

#: Read size for hashing; DVC also reads (and, for DVC 2 files, detects text) per MiB.
HASH_CHUNK_BYTES = 2**20
#: DVC 2's text heuristics look at the first 512 bytes of each chunk.
TEXT_SNIFF_BYTES = 512
#: Folders DVC never tracks inside a directory output.
DVC_IGNORED_DIRS = frozenset({".git", ".hg", ".dvc"})
#: How many changed files or bad rows an error message names before it summarises.
MAX_NAMED = 10
MAX_ROWS_NAMED = 5
#: The DVC file the project keeps at its root for the `data/` folder.
ROOT_DVC_FILE = "data.dvc"

_TEXT_CHARS = bytes(range(32, 127)) + b"\n\r\t\f\b"
_TEXT_MAX_NONTEXT_SHARE = 0.30


# ---------------------------------------------------------------------------------------
# DVC digests


def file_md5(path: Path, *, dos2unix: bool = False, remembered: bool = True) -> str:
    """The md5 DVC records for a file, read in 1 MiB chunks.

    Args:
        path: the file.
        dos2unix: hash as DVC 2 did (``md5-dos2unix``): CRLF becomes LF in every chunk
            that looks like text.
        remembered: answer from :mod:`.digests` when the file is unchanged since it was
            last hashed; False reads the bytes whatever the store says (checks of
            DVC's cache objects, whose bytes are what is in question).
    """
    if not remembered:
        return _file_md5(path, dos2unix)
    kind = "md5-dos2unix" if dos2unix else "md5"
    return digests.remembered(path, kind, lambda: _file_md5(path, dos2unix))


def _file_md5(path: Path, dos2unix: bool) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            if dos2unix and _looks_like_text(chunk[:TEXT_SNIFF_BYTES]):
                chunk = chunk.replace(b"\r\n", b"\n")
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_text(block: bytes) -> bool:
    """DVC's text heuristic: no NUL byte and at most 30% non-printable characters."""
    if b"\x00" in block:
        return False
    return (
        not block or len(block.translate(None, _TEXT_CHARS)) / len(block) <= _TEXT_MAX_NONTEXT_SHARE
    )


def dir_md5(path: Path, *, dos2unix: bool = False) -> tuple[str, list[dict[str, str]]]:
    """The ``<md5>.dir`` digest DVC records for a directory, and its file listing.

    Files under ``.git``, ``.hg`` and ``.dvc`` folders are skipped as DVC skips them;
    ``.dvcignore`` patterns are not applied. Empty folders do not count.

    Args:
        path: the directory.
        dos2unix: hash files as DVC 2 did (see :func:`file_md5`).

    Returns:
        The digest (``"<32 hex>.dir"``) and the listing, ``[{"md5", "relpath"}]`` sorted
        by relative path, exactly as DVC keeps it in its cache.
    """
    root = Path(path)
    entries: list[dict[str, str]] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in DVC_IGNORED_DIRS]
        for name in files:
            file = Path(folder, name)
            relpath = file.relative_to(root).as_posix()
            entries.append({"md5": file_md5(file, dos2unix=dos2unix), "relpath": relpath})
    return listing_md5(entries), sorted(entries, key=lambda entry: entry["relpath"])


def listing_md5(entries: list[dict[str, str]]) -> str:
    """The ``<md5>.dir`` digest of a folder's listing, ``[{"md5", "relpath"}]`` in any order."""
    listing = json.dumps(sorted(entries, key=lambda entry: entry["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode("utf-8"), usedforsecurity=False).hexdigest() + ".dir"


# ---------------------------------------------------------------------------------------
# Data versions


@dataclass(frozen=True)
class DataVersion:
    """A data file and the DVC version it belongs to, checked against the bytes on disk.

    Attributes:
        dvc_file: the ``.dvc`` file that records the version.
        out_path: the tracked folder or file (absolute).
        md5: the digest recorded in the ``.dvc`` file (``"<md5>.dir"`` for a folder).
        file_path: the file (or folder) the spec reads (absolute).
        file_md5: its own digest (a ``.dir`` digest when it is a folder).
        relpath: ``file_path`` relative to the project root, with forward slashes.
    """

    dvc_file: Path
    out_path: Path
    md5: str
    file_path: Path
    file_md5: str
    relpath: str


def resolve_data_version(root: Path, data_path: Path) -> DataVersion:
    """Find the DVC version that covers a data file and check the bytes still match it.

    ``root/data.dvc`` is looked at first, then ``*.dvc`` files beside the file and in
    each folder above it up to the root.

    Args:
        root: the project root.
        data_path: the data file or folder, absolute or relative to the root.

    Raises:
        DataError: the file does not exist.
        DataVersionError: no ``.dvc`` file covers it, or its bytes differ from the
            recorded version (naming the changed files when DVC's cache has the
            recorded listing).
    """
    root = Path(root).resolve()
    target = (root / data_path).resolve()
    relpath = _relative(target, root)
    if not target.exists():
        raise DataError(
            f"{relpath}: no such file",
            [
                "fix: `stemma data generate` for the worked example, `dvc checkout` to restore "
                "it from the DVC cache, or `dvc pull` to fetch it from the DVC remote"
            ],
        )

    found = _find_out(root, target)
    if found is None:
        top = Path(relpath).parts[0] if target.is_relative_to(root) else str(target)
        raise DataVersionError(
            f"{relpath} is not tracked by DVC",
            [
                f"looked for {ROOT_DVC_FILE} in {root} and *.dvc files beside and above the file",
                f"fix: `dvc add {top}` to record the data as a version, then commit the .dvc file",
            ],
        )
    dvc_file, out, out_path = found
    recorded, actual, entries, dos2unix = _check_out(root, dvc_file, out, out_path)
    if target == out_path:
        digest = actual
    elif target.is_dir():
        digest = dir_md5(target, dos2unix=dos2unix)[0]
    else:
        inside = target.relative_to(out_path).as_posix()
        listed = (entry["md5"] for entry in entries if entry["relpath"] == inside)
        digest = next(listed, None) or file_md5(target, dos2unix=dos2unix)
    return DataVersion(
        dvc_file=dvc_file,
        out_path=out_path,
        md5=recorded,
        file_path=target,
        file_md5=digest,
        relpath=relpath,
    )


def _check_out(
    root: Path, dvc_file: Path, out: dict[str, Any], out_path: Path
) -> tuple[str, str, list[dict[str, str]], bool]:
    """``(recorded md5, actual md5, folder listing, dos2unix)`` of a ``.dvc`` entry whose
    bytes on disk match it; DataVersionError naming the fix when they do not."""
    out_rel = _relative(out_path, root)
    dvc_rel = _relative(dvc_file, root)
    recorded = out.get("md5")
    if not isinstance(recorded, str) or not recorded:
        raise DataVersionError(
            f"{dvc_rel}: the entry for {out_rel} records no md5",
            [f"fix: `dvc add {out_rel}` to record the data as a version"],
        )
    dos2unix = out.get("hash") != "md5"  # DVC 3 writes `hash: md5`; DVC 2 wrote nothing
    records_folder = recorded.endswith(".dir")
    if records_folder != out_path.is_dir():
        recorded_kind, actual_kind = ("folder", "file") if records_folder else ("file", "folder")
        raise DataVersionError(
            f"{dvc_rel} records {out_rel} as a {recorded_kind}, but it is a {actual_kind}",
            [
                f"fix: `dvc checkout {dvc_rel}` to restore it, or `dvc add {out_rel}` "
                f"to record the {actual_kind}"
            ],
        )
    if records_folder:
        actual, entries = dir_md5(out_path, dos2unix=dos2unix)
    else:
        actual, entries = file_md5(out_path, dos2unix=dos2unix), []

    if actual != recorded:
        details = _changed_files(root, recorded, entries) or [
            f"recorded md5 {recorded}, the bytes on disk hash to {actual}"
        ]
        raise DataVersionError(
            f"{out_rel} differs from the version recorded in {dvc_rel}",
            [
                *details,
                f"fix: `dvc checkout {dvc_rel}` to restore the recorded version, or "
                f"`dvc add {out_rel}` to record the new data as a new version",
            ],
        )
    return recorded, actual, entries, dos2unix


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _candidate_dvc_files(root: Path, target: Path) -> Iterable[Path]:
    """``root/data.dvc`` first, then ``*.dvc`` files from the file's folder up to the root."""
    first = root / ROOT_DVC_FILE
    if first.is_file():
        yield first
    folder = target if target.is_dir() else target.parent
    for current in [folder, *folder.parents]:
        for candidate in sorted(current.glob("*.dvc")):
            if candidate != first and candidate.is_file():
                yield candidate
        if current == root or not current.is_relative_to(root):
            break


def _find_out(root: Path, target: Path) -> tuple[Path, dict[str, Any], Path] | None:
    """The ``.dvc`` file, its out entry and the out's path that cover ``target``."""
    for dvc_file in _candidate_dvc_files(root, target):
        try:
            content = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise DataVersionError(
                f"{_relative(dvc_file, root)}: cannot read the DVC file",
                [
                    f"{type(error).__name__}: {error}",
                    "fix: restore it from git (`git checkout -- <file>`)",
                ],
            ) from None
        outs = content.get("outs") if isinstance(content, dict) else None
        for out in outs if isinstance(outs, list) else []:
            if not isinstance(out, dict) or not isinstance(out.get("path"), str):
                continue
            out_path = (dvc_file.parent / out["path"]).resolve()
            if target == out_path or target.is_relative_to(out_path):
                return dvc_file, out, out_path
    return None


def _changed_files(root: Path, recorded: str, entries: list[dict[str, str]]) -> list[str]:
    """Name the files added, removed or changed since ``recorded``, from DVC's cache.

    Empty when the cache does not hold the recorded listing (then only digests can be
    compared). Looks in the default cache, ``.dvc/cache``, in DVC 3's layout
    (``files/md5/``) and in DVC 2's.
    """
    if not recorded.endswith(".dir"):
        return []
    cache = root / ".dvc" / "cache"
    name = recorded[:2] + "/" + recorded[2:]
    listing: Any = None
    for listing_path in (cache / "files" / "md5" / name, cache / name):
        try:
            listing = json.loads(listing_path.read_text(encoding="utf-8"))
            break
        except (OSError, ValueError):
            continue
    if not isinstance(listing, list):
        return []

    before: dict[str, str] = {
        str(item.get("relpath")): str(item.get("md5")) for item in listing if isinstance(item, dict)
    }
    after = {entry["relpath"]: entry["md5"] for entry in entries}
    lines = [
        f"changed: {path}"
        for path in sorted(before.keys() & after.keys())
        if before[path] != after[path]
    ]
    lines += [f"added: {path}" for path in sorted(after.keys() - before.keys())]
    lines += [f"removed: {path}" for path in sorted(before.keys() - after.keys())]
    if len(lines) > MAX_NAMED:
        lines = [*lines[:MAX_NAMED], f"... and {len(lines) - MAX_NAMED} more files"]
    return lines


# ---------------------------------------------------------------------------------------
# Tables


def load_table(path: Path, data: DataSpec) -> pd.DataFrame:
    """Read a Parquet or CSV table and check it can feed the spec's model.

    Every problem is collected before anything is raised: missing columns (features,
    target, id, time column), feature dtypes, missing or infinite feature values, an
    unusable target.

    Args:
        path: the file.
        data: the spec's data section (format, task, columns).

    Returns:
        The table as read.

    Raises:
        DataError: naming the file and, one line each, every problem found.
    """
    import pandas as pd

    path = Path(path)
    file_format = _table_format(path, data)
    try:
        frame = pd.read_parquet(path) if file_format == "parquet" else pd.read_csv(path)
    except Exception as error:  # pyarrow and the CSV parser raise many kinds; all mean "unreadable"
        raise DataError(
            f"{path}: cannot read the file as {file_format}",
            [_first_line(error)],
        ) from None

    problems = list(table_problems(frame, data))
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        raise DataError(f"{path}: {len(problems)} {noun} with the table", problems)
    return frame


#: Expectation arguments that name columns of the table.
COLUMN_ARGUMENTS = ("column", "column_A", "column_B", "column_list")


def spec_columns(data: DataSpec, checks: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
    """Every column the spec names, with the first place naming it (``data.target``)."""
    named = [(column, "data.features.numeric") for column in data.features.numeric]
    named += [(column, "data.features.categorical") for column in data.features.categorical]
    named += [(data.target, "data.target")]
    named += [(data.id, "data.id"), (data.split.time_column, "data.split.time_column")]
    for index, check in enumerate(checks):
        for name, kwargs in check.items():
            for argument in COLUMN_ARGUMENTS:
                value = kwargs.get(argument) if isinstance(kwargs, Mapping) else None
                values = value if isinstance(value, list) else [value]
                named += [(item, f"checks[{index}] {name}") for item in values]
    found: dict[str, str] = {}
    for column, where in named:
        if isinstance(column, str) and column not in found:
            found[column] = where
    return found


def header_columns(path: Path, data: DataSpec) -> list[str]:
    """The column names of a Parquet or CSV file, from its footer or first line (no rows).

    Raises:
        DataError: the file is missing or unreadable, or its format is unknown.
    """
    import csv

    import pyarrow.parquet as pq

    file_format = _table_format(path, data)
    try:
        if file_format == "parquet":
            return list(pq.read_schema(path).names)
        with open(path, newline="", encoding="utf-8-sig") as stream:
            return next(csv.reader(stream), [])
    except (OSError, ValueError, csv.Error) as error:  # pyarrow's errors derive from the first two
        raise DataError(
            f"{path}: cannot read the file as {file_format}", [_first_line(error)]
        ) from None


def column_name_problems(
    path: Path, data: DataSpec, checks: Sequence[Mapping[str, Any]] = ()
) -> list[str]:
    """One line per column the spec names that the file lacks, with the closest names."""
    present = header_columns(path, data)
    problems = []
    for column, where in spec_columns(data, checks).items():
        if column not in present:
            close = difflib.get_close_matches(column, present, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"{where}: `{column}` is not a column of {path.name}{hint}")
    return problems


def _table_format(path: Path, data: DataSpec) -> str:
    """``data.format``, or the one the extension names; DataError when there is no such file."""
    found = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}.get(path.suffix.lower())
    if data.format != "auto":
        found = data.format
    elif found is None:
        raise DataError(
            f"{path}: cannot tell the file format from the extension {path.suffix!r}",
            ["fix: set data.format to parquet or csv"],
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return found


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (parser errors can run to many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def table_problems(frame: pd.DataFrame, data: DataSpec) -> Iterator[str]:
    """Every reason the table cannot feed the spec's model, one line each (none: usable)."""
    import numpy as np
    import pandas as pd
    from pandas.api import types

    if len(frame) == 0:
        yield "the table has no rows"

    roles = [
        *((column, "numeric feature") for column in data.features.numeric),
        *((column, "categorical feature") for column in data.features.categorical),
        (data.target, "target"),
    ]
    if data.id:
        roles.append((data.id, "id column"))
    if data.split.time_column:
        roles.append((data.split.time_column, "time column"))
    missing = [(column, role) for column, role in roles if column not in frame.columns]
    yield from (f"missing column {column!r} ({role})" for column, role in missing)
    if missing:
        shown = ", ".join(map(str, frame.columns[:20])) + (
            " ..." if len(frame.columns) > 20 else ""
        )
        yield f"the table's columns are: {shown}"

    for column in (column for column in data.features.numeric if column in frame.columns):
        series = frame[column]
        if not types.is_numeric_dtype(series.dtype):
            yield (
                f"numeric feature {column!r} has dtype {series.dtype}, not a number "
                "(fix the values, or declare it under features.categorical)"
            )
            continue
        values = series.to_numpy(dtype="float64", na_value=np.nan)
        yield from _bad_rows(
            f"feature {column!r}", frame.index, ~np.isfinite(values), "missing or infinite"
        )

    for column in (column for column in data.features.categorical if column in frame.columns):
        series = frame[column]
        dtype = series.dtype
        categorical_ok = (
            types.is_integer_dtype(dtype)
            or types.is_bool_dtype(dtype)
            or isinstance(dtype, pd.CategoricalDtype)
            # given the series, pandas checks that an object column really holds strings
            or types.is_string_dtype(series)
        )
        if not categorical_ok:
            yield (
                f"categorical feature {column!r} has dtype {dtype}; expected integers or strings "
                "(cast the column, or declare it under features.numeric)"
            )
        yield from _bad_rows(
            f"feature {column!r}", frame.index, series.isna().to_numpy(), "missing"
        )

    if data.target in frame.columns:
        yield from _target_problems(frame, data)


def _target_problems(frame: pd.DataFrame, data: DataSpec) -> Iterator[str]:
    import numpy as np
    from pandas.api import types

    name = data.target
    series = frame[name]
    missing = series.isna().to_numpy()
    yield from _bad_rows(f"target {name!r}", frame.index, missing, "missing")
    present = series[~missing]
    if data.task == "regression":
        if not types.is_numeric_dtype(series.dtype) or types.is_bool_dtype(series.dtype):
            yield f"target {name!r} has dtype {series.dtype}; a regression target must be numeric"
        else:
            infinite = np.isinf(series.to_numpy(dtype="float64", na_value=np.nan))
            yield from _bad_rows(f"target {name!r}", frame.index, infinite, "infinite")
        return

    if len(present) == 0:
        return
    if data.task == "multiclass" or data.labels is not None:
        yield from _class_problems(present, data)
        return
    classes = sorted(present.unique().tolist(), key=repr)
    binary_values = types.is_bool_dtype(series.dtype) or (
        types.is_numeric_dtype(series.dtype) and set(classes) <= {0, 1}
    )
    if not binary_values:
        found = _named(classes)
        yield f"target {name!r} must hold 0/1 (or booleans) for a binary task; found {found}"
    elif len(classes) == 1:
        yield (
            f"target {name!r} has only one class: all {len(present)} labelled rows are "
            f"{classes[0]!r}; a binary model needs both 0 and 1"
        )


def _class_problems(present: pd.Series, data: DataSpec) -> Iterator[str]:
    """Labels the label map or the classes do not know, and too few classes."""
    from stemma.components.data.labels import label_text

    name = data.target
    text = present.map(label_text)
    if data.labels is not None:
        mapping = {label_text(raw): label_text(value) for raw, value in data.labels.items()}
        unmapped = sorted(set(text) - set(mapping))
        if unmapped:
            yield (
                f"target {name!r} holds labels data.labels does not map: "
                f"{_named(unmapped)} (map each to a class, or drop those rows)"
            )
            return
        text = text.map(mapping)
    if data.classes is not None:
        unknown = sorted(set(text) - {label_text(value) for value in data.classes})
        if unknown:
            yield f"target {name!r} holds labels not in data.classes: {_named(unknown)}"
            return
    distinct = sorted(set(text))
    if len(distinct) < 2:
        yield (
            f"target {name!r} has only one class: all {len(present)} labelled rows are "
            f"{distinct[0]!r}; a classifier needs at least two"
        )
    elif data.task == "binary" and not set(distinct) <= {"0", "1"}:
        yield f"target {name!r}: data.labels must map every label to 0 or 1"


def _named(values: list[Any]) -> str:
    shown = ", ".join(repr(value) for value in values[:MAX_ROWS_NAMED])
    more = f" and {len(values) - MAX_ROWS_NAMED} more" if len(values) > MAX_ROWS_NAMED else ""
    return shown + more


def _bad_rows(what: str, index: pd.Index, mask: Any, kind: str) -> list[str]:
    """One line naming how many rows are bad and the first few of them, or none."""
    count = int(mask.sum())
    if not count:
        return []
    first = ", ".join(str(label) for label in index[mask][:MAX_ROWS_NAMED].tolist())
    more = ", ..." if count > MAX_ROWS_NAMED else ""
    noun = "value" if count == 1 else "values"
    return [f"{what} has {count} {kind} {noun} (rows {first}{more})"]


# ---------------------------------------------------------------------------------------
# Splits


def split_table(
    frame: pd.DataFrame, split: SplitSpec
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split a table into training, validation and test rows, deterministically.

    ``random``: a permutation from ``numpy.random.default_rng(split.seed)``; the first
    ``test_fraction`` of it is the test split, the next ``validation_fraction`` of the
    rest the validation split. ``time``: rows ordered by ``time_column`` (ties keep
    table order); the latest ``test_fraction`` are the test split and the latest
    ``validation_fraction`` of the rest the validation split, so no model sees the
    future of the rows it is judged on. Each split keeps the table's row order and index.

    Args:
        frame: the table (not modified).
        split: the spec's split section.

    Returns:
        ``(train, validation, test)``.

    Raises:
        DataError: the time column is missing or has missing values, or a split would
            be empty.
    """
    import numpy as np

    rows = len(frame)
    n_test = _share(rows, split.test_fraction)
    n_validation = _share(rows - n_test, split.validation_fraction)
    n_train = rows - n_test - n_validation
    empty = [
        name
        for name, size in (("train", n_train), ("validation", n_validation), ("test", n_test))
        if size < 1
    ]
    if empty:
        raise DataError(
            f"cannot split {rows} rows: the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty",
            [
                f"test_fraction {split.test_fraction} and validation_fraction "
                f"{split.validation_fraction} give {n_train} train, {n_validation} validation, "
                f"{n_test} test rows",
                "fix: add rows, or change data.split.test_fraction / validation_fraction",
            ],
        )

    if split.method == "random":
        order = np.random.default_rng(split.seed).permutation(rows)
        test, validation, train = np.split(order, [n_test, n_test + n_validation])
    else:
        order = _time_order(frame, split.time_column)
        train, validation, test = np.split(order, [n_train, n_train + n_validation])
    return tuple(frame.iloc[np.sort(part)] for part in (train, validation, test))  # type: ignore[return-value]


def _share(rows: int, fraction: float) -> int:
    """``fraction`` of ``rows``, rounded half up (numpy and Python round half to even)."""
    return int(rows * fraction + 0.5)


def _time_order(frame: pd.DataFrame, column: str | None) -> Any:
    import numpy as np

    if not column or column not in frame.columns:
        raise DataError(
            f"cannot split by time: the table has no column {column!r}",
            ["fix: set data.split.time_column to a column of the table, or use method: random"],
        )
    values = frame[column]
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"cannot split by time: column {column!r} has missing values",
            _bad_rows(f"time column {column!r}", frame.index, missing, "missing"),
        )
    try:
        return np.argsort(values.to_numpy(), kind="stable")
    except TypeError as error:
        raise DataError(
            f"cannot split by time: the values of column {column!r} cannot be ordered",
            [f"{error}", "fix: store the column as timestamps or numbers"],
        ) from None


def dataset_source(version: DataVersion, root: Path, git_rev: str | None) -> DVCDatasetSource:
    """The MLflow dataset source of a file that :func:`resolve_data_version` verified."""
    from stemma.components.platform.tracking import DVCDatasetSource

    return DVCDatasetSource(
        path=version.relpath,
        dvc_file=str(version.dvc_file.relative_to(root)),
        md5=version.md5,
        file_md5=version.file_md5,
        git_rev=git_rev,
        repo=str(root),
    )
