"""New labelled production rows into the training table, as a new DVC data version.

Continuous training grows the training table with production rows whose labels have
arrived: each batch (a file, or a day folder of the endpoint's prediction log) is joined
with its labels by the id column, rows already in the table (by id) are left out, so
gathering twice adds nothing twice, and the grown table is written atomically and recorded
with ``dvc add``: ``data.dvc`` changes, the previous version stays in DVC's cache and can
be restored by its md5.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stemma.components.data import prediction_log
from stemma.components.data.project import git
from stemma.components.data.tables import DataVersion, dir_md5, file_md5
from stemma.components.errors import DataError
from stemma.components.platform.files import write_file_atomically

#: File types a batch folder may hold.
_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class NewRows:
    """Labelled production rows not yet in the training table.

    Attributes:
        frame: the rows, with the training table's columns in its order.
        sources: per batch file (relative name), the rows it contributes.
        unlabelled: batch rows whose label has not arrived yet.
        already_in_table: labelled rows skipped because their id is in the table.
    """

    frame: pd.DataFrame
    sources: dict[str, int] = field(default_factory=dict)
    unlabelled: int = 0
    already_in_table: int = 0

    @property
    def rows(self) -> int:
        return len(self.frame)


def read_file(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet or CSV file, or a day folder of the prediction log, as a table (only
    ``columns``, when given); a clear error when it cannot be read."""
    if path.is_dir():
        parts = prediction_log.day_parts(path)
        return pd.concat([read_file(part, columns) for part in parts], ignore_index=True)
    try:
        if _SUFFIXES.get(path.suffix) == "csv":
            return pd.read_csv(path, usecols=columns)
        return pd.read_parquet(path, columns=columns)
    except Exception as error:  # a truncated or foreign file, or no such column
        what = f"the id column `{columns[0]}` of " if columns else ""
        raise DataError(f"cannot read {what}{path}: {error}") from error


def read_ids(path: Path, id_column: str) -> pd.Series:
    """Only the id column of a batch (a cheap read to find which batches have labels)."""
    return read_file(path, [id_column])[id_column]


