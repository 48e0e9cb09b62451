"""One comparison of a registered fp32 version with every variant of it, on the same rows.

A version's variants are the registered versions whose parent tag
(``registering.PARENT_VERSION_TAG``) leads to it: quantized ones, pruned and distilled
ones (fp32 networks of their own) and variants of those (a distilled student, then int8).
:func:`compare_versions` loads each through the one model runtime (files verified),
measures the gate metric on the held-out rows the parent was gated on, probes every
runtime interleaved (:func:`.runtime.probe.probe_runtimes`, so that load on the machine
slows all alike) at batches of 1, 64 and 4,096 rows, and prices a million predictions on
the spec's scoring machine. :func:`update_cheapest_alias` points ``v<parent>-cheapest`` at
the cheapest passing variant, which ``compress.serve: cheapest`` serves.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stemma.components.errors import CompressionError, RegistryError
from stemma.components.quantization import heldout as heldout_rows_of
from stemma.components.quantization import registering
from stemma.components.quantization.measure import heldout_labels, scores
from stemma.components.runtime.probe import DEFAULT_REPEATS, LatencyProfile, probe_runtimes
from stemma.components.spec import METRIC_DIRECTIONS, CompressSpec, CostSpec
from stemma.components.spec.compress import PROBE_BATCH_SIZES, MachineSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from stemma.components.runtime.loading import ScoringModel

#: How a variant's chain of methods is written: ``distill → int8_dynamic``.
CHAIN_ARROW = " → "
#: Links followed from a variant up to its parent; hand-edited tags that loop stop here.
MAX_CHAIN_DEPTH = 16
#: Files of a model that hold its weights (the rest: preprocessing, metadata, code).
WEIGHT_FILES = ("weights.safetensors", "network.onnx")
#: Status of the parent's row, and of a registered variant (registered only if it passed).
PARENT, PASSED = "parent", "passed"


@dataclass(frozen=True)
class FamilyMember:
    """A version of the parent's family, as the registry records it.

    Attributes:
        version: its number.
        chain: the methods from the parent down to it (empty for the parent itself).
        aliases: its aliases, sorted.
    """

    version: str
    chain: tuple[str, ...]
    aliases: tuple[str, ...]


def variant_family(
    versions: Iterable[ModelVersion], parent_version: str, aliases: Mapping[str, str]
) -> list[FamilyMember]:
    """The parent and every registered variant whose chain of parents leads to it.

    A variant still ``registering`` (never verified, never served) is left out. The
    parent comes first, then variants by depth and version number.

    Args:
        versions: every version of the registered model.
        parent_version: the fp32 parent's number.
        aliases: the registered model's ``{alias: version}``.
    """
    by_number = {str(version.version): version for version in versions}
    named: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        named.setdefault(str(number), []).append(alias)

    def chain_of(number: str) -> tuple[str, ...] | None:
        methods: list[str] = []
        for _ in range(MAX_CHAIN_DEPTH):
            if number == parent_version:
                return tuple(reversed(methods))
            found = by_number.get(number)
            recorded = (found.tags or {}) if found is not None else {}
            if registering.METHOD_TAG not in recorded:
                return None  # an fp32 version other than the parent: another family
            methods.append(recorded[registering.METHOD_TAG])
            number = recorded.get(registering.PARENT_VERSION_TAG, "")
        return None

    members = []
    for number, version in by_number.items():
        if (version.tags or {}).get(registering.STATUS_TAG) == registering.STATUS_REGISTERING:
            continue
        chain = chain_of(number)
        if chain is not None:
            members.append(FamilyMember(number, chain, tuple(sorted(named.get(number, [])))))
    return sorted(members, key=lambda member: (len(member.chain), int(member.version)))


@dataclass(frozen=True)
class VariantFigures:
    """One model of the comparison: the parent or a variant, and its figures.

    Attributes:
        version: the registered version.
        chain: the methods from the parent down to it (empty: the parent).
        aliases: its aliases.
        status: ``parent`` (the reference) or ``passed`` (a registered variant).
        backend: the runtime backend it ran on.
        value: the gate metric on the held-out rows.
        metric_drop: how much worse than the parent, in the metric's units (positive:
            worse), whichever direction is better.
        within_drop_limit: whether that drop is within ``compress.metric_drop``.
        profile: its latency probe.
        size_bytes: its model files (as recorded in its manifest) on disk.
        weights_bytes: the files holding its weights (and ONNX graph).
        parameters: the number of values in its network's parameters, when known.
        cost_per_million: the price of a million predictions on the scoring machine.
        cost_ratio: that price over the parent's.
        weights_sha256: the sha256 of the weights file that was loaded.
    """

    version: str
    chain: tuple[str, ...]
    aliases: tuple[str, ...]
    status: str
    backend: str
    value: float
    metric_drop: float
    within_drop_limit: bool
    profile: LatencyProfile
    size_bytes: int
    weights_bytes: int
    parameters: int | None
    cost_per_million: float
    cost_ratio: float
    weights_sha256: str = ""

    @property
    def is_parent(self) -> bool:
        return not self.chain

    @property
    def passed(self) -> bool:
        """Whether it may serve: the parent, or a variant that passed its gate."""
        return self.status in (PARENT, PASSED)

    @property
    def method(self) -> str:
        """Its own method (the last of its chain), ``fp32`` for the parent."""
        return self.chain[-1] if self.chain else "fp32"

    @property
    def chain_text(self) -> str:
        """``distill → int8_dynamic``; ``fp32 (parent)`` for the parent."""
        return CHAIN_ARROW.join(self.chain) if self.chain else "fp32 (parent)"

    @property
    def label(self) -> str:
        """``v4 distill → int8_dynamic``."""
        return f"v{self.version} {self.chain_text}"


@dataclass(frozen=True)
class VersionComparison:
    """A parent version and every variant of it, measured on the same rows, alike.

    Attributes:
        model_name, parent_version: the parent.
        task, metric, higher_is_better: the gate metric and its direction.
        parent_value: the parent's metric on the held-out rows.
        metric_drop_limit: ``compress.metric_drop`` in the metric's units;
            ``metric_drop_text`` as the spec gave it.
        machine, machine_description: the scoring machine costs are priced on.
        currency: the unit of every cost; ``illustrative_prices``: whether the prices are
            the spec's illustrative defaults.
        rows: held-out rows; ``data_md5``: their data version; ``data_pointer``: its DVC
            pointer file, relative to the project root.
        measured_on: what the probe ran on (CPU model, cores, GPU).
        variants: the parent first, then each variant.
        notes: what a reader should know about the comparison.
    """

    model_name: str
    parent_version: str
    task: str
    metric: str
    higher_is_better: bool
    parent_value: float
    metric_drop_limit: float
    metric_drop_text: str
    machine: str
    machine_description: str
    currency: str
    illustrative_prices: bool
    rows: int
    data_md5: str
    data_pointer: str
    measured_on: str
    variants: tuple[VariantFigures, ...]
    notes: tuple[str, ...] = ()

    @property
    def parent(self) -> VariantFigures:
        return self.variants[0]

    @property
    def cheapest(self) -> VariantFigures:
        """The passing model with the lowest cost per million predictions; the parent
        unless a variant undercuts it."""
        candidates = [v for v in self.variants if v.passed and math.isfinite(v.cost_per_million)]
        return min(candidates or [self.parent], key=lambda v: (v.cost_per_million, bool(v.chain)))

    def table(self) -> list[dict[str, Any]]:
        """One row per model (the parent first), for a table: identity, metric, latency
        per batch size, throughput, size and cost."""
        cheapest = self.cheapest.version
        rows = []
        for variant in self.variants:
            row: dict[str, Any] = {
                "model": f"v{variant.version}",
                "version": variant.version,
                "method": variant.method,
                "chain": variant.chain_text,
                "aliases": ", ".join(variant.aliases),
                "status": variant.status,
                self.metric: variant.value,
                "metric_drop": variant.metric_drop,
                "within_drop_limit": variant.within_drop_limit,
                "backend": variant.backend,
            }
            row.update(variant.profile.percentiles())
            row.update(
                rows_per_s=variant.profile.rows_per_s,
                size_bytes=variant.size_bytes,
                weights_bytes=variant.weights_bytes,
                parameters=variant.parameters,
                cpu_s_per_million=variant.profile.cpu_seconds_per_million,
                cost_per_million=variant.cost_per_million,
                cost_ratio=variant.cost_ratio,
                cheapest=variant.version == cheapest,
            )
            rows.append(row)
        return rows

    def metrics(self) -> dict[str, float]:
        """Numbers for MLflow: ``v<version>.<measure>`` per model, and the cheapest version."""
        values: dict[str, float] = {"cheapest_version": float(self.cheapest.version)}
        for variant in self.variants:
            prefix = f"v{variant.version}."
            values.update(variant.profile.metrics(prefix))
            values[prefix + self.metric] = variant.value
            values[prefix + "metric_drop"] = variant.metric_drop
            values[prefix + "size_bytes"] = float(variant.size_bytes)
            values[prefix + "cost_per_million"] = variant.cost_per_million
            values[prefix + "cost_ratio"] = variant.cost_ratio
            if variant.parameters is not None:
                values[prefix + "parameters"] = float(variant.parameters)
        return values


def compare_versions(
    model_name: str,
    parent_version: str,
    *,
    root: Path,
    metric: str,
    compress: CompressSpec | None = None,
    cost: CostSpec | None = None,
    client: MlflowClient | None = None,
    architectures: Collection[str] = (),
    device: str = "cpu",
    batch_sizes: Sequence[int] = PROBE_BATCH_SIZES,
    warmup: int = 3,
    repeats: int = DEFAULT_REPEATS,
) -> VersionComparison:
    """Measure fp32 ``parent_version`` and every variant of it alike, on its held-out rows
    (recomputed under ``root``), with the spec's ``compress`` drop limit and ``cost``
    scoring machine; ``architectures``: those the spec allows besides the built-ins;
    ``device``, ``batch_sizes``, ``warmup``, ``repeats``: how the models run and are probed.

    Raises:
        RegistryError: no such version, or a model's files are refused.
        CompressionError: the version is a variant, or a variant reads other inputs.
        SpecError: ``metric`` is not a metric of the model's task.
        DataError: the held-out rows cannot be recomputed, or are not those it was gated on.
    """
    from mlflow import MlflowClient

    client = client or MlflowClient()
    compress = compress or CompressSpec()
    cost = cost or CostSpec()
    versions = registering.model_versions(client, model_name)
    parent = _parent(versions, model_name, parent_version)
    family = variant_family(versions, parent_version, _aliases(client, model_name))
    heldout = heldout_rows_of.heldout_rows(client, parent, root)
    models = _load_family(client, model_name, family, architectures, device)
    _check_metric(reference := models[parent_version], metric)
    values, profiles = _measure(models, heldout, metric, batch_sizes, warmup, repeats)
    heldout_rows_of.check_parent_value(parent, metric, values[parent_version])
    higher_is_better = METRIC_DIRECTIONS[reference.task][metric]
    drop_limit = compress.metric_drop(metric)
    machine = cost.machine("scoring")
    notes = [] if len(family) > 1 else [f"{model_name} v{parent_version} has no registered variant"]
    shared = {
        "parent_value": values[parent_version],
        "parent_cost": profiles[parent_version].cost_per_million(machine),
        "higher_is_better": higher_is_better,
        "drop_limit": drop_limit.limit(values[parent_version]),
        "machine": machine,
    }
    with tempfile.TemporaryDirectory(prefix="stemma-compare-") as scratch:
        sizes = {
            m.version: _model_size(client, model_name, m.version, Path(scratch)) for m in family
        }
    figures = [
        _figures(
            m, models[m.version], profiles[m.version], values[m.version], sizes[m.version], **shared
        )
        for m in family
    ]
    return VersionComparison(
        model_name=model_name,
        parent_version=parent_version,
        task=reference.task,
        metric=metric,
        higher_is_better=higher_is_better,
        parent_value=values[parent_version],
        metric_drop_limit=drop_limit.limit(values[parent_version]),
        metric_drop_text=drop_limit.describe(values[parent_version]),
        machine=cost.scoring,
        machine_description=machine.description,
        currency=cost.currency,
        illustrative_prices=cost.illustrative,
        rows=len(heldout.frame),
        data_md5=heldout.md5,
        data_pointer=heldout.pointer(root),
        measured_on=profiles[parent_version].machine,
        variants=tuple(figures),
        notes=tuple(notes),
    )


def _load_family(
    client: MlflowClient,
    model_name: str,
    family: list[FamilyMember],
    architectures: Collection[str],
    device: str,
) -> dict[str, ScoringModel]:
    """Every model of the family, its files verified, by version (the parent first)."""
    from stemma.components.runtime.loading import load_scoring_model

    return {
        member.version: load_scoring_model(
            f"models:/{model_name}/{member.version}",
            client=client,
            architectures=architectures,
            device=device,
        )
        for member in family
    }


def _measure(
    models: Mapping[str, ScoringModel],
    heldout: Any,
    metric: str,
    batch_sizes: Sequence[int],
    warmup: int,
    repeats: int,
) -> tuple[dict[str, float], dict[str, LatencyProfile]]:
    """Every model's metric on the held-out rows and its probe, all probed interleaved on
    the first model's (the parent's) encoding of the rows."""
    reference = next(iter(models.values()))
    target = heldout.data.target
    y = heldout_labels(reference.preprocessor, heldout.frame[target], target)
    x = reference.preprocessor.transform(heldout.frame)
    values = {
        number: _metric_value(model, heldout.frame, x, y, metric)
        for number, model in models.items()
    }
    profiles = probe_runtimes(
        {number: model.runtime for number, model in models.items()},
        x,
        batch_sizes=batch_sizes,
        warmup=warmup,
        repeats=repeats,
    )
    return values, profiles


def _figures(
    member: FamilyMember,
    model: ScoringModel,
    profile: LatencyProfile,
    value: float,
    size: tuple[int, int],
    *,
    parent_value: float,
    parent_cost: float,
    higher_is_better: bool,
    drop_limit: float,
    machine: MachineSpec,
) -> VariantFigures:
    """One model's row of the comparison from its measurements."""
    drop = _drop(parent_value, value, higher_is_better)
    price = profile.cost_per_million(machine)
    return VariantFigures(
        version=member.version,
        chain=member.chain,
        aliases=member.aliases,
        status=PASSED if member.chain else PARENT,
        backend=model.runtime.backend,
        value=value,
        metric_drop=drop,
        within_drop_limit=drop <= drop_limit,
        profile=profile,
        size_bytes=size[0],
        weights_bytes=size[1],
        parameters=_parameters(model),
        cost_per_million=price,
        cost_ratio=price / parent_cost if parent_cost > 0 else math.inf,
        weights_sha256=model.weights_sha256,
    )


