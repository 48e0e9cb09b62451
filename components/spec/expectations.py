"""The fast check of the spec's data checks: GX expectations against a shipped catalogue.

Imports no Great Expectations, so ``stemma validate`` stays fast. The catalogue
(``components/data/gx_catalog.json``) is written by :func:`stemma.components.data.checks.write_catalog`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The catalogue of GX expectations and their kwargs, shipped with the data package.
CATALOG_PATH = Path(__file__).parents[1] / "data" / "gx_catalog.json"

#: Arguments every expectation takes; left out of "its arguments are ..." hints.
STANDARD_KWARGS = frozenset(
    {"catch_exceptions", "description", "meta", "notes", "result_format", "severity"}
)
#: Suggestions offered for a misspelt name.
MAX_SUGGESTIONS = 3
#: How alike a name must be to be suggested (difflib ratio).
SUGGESTION_CUTOFF = 0.6
#: Characters a kwarg value or example may take in a message before it is cut.
MAX_VALUE_CHARS = 40

#: JSON types of the catalogue, in the order messages list them, with their wording.
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "date": "a date (YYYY-MM-DD)",
    "date-time": "a date-time (ISO 8601)",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_DATE_LIKE = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}")
_GALLERY_URL = "https://greatexpectations.io/expectations/"


@functools.lru_cache(maxsize=1)
def load_catalog() -> dict[str, Any]:
    """The shipped catalogue: ``{"great_expectations_version", "expectations": {type: ...}}``."""
    return json.loads(CATALOG_PATH.read_text(encoding="utf-8"))


def expectation_problems(checks: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """Find every problem in the checks that the catalogue can see, without importing GX.

    Reports unknown expectation types and kwargs (with the closest names as suggestions),
    kwargs that are not a mapping, missing required kwargs, and values of a JSON type the
    expectation does not take. Stricter than GX about types: GX coerces ``"18"`` to 18.0,
    this check calls it a string. Cross-field rules (``min_value`` or ``max_value`` must be
    set) are left to
    :func:`stemma.components.data.checks.deep_expectation_problems`.

    Args:
        checks: the spec's checks, each ``{expectation_type: {kwarg: value}}``.

    Returns:
        ``(index into checks, message)`` pairs, in spec order; empty when all is well.
    """
    known = load_catalog()["expectations"]
    problems: list[tuple[int, str]] = []
    for index, check in enumerate(checks):
        if malformed := shape_problem(check):
            problems.append((index, malformed))
            continue
        ((name, kwargs),) = check.items()
        entry = known.get(name)
        if entry is None:
            problems.append((index, unknown_type_message(name, known)))
            continue
        problems.extend((index, message) for message in _kwargs_problems(name, kwargs, entry))
    return problems


def shape_problem(check: Any) -> str | None:
    if not isinstance(check, Mapping) or len(check) != 1:
        return "each check is a one-key mapping `expect_...: {kwargs}`"
    ((name, kwargs),) = check.items()
    if not isinstance(name, str):
        return f"the expectation type must be a string, not {_describe(name)}"
    if not isinstance(kwargs, Mapping):
        return (
            f"the arguments of {name} must be a mapping `{{column: ...}}`, not {_describe(kwargs)}"
        )
    return None


def unknown_type_message(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, known, n=MAX_SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)
    if close:
        return f"unknown expectation type `{name}`; did you mean {_or_list(close)}?"
    return f"unknown expectation type `{name}`; see {_GALLERY_URL} for the {len(known)} known types"


def _kwargs_problems(name: str, kwargs: Mapping[str, Any], entry: Mapping[str, Any]) -> list[str]:
    spec_kwargs: Mapping[str, Mapping[str, Any]] = entry["kwargs"]
    messages = []
    for key, value in kwargs.items():
        rule = spec_kwargs.get(key)
        if rule is None:
            messages.append(unknown_kwarg_message(name, str(key), spec_kwargs))
        elif type_problem := _type_problem(key, value, rule):
            messages.append(type_problem)
    messages.extend(
        f"missing required argument `{key}`"
        for key, rule in spec_kwargs.items()
        if rule["required"] and key not in kwargs
    )
    return messages


def unknown_kwarg_message(name: str, key: str, spec_kwargs: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, spec_kwargs, n=MAX_SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)
    if close:
        return f"unknown argument `{key}`; did you mean {_or_list(close)}?"
    own = [k for k in spec_kwargs if k not in STANDARD_KWARGS]
    return (
        f"unknown argument `{key}`; {name} takes {', '.join(own) or 'only the standard arguments'}"
    )


def _type_problem(key: str, value: Any, rule: Mapping[str, Any]) -> str | None:
    types: list[str] = rule["types"]
    choices: list[str] | None = rule.get("choices")
    if _value_fits(value, types, choices):
        return None
    if isinstance(value, str) and choices and "string" in types:
        allowed = ", ".join(repr(choice) for choice in choices)
        return f"`{key}` must be one of {allowed}, not {value!r}"
    expected = [_TYPE_WORDS[t] for t in _TYPE_WORDS if t in types]
    return f"`{key}` must be {_or_list(expected, quote=False)}, not {_describe(value)}"


def _value_fits(value: Any, types: Sequence[str], choices: Sequence[str] | None) -> bool:
    if "any" in types:
        return True
    if value is None:
        return "null" in types
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean" in types
    if isinstance(value, int):
        return "integer" in types or "number" in types
    if isinstance(value, float):
        return "number" in types or ("integer" in types and value.is_integer())
    if isinstance(value, str):
        if "string" in types and (not choices or value in choices):
            return True
        return bool({"date", "date-time"} & set(types)) and bool(_DATE_LIKE.match(value))
    if isinstance(value, dt.date):  # YAML turns unquoted dates into date/datetime objects
        return bool({"date", "date-time", "string"} & set(types))
    if isinstance(value, (list, tuple, set, frozenset)):
        return "array" in types
    if isinstance(value, Mapping):
        return "object" in types
    return True  # a Python object YAML cannot produce: leave it to the deep check


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {short(repr(value))}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _or_list(items: Sequence[str], *, quote: bool = True) -> str:
    words = [f"`{item}`" if quote else item for item in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def short(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
