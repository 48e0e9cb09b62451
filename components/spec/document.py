"""The whole spec (:class:`Spec`), a loaded spec with its paths, and views of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from stemma.components.errors import SpecError
from stemma.components.spec.operations import EvaluateSpec, MonitorSpec, QuantizeSpec
from stemma.components.spec.sections import (
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
        problem = path_problem(relative, self.root, self.spec.pipeline.allowed_roots)
        if problem:
            raise SpecError(f"{self.path.name}: {problem}")
        path = Path(relative)
        return path if path.is_absolute() else self.root / path


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
            out[prefix] = (
                yaml.safe_dump(value, default_flow_style=True, width=10_000)
                .strip()
                .removesuffix("...")
                .strip()
            )

    walk("", spec.model_dump(mode="json"))
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec, every field described."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Stemma pipeline spec"
    return schema
