"""Loading a registered model for inference: its files checked, its network rebuilt.

:func:`load_scoring_model` rebuilds a registered model from its plain artifact files (no
pickle, no ``mlflow.pyfunc``) and refuses files whose hash differs from the one recorded
when the model was logged. Every inference in Stemma starts from the :class:`ScoringModel`
it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import RegistryError, StemmaError
from stemma.components.model.preprocessing import Preprocessor
from stemma.components.platform import tags
from stemma.components.platform.refs import ModelRefError, format_model_ref, parse_model_ref
from stemma.components.platform.refs import logged_model_id as refs_logged_model_id

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

    from stemma.components.runtime.backends import Runtime

_LOG = logging.getLogger(__name__)


def first_line(error: BaseException) -> str:
    """The first line of an error's message."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@dataclass(frozen=True, eq=False)
class ScoringModel:
    """A registered model, rebuilt for scoring.

    Attributes:
        reference: what was asked for (``models:/credit@champion``).
        model_uri: the version it resolved to (``models:/credit/3``).
        name: the registered model name.
        version: the version number, as text.
        alias: the alias in the reference, or None when a version was named.
        run_id: the training run of the version.
        weights_sha256: the sha256 of the weights file that was loaded.
        task: ``binary``, ``multiclass`` or ``regression``.
        threshold: decision threshold on the probability (binary).
        preprocessor: the fitted feature encoding.
        network: the network, in eval mode.
        signature_columns: the model's input signature, ``(name, MLflow type)`` pairs.
        runtime: what every inference on the model runs through (ONNX Runtime on its
            ``network.onnx`` when it has one, else eager, with the reason).
        architectures: the architectures it was allowed to name besides the built-ins
            (the caller's spec), so that another process loads it under the same terms.
        network_config: the network's config from ``network.json`` (what
            ``networks.build_network`` rebuilt it from); a quantized variant's is its
            parent's.
    """

    reference: str
    model_uri: str
    name: str
    version: str
    alias: str | None
    run_id: str | None
    weights_sha256: str
    task: str
    threshold: float
    preprocessor: Preprocessor
    network: nn.Module
    signature_columns: list[tuple[str, str]]
    runtime: Runtime
    architectures: tuple[str, ...] = ()
    network_config: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_columns(self) -> list[str]:
        """The columns the preprocessor reads, numeric then categorical."""
        return [*self.preprocessor.numeric, *self.preprocessor.categorical]

    @property
    def label(self) -> str:
        """``credit v3``."""
        return f"{self.name} v{self.version}"


class UntrustedModelError(RegistryError):
    """A model version's files or architecture are not what Stemma recorded: not loaded."""


def load_scoring_model(
    reference: str,
    *,
    client: MlflowClient | None = None,
    architectures: Collection[str] = (),
    device: str = "cpu",
    backend: str = "auto",
) -> ScoringModel:
    """Resolve a model reference in the registry and rebuild the model without pickle.

    Every downloaded file is checked against the manifest recorded when the model was
    logged; the preprocessor, network and signature are rebuilt from plain files, and the
    runtime is built: ONNX Runtime on ``network.onnx`` when the version has one, else
    eager with the reason. Nothing is unpickled, and a custom architecture is imported
    only when the caller's spec names it and its source hashes as it did at training.

    Args:
        reference: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        client: the MLflow client to use (default: one on the configured registry).
        architectures: the architectures the caller's spec allows besides the built-ins
            (``models.allowed_architectures(spec.model)``).
        device: ``cpu`` or ``cuda``, where the runtime runs.
        backend: ``auto``, ``eager`` or ``onnxruntime`` (see :func:`.backends.build_runtime`).

    Raises:
        UntrustedModelError: a file is missing, extra or changed against the recorded
            manifest (none recorded: registered outside Stemma); the architecture is not
            allowed or its source changed since training; the weights' sha256 differs
            from the one recorded at registration.
        OnnxFileError: ``network.onnx`` matches its manifest but ONNX Runtime cannot load it.
        RegistryError: the reference is malformed; the model, alias or version does not
            exist (the message lists the aliases and versions that do); or the artifacts
            are unreadable.
    """
    from mlflow import MlflowClient

    from stemma.components.model.artifact import DEFAULT_THRESHOLD, MODEL_ARTIFACT_FILES
    from stemma.components.model.quantized import runtime_backend

    try:
        parsed = parse_model_ref(reference)
    except ModelRefError as error:
        raise RegistryError(error.headline, error.details) from None
    client = client or MlflowClient()
    version = _resolve_version(client, parsed.name, parsed.alias, parsed.version)
    label = f"{parsed.name} v{version.version}"
    with tempfile.TemporaryDirectory(prefix="stemma-model-") as scratch:
        folder = _download(client, version, Path(scratch), label)
        verify_model_files(client, version, folder, label)
        mlmodel = _read_mlmodel(folder, label)
        paths = _artifact_paths(folder, mlmodel, MODEL_ARTIFACT_FILES, label)
        signature = _signature_columns(mlmodel, label)
        digest = _verified_weights_sha256(client, version, paths["weights"], label)
        preprocessor, document, network = _rebuild(
            paths, signature, label, _trusted_architectures(client, version, architectures)
        )
        onnx_file = _onnx_path(folder, mlmodel)
        backend = runtime_backend(document, backend)  # a variant names its own backend
        runtime = _model_runtime(
            client, version, network, preprocessor.n_inputs, onnx_file, device, backend, label
        )
    return ScoringModel(
        reference=reference,
        model_uri=format_model_ref(parsed.name, version=version.version),
        name=parsed.name,
        version=str(version.version),
        alias=parsed.alias,
        run_id=version.run_id,
        weights_sha256=digest,
        task=str(document["task"]),
        threshold=float(document.get("threshold", DEFAULT_THRESHOLD)),
        preprocessor=preprocessor,
        network=network.eval(),
        signature_columns=signature,
        runtime=runtime,
        architectures=tuple(sorted(architectures)),
        network_config=dict(document.get("config") or {}),
    )


