"""A starting spec inferred from a table: which column is what, the task, and data checks.

`stemma init` reads the user's table once (:func:`read_table`), settles the target and id
columns (:func:`choose_columns`: from the flags, or asked on a terminal) and infers the
rest (:func:`infer_spec`). Nothing here writes a file: every refusal happens before the
project folder is touched.

The rules, chosen so that the spec validates and trains as written:

- float columns are numeric features; integer columns with at most
  :data:`MAX_INTEGER_CATEGORIES` distinct values are categorical (codes such as a level
  or a region, where an order would be invented), with more they are numeric. A count
  with few values (children: 0-4) thus reads as categorical: its comment says to move it;
- text columns with at most :data:`MAX_CATEGORIES` distinct values and boolean columns
  are categorical;
- left out, each with its reason in the spec: columns with missing or infinite values
  (training refuses them), a single value (they carry nothing), one distinct integer or
  text per row (row numbers, identifiers, free text), dates and other types;
- the target: booleans and 0/1 numbers are ``binary``; any other two values are
  ``binary`` with ``data.labels`` mapping the later value in sorted order to 1; integers
  with up to :data:`MAX_INTEGER_CLASSES` values and text with up to :data:`MAX_CLASSES`
  are ``multiclass`` (``data.classes``, sorted); other numbers are ``regression``;
- checks: not-null on every column used, ranges with a margin of :data:`RANGE_MARGIN` of
  the span on numeric columns, value sets on categorical ones and the target, uniqueness
  of the id.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import DataError, SpecError

if TYPE_CHECKING:
    import pandas as pd

#: Integer columns with at most this many distinct values are categorical features.
MAX_INTEGER_CATEGORIES = 10
#: Text columns with more distinct values than this are left out (free text, identifiers).
MAX_CATEGORIES = 50
#: An integer target with at most this many values is multiclass; with more, regression.
MAX_INTEGER_CLASSES = 10
#: A text target with more values than this is refused: it names things, not classes.
MAX_CLASSES = 100
#: Fewer rows cannot be split into training, validation and test rows worth the name.
MIN_ROWS = 30
#: The margin of a suggested range, as a share of the column's span.
RANGE_MARGIN = 0.1
#: Significant digits of a suggested range's bounds, relative to its width.
RANGE_DIGITS = 3
#: Column names that say "I am the label" (compared in lower case).
TARGET_NAMES = ("target", "label", "labels", "class", "y", "outcome", "response")
#: Column names that say "I am an entity id": `id`, `customer_id`, `order-id`, `userId`.
ID_NAME = re.compile(r"^(?:id|.*[_\-\s.][iI][dD]|.*[a-z]Id)$", re.IGNORECASE)
#: Names a column listing shows before it says how many more there are.
MAX_NAMES_SHOWN = 20
#: Answers a terminal user may get wrong before `stemma init` gives up.
MAX_ASKS = 3
#: What a terminal user answers for "no id column".
NO_ID_ANSWER = "-"

#: ``ask(question, default) -> answer``: how a terminal user is asked for a column.
Ask = Callable[[str, str | None], str]


@dataclass(frozen=True)
class InferredSpec:
    """What :func:`infer_spec` found in a table, ready to be written as a spec.

    Attributes:
        name: the pipeline's name.
        data_path: the table's path in the project, relative to its root.
        rows: rows of the table.
        columns: its column count.
        target: the label column; ``task`` what predicting it is.
        labels: raw label -> class (binary targets whose values are not 0/1).
        classes: the classes in output order (multiclass).
        id_column: the entity id column, or None.
        numeric: numeric features; ``categorical`` categorical ones.
        integer_codes: the integer columns read as categorical, with their distinct counts.
        left_out: ``(column, reason)`` for every column that is none of the above.
        checks: the suggested expectations, ``{type: kwargs}`` each.
        notes: how the target and id were chosen, for the user.
    """

    name: str
    data_path: str
    rows: int
    columns: int
    target: str
    task: str
    labels: dict[Any, int] | None
    classes: list[Any] | None
    id_column: str | None
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    integer_codes: dict[str, int]
    left_out: tuple[tuple[str, str], ...]
    checks: tuple[dict[str, dict[str, Any]], ...]
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# Reading the table


def read_table(path: Path) -> pd.DataFrame:
    """Read the CSV or Parquet table a project starts from, refusing what cannot start one.

    Raises:
        DataError: the file is missing, empty, of an unknown format, unreadable, has no
            header row (its first row holds values) or no rows.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", ["fix: give a table with a header row"])
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}",
            ["fix: give a .csv or .parquet file (rename it if it is one)"],
        )
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{path}: the file is empty", ["fix: give a table with a header row"]
        ) from None
    except Exception as error:  # the parsers raise many kinds; all mean "unreadable"
        first = (str(error).strip().splitlines() or [""])[0]
        raise DataError(
            f"{path}: cannot read the file as {'CSV' if suffix == '.csv' else 'Parquet'}",
            [f"{type(error).__name__}: {first}"],
        ) from None
    if problem := header_problem([str(column) for column in frame.columns]):
        raise DataError(
            f"{path}: {problem}", ["fix: add a first line that names the columns, e.g. a,b,c"]
        )
    if len(frame) == 0:
        raise DataError(f"{path}: the table has a header but no rows")
    return frame


