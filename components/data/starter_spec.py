"""The spec `stemma init` writes: YAML text with comments, from an :class:`InferredSpec`.

The text is written here rather than dumped, so that it can say why each value is what it
is. Sections the user need not change yet are written as comments holding their defaults,
taken from the spec's own models so that they never drift from them. Before anything is
written, :func:`check_spec_text` validates the text as `stemma validate` would read it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import yaml

from stemma.components.data.inference import (
    MAX_INTEGER_CATEGORIES,
    RANGE_MARGIN,
    InferredSpec,
    shown,
)
from stemma.components.errors import SpecError

#: Where production batches and their labels land: outside the DVC-tracked training data.
PRODUCTION_BATCHES = "production/batches"
PRODUCTION_LABELS = "production/labels"
#: Where scoring writes its parts.
SCORES_OUTPUT = "outputs/scores"
#: The primary metric of the gate, per task.
GATE_METRICS = {"binary": "roc_auc", "multiclass": "accuracy", "regression": "rmse"}
#: The share of rows the default split trains on (test 0.2, then validation 0.1 of the rest).
TRAINING_SHARE = 0.8 * 0.9
#: Optimisation steps an epoch should have, which sizes the batch to the table...
STEPS_PER_EPOCH = 20
#: ...within these bounds (powers of two).
MIN_BATCH_SIZE, MAX_BATCH_SIZE = 32, 512
#: Longest line written before a list wraps.
LINE_WIDTH = 100
#: Characters that make a plain YAML scalar mean something else (flow, comment, anchor, ...).
YAML_SPECIAL = set(",[]{}#&*!|>'\"%@`:") | {"\t"}


def render_spec(inferred: InferredSpec) -> str:
    """The spec's YAML text, every inferred value commented."""
    sections = [
        _header(inferred),
        _pipeline(inferred),
        _data(inferred),
        _checks(inferred),
        _training(inferred),
        _production(inferred),
        _defaults(inferred),
    ]
    return "\n".join(section.rstrip("\n") + "\n" for section in sections)


def _header(inferred: InferredSpec) -> str:
    return (
        f"# {inferred.name}: a Stemma pipeline inferred by `stemma init` from {inferred.data_path}\n"
        f"# ({inferred.rows:,} rows, {inferred.columns} columns). Every value is a suggestion: "
        "change what is\n# wrong, then `stemma validate` and `stemma run train` this file; "
        "`stemma schema`\n# describes every field.\n"
    )


def _pipeline(inferred: InferredSpec) -> str:
    name = scalar(inferred.name)
    return (
        f"pipeline:\n  name: {name}\n"
        f"  experiment: {name}   # the MLflow experiment\n"
        f"  model_name: {name}   # the registered model\n"
    )


def _data(inferred: InferredSpec) -> str:
    lines = [
        "data:",
        f"  path: {scalar(inferred.data_path)}   # tracked by DVC (data.dvc): after changing "
        "it, `dvc add data`",
        f"  task: {inferred.task}   # {_task_reason(inferred)}",
        f"  target: {scalar(inferred.target)}",
    ]
    if inferred.labels is not None:
        negative, positive = inferred.labels
        lines.append(
            f"  # {positive!r} is the positive class (1); swap the 0 and 1 to predict {negative!r}"
        )
        lines.append(f"  labels: {flow(inferred.labels)}")
    if inferred.classes is not None:
        lines.append("  # the classes in the model's output order")
        lines += wrapped("  classes: ", inferred.classes)
    if inferred.id_column is not None:
        lines.append(
            f"  id: {scalar(inferred.id_column)}   # never a feature; joins labels to production rows"
        )
    else:
        lines.append(
            "  # id: <column>   # an entity id: shadow, canary and retraining join labels by it"
        )
    lines += ["  features:", "    # numbers (floats, integers with many values): standardised"]
    lines += wrapped("    numeric: ", inferred.numeric)
    lines.append(
        f"    # text, booleans and integers with at most {MAX_INTEGER_CATEGORIES} values: one-hot "
        "encoded"
    )
    if inferred.integer_codes:
        codes = [f"{column} ({count})" for column, count in inferred.integer_codes.items()]
        lines.append(
            f"    # read as codes: {shown(codes, limit=8)}; move a count or a rating to numeric"
        )
    lines += wrapped("    categorical: ", inferred.categorical)
    lines += [f"    # left out: {column}: {reason}" for column, reason in inferred.left_out]
    lines += [
        "  split:",
        "    method: random   # or `time`, with time_column: the latest rows are the test set",
        "    test_fraction: 0.2",
        "    validation_fraction: 0.1   # of the rest: early stopping watches it",
        "    seed: 7",
    ]
    return "\n".join(lines) + "\n"