def batch_files(path: Path) -> list[Path]:
    """The batches of a file or folder, in name order (days sort by name): the files of a
    folder, or the day folders of the prediction log's ``predictions`` folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"batch folder {path} does not exist")
    if prediction_log.is_log_folder(path):
        return [day for day in prediction_log.day_folders(path) if prediction_log.day_parts(day)]
    return sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())


def align_ids(ids: pd.Series, dtype: object, *, where: str) -> pd.Series:
    """Ids in the training table's type: the prediction log holds ids as text, where a
    table's ids are often whole numbers.

    Raises:
        DataError: a text id is not a whole number where the table's ids are.
    """
    if not pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_numeric_dtype(ids.dtype):
        return ids
    numbers = pd.to_numeric(ids, errors="coerce")
    wrong = ids[ids.notna() & (numbers.isna() | (numbers != numbers.round()))]
    if not wrong.empty:
        shown = ", ".join(str(value) for value in wrong.unique()[:5])
        raise DataError(
            f"{where}: {wrong.nunique()} ids are not whole numbers, as the training table's are",
            [f"e.g. {shown}"],
        )
    return numbers.astype(dtype) if numbers.notna().all() else numbers


def gather_new_rows(
    table: pd.DataFrame,
    batches: list[Path],
    labels: pd.DataFrame,
    *,
    id_column: str,
    target: str,
    fillable: Collection[str] = (),
) -> NewRows:
    """Join batches with their labels and keep the rows the table does not have.

    Labels are matched by id, so a label file need not mirror
    a batch file's name; a batch row without a label is counted, not used. A day of the
    prediction log gives one row per id, the one scored last, with its text ids read as
    the table's ids.

    Args:
        table: the current training table.
        batches: batch files (Parquet or CSV), or day folders of the prediction log.
        labels: the ``id, target`` table of :func:`~stemma.components.data.labels.read_labels`.
        id_column: the entity id (``data.id``).
        target: the label column (``data.target``).
        fillable: columns of the table a batch may lack (the prediction log holds only the
            model's inputs and the id): they are added as missing values.

    Raises:
        DataError: a batch lacks a column of the training table (or a fillable one whose
            type cannot be missing); a label is not one of the values the table's binary
            target takes; ids are text that are not whole numbers where the table's are.
    """
    known = set(pd.unique(table[target].dropna()))
    if known and known <= {0, 1}:
        strange = set(pd.unique(labels[target].dropna())) - known
        if strange:
            raise DataError(
                f"labels take values the training table never has: {sorted(strange)[:5]}",
                [f"`{target}` in the training table is one of {sorted(known)}"],
            )
    id_type = table[id_column].dtype
    labels = labels.assign(**{id_column: align_ids(labels[id_column], id_type, where="labels")})
    in_table = set(table[id_column].tolist())
    pieces, sources = [], {}
    unlabelled = already = 0
    for path in batches:
        batch = _read_batch(path, table, id_column=id_column, target=target, fillable=fillable)
        joined = batch.drop(columns=[target], errors="ignore").merge(
            labels, on=id_column, how="left"
        )
        has_label = joined[target].notna()
        unlabelled += int((~has_label).sum())
        fresh = has_label & ~joined[id_column].isin(in_table)
        already += int((has_label & ~fresh).sum())
        rows = joined.loc[fresh, list(table.columns)]
        if len(rows):
            rows = rows.astype(table.dtypes.to_dict())
            pieces.append(rows)
            sources[path.name] = len(rows)
            in_table.update(rows[id_column].tolist())
    frame = (
        pd.concat(pieces, ignore_index=True) if pieces else table.iloc[0:0].copy()
    ).reset_index(drop=True)
    return NewRows(frame=frame, sources=sources, unlabelled=unlabelled, already_in_table=already)


def _read_batch(
    path: Path, table: pd.DataFrame, *, id_column: str, target: str, fillable: Collection[str]
) -> pd.DataFrame:
    """A batch holding the training table's columns, its ids of the table's type; a log's
    rows once per id (the latest scoring)."""
    batch = read_file(path)
    if prediction_log.TIME_COLUMN in batch.columns and id_column in batch.columns:
        batch = batch.sort_values(prediction_log.TIME_COLUMN, kind="stable")
        batch = batch.drop_duplicates(id_column, keep="last").sort_index()
    if id_column in batch.columns:
        ids = align_ids(batch[id_column], table[id_column].dtype, where=f"batch {path}")
        batch = batch.assign(**{id_column: ids})
    absent = [c for c in table.columns if c != target and c not in batch.columns]
    missing = [c for c in absent if c not in fillable]
    if missing:
        raise DataError(f"batch {path} lacks column(s) of the training table: {', '.join(missing)}")
    for column in absent:
        if not _can_be_missing(table[column].dtype):
            raise DataError(
                f"batch {path} lacks the column {column} of the training table, whose "
                f"{table[column].dtype} values cannot be missing",
                ["log or add the column, or keep it out of the training table"],
            )
    filled = {
        column: pd.Series(None, index=batch.index, dtype=table[column].dtype) for column in absent
    }
    return batch.assign(**filled)


def _can_be_missing(dtype: object) -> bool:
    """Whether a column of this type holds missing values (numpy integers and booleans do not)."""
    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        return True
    return not (pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))


def append_rows(table_path: Path, table: pd.DataFrame, new: pd.DataFrame) -> Path:
    """Write ``table + new`` over ``table_path`` atomically (temp file, fsync, rename)."""
    grown = pd.concat([table, new], ignore_index=True)
    if table_path.suffix == ".csv":
        return write_file_atomically(table_path, lambda path: grown.to_csv(path, index=False))
    return write_file_atomically(table_path, lambda path: grown.to_parquet(path, index=False))


def record_new_version(root: Path, version: DataVersion) -> str:
    """``dvc add`` the tracked output again; returns the new md5 in ``data.dvc``.

    DVC keeps the previous version's files in its cache, so the old md5 stays
    restorable (``dvc checkout`` at the old pointer, or ``stemma reproduce``).
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(version.out_path))
    if version.out_path.is_dir():
        return dir_md5(version.out_path)[0]
    return file_md5(version.out_path)


def commit_pointer(root: Path, pointer: Path, message: str) -> str | None:
    """Commit only the DVC pointer (and its .gitignore) in git; returns the new revision.

    Nothing happens outside a git work tree. Other changes in the work tree are left
    alone: only the pointer is committed.
    """
    if git(root, "rev-parse", "--is-inside-work-tree").returncode != 0:
        return None
    paths = [str(pointer.relative_to(root))]
    ignore = pointer.parent / ".gitignore"
    if ignore.exists():
        paths.append(str(ignore.relative_to(root)))
    git(root, "add", "--", *paths)
    identity = []
    if not git(root, "config", "user.email").stdout.strip():  # a fresh machine: no git identity
        identity = ["-c", "user.name=Stemma", "-c", "user.email=stemma@localhost"]
    result = git(root, *identity, "commit", "-q", "-m", message, "--", *paths)
    if result.returncode != 0 and "nothing to commit" not in result.stdout + result.stderr:
        raise DataError(
            f"recorded the new data version but could not commit {paths[0]} in git",
            [line for line in (result.stderr or result.stdout).splitlines()[:5]],
        )
    return git(root, "rev-parse", "HEAD").stdout.strip() or None
