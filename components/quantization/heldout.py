"""The fp32 parent of a quantize run, its files, and the held-out rows it was gated on."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import DataError, RegistryError
from stemma.components.model.quantized import brief
from stemma.components.platform import tags as tag_names
from stemma.components.quantization.registering import is_variant, model_versions, registry_error
from stemma.components.spec import DataSpec

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from stemma.components.data.tables import DataVersion

#: The resolved spec every training run logs; its data section fixes the split.
RESOLVED_SPEC_ARTIFACT = "spec/resolved.yaml"


def default_parent_reference(client: MlflowClient, model_name: str) -> str:
    """The model ``stemma run quantize`` takes when none is named: the newest fp32 version
    that passed its gate (the challenger or champion a training run just made).

    Raises:
        RegistryError: no such registered model, or none of its fp32 versions passed.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"no registered model named {model_name!r}",
                ["train and register one first (stemma run train CONFIG), or fix the name"],
            ) from None
        raise registry_error(f"cannot read registered model {model_name!r}", error) from error
    gated = [
        version
        for version in model_versions(client, model_name)
        if not is_variant(version) and (version.tags or {}).get(tag_names.GATE_DECISION) == "passed"
    ]
    if not gated:
        raise RegistryError(
            f"{model_name} has no fp32 version that passed its gate: nothing to quantize",
            ["train one that passes (stemma run train CONFIG), or name a version with --model"],
        )
    newest = max(gated, key=lambda version: int(version.version))
    return f"models:/{model_name}/{newest.version}"


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows a model was gated on, recomputed from its data version.

    Attributes:
        frame: the test split, raw columns.
        data: the data section the model was trained with.
        version: the data version (DVC md5 and the file's paths).
    """

    frame: pd.DataFrame
    data: DataSpec
    version: DataVersion

    @property
    def md5(self) -> str:
        return self.version.md5

    @property
    def file_path(self) -> str:
        return self.version.relpath

    def pointer(self, root: Path) -> str:
        """The DVC pointer file, relative to the project root."""
        return str(self.version.dvc_file.resolve().relative_to(Path(root).resolve()))


def _training_data_spec(client: MlflowClient, parent: ModelVersion, label: str) -> DataSpec:
    """The data section of the spec the parent's training run logged."""
    import yaml

    if not parent.run_id:
        raise RegistryError(f"{label} has no training run: cannot tell which rows it was gated on")
    try:
        with tempfile.TemporaryDirectory(prefix="stemma-spec-") as scratch:
            path = client.download_artifacts(parent.run_id, RESOLVED_SPEC_ARTIFACT, scratch)
            document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return DataSpec.model_validate(document["data"])
    except Exception as error:  # missing artifact, unreadable YAML, an old layout
        raise RegistryError(
            f"{label}: cannot read the spec its training run {parent.run_id} used",
            [f"{RESOLVED_SPEC_ARTIFACT}: {brief(error)}", "quantize a model trained by Stemma"],
        ) from error


def _training_rev(client: MlflowClient, run_id: str | None) -> str | None:
    """The commit a training run recorded (its ``stemma.git.rev`` tag), if it can be read."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.tags.get(tag_names.GIT_REV)
    except Exception:  # only a hint in a message: a missing run must not hide the error
        return None


@dataclass(frozen=True)
class TrainingSplits:
    """The three splits a model was trained, validated and gated on, recomputed."""

    train: pd.DataFrame
    validation: pd.DataFrame
    heldout: HeldOut


def heldout_rows(client: MlflowClient, parent: ModelVersion, root: Path) -> HeldOut:
    """Recompute the test split ``parent`` was gated on, as its training run did.

    See :func:`training_splits`, whose ``heldout`` this is.
    """
    return training_splits(client, parent, root).heldout


def training_splits(client: MlflowClient, parent: ModelVersion, root: Path) -> TrainingSplits:
    """Recompute the splits ``parent`` was trained on, as its training run did.

    The training run's resolved spec gives the data file, columns and split; the data on
    disk must be the version the run trained on (the DVC md5 on the version's
    ``stemma.data.md5`` tag), so the split yields the same rows.

    Raises:
        RegistryError: the version has no training run, or the run has no resolved spec.
        DataError: the data on disk is another version, or differs from data.dvc.
    """
    from stemma.components.data.tables import load_table, resolve_data_version, split_table

    label = f"{parent.name} v{parent.version}"
    data = _training_data_spec(client, parent, label)
    data_path = Path(data.path) if Path(data.path).is_absolute() else Path(root) / data.path
    version = resolve_data_version(Path(root), data_path)
    found = parent.tags or {}
    trained_on = found.get(tag_names.DATA_MD5)
    if trained_on and trained_on != version.md5:
        # versions of older stores name the commit; newer ones leave it to the training run
        rev = found.get(tag_names.GIT_REV) or _training_rev(client, parent.run_id)
        raise DataError(
            f"{label} was trained on data version {trained_on}; the project's data is {version.md5}",
            [
                "its held-out rows cannot be recomputed from other data",
                f"check out that version (git checkout {rev or '<rev>'} "
                "-- data.dvc && dvc checkout), or use a model trained on the current data",
            ],
        )
    frame = load_table(version.file_path, data)
    train, validation, test = split_table(frame, data.split)
    return TrainingSplits(train, validation, HeldOut(frame=test, data=data, version=version))


def check_parent_value(parent: ModelVersion, metric: str, value: float) -> None:
    """The fp32 model's metric on the recomputed rows must be the one its gate recorded.

    Raises:
        DataError: it differs, so the rows are not the ones it was gated on.
    """
    found = parent.tags or {}
    if found.get(tag_names.GATE_METRIC) != metric or tag_names.GATE_VALUE not in found:
        return
    recorded = float(found[tag_names.GATE_VALUE])
    if not math.isclose(recorded, value, rel_tol=1e-9, abs_tol=1e-12):
        raise DataError(
            f"{parent.name} v{parent.version} scores {metric} {value!r} on the recomputed held-out "
            f"rows, but its gate recorded {recorded!r}",
            ["the rows differ from those it was gated on: nothing would be comparable"],
        )


def download_model_files(
    client: MlflowClient, model_name: str, version: str, destination: Path
) -> dict[str, Any]:
    """The registered model's files: ``preprocess``, ``network`` and ``weights`` paths,
    its ``network`` JSON as ``document``, its MLmodel ``signature`` mapping and the
    entries of the project code it carries as ``code`` (empty for a built-in network).

    Raises:
        RegistryError: the artifacts cannot be downloaded or lack a file.
        UntrustedModelError: a file differs from the manifest recorded when it was logged.
    """
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from stemma.components.model.artifact import MODEL_ARTIFACT_FILES
    from stemma.components.runtime.loading import verify_model_files

    label = f"{model_name} v{version}"
    try:
        uri = client.get_model_version_download_uri(model_name, str(version))
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=client.tracking_uri
            )
        )
        registered = client.get_model_version(model_name, str(version))
    except (MlflowException, OSError) as error:
        raise RegistryError(f"cannot download the artifacts of {label}", [brief(error)]) from error
    verify_model_files(client, registered, folder, label)
    files: dict[str, Any] = {}
    for key, name in MODEL_ARTIFACT_FILES.items():
        found = sorted(folder.rglob(name))
        if not found:
            raise RegistryError(f"{label}: the model has no {name} artifact")
        files[key] = found[0]
    files["document"] = json.loads(files["network"].read_text(encoding="utf-8"))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    files["signature"] = (mlmodel or {}).get("signature") or {}
    # The project module a custom network carries (MLflow's code_paths), for its variants.
    code = folder / "code"
    files["code"] = sorted(code.iterdir()) if code.is_dir() else []
    return files
