"""The whole spec (:class:`Spec`), a loaded spec with its paths, and views of it.

Then its problems: where they are in the file, and the checks a schema cannot express.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from stemma.components.errors import SpecError
from stemma.components.spec.compress import CompressSpec, CostSpec
from stemma.components.spec.expectations import expectation_problems
from stemma.components.spec.monitor import MonitorSpec
from stemma.components.spec.operations import EndpointSpec, EvaluateSpec, QuantizeSpec
from stemma.components.spec.sections import (
    IMPORT_PATH,
    METRIC_DIRECTIONS,
    DataSpec,
    Expectation,
    GateSpec,
    ModelSpec,
    PipelineSpec,
    RetrainSpec,
    ScoreSpec,
    Section,
    TrainSpec,
)

#: Every field of the spec that names a file or folder, as YAML paths.
PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("data", "path"),
    ("score", "input"),
    ("score", "output"),
    ("monitor", "input"),
    ("monitor", "labels"),
    ("evaluate", "labels"),
    ("retrain", "batches"),
    ("retrain", "labels"),
)


class Spec(Section):
    """A Stemma pipeline: the data, its checks, the model, its training, gate and scoring."""

    pipeline: PipelineSpec = Field(description="Names of the pipeline, experiment and model.")
    data: DataSpec = Field(description="The training table.")
    checks: list[Expectation] = Field(
        default_factory=list,
        description=(
            "Great Expectations expectations, each a one-key mapping "
            "`expect_...: {kwargs}`; all must pass before training."
        ),
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="How the network is trained.")
    gate: GateSpec = Field(default_factory=GateSpec, description="The registration gate.")
    score: ScoreSpec = Field(
        default_factory=ScoreSpec, description="Nightly batch scoring with the champion."
    )
    retrain: RetrainSpec | None = Field(
        default=None,
        description="Continuous training on new labelled production data (scheduled and on drift).",
    )
    monitor: MonitorSpec | None = Field(
        default=None,
        description="Drift monitoring of production batches (defaults apply when absent).",
    )
    evaluate: EvaluateSpec | None = Field(
        default=None,
        description="Shadow and canary evaluation of a challenger (defaults apply when absent).",
    )
    quantize: QuantizeSpec | None = Field(
        default=None,
        description="Post-training quantization of registered models (defaults apply when absent).",
    )
    endpoint: EndpointSpec | None = Field(
        default=None,
        description="The online endpoint, `stemma endpoint` (defaults apply when absent).",
    )
    compress: CompressSpec | None = Field(
        default=None,
        description="Pruning and distillation of registered models (defaults apply when absent).",
    )
    cost: CostSpec = Field(
        default_factory=CostSpec,
        description="Machine kinds and prices that costs per million predictions are figured on.",
    )


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from."""

    spec: Spec
    path: Path
    root: Path
    raw: dict[str, Any]
    overrides: tuple[str, ...] = ()

    def resolve(self, relative: str | Path) -> Path:
        """A path of the spec (or one a run was given), resolved against the project root.

        Raises:
            SpecError: the path resolves outside the project root and outside every
                folder of ``pipeline.allowed_roots``.
        """
        if problem := path_problem(relative, self.root, self.spec.pipeline.allowed_roots):
            raise SpecError(f"{self.path.name}: {problem}")
        return self.root / relative  # an absolute path stays as it is


def path_problem(
    value: str | Path, root: Path, allowed_roots: Sequence[str | Path] = ()
) -> str | None:
    """Why ``value`` may not be used as a path of a project at ``root``, or None.

    The path is resolved against the root with ``..`` and symlinks followed, so neither a
    relative climb nor a link inside the project reaches a folder it may not.
    """
    project = root.resolve()
    resolved = (project / value).resolve()
    folders = [project, *((project / folder).resolve() for folder in allowed_roots)]
    if any(resolved.is_relative_to(folder) for folder in folders):
        return None
    return (
        f"{value} resolves outside the project ({resolved}); to allow it, add its folder "
        "to pipeline.allowed_roots"
    )