def _download(client: MlflowClient, version: ModelVersion, scratch: Path, label: str) -> Path:
    """Download a version's artifacts under ``scratch``; RegistryError when that fails."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        download_uri = client.get_model_version_download_uri(version.name, str(version.version))
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=str(scratch), tracking_uri=client.tracking_uri
            )
        )
    except (MlflowException, OSError) as error:
        raise RegistryError(
            f"cannot download the artifacts of {label} "
            f"({format_model_ref(version.name, version=version.version)})",
            [first_line(error)],
        ) from error


def _onnx_path(folder: Path, mlmodel: dict[str, Any]) -> Path | None:
    """The version's ``network.onnx``, when it was logged with one."""
    from stemma.components.model.artifact import ONNX_ARTIFACT

    recorded = (mlmodel.get("flavors") or {}).get("python_function", {}).get("artifacts") or {}
    relative = (recorded.get(ONNX_ARTIFACT) or {}).get("path")
    return folder / relative if relative and (folder / relative).is_file() else None


def _model_runtime(
    client: MlflowClient,
    version: ModelVersion,
    network: nn.Module,
    width: int,
    onnx_file: Path | None,
    device: str,
    backend: str,
    label: str,
) -> Runtime:
    """The runtime of a loaded model; an unloadable ONNX file is an error naming it."""
    from stemma.components.model.artifact import RUNTIME_REASON_TAG
    from stemma.components.runtime.backends import OnnxFileError, build_runtime

    reason = None
    if onnx_file is None:
        reason = _recorded_tag(client, version, RUNTIME_REASON_TAG) or (
            "the version has no network.onnx (logged before Stemma exported ONNX graphs)"
        )
    try:
        return build_runtime(
            network.eval(),
            width=width,
            onnx_file=onnx_file,
            device=device,
            backend=backend,
            eager_reason=reason,
        )
    except OnnxFileError as error:
        raise OnnxFileError(f"{label}: {error.headline}", error.details) from None


def _verified_weights_sha256(
    client: MlflowClient, version: ModelVersion, weights: Path, label: str
) -> str:
    """The weights file's sha256, checked against the one recorded at registration."""
    digest = sha256_file(weights)
    expected = _recorded_weights_sha256(client, version)
    if expected is not None and expected != digest:
        raise UntrustedModelError(
            f"{label}: the weights file does not match the sha256 recorded when it was registered",
            [
                f"recorded {expected}",
                f"found    {digest}",
                "the artifact store changed after registration: restore the file or "
                "register the model again",
            ],
        )
    return digest


def _recorded_tag(client: MlflowClient, version: ModelVersion, key: str) -> str | None:
    """A tag of the version, else of its logged model, else None."""
    recorded = dict(getattr(version, "tags", None) or {})
    if recorded.get(key):
        return recorded[key]
    model_id = logged_model_id(version)
    if model_id:
        try:
            return client.get_logged_model(model_id).tags.get(key) or None
        except Exception:  # an older server without logged models: nothing recorded
            return None
    return None


def logged_model_id(version: ModelVersion) -> str | None:
    """The logged model a version was registered from: its ``model_id``, else its source.

    The SQLite store does not keep ``model_id`` on versions; the source ``models:/m-...``
    names the same logged model, whose files the version downloads.
    """
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    return refs_logged_model_id(str(getattr(version, "source", "") or ""))


