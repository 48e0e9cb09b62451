"""Spec problems: where they are in the file, and the checks a schema cannot express."""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from stemma.components.spec.document import PATH_FIELDS, Spec, path_problem
from stemma.components.spec.expectations import expectation_problems
from stemma.components.spec.operations import EvaluateSpec, MonitorSpec, QuantizeSpec
from stemma.components.spec.sections import (
    IMPORT_PATH,
    METRIC_DIRECTIONS,
    DataSpec,
    Expectation,
    GateSpec,
    ModelSpec,
    PipelineSpec,
    TrainSpec,
)


class Locator:
    """Maps a YAML path (``("train", "epochs")``) to its line in the file."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def line(self, loc: Sequence[str | int]) -> int | None:
        node = self._root
        best: int | None = node.start_mark.line + 1 if node is not None else None
        for key in loc:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == str(key):
                        best = key_node.start_mark.line + 1
                        node = value_node
                        break
                else:
                    return best
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
                if key >= len(node.value):
                    return best
                node = node.value[key]
                best = node.start_mark.line + 1
            else:
                return best
        return best


@dataclass(frozen=True)
class Problem:
    """One problem with a spec: where it is and what is wrong."""

    loc: tuple[str | int, ...]
    message: str
    line: int | None = None
    source: str | None = None

    def render(self, file_name: str) -> str:
        where = f"{file_name}:{self.line}" if self.line else file_name
        path = dotted(self.loc) or "(top level)"
        origin = f" (from {self.source})" if self.source else ""
        return f"{where} {path}: {self.message}{origin}"


def dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def keys_at(loc: Sequence[str | int]) -> list[str]:
    """The keys the spec allows in the section at ``loc`` (empty when it is not a section)."""
    model: Any = Spec
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        # Optional sections (`X | None`) are models too: take the model out of the union.
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def pydantic_message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    message = str(error["msg"])
    if kind == "extra_forbidden":
        loc = tuple(error["loc"])
        close = difflib.get_close_matches(str(loc[-1]), keys_at(loc[:-1]), n=1)
        hint = f"did you mean `{close[0]}`?" if close else "check the spelling"
        return f"unknown key (not part of the spec; {hint})"
    if kind == "missing":
        return "required but missing"
    # pydantic prefixes validator messages with "Value error, "
    message = message.removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    # "Input should be greater than 0" reads better in a spec as "must be greater than 0".
    message = re.sub(r"^input should (be|have)\b", r"must \1", message)
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        message = f"{message}, got {error.get('input')!r}"
    return message


def sections_of(spec: Spec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in Spec.model_fields}


def valid_sections(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Each top-level section that validates on its own (defaults for absent ones)."""
    sections: dict[str, Any] = {}
    for name, field in Spec.model_fields.items():
        try:
            if name in raw and field.annotation is not None:
                sections[name] = TypeAdapter(field.annotation).validate_python(raw[name])
            elif not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
        except ValidationError:
            continue
    return sections


