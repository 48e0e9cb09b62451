"""The model artifact: the files a logged model is made of, their manifest and their tags.

A model is logged as "models from code" (:mod:`.serving` is the model file) with plain
files and no pickle, so it loads with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``:
``preprocess.json``, ``network.json``, ``weights.safetensors`` and, when the network
exports and matches eager (:func:`.onnx_graph.export_onnx`), ``network.onnx``; for a
custom architecture whose module lies in the project, that module under ``code/``. The
sha256 of every file is recorded as the model's manifest; a load refuses a file that differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stemma.components.errors import DataError, TrainingError
from stemma.components.model.onnx_graph import ONNX_FILE, ExportReport, export_onnx
from stemma.components.platform import tags
from stemma.components.platform.files import write_atomically
from stemma.components.platform.tracking import quiet_integer_hint, require_active_run

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo
    from torch import nn

    from stemma.components.model.preprocessing import Preprocessor

#: Rows of the input example stored with the model (shown in the UI, used to check serving).
INPUT_EXAMPLE_ROWS = 5
#: Decision threshold on the probability of a binary model, stored in its network JSON.
DEFAULT_THRESHOLD = 0.5
#: Artifact names the model file (:mod:`.serving`) reads, and the files they are written to.
MODEL_ARTIFACT_FILES = {
    "preprocess": "preprocess.json",
    "network": "network.json",
    "weights": "weights.safetensors",
}
#: Artifact name of the network's ONNX graph, present only when the network exported.
ONNX_ARTIFACT = "onnx"
#: Layout version of the network JSON, so the model file can refuse one it does not know.
NETWORK_FORMAT = 1
#: What the logged model needs at inference time, pinned to what is installed here
#: (torch's local suffix such as ``+cpu`` dropped: ``torch==2.13.0`` resolves to the CPU
#: wheel on a CPU machine; anything looser pulls the newest CUDA build).
MODEL_REQUIREMENTS = ("torch", "mlflow", "numpy", "pandas", "safetensors")
#: Which backend serves a version, why eager, and the hash of its ONNX graph.
RUNTIME_BACKEND_TAG = tags.RUNTIME_BACKEND
RUNTIME_REASON_TAG = tags.RUNTIME_REASON
ONNX_SHA256_TAG = tags.ONNX_SHA256
#: Tags a registered version copies from its logged model (what a load checks and uses).
INTEGRITY_TAGS = (
    tags.MODEL_FILES,
    tags.ARCHITECTURE_SHA256,
    tags.LOGGED_MODEL_WEIGHTS_SHA256,
    ONNX_SHA256_TAG,
    RUNTIME_BACKEND_TAG,
    RUNTIME_REASON_TAG,
)
#: How many differing files a message names before it summarises.
MAX_FILES_NAMED = 10
#: Folder of a logged model holding the project's module of a custom architecture
#: (MLflow's ``code_paths``, which ``mlflow.pyfunc.load_model`` puts first on the import path).
CODE_FOLDER = "code"
#: The most files and bytes of project code a model carries: a module or a package of
#: sources, not a folder of data that happens to sit beside them.
MAX_CODE_FILES = 500
MAX_CODE_BYTES = 16 * 1024 * 1024
#: Files left out of a model's manifest: MLflow writes ``registered_model_meta`` (the
#: registered name and version, as YAML) into a local store's model folder whenever a
#: version is loaded by a ``models:/<name>/...`` URI; Stemma never reads it.
UNRECORDED_MODEL_FILES = frozenset({"registered_model_meta"})


# ---------------------------------------------------------------------------------------
# Weights


def safetensors_bytes(network: nn.Module) -> bytes:
    """The network's weights as the bytes of a safetensors file."""
    from safetensors.torch import save

    # Fresh contiguous CPU copies: safetensors refuses views and tensors sharing memory.
    tensors = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in network.state_dict().items()
    }
    return save(tensors)


def save_weights(network: nn.Module, path: Path) -> str:
    """Write the network's weights as safetensors, atomically.

    Returns:
        The sha256 (hex) of the file's bytes, equal to :func:`weights_sha256`.
    """
    return write_weights_file(path, safetensors_bytes(network))


def write_weights_file(path: Path, payload: bytes) -> str:
    """Write a weights file's bytes atomically (its folder made); returns their sha256."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, payload)
    return hashlib.sha256(payload).hexdigest()


def load_weights(network: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``network`` (in place) and return it.

    Raises:
        TrainingError: the file is missing, unreadable, or does not fit the network.
    """
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such weights file") from None
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise TrainingError(f"{path}: not a readable safetensors file: {error}") from error
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise TrainingError(
            f"{path}: the weights do not fit this network", str(error).splitlines()
        ) from None
    return network