def verify_model_files(
    client: MlflowClient, version: ModelVersion, folder: Path, label: str
) -> dict[str, str]:
    """Check every file of a downloaded model version against its recorded manifest.

    Args:
        client: the MLflow client the version was read with.
        version: the registered version.
        folder: where its artifacts were downloaded.
        label: ``credit v3``, for messages.

    Returns:
        The manifest, ``{relative path: sha256}``.

    Raises:
        UntrustedModelError: no manifest is recorded, or a file is missing, extra or
            changed; the message names the files, recorded digest against found.
    """
    from stemma.components.model.artifact import (
        decode_manifest,
        file_differences,
        model_file_digests,
    )

    found = model_file_digests(folder)
    recorded = decode_manifest(_recorded_tag(client, version, tags.MODEL_FILES))
    if recorded is None:
        raise UntrustedModelError(
            f"{label}: no file digests were recorded for this version, so Stemma does not "
            "load it (registered outside Stemma, or by an older Stemma)",
            [
                f"its files: {', '.join(sorted(found)) or 'none'}",
                "register a model trained by Stemma (stemma run train CONFIG), or move the "
                "alias to a version Stemma registered",
            ],
        )
    differences = file_differences(recorded, found)
    if differences:
        raise UntrustedModelError(
            f"{label}: its files differ from the digests recorded when it was logged; "
            "nothing of it was loaded",
            [
                *differences,
                "the artifact store changed after registration: restore the files or "
                "register the model again",
            ],
        )
    return recorded


def _trusted_architectures(
    client: MlflowClient, version: ModelVersion, allowed: Collection[str]
) -> dict[str, str | None]:
    """The architectures the network may name, each with the source hash it must have."""
    from stemma.components.model.networks import BUILTIN_ARCHITECTURES, is_custom

    recorded = _recorded_tag(client, version, tags.ARCHITECTURE_SHA256)
    trusted: dict[str, str | None] = dict.fromkeys(BUILTIN_ARCHITECTURES)
    for architecture in allowed:
        if is_custom(architecture):
            trusted[architecture] = recorded or ""
    return trusted


def _check_architecture(
    document: dict[str, Any], trusted: dict[str, str | None], label: str
) -> None:
    """Refuse a foreign architecture, or a custom one whose source changed, before importing it."""
    from stemma.components.model.networks import (
        MLP_ARCHITECTURE,
        architecture_source_sha256,
        check_architecture,
    )

    config = document.get("config")
    architecture = (
        config.get("architecture", MLP_ARCHITECTURE) if isinstance(config, dict) else None
    )
    try:
        check_architecture(architecture, trusted, label)
    except RegistryError as error:
        raise UntrustedModelError(error.headline, error.details) from None
    assert isinstance(architecture, str)  # check_architecture refuses anything else
    expected = trusted[architecture]
    if expected is None:  # a built-in
        return
    try:
        current = architecture_source_sha256(architecture)
    except StemmaError as error:
        raise RegistryError(f"{label}: {error.headline}", error.details) from None
    if current != expected:
        raise UntrustedModelError(
            f"{label}: the source of architecture {architecture} differs from the one it was "
            "trained with; it was not imported",
            [
                f"recorded {expected or '(none)'}",
                f"found    {current}",
                "check out the code the model was trained with, or train the model again "
                "with this code (stemma run train CONFIG)",
            ],
        )


def _rebuild(
    paths: dict[str, Path],
    signature: list[tuple[str, str]],
    label: str,
    trusted: dict[str, str | None],
) -> tuple[Preprocessor, dict[str, Any], nn.Module]:
    """The preprocessor, the network JSON and the network with its weights loaded."""
    from stemma.components.model.artifact import NETWORK_FORMAT, load_weights
    from stemma.components.model.networks import build_network
    from stemma.components.model.quantized import QUANTIZED_NETWORK_FORMAT, load_variant_network

    try:
        preprocessor = Preprocessor.load_json(paths["preprocess"])
        document = json.loads(paths["network"].read_text(encoding="utf-8"))
    except ValueError as error:
        raise RegistryError(f"{label}: unreadable model files", [str(error)]) from error
    formats = (NETWORK_FORMAT, QUANTIZED_NETWORK_FORMAT)
    if not isinstance(document, dict) or document.get("format") not in formats:
        layout = document.get("format") if isinstance(document, dict) else None
        raise RegistryError(
            f"{label}: network.json has format {layout!r}; this Stemma reads {formats}"
        )
    _check_architecture(document, trusted, label)
    signed = {column for column, _ in signature}
    unsigned = [
        column
        for column in (*preprocessor.numeric, *preprocessor.categorical)
        if column not in signed
    ]
    if unsigned:
        raise RegistryError(
            f"{label}: the signature lacks feature columns the model reads: {', '.join(unsigned)}"
        )
    try:
        n_inputs, n_outputs = int(document["n_inputs"]), int(document["n_outputs"])
        if n_inputs != preprocessor.n_inputs:
            raise ValueError(
                f"the network takes {n_inputs} inputs, the preprocessor makes {preprocessor.n_inputs}"
            )
        network: nn.Module
        if document["format"] == QUANTIZED_NETWORK_FORMAT:  # a quantized variant
            network = load_variant_network(document, paths["weights"], allowed=trusted)
        else:
            network = build_network(document["config"], n_inputs, n_outputs, allowed=trusted)
            load_weights(network, paths["weights"])
    except Exception as error:  # malformed JSON fields, TrainingError, a custom class's error
        raise RegistryError(f"{label}: cannot rebuild the network", [first_line(error)]) from error
    return preprocessor, document, network


