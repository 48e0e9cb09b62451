"""Preprocessing: turn a table into the float32 matrix a network reads, and back.

A :class:`Preprocessor` is fitted on the training split only (so no statistic of the
validation or test rows leaks into training), is immutable, and round-trips through JSON,
which is how it travels next to the weights in the model registry. Numeric columns are
standardised; categorical columns are one-hot encoded with the training vocabulary, and a
value the training split never showed encodes as an all-zero block rather than an error,
because production data meets new categories long before anyone retrains.

This module needs only numpy and pandas, so serving and checks can use it without torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stemma.components.errors import DataError
from stemma.components.spec import FeaturesSpec

#: Tasks a preprocessor knows how to encode targets for.
TASKS = ("binary", "regression")

#: A category value as stored in JSON: integer codes stay integers, everything else is text.
Category = int | str

#: How many offending columns an error message lists before it summarises the rest.
_MAX_LISTED = 10


@dataclass(frozen=True)
class Preprocessor:
    """Fitted feature encoding: standardised numeric columns, then one-hot categorical ones.

    Attributes:
        numeric: numeric feature columns, in input order.
        means: training mean of each numeric column.
        stds: training standard deviation of each numeric column (1.0 where it was 0).
        categorical: categorical feature columns, in input order.
        vocabularies: for each categorical column, its sorted training values (all ``int``
            or all ``str``).
        task: ``binary`` or ``regression``.
        target_mean: training mean of the target (regression only).
        target_std: training standard deviation of the target (regression only).
    """

    numeric: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    categorical: tuple[str, ...]
    vocabularies: tuple[tuple[Category, ...], ...]
    task: str
    target_mean: float | None = None
    target_std: float | None = None

    def __post_init__(self) -> None:
        _check_consistent(self)

    # -- shape ------------------------------------------------------------------------

    @property
    def n_inputs(self) -> int:
        """Width of the matrix :meth:`transform` returns."""
        return len(self.numeric) + sum(len(vocabulary) for vocabulary in self.vocabularies)

    @property
    def feature_names(self) -> list[str]:
        """One name per input column: ``salary`` for numeric, ``elevel=3`` for one-hot."""
        names = list(self.numeric)
        for column, vocabulary in zip(self.categorical, self.vocabularies, strict=True):
            names.extend(f"{column}={value}" for value in vocabulary)
        return names

    # -- encoding ---------------------------------------------------------------------

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode a table as the network's float32 input matrix.

        Columns other than the features are ignored. Unknown or missing categories encode
        as an all-zero block.

        Args:
            frame: a table holding every feature column.

        Returns:
            A ``(len(frame), n_inputs)`` float32 array.

        Raises:
            DataError: a feature column is missing, or a numeric column holds missing,
                infinite or non-numeric values.
        """
        _require_columns(frame, [*self.numeric, *self.categorical], "feature")
        out = np.empty((len(frame), self.n_inputs), dtype=np.float32)
        if self.numeric:
            values = _numeric_matrix(frame, self.numeric)
            means = np.asarray(self.means, dtype=np.float64)
            stds = np.asarray(self.stds, dtype=np.float64)
            out[:, : len(self.numeric)] = (values - means) / stds
        offset = len(self.numeric)
        rows = np.arange(len(frame))
        for column, vocabulary in zip(self.categorical, self.vocabularies, strict=True):
            width = len(vocabulary)
            block = out[:, offset : offset + width]
            block[...] = 0.0
            codes = _category_codes(frame[column], vocabulary)
            known = codes >= 0
            block[rows[known], codes[known]] = 1.0
            offset += width
        return out

    def encode_target(self, frame: pd.DataFrame, target: str) -> np.ndarray:
        """The training target as float32: 0/1 for binary, standardised for regression.

        Raises:
            DataError: the column is missing, holds missing or non-finite values, or (binary)
                holds values other than 0 and 1.
        """
        _require_columns(frame, [target], "target")
        if self.task == "binary":
            return _binary_labels(frame[target], target).astype(np.float32)
        values = _finite_target(frame[target], target)
        assert self.target_mean is not None and self.target_std is not None
        return ((values - self.target_mean) / self.target_std).astype(np.float32)

    def decode_output(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Turn raw network outputs into predictions in the target's units.

        Args:
            raw: network outputs, shape ``(n,)`` or ``(n, 1)``.
            out: a contiguous float64 array of shape ``(n,)`` to write the predictions into
                (the scoring engine fills a chunk's scores batch by batch); None allocates.

        Returns:
            A 1-D float64 array (``out`` when given): the probability of class 1 (binary) or
            the predicted value (regression).
        """
        values = np.asarray(raw, dtype=np.float64)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise ValueError(f"expected raw outputs of shape (n,) or (n, 1), got {values.shape}")
        if out is None:
            out = np.empty(values.shape, dtype=np.float64)
        elif out.shape != values.shape or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError(f"out must be contiguous float64 of shape {values.shape}")
        if self.task == "binary":
            # torch's logistic in float64 is within 2 ulp of SciPy's expit, neither
            # overflows nor rounds large negative logits to 0 (down to about -709), and runs
            # 4x faster per 8,192-row batch (8 against 33 us: a few ms per 1M scored rows).
            import torch

            if not values.flags.writeable:  # torch warns about read-only arrays
                values = values.copy()
            torch.sigmoid(torch.from_numpy(values), out=torch.from_numpy(out))
            return out
        assert self.target_mean is not None and self.target_std is not None
        np.multiply(values, self.target_std, out=out)
        np.add(out, self.target_mean, out=out)
        return out

    # -- persistence ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor as a JSON-safe mapping (lists, floats, ints, strings)."""
        return {
            "numeric": list(self.numeric),
            "means": list(self.means),
            "stds": list(self.stds),
            "categorical": list(self.categorical),
            "vocabularies": [list(vocabulary) for vocabulary in self.vocabularies],
            "task": self.task,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessor:
        """Rebuild a preprocessor from :meth:`to_dict` output.

        Raises:
            ValueError: a key is missing or unknown, or a value has the wrong type or shape.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a preprocessor must be a mapping, got {type(data).__name__}")
        expected = {field.name for field in fields(cls)}
        missing = sorted(expected - set(data))
        unknown = sorted(set(data) - expected)
        if missing or unknown:
            parts = [f"missing keys {missing}"] if missing else []
            parts += [f"unknown keys {unknown}"] if unknown else []
            raise ValueError(f"malformed preprocessor: {'; '.join(parts)}")
        for key in ("numeric", "means", "stds", "categorical", "vocabularies"):
            if not isinstance(data[key], list | tuple):
                raise ValueError(f"malformed preprocessor: {key} must be a list")
        if not all(isinstance(item, list | tuple) for item in data["vocabularies"]):
            raise ValueError("malformed preprocessor: vocabularies must be a list of lists")
        return cls(
            numeric=tuple(data["numeric"]),
            means=tuple(data["means"]),
            stds=tuple(data["stds"]),
            categorical=tuple(data["categorical"]),
            vocabularies=tuple(tuple(item) for item in data["vocabularies"]),
            task=data["task"],
            target_mean=data["target_mean"],
            target_std=data["target_std"],
        )

    def save_json(self, path: str | Path) -> Path:
        """Write the preprocessor as JSON, atomically (a reader never sees half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, target)
        return target

    @classmethod
    def load_json(cls, path: str | Path) -> Preprocessor:
        """Read a preprocessor written by :meth:`save_json`.

        Raises:
            ValueError: the file is not valid JSON or not a preprocessor.
        """
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def fit_preprocessor(
    frame: pd.DataFrame,
    features: FeaturesSpec,
    *,
    task: str,
    target: str | None = None,
) -> Preprocessor:
    """Fit the feature (and, for regression, target) encoding on the training split.

    Args:
        frame: the training rows only.
        features: which columns are numeric and which categorical.
        task: ``binary`` or ``regression``.
        target: the label column; required for regression (its mean and spread are fitted).

    Returns:
        The fitted, immutable preprocessor.

    Raises:
        DataError: the frame is empty, a column is missing, a numeric column holds
            missing, infinite or non-numeric values, or a categorical column has no values.
        ValueError: an unknown task, or a regression without a target column.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "regression" and target is None:
        raise ValueError("a regression preprocessor needs the target column to fit its scale")
    if len(frame) == 0:
        raise DataError("the training split has no rows to fit the preprocessing on")
    _require_columns(frame, features.all, "feature")

    means: tuple[float, ...] = ()
    stds: tuple[float, ...] = ()
    if features.numeric:
        values = _numeric_matrix(frame, features.numeric)
        means = tuple(float(mean) for mean in values.mean(axis=0))
        # A constant column carries no signal; scaling it by 1 keeps it at 0 rather than
        # dividing by zero.
        stds = tuple(float(std) if std > 0 else 1.0 for std in values.std(axis=0))

    vocabularies = [_fit_vocabulary(frame[column]) for column in features.categorical]
    empty = [c for c, v in zip(features.categorical, vocabularies, strict=True) if not v]
    if empty:
        raise DataError(
            f"categorical feature columns with no values in the training split: {', '.join(empty)}",
            ["drop them from data.features.categorical or fix the data"],
        )

    target_mean = target_std = None
    if task == "regression":
        assert target is not None
        _require_columns(frame, [target], "target")
        values = _finite_target(frame[target], target)
        target_mean = float(values.mean())
        spread = float(values.std())
        target_std = spread if spread > 0 else 1.0
    return Preprocessor(
        numeric=tuple(features.numeric),
        means=means,
        stds=stds,
        categorical=tuple(features.categorical),
        vocabularies=tuple(vocabularies),
        task=task,
        target_mean=target_mean,
        target_std=target_std,
    )


# ---------------------------------------------------------------------------------------
# Helpers


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], role: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        raise DataError(
            f"the data lacks {len(missing)} {role} {noun}: {_listing(missing)}",
            [f"columns present: {_listing([str(c) for c in frame.columns])}"],
        )


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown} and {len(items) - _MAX_LISTED} more"


def _numeric_matrix(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """The columns as a float64 matrix; DataError naming every column with bad values."""
    matrix = np.empty((len(frame), len(columns)), dtype=np.float64)
    for index, column in enumerate(columns):
        series = frame[column]
        if not pd.api.types.is_numeric_dtype(series):
            # Columns from JSON records arrive as object dtype; anything not a number
            # becomes NaN here and is reported below with the missing values.
            series = pd.to_numeric(series.astype(object), errors="coerce")
        matrix[:, index] = series.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(matrix)
    if bad.any():
        counts = bad.sum(axis=0)
        offenders = [
            f"{column} ({count} {'row' if count == 1 else 'rows'})"
            for column, count in zip(columns, counts, strict=True)
            if count
        ]
        raise DataError(
            f"numeric feature columns hold missing, infinite or non-numeric values: {_listing(offenders)}",
            ["impute or drop those rows, or add a not-null check to the spec's checks"],
        )
    return matrix


def _fit_vocabulary(series: pd.Series) -> tuple[Category, ...]:
    """The sorted distinct values: integers when the column holds whole numbers, else text."""
    present = series.dropna()
    if pd.api.types.is_bool_dtype(present) or pd.api.types.is_integer_dtype(present):
        return tuple(sorted({int(value) for value in pd.unique(present)}))
    if pd.api.types.is_float_dtype(present):
        distinct = pd.unique(present)
        if np.all(np.isfinite(distinct)) and np.all(distinct == np.round(distinct)):
            return tuple(sorted({int(value) for value in distinct}))
    return tuple(sorted({str(value) for value in pd.unique(present.astype(str))}))


def _category_codes(series: pd.Series, vocabulary: tuple[Category, ...]) -> np.ndarray:
    """Index of each value in the vocabulary, -1 for unknown or missing values."""
    if vocabulary and isinstance(vocabulary[0], int):
        if pd.api.types.is_bool_dtype(series):
            series = series.astype(np.int64)
        elif not pd.api.types.is_numeric_dtype(series):
            series = pd.to_numeric(series.astype(object), errors="coerce")
        index = pd.Index(vocabulary, dtype=np.int64)
    else:
        series = series.astype(str)
        index = pd.Index(vocabulary, dtype=object)
    return np.asarray(index.get_indexer(series), dtype=np.int64)


def _binary_labels(series: pd.Series, column: str) -> np.ndarray:
    if series.isna().any():
        raise DataError(f"target column {column!r} has {int(series.isna().sum())} missing values")
    if pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=np.float64)
    numbers = pd.to_numeric(series.astype(object), errors="coerce")
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        examples = sorted({str(value) for value in series[bad].head(50)})[:5]
        raise DataError(
            f"target column {column!r} of a binary task must hold 0 and 1; "
            f"{int(bad.sum())} rows hold other values (e.g. {', '.join(examples)})",
            ["encode the positive class as 1 and the negative class as 0"],
        )
    return values


def _finite_target(series: pd.Series, column: str) -> np.ndarray:
    numbers = pd.to_numeric(series.astype(object), errors="coerce")
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(
            f"target column {column!r} has {int(bad.sum())} missing, infinite or non-numeric values"
        )
    return values


def _check_consistent(pre: Preprocessor) -> None:
    """Raise ValueError unless the fields describe a usable preprocessor."""
    if pre.task not in TASKS:
        raise ValueError(f"malformed preprocessor: task must be one of {TASKS}, got {pre.task!r}")
    names = [*pre.numeric, *pre.categorical]
    if not all(isinstance(name, str) for name in names):
        raise ValueError("malformed preprocessor: column names must be strings")
    if len(set(names)) != len(names):
        raise ValueError("malformed preprocessor: a column is listed more than once")
    if not len(pre.means) == len(pre.stds) == len(pre.numeric):
        raise ValueError("malformed preprocessor: numeric, means and stds differ in length")
    for name, values in (("means", pre.means), ("stds", pre.stds)):
        if not all(_is_finite_number(value) for value in values):
            raise ValueError(f"malformed preprocessor: {name} must be finite numbers")
    if not all(std > 0 for std in pre.stds):
        raise ValueError("malformed preprocessor: stds must be positive")
    if len(pre.vocabularies) != len(pre.categorical):
        raise ValueError("malformed preprocessor: categorical and vocabularies differ in length")
    for column, vocabulary in zip(pre.categorical, pre.vocabularies, strict=True):
        kinds = {_category_kind(value) for value in vocabulary}
        if not vocabulary or None in kinds or len(kinds) > 1:
            raise ValueError(
                f"malformed preprocessor: vocabulary of {column!r} must be a non-empty list "
                "of all integers or all strings"
            )
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"malformed preprocessor: vocabulary of {column!r} repeats a value")
    if pre.task == "regression":
        if not (_is_finite_number(pre.target_mean) and _is_finite_number(pre.target_std)):
            raise ValueError(
                "malformed preprocessor: regression needs finite target_mean and target_std"
            )
        assert pre.target_std is not None
        if pre.target_std <= 0:
            raise ValueError("malformed preprocessor: target_std must be positive")
    elif pre.target_mean is not None or pre.target_std is not None:
        raise ValueError(
            "malformed preprocessor: target_mean and target_std are for regression only"
        )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _category_kind(value: object) -> type | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int
    if isinstance(value, str):
        return str
    return None