def semantic_problems(
    spec: Spec,
    root: Path,
    *,
    check_paths: bool = True,
    check_imports: bool = True,
    check_expectations: bool = True,
) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems a schema cannot express: consistency between sections, files, imports."""
    return section_problems(
        sections_of(spec),
        root,
        check_paths=check_paths,
        check_imports=check_imports,
        check_expectations=check_expectations,
    )


def section_problems(
    sections: Mapping[str, Any],
    root: Path,
    *,
    check_paths: bool,
    check_imports: bool,
    check_expectations: bool,
) -> list[tuple[tuple[str | int, ...], str]]:
    problems = _path_problems(sections, root)
    outside = {loc for loc, _ in problems}
    data: DataSpec | None = sections.get("data")
    if data is not None:
        problems += _data_problems(
            data, root, check_paths=check_paths and ("data", "path") not in outside
        )
        gate: GateSpec | None = sections.get("gate")
        if gate is not None:
            problems += _gate_problems(gate, data.task)
        monitor: MonitorSpec | None = sections.get("monitor")
        if monitor is not None:
            problems += _monitor_problems(monitor, data)
        evaluate: EvaluateSpec | None = sections.get("evaluate")
        if evaluate is not None:
            problems += _evaluate_problems(evaluate, data)
    quantize: QuantizeSpec | None = sections.get("quantize")
    if quantize is not None:
        problems += _quantize_problems(quantize)
    checks: list[Expectation] = sections.get("checks") or []
    problems += _check_problems(checks, check_expectations=check_expectations)
    train: TrainSpec | None = sections.get("train")
    if train is not None:
        problems += _train_problems(train)
    model: ModelSpec | None = sections.get("model")
    if model is not None and check_imports and IMPORT_PATH.match(model.architecture):
        message = import_problem(model.architecture)
        if message:
            problems.append((("model", "architecture"), message))
    return problems


def _path_problems(
    sections: Mapping[str, Any], root: Path
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every path field that resolves outside the project and the allowed roots."""
    pipeline: PipelineSpec | None = sections.get("pipeline")
    allowed = pipeline.allowed_roots if pipeline is not None else []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for section_name, field_name in PATH_FIELDS:
        value = getattr(sections.get(section_name), field_name, None)
        if isinstance(value, str):
            message = path_problem(value, root, allowed)
            if message:
                problems.append(((section_name, field_name), message))
    return problems