def resolve_parent(client: MlflowClient, reference: str) -> tuple[str, str]:
    """The registered model and version number a reference names.

    Raises:
        RegistryError: the reference is malformed, or names no model, alias or version.
    """
    from mlflow.exceptions import MlflowException

    from stemma.components.platform.refs import ModelRefError, parse_model_ref

    try:
        parsed = parse_model_ref(reference)
    except ModelRefError as error:
        raise RegistryError(error.headline, error.details) from None
    try:
        if parsed.alias is not None:
            found = client.get_model_version_by_alias(parsed.name, parsed.alias)
        else:
            found = client.get_model_version(parsed.name, str(parsed.version))
    except MlflowException as error:
        raise RegistryError(
            f"{reference} names no model version",
            [
                str(getattr(error, "message", error)).splitlines()[0],
                f"name one that exists: --model models:/{parsed.name}/<version>",
            ],
        ) from error
    return parsed.name, str(found.version)


def update_cheapest_alias(client: MlflowClient, comparison: VersionComparison) -> str | None:
    """Point ``v<parent>-cheapest`` at the comparison's cheapest passing variant, or remove
    it when the parent itself is cheapest (the latest comparison decides).

    Returns:
        The version the alias names, or None.

    Raises:
        RegistryError: MLflow refused to set or remove the alias.
    """
    from mlflow.exceptions import MlflowException

    alias = registering.cheapest_alias(comparison.parent_version)
    cheapest = comparison.cheapest
    name = comparison.model_name
    try:
        if not cheapest.is_parent:
            client.set_registered_model_alias(name, alias, cheapest.version)
            return cheapest.version
        if alias in _aliases(client, name):
            client.delete_registered_model_alias(name, alias)
    except MlflowException as error:
        raise registering.registry_error(f"cannot set the alias {alias}", error) from error
    return None