def flatten(spec: Spec) -> dict[str, str]:
    """The spec as flat ``section.key -> value`` strings (for MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000)
            out[prefix] = dumped.strip().removesuffix("...").strip()

    walk("", spec.model_dump(mode="json"))
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec, every field described."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Stemma pipeline spec"
    return schema


# ---------------------------------------------------------------------------------------
# Problems: where they are in the file, and the checks a schema cannot express


#: A place in the spec (``("train", "epochs")``), and problems found at such places.
Loc = tuple[str | int, ...]
Found = list[tuple[Loc, str]]


def line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The line of a YAML path (``("train", "epochs")``) in the file whose node is ``root``:
    of the deepest part of it the file holds."""
    node = root
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

    loc: Loc
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

    def is_model(value: Any) -> bool:
        return isinstance(value, type) and issubclass(value, BaseModel)

    model: Any = Spec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) and is_model(model) else None
        if field is None:
            return []
        # Optional sections (`X | None`) are models too: take the model out of the union.
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next((c for c in candidates if is_model(c)), None)
    return list(model.model_fields) if is_model(model) else []


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


def section_problems(
    sections: Mapping[str, Any],
    root: Path,
    *,
    check_paths: bool,
    check_imports: bool,
    check_expectations: bool,
) -> Found:
    """Problems a schema cannot express: consistency between sections, files, imports."""
    problems = list(_path_problems(sections, root))
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
    # The model, and the student when distillation builds one, as `module:Class`.
    model: ModelSpec | None = sections.get("model")
    compress: CompressSpec | None = sections.get("compress")
    classes: dict[Loc, str] = {("model", "architecture"): model.architecture if model else "mlp"}
    if compress is not None and "distill" in compress.methods:
        student = compress.distill.student.architecture
        classes["compress", "distill", "student", "architecture"] = student
    for loc, architecture in classes.items():
        if check_imports and IMPORT_PATH.match(architecture):
            message = import_problem(architecture, root)
            if message:
                problems.append((loc, message))
    return problems


def _path_problems(sections: Mapping[str, Any], root: Path) -> Iterator[tuple[Loc, str]]:
    """Every path field that resolves outside the project and the allowed roots."""
    pipeline: PipelineSpec | None = sections.get("pipeline")
    allowed = pipeline.allowed_roots if pipeline is not None else []
    for section_name, field_name in PATH_FIELDS:
        value = getattr(sections.get(section_name), field_name, None)
        if isinstance(value, str) and (message := path_problem(value, root, allowed)):
            yield (section_name, field_name), message


def _data_problems(data: DataSpec, root: Path, *, check_paths: bool) -> Iterator[tuple[Loc, str]]:
    features = data.features
    if not features.all:
        yield ("data", "features"), "declare at least one numeric or categorical feature"
    seen: dict[str, Loc] = {}
    for kind in ("numeric", "categorical"):
        for index, column in enumerate(getattr(features, kind)):
            loc: Loc = ("data", "features", kind, index)
            if column in seen:
                first = dotted(seen[column])
                yield loc, f"column {column!r} is declared more than once (first at {first})"
            else:
                seen[column] = loc
    for role in ("target", "id"):
        column = getattr(data, role)
        if column is not None and column in seen:
            yield ("data", role), f"column {column!r} is also declared as a feature"
    if data.id is not None and data.id == data.target:
        yield ("data", "id"), "the id column cannot be the target"

    split = data.split
    if split.method == "time" and not split.time_column:
        yield ("data", "split", "time_column"), "required when split.method is `time`"
    if split.time_column and split.time_column in seen:
        yield ("data", "split", "time_column"), "the time column cannot be a feature"
    if split.test_fraction + split.validation_fraction * (1 - split.test_fraction) >= 0.95:
        yield ("data", "split"), "test and validation fractions leave almost nothing to train on"

    if check_paths:
        data_path = root / data.path
        if not data_path.exists():
            yield (
                ("data", "path"),
                f"{data_path} does not exist (generate or fetch it first: `stemma data generate` "
                "for the worked example, `dvc pull` for a DVC remote)",
            )
        elif (
            data.format == "auto"
            and data_path.is_file()
            and data_path.suffix.lower() not in (".parquet", ".csv")
        ):
            yield (
                ("data", "format"),
                f"cannot tell the format of {data_path.name}; set parquet or csv",
            )


def data_tracking_problem(data: DataSpec, root: Path) -> str | None:
    """Why training will refuse ``data.path`` as unversioned, or None when DVC tracks it.

    Tracked means covered by an output of a ``.dvc`` file or of a ``dvc.yaml`` stage in the
    file's folder or one above it, up to the project root. A warning rather than a problem
    of the spec: scoring and monitoring read no training data, and the fix is one command.
    """
    project = root.resolve()
    target = (project / data.path).resolve()
    folder = target.parent
    for current in [folder, *folder.parents]:
        for pointer in [*sorted(current.glob("*.dvc")), current / "dvc.yaml"]:
            if any(target.is_relative_to(out) for out in _dvc_outputs(pointer)):
                return None
        if current == project or not current.is_relative_to(project):
            break
    top = Path(data.path).parts[0] if target.is_relative_to(project) else data.path
    return (
        f"{data.path} is not tracked by DVC (no .dvc file covers it and no dvc.yaml stage "
        f"writes it), so `stemma run train` will refuse it; fix: `dvc add {top}`, then "
        "commit the .dvc file"
    )