def _resolve_version(
    client: MlflowClient, name: str, alias: str | None, number: str | None
) -> ModelVersion:
    """The version an alias or number names; RegistryError listing what exists otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(number))
    except MlflowException as error:
        failure = error
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"no registered model named {name!r}",
                ["train and register one first (stemma run train CONFIG), or fix the name"],
            ) from None
        raise RegistryError(
            f"cannot read registered model {name!r}", [first_line(error)]
        ) from error
    aliases = {key: str(value) for key, value in (registered.aliases or {}).items()}
    listing = ", ".join(f"{key} -> v{value}" for key, value in sorted(aliases.items())) or "none"
    if alias is not None and alias not in aliases:
        raise RegistryError(
            f"model {name!r} has no alias {alias!r}",
            [f"its aliases: {listing}", f"or name a version: models:/{name}/<version>"],
        )
    if alias is None:
        try:
            found = client.search_model_versions(f"name = '{name}'")
            versions = ", ".join(str(v) for v in sorted(int(item.version) for item in found))
        except MlflowException:
            versions = "unknown"
        raise RegistryError(
            f"model {name!r} has no version {number}",
            [f"its versions: {versions or 'none'}", f"its aliases: {listing}"],
        )
    raise RegistryError(
        f"cannot read model {name!r} alias {alias!r}", [first_line(failure)]
    ) from failure


def _read_mlmodel(folder: Path, label: str) -> dict[str, Any]:
    import yaml

    path = folder / "MLmodel"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise RegistryError(
            f"{label}: cannot read its MLmodel file", [first_line(error)]
        ) from error
    if not isinstance(document, dict):
        raise RegistryError(f"{label}: its MLmodel file is not a mapping")
    return document


def _artifact_paths(
    folder: Path, mlmodel: dict[str, Any], files: dict[str, str], label: str
) -> dict[str, Path]:
    """Where the preprocess, network and weights files are in the downloaded folder."""
    recorded = (mlmodel.get("flavors") or {}).get("python_function", {}).get("artifacts") or {}
    paths: dict[str, Path] = {}
    for key, file_name in files.items():
        relative = (recorded.get(key) or {}).get("path")
        candidate = folder / relative if relative else None
        if candidate is None or not candidate.is_file():
            # Older layouts: look for the file by name anywhere in the model folder.
            candidate = next(iter(sorted(folder.rglob(file_name))), None)
        if candidate is None:
            raise RegistryError(
                f"{label}: the model has no {file_name} artifact",
                ["it was not logged by Stemma's log_pyfunc_model; register a Stemma model"],
            )
        paths[key] = candidate
    return paths


def _signature_columns(mlmodel: dict[str, Any], label: str) -> list[tuple[str, str]]:
    inputs = (mlmodel.get("signature") or {}).get("inputs")
    try:
        columns = json.loads(inputs) if isinstance(inputs, str) else None
    except json.JSONDecodeError:
        columns = None
    if not columns or not all(isinstance(c, dict) and "name" in c and "type" in c for c in columns):
        raise RegistryError(
            f"{label}: the model has no column-based input signature",
            ["Stemma checks inputs against it before scoring; log the model with a signature"],
        )
    return [(str(column["name"]), str(column["type"])) for column in columns]


def _recorded_weights_sha256(client: MlflowClient, version: ModelVersion) -> str | None:
    """The weights hash recorded on the version, else on its logged model, else None."""
    recorded = dict(getattr(version, "tags", None) or {})
    if recorded.get(tags.WEIGHTS_SHA256):
        return recorded[tags.WEIGHTS_SHA256]
    return _recorded_tag(client, version, tags.LOGGED_MODEL_WEIGHTS_SHA256)