def weights_sha256(network: nn.Module) -> str:
    """The sha256 (hex) of the network's weights as :func:`save_weights` would write them."""
    return hashlib.sha256(safetensors_bytes(network)).hexdigest()


# ---------------------------------------------------------------------------------------
# Manifests and tags


def model_requirements() -> list[str]:
    """The logged model's pip requirements, pinned to the versions installed here."""
    return [
        f"{package}=={metadata.version(package).split('+', 1)[0]}" for package in MODEL_REQUIREMENTS
    ]


def model_file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a model folder, keyed by its POSIX path relative to it
    (except :data:`UNRECORDED_MODEL_FILES`)."""
    folder = Path(folder)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        if relative in UNRECORDED_MODEL_FILES:
            continue
        with open(path, "rb") as handle:
            digests[relative] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def encode_manifest(digests: Mapping[str, str]) -> str:
    """The manifest as the compact JSON a tag holds (keys sorted, no spaces)."""
    return json.dumps(dict(sorted(digests.items())), separators=(",", ":"))


def decode_manifest(text: str | None) -> dict[str, str] | None:
    """A manifest tag's value as ``{path: sha256}``; None when absent or malformed."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return None
    return value


def file_differences(recorded: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    """One line per file that is missing, extra or changed, recorded digest against found."""
    lines = []
    for path in sorted(recorded.keys() | found.keys()):
        before, after = recorded.get(path), found.get(path)
        if before == after:
            continue
        if after is None:
            lines.append(f"{path}: missing (recorded {before})")
        elif before is None:
            lines.append(f"{path}: not recorded (found {after})")
        else:
            lines.append(f"{path}: changed (recorded {before}, found {after})")
    if len(lines) > MAX_FILES_NAMED:
        lines = [*lines[:MAX_FILES_NAMED], f"... and {len(lines) - MAX_FILES_NAMED} more"]
    return lines


def record_model_files(client: Any, model_id: str) -> dict[str, str]:
    """Hash every file of a logged model, as the store holds it, and tag the model with them.

    The files are read back from the artifact store (not from the folder they were
    logged from), so the manifest covers exactly what a later load downloads. Call it
    again after adding a file to the model (``profile.save_with_model`` does).

    Returns:
        The manifest, ``{relative path: sha256}``.
    """
    import tempfile

    import mlflow

    location = client.get_logged_model(model_id).artifact_location
    with tempfile.TemporaryDirectory(prefix="stemma-manifest-") as scratch:
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=scratch, tracking_uri=client.tracking_uri
        )
        digests = model_file_digests(Path(folder))
    client.set_logged_model_tags(model_id, {tags.MODEL_FILES: encode_manifest(digests)})
    return digests


def integrity_tags(client: Any, model_id: str | None) -> dict[str, str]:
    """The tags a version registered from a logged model copies from it (manifest, hashes,
    runtime backend)."""
    if not model_id:
        return {}
    found = client.get_logged_model(model_id).tags or {}
    copied = {key: found[key] for key in INTEGRITY_TAGS if found.get(key)}
    if tags.LOGGED_MODEL_WEIGHTS_SHA256 in copied:  # versions name it as the run does
        copied[tags.WEIGHTS_SHA256] = copied.pop(tags.LOGGED_MODEL_WEIGHTS_SHA256)
    return copied


def architecture_tags(network_config: Mapping[str, Any]) -> dict[str, str]:
    """``{ARCHITECTURE_SHA256: sha256}`` for a custom architecture; empty for a built-in."""
    from stemma.components.model.networks import (
        MLP_ARCHITECTURE,
        architecture_source_sha256,
        is_custom,
    )

    architecture = str(network_config.get("architecture", MLP_ARCHITECTURE))
    if not is_custom(architecture):
        return {}
    return {tags.ARCHITECTURE_SHA256: architecture_source_sha256(architecture)}