def _task_reason(inferred: InferredSpec) -> str:
    if inferred.task == "regression":
        return f"{inferred.target!r} holds numbers with many values"
    if inferred.task == "multiclass":
        return f"{len(inferred.classes or [])} classes in {inferred.target!r}"
    if inferred.labels is not None:
        return f"two values in {inferred.target!r}, mapped to 0 and 1 by labels"
    return f"{inferred.target!r} holds 0/1 (or booleans)"


def _checks(inferred: InferredSpec) -> str:
    lines = [
        "# Great Expectations checks of the training table, suggested from its values",
        f"# (ranges with a {RANGE_MARGIN:.0%} margin of the span); training stops when one fails.",
        "checks:",
    ]
    for check in inferred.checks:
        ((name, kwargs),) = check.items()
        lines += wrapped(f"  - {name}: ", kwargs)
    return "\n".join(lines) + "\n"


def _training(inferred: InferredSpec) -> str:
    metric = GATE_METRICS[inferred.task]
    bound = "maximum" if inferred.task == "regression" else "minimum"
    training_rows = math.floor(inferred.rows * TRAINING_SHARE)
    size = batch_size(training_rows)
    return (
        "model:\n"
        "  architecture: mlp   # or `package.module:Class`, your own torch.nn.Module\n"
        "  hidden: [64, 32]\n"
        "  dropout: 0.1\n"
        "\n"
        "train:\n"
        "  epochs: 20\n"
        f"  batch_size: {size}   # {math.ceil(training_rows / size)} steps an epoch on "
        f"{training_rows:,} training rows\n"
        "  learning_rate: 0.001\n"
        "  optimizer: adam\n"
        "  seed: 7\n"
        "  device: auto   # CUDA (bf16) when there is a GPU, else the CPU\n"
        "  early_stopping: {patience: 3, min_delta: 0.0001}\n"
        "\n"
        "# A new model gets an alias only when it beats the champion on the same test rows.\n"
        "gate:\n"
        f"  metric: {metric}\n"
        f"  # {bound}: <value>   # and, once you know what is good enough, clears this bar\n"
        "  margin_over_champion: 0.0\n"
    )


def batch_size(training_rows: int) -> int:
    """A power of two that gives ``training_rows`` about :data:`STEPS_PER_EPOCH` steps."""
    size = 2 ** math.floor(math.log2(max(training_rows / STEPS_PER_EPOCH, 1)))
    return min(MAX_BATCH_SIZE, max(MIN_BATCH_SIZE, size))


def _production(inferred: InferredSpec) -> str:
    text = (
        "# Production batches land in production/ (git-ignored, outside the DVC-tracked\n"
        "# training data); `stemma run score` writes their predictions under outputs/.\n"
        "score:\n"
        f"  input: {PRODUCTION_BATCHES}\n"
        f"  output: {SCORES_OUTPUT}\n"
        "  invalid_rows: reject   # rows with missing values go to the rejects\n"
        "  unknown_categories: reject\n"
        '  schedule: "0 2 * * *"   # nightly, under `stemma serve`\n'
    )
    if inferred.id_column is None:
        return text
    return text + (
        "\n# Shadow and canary evaluation of a challenger on labelled production rows.\n"
        "evaluate:\n"
        f"  labels: {PRODUCTION_LABELS}\n"
    )