def _parent(versions: list[ModelVersion], model_name: str, number: str) -> ModelVersion:
    """The parent's registry entry: an fp32 version of the model, never a variant."""
    by_number = {str(version.version): version for version in versions}
    parent = by_number.get(str(number))
    if parent is None:
        known = ", ".join(sorted(by_number, key=int)) or "none"
        raise RegistryError(
            f"model {model_name!r} has no version {number}", [f"its versions: {known}"]
        )
    if registering.is_variant(parent):
        found = parent.tags or {}
        above = found.get(registering.PARENT_VERSION_TAG, "?")
        raise CompressionError(
            f"{model_name} v{number} is itself a variant "
            f"({found.get(registering.METHOD_TAG)} of v{above})",
            [f"compare its fp32 parent, which lists it: --model models:/{model_name}/{above}"],
        )
    return parent


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        raise registering.registry_error(f"cannot read {model_name!r}", error) from error
    return {alias: str(number) for alias, number in (registered.aliases or {}).items()}


def _check_metric(model: ScoringModel, metric: str) -> None:
    from stemma.components.errors import SpecError

    known = METRIC_DIRECTIONS.get(model.task, {})
    if metric not in known:
        raise SpecError(
            f"gate.metric {metric!r} is not a metric of {model.label}, a {model.task} model; "
            f"choose one of {', '.join(known)}"
        )


