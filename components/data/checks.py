"""Data checks: the spec's ``checks`` run as a Great Expectations 1.x suite.

A check is a one-key mapping ``{expectation_type: {kwarg: value}}``. This module:

- checks them exactly with GX itself (:func:`deep_expectation_problems`; the fast check
  against the shipped ``gx_catalog.json``, which this module writes, is in
  :mod:`stemma.components.spec.expectations`);
- runs them on a DataFrame (:func:`validate_table`) and returns a :class:`ValidationReport`
  whose outcomes are in spec order, with a digest for lineage and one-screen failure lines;
- builds GX Data Docs for a report (:func:`build_data_docs`).

``great_expectations`` is imported only inside the functions that need it (3-4 s cold).
Regenerate the catalogue after a GX upgrade with ``python -m stemma.components.data.checks``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import SpecError
from stemma.components.platform.files import write_atomically
from stemma.components.spec.expectations import (
    CATALOG_PATH,
    MAX_VALUE_CHARS,
    shape_problem,
    short,
    unknown_kwarg_message,
    unknown_type_message,
)

if TYPE_CHECKING:
    import pandas as pd


#: Expectation fields that GX fills in itself or that only GX Cloud uses; not user kwargs.
INTERNAL_FIELDS = frozenset({"id", "rendered_content", "batch_id", "windows", "library_metadata"})

#: Where the spec position of a check is kept in its expectation's ``meta``, so that GX's
#: results (which come back in another order, with normalised kwargs) map back to the spec.
INDEX_META_KEY = "stemma_check_index"

#: Unexpected values kept per outcome for reports.
MAX_EXAMPLES = 5
#: Unexpected values GX keeps per expectation (its SUMMARY ``partial_unexpected_list``).
PARTIAL_UNEXPECTED_COUNT = 20
#: Shares of unexpected rows below this percentage are shown as "<0.01%".
SMALLEST_PERCENT = 0.01

#: JSON types of the values other than strings a JSON schema's ``enum`` holds.
_ENUM_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number"}

#: Names inside the throw-away GX contexts; each call gets a fresh context, so they never clash.
_DATASOURCE_NAME = "stemma"
_ASSET_NAME = "table"
_BATCH_DEFINITION_NAME = "whole_table"
_BATCH_ID = f"{_DATASOURCE_NAME}-{_ASSET_NAME}"

#: Result fields that change from run to run of the same data and suite (or between
#: installations, like traceback paths); left out of the digest only.
_VOLATILE_META_KEYS = ("run_id", "validation_time", "validation_id", "checkpoint_id")
_VOLATILE_BATCH_MARKERS = ("ge_load_time",)


# --------------------------------------------------------------------------- catalogue


def write_catalog(path: Path | None = None) -> dict[str, Any]:
    """Build the catalogue of GX's expectations from the installed great_expectations.

    For every expectation class GX registers (its own, not plugins'), lists the kwargs a
    user may pass: required or not, the JSON types allowed (``string``, ``integer``,
    ``number``, ``boolean``, ``date``, ``date-time``, ``array``, ``object``, ``null`` or
    ``any``) and, for enumerations, the allowed strings. Fields GX fills in itself
    (:data:`INTERNAL_FIELDS`) are left out.

    Args:
        path: where to write it as JSON (sorted keys, indent 1); None only builds it.

    Returns:
        The catalogue.
    """
    gx = _import_gx()
    from great_expectations.expectations.registry import (
        get_expectation_impl,
        list_registered_expectation_implementations,
        register_core_expectations,
    )

    register_core_expectations()
    expectations = {}
    for name in sorted(list_registered_expectation_implementations()):
        expectation_class = get_expectation_impl(name)
        if not expectation_class.__module__.startswith("great_expectations."):
            continue  # a plugin registered in this process; the catalogue describes GX itself
        expectations[name] = {"kwargs": _class_kwargs(expectation_class)}
    catalog = {"great_expectations_version": gx.__version__, "expectations": expectations}
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(catalog, indent=1, sort_keys=True) + "\n")
    return catalog


def _class_kwargs(expectation_class: Any) -> dict[str, dict[str, Any]]:
    schema = expectation_class.schema()
    definitions = schema.get("definitions", {})
    kwargs: dict[str, dict[str, Any]] = {}
    # GX's expectations are pydantic v1 models: __fields__ holds ModelField objects.
    for field_name, field in expectation_class.__fields__.items():
        if field_name in INTERNAL_FIELDS:
            continue
        alternatives = _alternatives(schema["properties"][field.alias], definitions)
        types = {json_type for json_type, _ in alternatives}
        if field.allow_none:
            types.add("null")
        entry: dict[str, Any] = {"required": bool(field.required), "types": sorted(types)}
        string_choices = [choices for json_type, choices in alternatives if json_type == "string"]
        if string_choices and None not in string_choices:  # every string must be a choice
            entry["choices"] = sorted({c for choices in string_choices for c in choices or ()})
        kwargs[field_name] = entry
    return kwargs


def _alternatives(
    schema: Mapping[str, Any], definitions: Mapping[str, Any]
) -> list[tuple[str, tuple[str, ...] | None]]:
    """The ``(json type, allowed strings or None)`` alternatives a JSON schema accepts."""
    if "$ref" in schema:
        return _alternatives(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            return [
                alternative
                for member in schema[combinator]
                for alternative in _alternatives(member, definitions)
            ]
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        strings = tuple(v for v in values if isinstance(v, str))
        alternatives: list[tuple[str, tuple[str, ...] | None]] = [
            (_ENUM_TYPES.get(type(v), "any"), None) for v in values if not isinstance(v, str)
        ]
        if strings:
            alternatives.append(("string", strings))
        return alternatives
    json_types = schema.get("type")
    if json_types is None:
        return [("any", None)]
    if isinstance(json_types, str):
        json_types = [json_types]
    date_format = schema.get("format")
    return [
        (date_format if t == "string" and date_format in ("date", "date-time") else t, None)
        for t in json_types
    ]


# --------------------------------------------------------------------------- deep check


def deep_expectation_problems(checks: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """Check every entry exactly as GX will, by building its expectation object.

    Catches what the catalogue cannot see (cross-field rules such as "min_value and
    max_value cannot both be None") at the cost of importing GX. Takes and returns what
    :func:`~stemma.components.spec.expectations.expectation_problems` does.
    """
    problems: list[tuple[int, str]] = []
    for index, check in enumerate(checks):
        _, messages = _build_expectation(check)
        problems.extend((index, message) for message in messages)
    return problems


def _build_expectation(check: Any, meta: Mapping[str, Any] | None = None) -> tuple[Any, list[str]]:
    """``(GX expectation, [])`` for a well-formed check, else ``(None, [messages])``."""
    if malformed := shape_problem(check):
        return None, [malformed]
    _import_gx()
    from great_expectations.compatibility.pydantic import ValidationError
    from great_expectations.exceptions import ExpectationNotFoundError, GreatExpectationsError
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )
    from great_expectations.expectations.registry import (
        list_registered_expectation_implementations,
    )

    ((name, kwargs),) = check.items()
    kwargs = copy.deepcopy(dict(kwargs))  # GX may normalise values in place
    if meta:
        user_meta = kwargs.get("meta") or {}
        if isinstance(user_meta, Mapping):
            kwargs["meta"] = {**user_meta, **meta}
    try:
        return ExpectationConfiguration(type=name, kwargs=kwargs).to_domain_obj(), []
    except ExpectationNotFoundError:
        known = {n: None for n in list_registered_expectation_implementations()}
        return None, [unknown_type_message(name, known)]
    except ValidationError as error:
        return None, _pydantic_messages(error, name)
    except (GreatExpectationsError, TypeError, ValueError) as error:
        return None, [str(error)]
    except Exception as error:  # whatever GX raises, it is this entry's problem to report
        return None, [f"{type(error).__name__}: {error}"]


def _field_names(name: str) -> dict[str, None]:
    from great_expectations.expectations.registry import get_expectation_impl

    fields = get_expectation_impl(name).__fields__
    return {field: None for field in fields if field not in INTERNAL_FIELDS}


def _pydantic_messages(error: Any, name: str) -> list[str]:
    """One line per field from a pydantic v1 ValidationError (unions give one error a branch)."""
    by_field: dict[str, list[str]] = {}
    for item in error.errors():
        by_field.setdefault(".".join(str(part) for part in item["loc"]), []).append(item["msg"])
    by_field = {field: _distinct(messages) for field, messages in by_field.items()}
    if len(by_field) > 1:
        # Root validators run without the fields that failed, so their complaints
        # ("min_value and max_value cannot both be None") would only repeat those errors.
        by_field.pop("__root__", None)
    messages = []
    for field, field_messages in by_field.items():
        if field == "__root__":
            messages.extend(field_messages)
        elif field_messages == ["extra fields not permitted"]:
            messages.append(unknown_kwarg_message(name, field, _field_names(name)))
        elif field_messages == ["field required"]:
            messages.append(f"missing required argument `{field}`")
        else:
            messages.append(f"`{field}`: {'; '.join(field_messages)}")
    return messages


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ExpectationOutcome:
    """What one check found.

    Attributes:
        index: position of the check in the spec's ``checks``.
        type: the expectation type.
        kwargs: the kwargs as written in the spec.
        success: whether the check passed.
        unexpected_count: rows that failed (map expectations), else None.
        unexpected_percent: GX's percentage of non-null rows that failed, else None.
        element_count: rows looked at, else None.
        examples: up to :data:`MAX_EXAMPLES` distinct unexpected values, in row order.
        observed_value: the statistic an aggregate expectation measured, else None.
        exception: the error GX met while checking, else None.
    """

    index: int
    type: str
    kwargs: dict[str, Any]
    success: bool
    unexpected_count: int | None
    unexpected_percent: float | None
    element_count: int | None
    examples: tuple[Any, ...]
    observed_value: Any
    exception: str | None

    def describe(self) -> str:
        """``expect_x(column=age, min_value=18)``."""
        arguments = ", ".join(f"{k}={_format_value(v)}" for k, v in self.kwargs.items())
        return f"{self.type}({arguments})"

    def render(self) -> str:
        """One line: the check and what it found."""
        head = f"#{self.index} {self.describe()}"
        if self.exception:
            return f"{head}: error: {short(self.exception, 3 * MAX_VALUE_CHARS)}"
        if self.unexpected_count is not None and self.element_count:
            share = 100.0 * self.unexpected_count / self.element_count
            line = (
                f"{head}: {self.unexpected_count} of {self.element_count} rows "
                f"({_format_percent(share)}) unexpected"
            )
            if self.examples:
                line += ", e.g. " + ", ".join(_format_value(v) for v in self.examples)
            return line
        if self.observed_value is not None:
            return f"{head}: observed {_format_value(self.observed_value)}"
        return f"{head}: {'passed' if self.success else 'failed'}"


@dataclass(frozen=True)
class ValidationReport:
    """The result of running the checks on a table.

    Attributes:
        success: whether every check passed.
        outcomes: one per check, in spec order.
        statistics: GX's counts (evaluated, successful, unsuccessful, success_percent).
        result_json: GX's full suite result as a JSON-able dict, results in spec order.
        digest: sha256 of ``result_json`` as canonical JSON without the run-specific
            fields (load time, run id, tracebacks): same data and checks, same digest.
    """

    success: bool
    outcomes: list[ExpectationOutcome]
    statistics: dict[str, Any]
    result_json: dict[str, Any]
    digest: str

    @property
    def failures(self) -> list[ExpectationOutcome]:
        """The outcomes that did not pass, in spec order."""
        return [outcome for outcome in self.outcomes if not outcome.success]

    def render_failure(self, max_lines: int = 20) -> list[str]:
        """One line per failed check, at most ``max_lines`` lines in all.

        A line reads ``#3 expect_column_values_to_be_between(column=age, min_value=18,
        max_value=100): 42 of 40000 rows (0.1%) unexpected, e.g. 7, 12, 150``, where ``#3``
        is the check's position in ``checks`` (``checks[3]``, counted from 0).
        """
        lines = [outcome.render() for outcome in self.failures]
        if len(lines) > max_lines:
            kept = max(max_lines - 1, 0)
            lines = [*lines[:kept], f"... and {len(lines) - kept} more failed checks"]
        return lines

    def summary(self) -> str:
        """``8 of 8 expectations passed`` (or how many failed)."""
        passed = sum(outcome.success for outcome in self.outcomes)
        total = len(self.outcomes)
        text = f"{passed} of {total} expectations passed"
        return text if passed == total else f"{text} ({total - passed} failed)"


def validate_table(
    frame: pd.DataFrame, checks: Sequence[Mapping[str, Any]], *, suite_name: str
) -> ValidationReport:
    """Run the checks on a DataFrame with GX and report each outcome in spec order.

    Each call uses its own ephemeral GX context, so calls do not share state.

    Args:
        frame: the table; not modified.
        checks: the spec's checks, each ``{expectation_type: {kwarg: value}}``.
        suite_name: name of the expectation suite (shown in Data Docs), e.g. the pipeline's.

    Returns:
        The report; ``report.success`` is False when any check failed or raised.

    Raises:
        SpecError: a check that GX cannot build (GX would silently drop it otherwise).
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    expectations: list[Any] = []
    problems: list[str] = []
    for index, check in enumerate(checks):
        expectation, messages = _build_expectation(check, meta={INDEX_META_KEY: index})
        expectations.append(expectation)
        problems.extend(f"checks[{index}] {_check_name(check)}: {m}" for m in messages)
    if problems:
        raise SpecError(
            f"{len(problems)} problem(s) in the checks of suite {suite_name!r}; fix the spec",
            problems,
        )

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas(name=_DATASOURCE_NAME)
        .add_dataframe_asset(name=_ASSET_NAME)
        .add_batch_definition_whole_dataframe(_BATCH_DEFINITION_NAME)
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
    result = batch.validate(
        suite,
        result_format={
            "result_format": "SUMMARY",
            "partial_unexpected_count": PARTIAL_UNEXPECTED_COUNT,
        },
    )
    return _report_from_result(result.to_json_dict(), checks)


def _report_from_result(
    result_json: dict[str, Any], checks: Sequence[Mapping[str, Any]]
) -> ValidationReport:
    by_index: dict[int, dict[str, Any]] = {}
    unmatched: list[dict[str, Any]] = []
    for item in result_json.get("results", []):
        index = (item.get("expectation_config", {}).get("meta") or {}).get(INDEX_META_KEY)
        if isinstance(index, int):
            by_index[index] = item
        else:
            unmatched.append(item)
    outcomes = [_outcome(index, check, by_index.get(index)) for index, check in enumerate(checks)]
    ordered = {**result_json, "results": [*(by_index[i] for i in sorted(by_index)), *unmatched]}
    return ValidationReport(
        # Fail closed: a check GX returned no result for counts as failed.
        success=bool(result_json.get("success")) and all(o.success for o in outcomes),
        outcomes=outcomes,
        statistics=dict(result_json.get("statistics", {})),
        result_json=ordered,
        digest=result_digest(ordered),
    )


def _outcome(
    index: int, check: Mapping[str, Any], item: dict[str, Any] | None
) -> ExpectationOutcome:
    ((name, kwargs),) = check.items()
    if item is None:
        item = {"success": False, "result": {}, "exception_info": {}}
        exception: str | None = "Great Expectations returned no result for this check"
    else:
        exception = _exception_message(item.get("exception_info") or {})
    result = item.get("result") or {}
    examples = _distinct(result.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]
    return ExpectationOutcome(
        index=index,
        type=name,
        kwargs=copy.deepcopy(dict(kwargs)),
        success=bool(item.get("success")) and exception is None,
        unexpected_count=result.get("unexpected_count"),
        unexpected_percent=result.get("unexpected_percent"),
        element_count=result.get("element_count"),
        examples=tuple(examples),
        observed_value=result.get("observed_value"),
        exception=exception,
    )


def _exception_message(info: Mapping[str, Any]) -> str | None:
    """GX's exception text: ``exception_info`` is flat, or keyed by metric when a metric failed."""
    entries = [info] if "raised_exception" in info else list(info.values())
    messages = _distinct(
        str(entry.get("exception_message") or "unknown error")
        for entry in entries
        if isinstance(entry, Mapping) and entry.get("raised_exception")
    )
    return "; ".join(messages) or None


def _distinct(values: Iterable[Any]) -> list[Any]:
    """``values`` without repeats, in order (GX's values may be lists, which do not hash)."""
    kept: list[Any] = []
    for value in values:
        if value not in kept:
            kept.append(value)
    return kept


def result_digest(result_json: Mapping[str, Any]) -> str:
    """sha256 of a GX suite result as canonical JSON, without run-specific fields."""
    stable = copy.deepcopy(dict(result_json))
    meta = stable.get("meta") or {}
    for key in _VOLATILE_META_KEYS:
        meta.pop(key, None)
    for key in _VOLATILE_BATCH_MARKERS:
        (meta.get("batch_markers") or {}).pop(key, None)
    stable.pop("id", None)
    stable.pop("result_url", None)
    for item in stable.get("results", []):
        info = item.get("exception_info") or {}
        for entry in [info, *info.values()]:
            if isinstance(entry, dict):
                entry.pop("exception_traceback", None)
    canonical = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_name(check: Any) -> str:
    if isinstance(check, Mapping) and len(check) == 1:
        return str(next(iter(check)))
    return "?"


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return short("[" + ", ".join(_format_value(v) for v in value) + "]")
    if isinstance(value, str):
        return short(value)
    return short(str(value))


def _format_percent(share: float) -> str:
    if 0 < share < SMALLEST_PERCENT:
        return f"<{SMALLEST_PERCENT}%"
    if share < 1:
        return f"{share:.2g}%"  # 0.05%, not 0.1%: a few bad rows in many should still show
    return f"{share:.1f}%"


# --------------------------------------------------------------------------- data docs


def build_data_docs(
    report: ValidationReport, out_dir: Path, *, asset: str | None = None, run: str | None = None
) -> Path:
    """Write GX Data Docs (a static HTML site) for a report into ``out_dir``.

    GX builds Data Docs only from a file context; one is made in a temporary folder (never
    the project root), the result is stored there, the site built, and its ``local_site``
    folder copied to ``out_dir``, which is replaced whole. The pages name the data asset
    and the run, and render offline: the CDN scripts, stylesheets and images GX's pages
    load are left out (see :func:`offline_page`).

    Args:
        report: the report of :func:`validate_table`.
        out_dir: the folder to write the site to.
        asset: what was checked, as the pages name it (a path, a table).
        run: the run that checked it, as the pages name it (``mlflow-run-<id>``; characters
            a folder name cannot hold become ``-``).

    Returns:
        The site's ``index.html``.
    """
    gx = _import_gx()
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    document = copy.deepcopy(report.result_json)
    run_name = re.sub(r"[^A-Za-z0-9._-]+", "-", run or f"stemma-{report.digest[:12]}")
    run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.UTC))  # a site folder
    meta = document.setdefault("meta", {})
    meta["batch_spec"] = {**(meta.get("batch_spec") or {}), "data_asset_name": asset or _ASSET_NAME}
    meta["run_id"] = run_id.to_json_dict()
    result = ExpectationSuiteValidationResultSchema().load(document)
    suite_name = result.suite_name
    configurations = [
        {"type": config["type"], "kwargs": config["kwargs"], "meta": config.get("meta") or {}}
        for config in (item["expectation_config"] for item in report.result_json.get("results", []))
    ]
    batch_id = next(
        (c["kwargs"].get("batch_id") for c in configurations if c["kwargs"].get("batch_id")),
        _BATCH_ID,
    )
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="stemma-gx-docs-") as workdir:
        context = gx.get_context(mode="file", project_root_dir=workdir)
        context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=configurations))
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite_name),
            run_id=run_id,
            batch_identifier=batch_id,
        )
        context.validation_results_store.set(key, result)
        site = Path(context.root_directory) / "uncommitted" / "data_docs" / "local_site"
        context.build_data_docs()
        for page in site.rglob("*.html"):
            page.write_text(offline_page(page.read_text()))
        _replace_dir(site, out_dir)
    return out_dir / "index.html"