def _defaults(inferred: InferredSpec) -> str:
    from stemma.components.spec.monitor import MonitorSpec
    from stemma.components.spec.operations import EvaluateSpec, QuantizeSpec
    from stemma.components.spec.sections import RetrainSpec

    commented: list[tuple[str, str, Any]] = [
        (
            "monitor",
            "Drift of production batches against the training profile",
            MonitorSpec(labels=PRODUCTION_LABELS if inferred.id_column else None),
        ),
        ("quantize", "Quantized variants (int8, bf16), registered when they pay", QuantizeSpec()),
    ]
    if inferred.id_column is not None:
        retrain = RetrainSpec(batches=PRODUCTION_BATCHES, labels=PRODUCTION_LABELS)
        commented.insert(
            1, ("retrain", "Continuous training on newly labelled production batches", retrain)
        )
    else:
        evaluate = EvaluateSpec(labels=PRODUCTION_LABELS)
        commented.insert(1, ("evaluate", "Shadow and canary evaluation (needs data.id)", evaluate))
    lines = [
        "# Sections at their defaults: uncomment one to change it (`stemma schema` says more)."
    ]
    for name, what, section in commented:
        lines += ["#", f"# {what}."]
        document = section.model_dump(mode="json", exclude_none=True)
        lines += [f"# {line}" for line in block({name: document})]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# YAML text


def block(mapping: Mapping[str, Any], indent: str = "") -> list[str]:
    """A mapping as block YAML lines: top-level sections and mappings that hold mappings
    as blocks, the rest in flow style."""
    lines: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and (
            not indent or any(isinstance(v, Mapping) for v in value.values())
        ):
            lines.append(f"{indent}{scalar(key)}:")
            lines += block(value, indent + "  ")
        else:
            lines += wrapped(f"{indent}{scalar(key)}: ", value)
    return lines


def wrapped(prefix: str, value: Any) -> list[str]:
    """``prefix`` and ``value`` in flow style, lines broken after an item's comma before
    they pass :data:`LINE_WIDTH`; continuation lines are indented under the value."""
    lines = [prefix]
    indent = " " * len(prefix) + "  "
    for piece in _pieces(value):
        if len(lines[-1]) + len(piece.rstrip()) > LINE_WIDTH and lines[-1].strip():
            lines[-1] = lines[-1].rstrip()
            lines.append(indent)
        lines[-1] += piece
    return lines


def _pieces(value: Any) -> list[str]:
    """The flow text of ``value`` in pieces, each ending where a line may break."""
    if isinstance(value, Mapping):
        items = [
            [f"{scalar(key)}: " + (p := _pieces(item))[0], *p[1:]] for key, item in value.items()
        ]
        opening, closing = "{", "}"
    elif isinstance(value, list | tuple):
        items = [_pieces(item) for item in value]
        opening, closing = "[", "]"
    else:
        return [scalar(value)]
    if not items:
        return [opening + closing]
    pieces: list[str] = []
    for index, item in enumerate(items):
        item = [*item]
        item[-1] += ", " if index < len(items) - 1 else ""
        pieces += item
    pieces[0] = opening + pieces[0]
    pieces[-1] += closing
    return pieces


def flow(value: Any) -> str:
    """``value`` as one line of flow-style YAML."""
    return "".join(_pieces(value))


def scalar(value: Any) -> str:
    """A scalar as YAML that reads back as the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.partition("e")[0]:  # YAML 1.1 floats need a dot
            mantissa, _, exponent = text.partition("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    text = str(value)
    plain = (
        text
        and text == text.strip()
        and not YAML_SPECIAL & set(text)
        and not text.startswith(("-", "?"))
        and yaml.safe_load(text) == text
    )
    return text if plain else json.dumps(text, ensure_ascii=False)


def check_spec_text(text: str, where: str) -> None:
    """Validate a written spec as `stemma validate` reads it (schema and checks; no files).

    Raises:
        SpecError: the text is not a valid spec (a fault of Stemma's, named as such).
    """
    from pydantic import ValidationError

    from stemma.components.spec.document import Spec
    from stemma.components.spec.expectations import expectation_problems
    from stemma.components.spec.loading import load_yaml

    raw, _ = load_yaml(text)
    problems: list[str] = []
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as error:
        problems += [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    else:
        problems += [f"checks[{i}]: {message}" for i, message in expectation_problems(spec.checks)]
    if problems:
        raise SpecError(
            f"{where}: the inferred spec does not validate (a fault of stemma init; please "
            "report it); nothing was written",
            problems,
        )