def _metric_value(
    model: ScoringModel, frame: Any, x: np.ndarray, y: np.ndarray, metric: str
) -> float:
    """The gate metric of one model on the held-out rows, through its own preprocessing."""
    from stemma.components.training.metrics import evaluate_scores

    own = model.preprocessor.transform(frame)
    if own.shape != x.shape:
        raise CompressionError(
            f"{model.label} reads {own.shape[1]} inputs per row, its parent {x.shape[1]}",
            ["a variant must take its parent's inputs to be compared with it"],
        )
    found = scores(model.runtime, own, model.preprocessor)
    return float(evaluate_scores(model.task, y, found, model.threshold)[metric])


def _drop(parent_value: float, value: float, higher_is_better: bool) -> float:
    """How much worse than the parent (positive: worse); a value that is not a number is
    as bad as can be, so that it never looks within a limit."""
    if not (math.isfinite(value) and math.isfinite(parent_value)):
        return math.inf
    return (parent_value - value) if higher_is_better else (value - parent_value)


def _parameters(model: ScoringModel) -> int | None:
    try:
        count = sum(int(parameter.numel()) for parameter in model.network.parameters())
    except Exception:  # a tensor subclass that cannot count itself: unknown, not wrong
        return None
    return count or None


def _model_size(
    client: MlflowClient, model_name: str, version: str, scratch: Path
) -> tuple[int, int]:
    """Bytes of a version's model files (those its manifest records) and of its weights."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from stemma.components.runtime.loading import verify_model_files

    label = f"{model_name} v{version}"
    try:
        uri = client.get_model_version_download_uri(model_name, version)
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri,
                dst_path=str(scratch / version),
                tracking_uri=client.tracking_uri,
            )
        )
        registered = client.get_model_version(model_name, version)
    except (MlflowException, OSError) as error:
        raise registering.registry_error(f"cannot download the files of {label}", error) from error
    manifest = verify_model_files(client, registered, folder, label)
    sizes = {relative: (folder / relative).stat().st_size for relative in manifest}
    weights = sum(size for relative, size in sizes.items() if Path(relative).name in WEIGHT_FILES)
    return sum(sizes.values()), weights
