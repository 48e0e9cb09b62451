"""The reference profile: what the training data looked like, saved with the model.

Drift monitoring compares each production batch with the data the model was trained on,
without reloading that data: at training time the flow builds a :class:`ReferenceProfile`
and stores it with the model version. Per feature it holds

* numeric: quantile bin edges and the rows in each bin (for PSI), the count of missing
  values, and a seeded sample of at most ``sample_size`` values, sorted, against which the
  Kolmogorov-Smirnov test is exact (the whole column when it is no larger);
* categorical: every category and its count;

plus the same for the model's scores on the held-out test split (rows the model never
trained on, so an unshifted batch scores like them), for a classifier the classes it
predicted on those rows (:func:`predicted_classes`), the training labels (label rate) and
the test metrics the performance check compares with.

The profile is one JSON document (``reference_profile.json``). It is logged as an artifact
of the training run, copied into the logged model's artifact folder (so it travels with
``models:/<name>/<version>``), and its sha256 is recorded as the tag
``stemma.profile.sha256`` on the logged model and the model version. Loading checks the
hash; a version registered before profiles were saved has no tag, which
:func:`load_model_profile` reports as :class:`MissingProfileError`.

mlflow is imported only inside the functions that talk to the registry.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stemma.components.errors import DataError, RegistryError
from stemma.components.platform import tags
from stemma.components.platform.files import write_atomically

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stemma.components.model.preprocessing import Preprocessor
    from stemma.components.spec import DataSpec

#: Layout version of the profile document; readers refuse layouts they do not know.
PROFILE_FORMAT = 1
#: The profile's file name, in the model's artifacts and under PROFILE_RUN_DIR of the run.
PROFILE_FILE = "reference_profile.json"
#: Folder of the training run's artifacts that holds the profile.
PROFILE_RUN_DIR = "profile"
#: Tag (on the logged model and the model version) holding the profile's sha256.
PROFILE_SHA256_TAG = tags.PROFILE_SHA256
#: Default quantile bins per numeric column.
DEFAULT_BINS = 10
#: Default size of the sorted sample kept per numeric column.
DEFAULT_SAMPLE_SIZE = 10_000
#: Seed of the sample draw, so the same data gives the same profile.
SAMPLE_SEED = 0
#: A binary model's decision threshold on the probability of class 1 (the model's own).
DEFAULT_THRESHOLD = 0.5

NUMERIC = "numeric"
CATEGORICAL = "categorical"

#: A category value as JSON keeps it: integer codes stay integers, anything else is text.
Category = int | str


class MissingProfileError(RegistryError):
    """The model version has no reference profile (registered before profiles existed)."""


# ---------------------------------------------------------------------------------------
# Column profiles


@dataclass(frozen=True)
class NumericProfile:
    """A numeric column of the reference rows.

    Attributes:
        rows: rows profiled, missing ones included.
        missing: rows whose value is missing or not finite.
        edges: interior bin edges, increasing; bin ``j`` holds ``edges[j-1] <= x < edges[j]``
            (the first and last bins are open-ended).
        counts: finite values per bin (``len(edges) + 1`` entries).
        sample: at most ``sample_size`` finite values, sorted (every value when there are
            no more).
        mean, std, minimum, maximum: of the finite values (None when there are none).
    """

    rows: int
    missing: int
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    sample: np.ndarray = field(repr=False)
    mean: float | None = None
    std: float | None = None
    minimum: float | None = None
    maximum: float | None = None

    kind = NUMERIC

    @property
    def finite(self) -> int:
        return self.rows - self.missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": NUMERIC,
            "rows": self.rows,
            "missing": self.missing,
            "edges": list(self.edges),
            "counts": list(self.counts),
            "mean": self.mean,
            "std": self.std,
            "min": self.minimum,
            "max": self.maximum,
            # float64 -> Python float -> JSON (repr) -> float64 is exact.
            "sample": self.sample.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> NumericProfile:
        edges = tuple(float(value) for value in _list(data, "edges", where))
        counts = tuple(_count(value, where) for value in _list(data, "counts", where))
        sample = np.asarray(_list(data, "sample", where), dtype=np.float64)
        if len(counts) != len(edges) + 1:
            raise ValueError(f"{where}: {len(counts)} counts for {len(edges)} edges")
        if np.any(np.diff(np.asarray(edges)) <= 0):
            raise ValueError(f"{where}: edges must increase")
        if sample.size and (np.any(np.diff(sample) < 0) or not np.isfinite(sample).all()):
            raise ValueError(f"{where}: the sample must be finite and sorted")
        return cls(
            rows=_count(data.get("rows"), where),
            missing=_count(data.get("missing"), where),
            edges=edges,
            counts=counts,
            sample=sample,
            mean=_optional_float(data.get("mean")),
            std=_optional_float(data.get("std")),
            minimum=_optional_float(data.get("min")),
            maximum=_optional_float(data.get("max")),
        )


@dataclass(frozen=True)
class CategoricalProfile:
    """A categorical column of the reference rows: every category and its count.

    Attributes:
        rows: rows profiled, missing ones included.
        missing: rows without a value.
        categories: the values seen, most frequent first (ties by value).
        counts: rows per category.
    """

    rows: int
    missing: int
    categories: tuple[Category, ...]
    counts: tuple[int, ...]

    kind = CATEGORICAL

    @property
    def finite(self) -> int:
        return self.rows - self.missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": CATEGORICAL,
            "rows": self.rows,
            "missing": self.missing,
            "categories": list(self.categories),
            "counts": list(self.counts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> CategoricalProfile:
        categories = tuple(_list(data, "categories", where))
        counts = tuple(_count(value, where) for value in _list(data, "counts", where))
        if len(categories) != len(counts):
            raise ValueError(f"{where}: {len(counts)} counts for {len(categories)} categories")
        if not all(isinstance(value, int | str) for value in categories):
            raise ValueError(f"{where}: categories must be integers or text")
        if len(set(categories)) != len(categories):
            raise ValueError(f"{where}: a category is listed twice")
        return cls(
            rows=_count(data.get("rows"), where),
            missing=_count(data.get("missing"), where),
            categories=categories,
            counts=counts,
        )


ColumnProfile = NumericProfile | CategoricalProfile


def profile_numeric(
    values: np.ndarray | pd.Series,
    *,
    bins: int = DEFAULT_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = SAMPLE_SEED,
) -> NumericProfile:
    """Profile a numeric column: quantile bins with their counts, and a sorted sample.

    The interior edges are the column's ``1/bins, 2/bins, ...`` quantiles, with repeated
    values merged (a column of few distinct values gets fewer bins). Missing and
    non-finite values are counted, not binned.

    Args:
        values: the column (not modified).
        bins: quantile bins wanted.
        sample_size: the most values kept in the sample.
        seed: seed of the sample draw when the column has more finite values.

    Raises:
        DataError: the column is not numeric.
    """
    if bins < 1 or sample_size < 1:
        raise ValueError("bins and sample_size must be at least 1")
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise DataError(f"cannot profile a non-numeric column: {error}") from None
    finite = array[np.isfinite(array)]
    ordered = np.sort(finite)
    if ordered.size:
        quantiles = np.quantile(ordered, np.arange(1, bins) / bins)
        edges = np.unique(quantiles)
        # Drop an edge at the minimum: the first bin would stay empty by construction.
        edges = edges[edges > ordered[0]]
    else:
        edges = np.empty(0)
    counts = bin_counts_sorted(ordered, edges)
    if ordered.size > sample_size:
        chosen = np.random.default_rng(seed).choice(ordered.size, size=sample_size, replace=False)
        sample = np.sort(ordered[chosen])
    else:
        sample = ordered
    stats: dict[str, float | None] = dict.fromkeys(("mean", "std", "minimum", "maximum"))
    if ordered.size:
        stats = {
            "mean": float(ordered.mean()),
            "std": float(ordered.std()),
            "minimum": float(ordered[0]),
            "maximum": float(ordered[-1]),
        }
    return NumericProfile(
        rows=int(array.size),
        missing=int(array.size - finite.size),
        edges=tuple(float(edge) for edge in edges),
        counts=tuple(int(count) for count in counts),
        sample=np.ascontiguousarray(sample),
        **stats,
    )


def bin_counts_sorted(ordered: np.ndarray, edges: np.ndarray | Sequence[float]) -> np.ndarray:
    """Values per bin of ``edges`` (bin j: ``edges[j-1] <= x < edges[j]``) of sorted values.

    Counting on sorted values costs one binary search per edge.
    """
    below = np.searchsorted(ordered, np.asarray(edges, dtype=np.float64), side="left")
    return np.diff(np.concatenate(([0], below, [ordered.size]))).astype(np.int64)


def profile_categorical(values: np.ndarray | pd.Series) -> CategoricalProfile:
    """Profile a categorical column: each category and its count, most frequent first."""
    series = pd.Series(values).reset_index(drop=True)
    present = series.dropna()
    counted = present.value_counts(sort=False)
    items = sorted(
        ((category_key(value), int(count)) for value, count in counted.items()),
        key=lambda item: (-item[1], str(item[0])),
    )
    return CategoricalProfile(
        rows=len(series),
        missing=int(len(series) - len(present)),
        categories=tuple(value for value, _ in items),
        counts=tuple(count for _, count in items),
    )


def category_key(value: Any) -> Category:
    """A category as JSON keeps it: integers (numpy's too) as int, anything else as text."""
    if isinstance(value, bool | np.bool_ | int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    return str(value)


# ---------------------------------------------------------------------------------------
# The profile of a model


@dataclass(frozen=True)
class ReferenceProfile:
    """What the reference rows of a model looked like.

    Attributes:
        task: ``binary``, ``multiclass`` or ``regression``.
        features: the profile of each feature column, by name.
        feature_kinds: ``numeric`` or ``categorical`` per feature, as the spec declared.
        scores: the model's scores on the held-out test split, or None.
        label: the target column's profile, or None: a classifier's is categorical, its
            labels as the model's classes (through its label map) when the profile was
            built with the model's preprocessor.
        target: the label column's name.
        id_column: the id column's name, or None.
        performance: the model's test-split metrics (``roc_auc``...), which a labelled
            batch is compared with.
        bins: the quantile bins asked for per numeric column.
        sample_size: the most values kept per numeric sample.
        source: where the reference rows came from (data version, rows per part).
        created: when the profile was built (ISO 8601).
        classes: a classifier's classes in the order of its outputs (binary: 0, 1).
        predictions: the classes the model predicted on the test split (a classifier), or
            None (a regression, or a profile made before Stemma recorded them).
        threshold: the probability of class 1 from which a binary model predicts 1.
    """

    task: str
    features: dict[str, ColumnProfile]
    target: str
    id_column: str | None = None
    scores: NumericProfile | None = None
    label: ColumnProfile | None = None
    performance: dict[str, float] = field(default_factory=dict)
    bins: int = DEFAULT_BINS
    sample_size: int = DEFAULT_SAMPLE_SIZE
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    classes: tuple[Category, ...] = ()
    predictions: CategoricalProfile | None = None
    threshold: float = DEFAULT_THRESHOLD

    @property
    def label_rate(self) -> float | None:
        """Share of positive labels in the reference rows (binary), else None."""
        if not isinstance(self.label, CategoricalProfile):
            return None
        return rate_of_one(self.label.categories, self.label.counts)

    def to_dict(self) -> dict[str, Any]:
        """The profile as a JSON-safe document."""
        return {
            "format": PROFILE_FORMAT,
            "task": self.task,
            "target": self.target,
            "id_column": self.id_column,
            "created": self.created,
            "bins": self.bins,
            "sample_size": self.sample_size,
            "source": dict(self.source),
            "label_rate": self.label_rate,
            "performance": dict(self.performance),
            "features": {name: column.to_dict() for name, column in self.features.items()},
            "scores": self.scores.to_dict() if self.scores is not None else None,
            "label": self.label.to_dict() if self.label is not None else None,
            "classes": list(self.classes),
            "predictions": self.predictions.to_dict() if self.predictions is not None else None,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ReferenceProfile:
        """Rebuild a profile from :meth:`to_dict` output.

        Raises:
            ValueError: the document is not a profile of a layout this Stemma reads.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a profile must be a mapping, got {type(data).__name__}")
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"profile format {data.get('format')!r}; this Stemma reads {PROFILE_FORMAT}"
            )
        features_data = data.get("features")
        if not isinstance(features_data, Mapping) or not features_data:
            raise ValueError("a profile needs a non-empty `features` mapping")
        features = {
            str(name): _column_from_dict(column, f"features.{name}")
            for name, column in features_data.items()
        }
        scores = data.get("scores")
        label = data.get("label")
        score_profile = _column_from_dict(scores, "scores") if scores is not None else None
        if score_profile is not None and not isinstance(score_profile, NumericProfile):
            raise ValueError("scores must be profiled as a numeric column")
        performance = data.get("performance") or {}
        if not isinstance(performance, Mapping):
            raise ValueError("performance must be a mapping of metric names to values")
        predictions = data.get("predictions")
        prediction_profile = (
            CategoricalProfile.from_dict(predictions, "predictions")
            if isinstance(predictions, Mapping)
            else None
        )
        classes = data.get("classes") or []
        if not isinstance(classes, list) or not all(isinstance(c, int | str) for c in classes):
            raise ValueError("classes must be a list of integers or text")
        return cls(
            task=str(data.get("task")),
            features=features,
            target=str(data.get("target")),
            id_column=data.get("id_column"),
            scores=score_profile,
            label=_column_from_dict(label, "label") if label is not None else None,
            performance={str(key): float(value) for key, value in performance.items()},
            bins=int(data.get("bins", DEFAULT_BINS)),
            sample_size=int(data.get("sample_size", DEFAULT_SAMPLE_SIZE)),
            source=dict(data.get("source") or {}),
            created=str(data.get("created", "")),
            classes=tuple(classes),
            predictions=prediction_profile,
            threshold=float(data.get("threshold", DEFAULT_THRESHOLD)),
        )

    def to_json_bytes(self) -> bytes:
        """The document's bytes as written: compact, keys in a fixed order."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")


def rate_of_one(categories: Sequence[Any], counts: Sequence[int] | np.ndarray) -> float | None:
    """The share of the category 1 among the counted rows (a binary label's rate); None
    without rows."""
    total = float(np.sum(counts))
    if total <= 0:
        return None
    return float(sum(c for v, c in zip(categories, counts, strict=True) if v == 1)) / total


def _column_from_dict(data: Any, where: str) -> ColumnProfile:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: must be a mapping")
    kind = data.get("kind")
    if kind == NUMERIC:
        return NumericProfile.from_dict(data, where)
    if kind == CATEGORICAL:
        return CategoricalProfile.from_dict(data, where)
    raise ValueError(f"{where}: kind must be numeric or categorical, got {kind!r}")


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key}: must be a list")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: counts must be non-negative integers, got {value!r}")
    return value


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def predicted_classes(
    scores: np.ndarray,
    *,
    classes: Sequence[Category] = (),
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """The class a classifier predicts from each row's scores; rows with a missing or
    non-finite score are left out.

    Args:
        scores: the probability of class 1, shape ``(n,)`` (binary: class 1 from
            ``threshold`` on, else 0), or each class's probability, shape ``(n, classes)``
            (multiclass: the likeliest class).
        classes: the classes in the order of the scores' columns (default: their indices).
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 1:
        finite = values[np.isfinite(values)]
        return (finite >= threshold).astype(np.int64)
    usable = values[np.isfinite(values).all(axis=1)]
    best = usable.argmax(axis=1)
    if not classes:
        return best.astype(np.int64)
    return np.asarray(classes, dtype=object)[best]


def build_reference_profile(
    frame: pd.DataFrame,
    data: DataSpec,
    *,
    scores: np.ndarray | None = None,
    performance: Mapping[str, float] | None = None,
    bins: int = DEFAULT_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    source: Mapping[str, Any] | None = None,
    preprocessor: Preprocessor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> ReferenceProfile:
    """Profile the reference rows of a model.

    Args:
        frame: the reference rows (the training table): every feature column, and the
            target when it is present (not modified).
        data: the spec's data section (feature kinds, target, id, task).
        scores: the model's scores on held-out rows of the same data (the test split).
        performance: the model's metrics on those rows.
        bins: quantile bins per numeric column.
        sample_size: the most values kept per numeric sample.
        source: where the rows came from (recorded as given).
        preprocessor: a classifier's fitted preprocessor: its classes (in the order of its
            outputs) name the predicted classes, and the labels are profiled as the classes
            its label map makes of them (as the monitor counts a batch's labels). Without
            it: classes ``0, 1`` (binary) or ``data.classes``, labels as they are.
        threshold: a binary model's decision threshold.

    Raises:
        DataError: a feature column is missing or a numeric one is not numeric.
    """
    missing = [column for column in data.features.all if column not in frame.columns]
    if missing:
        raise DataError(f"cannot profile the reference rows: missing {', '.join(missing)}")
    features: dict[str, ColumnProfile] = {}
    for column in data.features.numeric:
        try:
            features[column] = profile_numeric(frame[column], bins=bins, sample_size=sample_size)
        except DataError as error:
            raise DataError(f"cannot profile numeric feature {column!r}: {error}") from None
    for column in data.features.categorical:
        features[column] = profile_categorical(frame[column])
    classes = _classes(data, preprocessor)
    label: ColumnProfile | None = None
    if data.target in frame.columns:
        if data.task == "regression":
            label = profile_numeric(frame[data.target], bins=bins, sample_size=sample_size)
        else:
            label = _profile_labels(frame[data.target], classes, preprocessor)
    score_profile = prediction_profile = None
    if scores is not None:
        # A multiclass model's score is its predicted class's probability.
        flat = scores.max(axis=1) if np.ndim(scores) == 2 else scores
        score_profile = profile_numeric(flat, bins=bins, sample_size=sample_size)
        if data.task != "regression":
            prediction_profile = profile_categorical(
                predicted_classes(scores, classes=classes, threshold=threshold)
            )
    return ReferenceProfile(
        task=data.task,
        features=features,
        target=data.target,
        id_column=data.id,
        scores=score_profile,
        label=label,
        performance={
            key: float(value)
            for key, value in (performance or {}).items()
            if math.isfinite(float(value))
        },
        bins=bins,
        sample_size=sample_size,
        source=dict(source or {}),
        created=datetime.now(UTC).isoformat(),
        classes=tuple(category_key(value) for value in classes),
        predictions=prediction_profile,
        threshold=threshold,
    )


def _classes(data: DataSpec, preprocessor: Preprocessor | None) -> tuple[Category, ...]:
    """A classifier's classes in the order of its outputs; none for a regression."""
    if data.task == "regression":
        return ()
    if preprocessor is not None:
        return tuple(preprocessor.class_names())
    return (0, 1) if data.task == "binary" else tuple(data.classes or ())


def _profile_labels(
    target: pd.Series, classes: Sequence[Category], preprocessor: Preprocessor | None
) -> CategoricalProfile:
    """A classifier's labels, as the classes its preprocessor's label map makes of them
    (a label of no class counts as missing), or as they are without a preprocessor."""
    if preprocessor is None:
        return profile_categorical(target)
    codes = preprocessor.class_codes(target.reset_index(drop=True))
    named = pd.Series(np.asarray(classes, dtype=object)[np.maximum(codes, 0)])
    return profile_categorical(named.where(codes >= 0))


def write_profile(profile: ReferenceProfile, path: Path) -> str:
    """Write the profile as JSON, atomically; return the sha256 of the bytes written."""
    payload = profile.to_json_bytes()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, payload)
    return hashlib.sha256(payload).hexdigest()


def read_profile(path: Path, expected_sha256: str | None = None) -> ReferenceProfile:
    """Read a profile written by :func:`write_profile`, checking its sha256 when given.

    Raises:
        RegistryError: the bytes differ from the recorded hash, or are not a profile.
    """
    payload = Path(path).read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise RegistryError(
            f"{path.name}: the reference profile does not match the sha256 recorded with the model",
            [
                f"recorded {expected_sha256}",
                f"found    {digest}",
                "the artifact store changed after registration: restore it or retrain",
            ],
        )
    try:
        return ReferenceProfile.from_dict(json.loads(payload))
    except (ValueError, TypeError) as error:
        raise RegistryError(f"{path.name}: not a reference profile", [str(error)]) from None


# ---------------------------------------------------------------------------------------
# With the model in the registry


def save_with_model(client: MlflowClient, model_id: str, path: Path, sha256: str) -> None:
    """Copy the profile into a logged model's artifacts and tag the model with its hash.

    Call it after the model is logged and before it is registered, so the version's
    artifacts hold the profile from the start. The model's file manifest is recorded
    again, so that it covers the profile too.
    """
    from stemma.components.model.artifact import record_model_files

    client.log_model_artifact(model_id, str(path))
    client.set_logged_model_tags(model_id, {PROFILE_SHA256_TAG: sha256})
    record_model_files(client, model_id)


def tag_model_version(client: MlflowClient, name: str, version: str, sha256: str) -> None:
    """Record the profile's hash on a registered version (what the monitor looks for)."""
    client.set_model_version_tag(name, str(version), PROFILE_SHA256_TAG, sha256)


def load_model_profile(
    client: MlflowClient, name: str, version: str
) -> tuple[ReferenceProfile, str]:
    """The reference profile of a registered model version, and its sha256.

    The profile is read from the version's artifacts, else from its training run's
    ``profile/`` artifacts, and checked against the recorded hash.

    Raises:
        MissingProfileError: the version records no profile (registered before Stemma
            saved profiles): retrain, or monitor a newer version.
        RegistryError: the file is missing, altered or unreadable.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    label = f"{name} v{version}"
    try:
        model_version = client.get_model_version(name, str(version))
    except MlflowException as error:
        raise RegistryError(f"cannot read {label}", [str(error.message)]) from error
    expected = (model_version.tags or {}).get(PROFILE_SHA256_TAG)
    model_id = getattr(model_version, "model_id", None)
    if not expected and model_id:
        try:
            expected = client.get_logged_model(model_id).tags.get(PROFILE_SHA256_TAG)
        except MlflowException:
            expected = None
    if not expected:
        raise MissingProfileError(
            f"{label} has no reference profile: it was registered before Stemma saved "
            "profiles with its models, so there is nothing to compare a batch with",
            [
                "train the model again (stemma run train CONFIG) and monitor the new version,",
                f"or name a version that has one with --model models:/{name}/<version>",
            ],
        )
    with tempfile.TemporaryDirectory(prefix="stemma-profile-") as scratch:
        candidates = [f"{client.get_model_version_download_uri(name, str(version))}/{PROFILE_FILE}"]
        if model_version.run_id:
            candidates.append(f"runs:/{model_version.run_id}/{PROFILE_RUN_DIR}/{PROFILE_FILE}")
        failures = []
        for index, uri in enumerate(candidates):
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=uri,
                    dst_path=str(Path(scratch) / str(index)),
                    tracking_uri=client.tracking_uri,
                )
            except (MlflowException, OSError) as error:
                failures.append(f"{uri}: {str(error).strip().splitlines()[0]}")
                continue
            return read_profile(Path(local), expected), expected
    raise RegistryError(
        f"{label} records a reference profile (sha256 {expected[:12]}...) that cannot be found",
        failures,
    )