def _data_problems(
    data: DataSpec, root: Path, *, check_paths: bool
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    features = data.features
    if not features.all:
        problems.append(
            (("data", "features"), "declare at least one numeric or categorical feature")
        )
    seen: dict[str, tuple[str | int, ...]] = {}
    for kind in ("numeric", "categorical"):
        for index, column in enumerate(getattr(features, kind)):
            loc: tuple[str | int, ...] = ("data", "features", kind, index)
            if column in seen:
                first = dotted(seen[column])
                problems.append(
                    (loc, f"column {column!r} is declared more than once (first at {first})")
                )
            else:
                seen[column] = loc
    for role in ("target", "id"):
        column = getattr(data, role)
        if column is not None and column in seen:
            problems.append((("data", role), f"column {column!r} is also declared as a feature"))
    if data.id is not None and data.id == data.target:
        problems.append((("data", "id"), "the id column cannot be the target"))

    split = data.split
    if split.method == "time" and not split.time_column:
        problems.append((("data", "split", "time_column"), "required when split.method is `time`"))
    if split.time_column and split.time_column in seen:
        problems.append((("data", "split", "time_column"), "the time column cannot be a feature"))
    if split.test_fraction + split.validation_fraction * (1 - split.test_fraction) >= 0.95:
        problems.append(
            (("data", "split"), "test and validation fractions leave almost nothing to train on")
        )

    if check_paths:
        data_path = Path(data.path) if Path(data.path).is_absolute() else root / data.path
        if not data_path.exists():
            problems.append(
                (
                    ("data", "path"),
                    f"{data_path} does not exist (generate or fetch it first: `stemma data generate` "
                    "for the worked example, `dvc pull` for a DVC remote)",
                )
            )
        elif (
            data.format == "auto"
            and data_path.is_file()
            and data_path.suffix.lower() not in (".parquet", ".csv")
        ):
            problems.append(
                (
                    ("data", "format"),
                    f"cannot tell the format of {data_path.name}; set parquet or csv",
                )
            )

    return problems


def _evaluate_problems(
    evaluate: EvaluateSpec, data: DataSpec
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if data.id is None:
        problems.append(
            (
                ("data", "id"),
                "required by `evaluate`: shadow and canary evaluation join rows by the id column",
            )
        )
    features = data.features.all
    seen: set[str] = set()
    for index, column in enumerate(evaluate.shadow.segments):
        loc: tuple[str | int, ...] = ("evaluate", "shadow", "segments", index)
        if column not in features:
            problems.append(
                (
                    loc,
                    f"{column!r} is not a feature column; segment by one of {', '.join(features)}",
                )
            )
        elif column in seen:
            problems.append((loc, f"{column!r} is listed more than once"))
        seen.add(column)
    steps = evaluate.canary.steps
    if any(later <= earlier for earlier, later in pairwise(steps)):
        problems.append(
            (("evaluate", "canary", "steps"), f"must increase step by step, got {steps}")
        )
    if steps and steps[-1] != 1.0:
        problems.append(
            (
                ("evaluate", "canary", "steps"),
                f"must end at 1.0 (the step at which the challenger is promoted), got {steps[-1]}",
            )
        )
    return problems


def _quantize_problems(quantize: QuantizeSpec) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    seen: set[str] = set()
    for index, method in enumerate(quantize.methods):
        if method in seen:
            problems.append((("quantize", "methods", index), f"method {method!r} is listed twice"))
        seen.add(method)
    return problems


def _train_problems(train: TrainSpec) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    distributed = train.distributed
    if distributed is None:
        return problems
    loc: tuple[str | int, ...] = ("train", "distributed")
    if distributed.backend == "nccl" and train.device == "cpu":
        problems.append(
            (
                (*loc, "backend"),
                "nccl needs CUDA, but train.device is cpu: use gloo (or auto) on the CPU",
            )
        )
    if distributed.nproc_per_node > train.batch_size:
        problems.append(
            (
                (*loc, "nproc_per_node"),
                f"{distributed.nproc_per_node} processes cannot share a batch of "
                f"{train.batch_size} rows (train.batch_size): each needs at least one row",
            )
        )
    return problems


def _gate_problems(gate: GateSpec, task: str) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    metrics = METRIC_DIRECTIONS[task]
    if gate.metric not in metrics:
        problems.append(
            (
                ("gate", "metric"),
                f"{gate.metric!r} is not a {task} metric; choose one of {', '.join(metrics)}",
            )
        )
    else:
        higher_is_better = metrics[gate.metric]
        if higher_is_better and gate.maximum is not None:
            problems.append(
                (("gate", "maximum"), f"{gate.metric} is better when higher: set `minimum` instead")
            )
        if not higher_is_better and gate.minimum is not None:
            problems.append(
                (("gate", "minimum"), f"{gate.metric} is better when lower: set `maximum` instead")
            )

    return problems


def _monitor_problems(
    monitor: MonitorSpec, data: DataSpec
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    declared = data.features.all
    for index, column in enumerate(monitor.features or []):
        if column not in declared:
            problems.append(
                (
                    ("monitor", "features", index),
                    f"{column!r} is not a feature of data.features ({', '.join(declared)})",
                )
            )
    monitored = len(monitor.features) if monitor.features is not None else len(declared)
    if monitor.features is not None and not monitor.features:
        problems.append((("monitor", "features"), "list at least one feature, or leave it out"))
    elif monitor.min_drifted_features > monitored:
        problems.append(
            (
                ("monitor", "min_drifted_features"),
                f"must be at most the {monitored} monitored features",
            )
        )
    metrics = METRIC_DIRECTIONS[data.task]
    if monitor.metric is not None and monitor.metric not in metrics:
        problems.append(
            (
                ("monitor", "metric"),
                f"{monitor.metric!r} is not a {data.task} metric; choose one of {', '.join(metrics)}",
            )
        )
    return problems


def _check_problems(
    checks: list[Expectation], *, check_expectations: bool
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for index, check in enumerate(checks):
        if len(check) != 1:
            problems.append(
                (("checks", index), "each check is a one-key mapping `expect_...: {kwargs}`")
            )
    if check_expectations and checks:
        wellformed = [(i, c) for i, c in enumerate(checks) if len(c) == 1]
        for index, message in expectation_problems([c for _, c in wellformed]):
            original_index, check = wellformed[index]
            (name,) = check
            problems.append((("checks", original_index, name), message))

    return problems


def import_problem(import_path: str) -> str | None:
    """Why ``module:Class`` cannot be used as a model class, or None when it can."""
    module_name, _, class_name = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure is the user's to see
        return f"cannot import module {module_name!r}: {type(error).__name__}: {error}"
    cls = getattr(module, class_name, None)
    if cls is None:
        return f"module {module_name!r} has no attribute {class_name!r}"
    if not isinstance(cls, type):
        return f"{import_path} is not a class"
    try:
        import torch  # only reached for custom architectures, which import torch themselves
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not issubclass(cls, torch.nn.Module):
        return f"{import_path} is not a torch.nn.Module"
    return None
