"""The pipeline spec: one YAML file per pipeline, validated as a whole before anything runs.

Every section is a pydantic model with ``extra="forbid"``, typed and bounded fields and a
description (shown in ``stemma schema``, editors and the Prefect UI). :func:`load_spec`
collects *every* problem (schema errors, paths, duplicate columns, unknown expectations,
model classes that do not import) into one :class:`~.errors.SpecError` whose lines read
``credit.yaml:14 train.epochs: must be greater than 0``.

Hostile files are refused before they cost anything (:mod:`.loading`): plain YAML only
(a ``!!python/...`` tag is refused, never run), at most :data:`MAX_SPEC_BYTES` bytes,
:data:`MAX_SPEC_DEPTH` levels and :data:`MAX_SPEC_NODES` values with aliases expanded.
``--set`` values go through the same loader. Every path of the spec (:data:`PATH_FIELDS`,
and any path a run is given, through :meth:`LoadedSpec.resolve`) must resolve, ``..`` and
symlinks followed, inside the project root or a folder of ``pipeline.allowed_roots``.

Modules: :mod:`.sections`, :mod:`.operations` and :mod:`.monitor` (the sections),
:mod:`.limits` (metric limits in the metric's units or relative, ``0.005`` or ``2%``, and
labelled-row minimums that scale with the batch), :mod:`.document` (the whole spec and its
problems), :mod:`.loading` and :mod:`.expectations` (the fast check of data checks). This
package re-exports their public names lazily and
imports no heavy library (torch, mlflow, great_expectations, prefect), so that
``stemma --help`` and ``stemma validate`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: This package's module -> the public names it defines, re-exported here on first use.
_MODULES = {
    "sections": "METRIC_DIRECTIONS CLASSIFICATION_TASKS BUILTIN_ARCHITECTURES Name PipelineSpec FeaturesSpec "
    "SplitSpec DataSpec Expectation ModelSpec EarlyStoppingSpec DistributedSpec TrainSpec "
    "GateSpec DaskSpec ScoreSpec RetrainSpec",
    "monitor": "NumericStatistic CategoricalStatistic MonitorStatisticsSpec "
    "MonitorThresholdsSpec MonitorSpec",
    "operations": "QUANTIZE_METHODS QuantizeMethod ShadowSpec CanaryGuardsSpec "
    "CanarySpec EvaluateSpec QuantizeSpec EndpointSpec",
    "document": "PATH_FIELDS Spec LoadedSpec path_problem flatten json_schema Problem "
    "import_problem put_project_on_import_path",
    "loading": "MAX_SPEC_BYTES MAX_SPEC_DEPTH MAX_SPEC_NODES SpecLimitError load_yaml "
    "apply_overrides find_project_root load_spec",
    "compress": "COMPRESS_METHODS PRUNE_CRITERIA SERVE_CHOICES PROBE_BATCH_SIZES ILLUSTRATIVE_MACHINES PruneSpec "
    "StudentSpec DistillSpec CompressSpec MachineSpec CostSpec cost_per_million",
    "limits": "TARGET_UNIT_METRICS MetricDrop MetricDropLimit PositiveMetricDrop MetricMargin "
    "parse_metric_drop default_drop scaled_minimum describe_drop percent_of",
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names.split()}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # the same names, for type checkers
    from stemma.components.spec.compress import *  # noqa: F403
    from stemma.components.spec.document import *  # noqa: F403
    from stemma.components.spec.limits import *  # noqa: F403
    from stemma.components.spec.loading import *  # noqa: F403
    from stemma.components.spec.monitor import *  # noqa: F403
    from stemma.components.spec.operations import *  # noqa: F403
    from stemma.components.spec.sections import *  # noqa: F403