def _dvc_outputs(pointer: Path) -> Iterator[Path]:
    """The outputs a ``.dvc`` file or a ``dvc.yaml`` names, as absolute paths."""
    try:
        document = yaml.safe_load(pointer.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if not isinstance(document, dict):
        return
    if pointer.name == "dvc.yaml":
        stages = document.get("stages")
        outs_lists = [
            (stage.get("outs"), pointer.parent / str(stage.get("wdir") or "."))
            for stage in (stages.values() if isinstance(stages, dict) else [])
            if isinstance(stage, dict)
        ]
    else:
        outs_lists = [(document.get("outs"), pointer.parent)]
    for outs, base in outs_lists:
        for out in outs if isinstance(outs, list) else []:
            # `- path`, `- {path: ...}` (.dvc files) or `- path: {cache: false}` (dvc.yaml)
            path = out.get("path") if isinstance(out, dict) and "path" in out else out
            if isinstance(path, dict) and len(path) == 1:
                (path,) = path
            if isinstance(path, str):
                yield (base / path).resolve()


def _evaluate_problems(evaluate: EvaluateSpec, data: DataSpec) -> Iterator[tuple[Loc, str]]:
    if data.id is None:
        yield (
            ("data", "id"),
            "required by `evaluate`: shadow and canary evaluation join rows by the id column",
        )
    features = data.features.all
    seen: set[str] = set()
    for index, column in enumerate(evaluate.shadow.segments):
        loc: Loc = ("evaluate", "shadow", "segments", index)
        if column not in features:
            yield (
                loc,
                f"{column!r} is not a feature column; segment by one of {', '.join(features)}",
            )
        elif column in seen:
            yield loc, f"{column!r} is listed more than once"
        seen.add(column)
    steps = evaluate.canary.steps
    if any(later <= earlier for earlier, later in pairwise(steps)):
        yield ("evaluate", "canary", "steps"), f"must increase step by step, got {steps}"
    if steps and steps[-1] != 1.0:
        yield (
            ("evaluate", "canary", "steps"),
            f"must end at 1.0 (the step at which the challenger is promoted), got {steps[-1]}",
        )


def _quantize_problems(quantize: QuantizeSpec) -> Iterator[tuple[Loc, str]]:
    seen: set[str] = set()
    for index, method in enumerate(quantize.methods):
        if method in seen:
            yield ("quantize", "methods", index), f"method {method!r} is listed twice"
        seen.add(method)


def _train_problems(train: TrainSpec) -> Iterator[tuple[Loc, str]]:
    distributed = train.distributed
    if distributed is None:
        return
    loc: Loc = ("train", "distributed")
    if distributed.backend == "nccl" and train.device == "cpu":
        yield (
            (*loc, "backend"),
            "nccl needs CUDA, but train.device is cpu: use gloo (or auto) on the CPU",
        )
    if distributed.nproc_per_node > train.batch_size:
        yield (
            (*loc, "nproc_per_node"),
            f"{distributed.nproc_per_node} processes cannot share a batch of "
            f"{train.batch_size} rows (train.batch_size): each needs at least one row",
        )


def _gate_problems(gate: GateSpec, task: str) -> Iterator[tuple[Loc, str]]:
    metrics = METRIC_DIRECTIONS[task]
    if gate.metric not in metrics:
        yield ("gate", "metric"), _unknown_metric(gate.metric, task)
    else:
        higher_is_better = metrics[gate.metric]
        if higher_is_better and gate.maximum is not None:
            yield ("gate", "maximum"), f"{gate.metric} is better when higher: set `minimum` instead"
        if not higher_is_better and gate.minimum is not None:
            yield ("gate", "minimum"), f"{gate.metric} is better when lower: set `maximum` instead"


def _monitor_problems(monitor: MonitorSpec, data: DataSpec) -> Iterator[tuple[Loc, str]]:
    declared = data.features.all
    for index, column in enumerate(monitor.features or []):
        if column not in declared:
            yield (
                ("monitor", "features", index),
                f"{column!r} is not a feature of data.features ({', '.join(declared)})",
            )
    monitored = len(monitor.features) if monitor.features is not None else len(declared)
    if monitor.features is not None and not monitor.features:
        yield ("monitor", "features"), "list at least one feature, or leave it out"
    elif monitor.min_drifted_features > monitored:
        yield (
            ("monitor", "min_drifted_features"),
            f"must be at most the {monitored} monitored features",
        )
    if monitor.metric is not None and monitor.metric not in METRIC_DIRECTIONS[data.task]:
        yield ("monitor", "metric"), _unknown_metric(monitor.metric, data.task)
    yield from _monitor_statistics_problems(monitor, data)


def _monitor_statistics_problems(monitor: MonitorSpec, data: DataSpec) -> Iterator[tuple[Loc, str]]:
    """A PSI threshold that nothing computes, and kinds of column that nothing decides on."""
    statistics = monitor.statistics
    psi_decides = monitor.thresholds.psi is not None
    if psi_decides and "psi" not in [*statistics.numeric, *statistics.categorical]:
        yield (
            ("monitor", "thresholds", "psi"),
            "PSI is not among monitor.statistics: add psi to statistics.numeric or "
            "statistics.categorical, or leave the threshold out",
        )
    monitored = monitor.features or data.features.all
    for kind, tests in (("numeric", {"ks"}), ("categorical", {"chi2", "jensen_shannon"})):
        listed = set(getattr(statistics, kind))
        has_columns = any(column in getattr(data.features, kind) for column in monitored)
        if has_columns and not listed & tests and not psi_decides:
            yield (
                ("monitor", "statistics", kind),
                f"{', '.join(sorted(listed))} decides nothing without monitor.thresholds.psi: "
                f"add {' or '.join(sorted(tests))}, or set a PSI threshold",
            )


def _unknown_metric(metric: str, task: str) -> str:
    return f"{metric!r} is not a {task} metric; choose one of {', '.join(METRIC_DIRECTIONS[task])}"


def _check_problems(
    checks: list[Expectation], *, check_expectations: bool
) -> Iterator[tuple[Loc, str]]:
    for index, check in enumerate(checks):
        if len(check) != 1:
            yield ("checks", index), "each check is a one-key mapping `expect_...: {kwargs}`"
        elif check_expectations:
            for _, message in expectation_problems([check]):
                yield ("checks", index, *check), message


def put_project_on_import_path(root: Path) -> None:
    """Put a project's root first on ``sys.path`` (once), as ``PYTHONPATH=<root>`` would.

    Then ``model.architecture: mymodels:ResMLP`` imports the project's own ``mymodels.py``
    (or ``mymodels/`` package) whatever folder Stemma runs from, and before an installed
    module of that name, as MLflow's ``code_paths`` does where the logged model is loaded.
    Only a spec whose model is an import path does this, and only for its own root.
    """
    # On purpose never undone: the need lasts as long as the process may build the
    # network (training, and the scoring and evaluation that rebuild it), the user's module
    # may import its own siblings lazily, and the worker processes multiprocessing spawns
    # (Dask's) start from this sys.path. A block-scoped insertion would break those.
    entry = str(Path(root).resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)


def import_problem(import_path: str, root: Path | None = None) -> str | None:
    """Why ``module:Class`` cannot be used as a model class, or None when it can.

    Args:
        import_path: ``module:Class``.
        root: the spec's project root, put on the import path first
            (:func:`put_project_on_import_path`).
    """
    module_name, _, class_name = import_path.partition(":")
    if root is not None:
        put_project_on_import_path(root)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure is the user's to see
        problem = f"cannot import module {module_name!r}: {type(error).__name__}: {error}"
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        if missing and not f"{module_name}.".startswith(f"{missing}."):
            return f"{problem}; {module_name} imports {missing!r}, which is not installed here: install it"
        where = f" {Path(root).resolve()}" if root is not None else ""
        top = module_name.partition(".")[0]
        return (
            f"{problem}; put {top}.py (or the package folder {top}/) in the project "
            f"root{where}, or install it"
        )
    cls = getattr(module, class_name, None)
    if cls is None:
        return (
            f"module {module_name!r} has no attribute {class_name!r} "
            f"(imported from {getattr(module, '__file__', None) or 'a namespace package'})"
        )
    if not isinstance(cls, type):
        return f"{import_path} is not a class"
    try:
        import torch  # only reached for custom architectures, which import torch themselves
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not issubclass(cls, torch.nn.Module):
        return f"{import_path} is not a torch.nn.Module"
    return None