#: What GX's pages fetch from the network: CDN scripts, stylesheets and images.
_REMOTE = re.compile(
    r"<script[^>]*\ssrc=\"https?://[^\"]*\"[^>]*>\s*</script>"
    r"|<link[^>]*\shref=\"https?://[^\"]*\"[^>]*>|<img[^>]*\ssrc=\"https?://[^\"]*\"[^>]*>",
    re.IGNORECASE,
)
#: Plain styling in place of Bootstrap's, so that tables and sections read well offline.
OFFLINE_STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:75rem}"
    "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
    "padding:.25rem .5rem;text-align:left;vertical-align:top}.collapse{display:block}</style>"
)


def offline_page(html: str) -> str:
    """A Data Docs page that loads nothing from the network: MLflow's artifact viewer and a
    machine without internet access show it at once, in plain styling."""
    return _REMOTE.sub("", html).replace("</head>", OFFLINE_STYLE + "</head>", 1)


def _replace_dir(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` so that ``target`` is either the old or the new folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.copytree(source, staging, dirs_exist_ok=True)
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        retired.rmdir()
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)


# --------------------------------------------------------------------------- helpers


def _import_gx() -> Any:
    """Import great_expectations quietly (no usage analytics unless the user asked for them)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


if __name__ == "__main__":  # regenerate the shipped catalogue after a GX upgrade
    write_catalog(CATALOG_PATH)
    print(f"wrote {CATALOG_PATH}")