def header_problem(names: Sequence[str]) -> str | None:
    """Why ``names`` are not a header row (every name a number or empty), or None."""

    def looks_like_a_value(name: str) -> bool:
        if name.startswith("Unnamed: "):  # pandas' name for an empty header cell
            return True
        try:
            float(name)
        except ValueError:
            return False
        return True

    if names and all(looks_like_a_value(name) for name in names):
        return (
            f"no header row: the first row holds values ({shown(names, limit=5)}), not column names"
        )
    return None


def shown(names: Sequence[Any], *, limit: int = MAX_NAMES_SHOWN) -> str:
    """``a, b, c`` (and how many more past ``limit``)."""
    text = ", ".join(str(name) for name in names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------
# Target and id


def guess_id(frame: pd.DataFrame) -> str | None:
    """The first column named like an id whose values are present, unique integers or text."""
    from pandas.api import types

    for column in frame.columns:
        series = frame[column]
        if (
            ID_NAME.match(str(column))
            and (types.is_integer_dtype(series.dtype) or types.is_string_dtype(series))
            and not series.isna().any()
            and series.is_unique
        ):
            return str(column)
    return None


def choose_columns(
    frame: pd.DataFrame,
    *,
    target: str | None,
    id_column: str | None,
    ask: Ask | None,
    source: str,
) -> tuple[str, str | None, list[str]]:
    """The target and id columns, from the flags, a terminal user's answers or a guess.

    The id, when not given, is the column named like one whose values are unique; with
    ``ask`` the user confirms or changes it (:data:`NO_ID_ANSWER` for none). The target,
    when not given, is asked for (a column named like a label is offered); without
    ``ask`` it is an error listing the columns.

    Args:
        frame: the table.
        target, id_column: the flags (None when not given).
        ask: asks a terminal user (None when nobody can answer).
        source: the table's name, for messages.

    Returns:
        ``(target, id column or None, notes saying what was guessed)``.

    Raises:
        SpecError: a flag names no column, the id and target are one column, or no
            target was given and nobody can be asked.
    """
    columns = [str(column) for column in frame.columns]
    notes: list[str] = []
    if id_column is not None:
        _require_column(id_column, columns, "--id", source)
    else:
        guess = guess_id(frame)
        if ask is not None:
            question = (
                f"Id column of {source} (unique per row, never a feature; "
                f"{NO_ID_ANSWER!r} for none)"
            )
            id_column = _ask_column(ask, question, guess or NO_ID_ANSWER, columns, none_ok=True)
        elif guess is not None:
            id_column = guess
            notes.append(f"id: {guess} (named like an id, unique values; --id to choose another)")
    if target is None:
        candidates = [column for column in columns if column != id_column]
        guess = next((c for c in candidates if c.lower() in TARGET_NAMES), None)
        if ask is None:
            raise SpecError(
                f"{source}: which column is the target? Name it with --target",
                [
                    f"columns: {shown(candidates)}",
                    *([f"named like a label: {guess}"] if guess else []),
                    f"fix: stemma init {source} --target {guess or candidates[-1]}",
                ],
            )
        question = f"Target column of {source} (the label to predict; columns: {shown(candidates)})"
        target = _ask_column(ask, question, guess or candidates[-1], candidates, none_ok=False)
    else:
        _require_column(target, columns, "--target", source)
    if target == id_column:
        raise SpecError(f"{source}: {target!r} cannot be both the target and the id column")
    assert target is not None
    return target, id_column, notes


def _require_column(name: str, columns: list[str], flag: str, source: str) -> None:
    if name not in columns:
        close = difflib.get_close_matches(name, columns, n=1)
        raise SpecError(
            f"{flag} {name!r} is not a column of {source}",
            [
                *([f"did you mean {close[0]!r}?"] if close else []),
                f"columns: {shown(columns)}",
            ],
        )


def _ask_column(
    ask: Ask, question: str, default: str, columns: list[str], *, none_ok: bool
) -> str | None:
    prompt = question
    for _ in range(MAX_ASKS):
        answer = (ask(prompt, default) or default).strip()
        if none_ok and answer == NO_ID_ANSWER:
            return None
        if answer in columns:
            return answer
        close = difflib.get_close_matches(answer, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        prompt = f"{answer!r} is not a column{hint}. {question}"
    raise SpecError(f"no column chosen after {MAX_ASKS} answers", [f"columns: {shown(columns)}"])


# ---------------------------------------------------------------------------------------
# The spec


def infer_spec(
    frame: pd.DataFrame,
    *,
    name: str,
    data_path: str,
    target: str,
    id_column: str | None,
    notes: Sequence[str] = (),
) -> InferredSpec:
    """Infer the task, the features and the checks of a table whose target is chosen.

    Raises:
        DataError: too few rows, a target with missing values, one value or too many
            classes, or no column usable as a feature; naming the column and the fix.
    """
    if len(frame) < MIN_ROWS:
        raise DataError(
            f"{data_path}: {len(frame)} rows; a model needs at least {MIN_ROWS} to split into "
            "training, validation and test rows"
        )
    task, labels, classes = infer_task(frame[target], target)
    numeric: list[str] = []
    categorical: list[str] = []
    codes: dict[str, int] = {}
    left_out: list[tuple[str, str]] = []
    for column in frame.columns:
        if column in (target, id_column):
            continue
        kind, reason = feature_kind(frame[column])
        if kind == "numeric":
            numeric.append(str(column))
        elif kind == "categorical":
            categorical.append(str(column))
            if reason:
                codes[str(column)] = frame[column].nunique()
        else:
            left_out.append((str(column), reason))
    if not numeric and not categorical:
        raise DataError(
            f"{data_path}: no column can be a feature",
            [f"{column}: {reason}" for column, reason in left_out[:MAX_NAMES_SHOWN]]
            or ["the table holds only the target and id columns"],
        )
    return InferredSpec(
        name=name,
        data_path=data_path,
        rows=len(frame),
        columns=len(frame.columns),
        target=target,
        task=task,
        labels=labels,
        classes=classes,
        id_column=id_column,
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        integer_codes=codes,
        left_out=tuple(left_out),
        checks=tuple(suggest_checks(frame, target, task, id_column, numeric, categorical)),
        notes=tuple(notes),
    )


def infer_task(series: pd.Series, name: str) -> tuple[str, dict[Any, int] | None, list[Any] | None]:
    """``(task, labels, classes)`` of a target column (see the module's rules).

    Raises:
        DataError: missing values, a single value, values of mixed types, or more text
            classes than :data:`MAX_CLASSES`.
    """
    from pandas.api import types

    missing = int(series.isna().sum())
    if missing:
        raise DataError(
            f"target {name!r} has {missing} missing value(s)",
            ["fix: drop the unlabelled rows (or fill them), then run stemma init again"],
        )
    values = sorted((plain(value) for value in series.unique()), key=_order)
    if len(values) < 2:
        raise DataError(
            f"target {name!r} has a single value ({values[0]!r} in all {len(series)} rows): "
            "there is nothing to predict",
            ["fix: choose another --target, or add rows of the other classes"],
        )
    if types.is_bool_dtype(series.dtype):
        return "binary", None, None
    if types.is_numeric_dtype(series.dtype):
        if not all(float(value).is_integer() for value in values):
            return "regression", None, None
        values = [int(value) for value in values]
        if len(values) == 2:
            return ("binary", None, None) if values == [0, 1] else _binary_labels(values)
        if len(values) <= MAX_INTEGER_CLASSES:
            return "multiclass", None, values
        return "regression", None, None
    if not types.is_string_dtype(series):
        raise DataError(
            f"target {name!r} has dtype {series.dtype} with values of several types",
            ["fix: make the column hold numbers or text only"],
        )
    if len(values) == 2:
        return _binary_labels(values)
    if len(values) > MAX_CLASSES:
        raise DataError(
            f"target {name!r} has {len(values)} distinct values, more than {MAX_CLASSES} "
            "classes: it names things rather than classes",
            ["fix: choose another --target"],
        )
    return "multiclass", None, values


def _binary_labels(values: list[Any]) -> tuple[str, dict[Any, int], None]:
    """Two raw values mapped to 0 and 1 in sorted order: the later one is the positive class."""
    return "binary", {values[0]: 0, values[1]: 1}, None


def feature_kind(series: pd.Series) -> tuple[str | None, str]:
    """``("numeric" | "categorical", note)`` of a feature column, or ``(None, why it is
    left out)``; the note is non-empty for an integer column read as categorical."""
    import numpy as np
    import pandas as pd
    from pandas.api import types

    dtype = series.dtype
    missing = int(series.isna().sum())
    if missing:
        return None, f"{missing} missing value(s): fill them, then add the column"
    distinct = series.nunique()
    if distinct < 2:
        return None, "a single value"
    if types.is_bool_dtype(dtype):
        return "categorical", ""
    if types.is_integer_dtype(dtype):
        if distinct <= MAX_INTEGER_CATEGORIES:
            return "categorical", f"integer with {distinct} values"
        if distinct == len(series):
            return None, "a different integer in every row (a row number or an id?)"
        return "numeric", ""
    if types.is_float_dtype(dtype):
        if not np.isfinite(series.to_numpy(dtype="float64")).all():
            return None, "infinite values: replace them, then add the column"
        return "numeric", ""
    if types.is_datetime64_any_dtype(dtype):
        return None, "a date or time (usable as data.split.time_column)"
    if types.is_string_dtype(series) or isinstance(dtype, pd.CategoricalDtype):
        if distinct > MAX_CATEGORIES:
            return None, f"{distinct} distinct values: free text or an identifier"
        return "categorical", ""
    return None, f"dtype {dtype} is neither a number nor text"


# ---------------------------------------------------------------------------------------
# Checks


def suggest_checks(
    frame: pd.DataFrame,
    target: str,
    task: str,
    id_column: str | None,
    numeric: Sequence[str],
    categorical: Sequence[str],
) -> list[dict[str, dict[str, Any]]]:
    """Expectations the table passes as it is: see the module's rules."""
    checks: list[dict[str, dict[str, Any]]] = []
    used = [c for c in frame.columns if c in (id_column, target, *numeric, *categorical)]
    for column in used:
        series = frame[column]
        if not series.isna().any():
            checks.append({"expect_column_values_to_not_be_null": {"column": column}})
        if column in numeric or (column == target and task == "regression"):
            low, high = padded_range(series)
            between = {"column": column, "min_value": low, "max_value": high}
            checks.append({"expect_column_values_to_be_between": between})
        elif column in categorical or column == target:
            values = sorted({plain(value) for value in series.dropna().unique()}, key=_order)
            checks.append(
                {"expect_column_values_to_be_in_set": {"column": column, "value_set": values}}
            )
        elif column == id_column and series.is_unique:
            checks.append({"expect_column_values_to_be_unique": {"column": column}})
    return checks


def padded_range(series: pd.Series) -> tuple[int | float, int | float]:
    """Bounds around a numeric column's values with a :data:`RANGE_MARGIN` margin, rounded
    outwards to :data:`RANGE_DIGITS` significant digits of the width; a column that is never
    negative gets no negative lower bound."""
    from pandas.api import types

    low, high = float(series.min()), float(series.max())
    margin = RANGE_MARGIN * ((high - low) or abs(high) or 1.0)
    padded_low = low - margin if low < 0 else max(0.0, low - margin)
    padded_high = high + margin
    if types.is_integer_dtype(series.dtype):
        return math.floor(padded_low), math.ceil(padded_high)
    width = padded_high - padded_low
    digits = RANGE_DIGITS - 1 - math.floor(math.log10(width))
    scale = 10.0**digits
    rounded_low = math.floor(padded_low * scale) / scale
    rounded_high = math.ceil(padded_high * scale) / scale
    if digits <= 0:
        return int(rounded_low), int(rounded_high)
    return round(rounded_low, digits), round(rounded_high, digits)


def plain(value: Any) -> Any:
    """A NumPy scalar as the plain Python value a spec holds (``np.int64(3)`` -> 3)."""
    return value.item() if hasattr(value, "item") else value


def _order(value: Any) -> tuple[str, Any]:
    return (type(value).__name__, value)