def project_code(architecture: str, project_root: Path) -> dict[str, Path]:
    """The files of a custom architecture's module that a model logged from this project
    carries, by POSIX path relative to ``code/``; empty when it carries none.

    The module is ``mymodels.py``, or the whole package folder ``mymodels/`` (caches and
    hidden entries left out), when it lies in the project
    (:func:`~.networks.project_code_location`); a built-in, an installed module, or one
    outside the project, is not carried.

    Raises:
        TrainingError: the package holds more than :data:`MAX_CODE_FILES` files or
            :data:`MAX_CODE_BYTES` bytes.
    """
    from stemma.components.model.networks import project_code_location

    location = project_code_location(architecture, project_root)
    if location is None:
        return {}
    if location.is_file():
        return {location.name: location}
    files = {}
    for path in sorted(location.rglob("*")):
        parts = path.relative_to(location).parts
        skipped = any(part.startswith(".") or part == "__pycache__" for part in parts)
        if path.is_file() and not skipped and path.suffix != ".pyc":
            files[path.relative_to(location.parent).as_posix()] = path
    size = sum(path.stat().st_size for path in files.values())
    if len(files) > MAX_CODE_FILES or size > MAX_CODE_BYTES:
        raise TrainingError(
            f"model.architecture {architecture}: {location} holds {len(files)} files, "
            f"{size:,} bytes: more than a model carries ({MAX_CODE_FILES} files, "
            f"{MAX_CODE_BYTES:,} bytes)",
            ["keep the network's code in a package of its own, without data files"],
        )
    return files


def stage_project_code(
    network_config: Mapping[str, Any], project_root: Path | None, workdir: Path
) -> dict[str, str]:
    """Copy the module a model carries (:func:`project_code`) into ``workdir/code``.

    The copy is what is hashed and logged, so the digests are those of the logged files
    even if the project changes meanwhile.

    Returns:
        ``{path relative to code/: sha256}``; empty when nothing is carried.
    """
    from stemma.components.model.networks import MLP_ARCHITECTURE

    architecture = str(network_config.get("architecture", MLP_ARCHITECTURE))
    sources = project_code(architecture, project_root) if project_root is not None else {}
    target = Path(workdir) / CODE_FOLDER
    shutil.rmtree(target, ignore_errors=True)
    digests = {}
    for relative, source in sources.items():
        payload = source.read_bytes()
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(payload)
        digests[relative] = hashlib.sha256(payload).hexdigest()
    return digests


def code_sha256(files: Mapping[str, str]) -> str | None:
    """One digest of carried code: the sha256 of its ``<sha256>  <path>`` lines (the
    format of ``sha256sum``), sorted by path; None when there is none."""
    if not files:
        return None
    lines = "".join(f"{files[path]}  {path}\n" for path in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def carried_code(digests: Mapping[str, str], folder: str = CODE_FOLDER) -> dict[str, str]:
    """The carried code among a model's file digests (its manifest, or a run's artifacts
    with ``folder="model/code"``), by path relative to the code folder."""
    prefix = f"{folder}/"
    return {
        path.removeprefix(prefix): digest
        for path, digest in digests.items()
        if path.startswith(prefix)
    }


def runtime_tags(report: ExportReport) -> dict[str, str]:
    """The backend a model will be served by, and why eager when it is, as tags."""
    if report.exported and report.sha256:
        return {RUNTIME_BACKEND_TAG: "onnxruntime", ONNX_SHA256_TAG: report.sha256}
    return {RUNTIME_BACKEND_TAG: "eager", RUNTIME_REASON_TAG: report.reason or "not exported"}


def serving_code_path() -> Path:
    """The model file MLflow logs as "models from code"."""
    return Path(__file__).with_name("serving.py")


# ---------------------------------------------------------------------------------------
# Logging the model


def log_pyfunc_model(
    *,
    preprocessor: Preprocessor,
    network: nn.Module,
    network_config: dict[str, Any],
    input_example: pd.DataFrame,
    task: str,
    workdir: Path,
    name: str = "model",
    project_root: Path | None = None,
) -> tuple[ModelInfo, str]:
    """Log the preprocessor and network as a pickle-free pyfunc model of the active run.

    Writes the model files into ``workdir`` (see the module docstring), logs them with
    :mod:`.serving` as the model code, then records the sha256 of every file of the logged
    model (:func:`record_model_files`), the runtime backend (with the reason when the
    network is served by eager) and, for a custom architecture, the sha256 of its source
    (on the model and the run). A custom architecture whose module lies in the project
    is logged with it (:func:`stage_project_code`, MLflow's ``code_paths``) and the code's
    digest tagged on the model, so ``mlflow.pyfunc.load_model`` works from any folder. The
    signature takes the feature columns with the example's types and returns ``score``
    (probability or value) and, for a binary task, ``prediction``.

    Args:
        preprocessor: fitted on the training split.
        network: the trained network (its weights are saved; it is not modified).
        network_config: what ``networks.build_network`` needs to rebuild it.
        input_example: rows with at least the feature columns; a few are stored.
        task: ``binary`` or ``regression``.
        workdir: an empty or scratch folder for the artifact files.
        name: the model's name within the run.
        project_root: the spec's project root, where a custom architecture's module may
            lie; None carries no code.

    Returns:
        The logged model's info and the sha256 of its weights file.
    """
    import mlflow
    from mlflow.models import infer_signature

    require_active_run("log_pyfunc_model")
    features = [*preprocessor.numeric, *preprocessor.categorical]
    missing = [column for column in features if column not in input_example.columns]
    if missing:
        raise DataError(f"input example lacks feature columns: {', '.join(missing)}")
    example = input_example.loc[:, features].head(INPUT_EXAMPLE_ROWS).reset_index(drop=True)
    raw = _eager_outputs(network, preprocessor.transform(example))
    scores = np.asarray(preprocessor.decode_output(raw), dtype=np.float64)
    outputs = preprocessor.output_frame(scores, threshold=DEFAULT_THRESHOLD)

    n_outputs = int(raw.shape[1]) if raw.ndim == 2 else 1
    paths, weights_sha256, report = write_model_files(
        Path(workdir), preprocessor, network, network_config, task, n_outputs
    )
    architecture = architecture_tags(network_config)
    code_paths, code_tags = _code_to_log(network_config, project_root, Path(workdir))
    with quiet_integer_hint():
        signature = infer_signature(example, outputs)
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(serving_code_path()),
        artifacts={key: str(path) for key, path in paths.items()},
        signature=signature,
        input_example=example,
        pip_requirements=model_requirements(),
        code_paths=code_paths,
        tags={
            tags.LOGGED_MODEL_WEIGHTS_SHA256: weights_sha256,
            tags.TASK: task,
            **architecture,
            **code_tags,
            **runtime_tags(report),
        },
    )
    if architecture:
        mlflow.set_tags(architecture)
    record_model_files(mlflow.MlflowClient(), info.model_id)
    return info, weights_sha256


def _code_to_log(
    network_config: Mapping[str, Any], project_root: Path | None, workdir: Path
) -> tuple[list[str] | None, dict[str, str]]:
    """The ``code_paths`` of the code a model carries (its module file or package folder,
    staged in ``workdir``), and the tag of its digest; ``(None, {})`` when it carries none."""
    files = stage_project_code(network_config, project_root, workdir)
    digest = code_sha256(files)
    if digest is None:
        return None, {}
    tops = sorted({relative.split("/")[0] for relative in files})
    return [str(workdir / CODE_FOLDER / top) for top in tops], {
        tags.ARCHITECTURE_CODE_SHA256: digest
    }


def write_model_files(
    workdir: Path,
    preprocessor: Preprocessor,
    network: nn.Module,
    network_config: dict[str, Any],
    task: str,
    n_outputs: int,
) -> tuple[dict[str, Path], str, ExportReport]:
    """Write the model's files into ``workdir``.

    Returns:
        ``{artifact name: path}`` (``onnx`` only when the network exported), the weights'
        sha256 and the ONNX export's report.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {key: workdir / file_name for key, file_name in MODEL_ARTIFACT_FILES.items()}
    preprocessor.save_json(paths["preprocess"])
    document: dict[str, Any] = {
        "format": NETWORK_FORMAT,
        "task": task,
        "config": network_config,
        "n_inputs": int(preprocessor.n_inputs),
        "n_outputs": n_outputs,
    }
    if task == "binary":
        document["threshold"] = DEFAULT_THRESHOLD
    write_atomically(paths["network"], json.dumps(document, indent=2, sort_keys=True))
    weights_sha256 = save_weights(network, paths["weights"])
    report = export_onnx(network, int(preprocessor.n_inputs), workdir / ONNX_FILE)
    if report.exported:
        paths[ONNX_ARTIFACT] = workdir / ONNX_FILE
    return paths, weights_sha256, report


def _eager_outputs(network: nn.Module, matrix: np.ndarray) -> np.ndarray:
    """The network's raw outputs on a few rows, in eval mode, without changing its mode."""
    import copy

    import torch

    module = copy.deepcopy(network).eval() if network.training else network
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(matrix, np.float32))).float().numpy()
