"""`stemma reproduce`'s steps around the retraining: fetch and check the registered model's
files, and lay out the scratch project the training flow retrains in."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from stemma.components.errors import LineageError
from stemma.components.lineage import reproduce

#: Name of the spec file in the scratch project (the flow run is named after it).
SPEC_NAME = "reproduce.yaml"


def model_weights(client: Any, name: str, version: str, folder: Path) -> tuple[Path, Path]:
    """Download a version's model files; return the model folder and its weights file.

    Raises:
        LineageError: the version has no weights file.
    """
    import mlflow

    uri = client.get_model_version_download_uri(name, version)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(folder), tracking_uri=client.tracking_uri
        )
    )
    found = sorted(local.rglob(reproduce.WEIGHTS_FILE))
    if not found:
        raise LineageError(f"models:/{name}/{version}: no {reproduce.WEIGHTS_FILE} among its files")
    return local, found[0]


def recorded_model(
    client: Any, plan: reproduce.ReproductionPlan, folder: Path
) -> tuple[Path, Path]:
    """The registered version's files, checked against the digests recorded when it was
    logged: its model folder and weights file.

    Raises:
        LineageError: a file differs from its recorded digest, or the weights changed.
    """
    recorded_folder, recorded = model_weights(client, plan.model_name, plan.version, folder)
    problems = reproduce.recorded_file_problems(plan.model_files, recorded_folder)
    if problems:
        raise LineageError(
            f"NOT REPRODUCED {plan.model_uri}: its files differ from the digests recorded "
            "when it was registered; nothing was retrained",
            problems,
        )
    digest = hashlib.sha256(recorded.read_bytes()).hexdigest()
    if digest != plan.weights_sha256:
        raise LineageError(
            f"{plan.model_uri}: its weights file changed in the artifact store",
            [f"registered with sha256 {plan.weights_sha256}", f"the file now hashes to {digest}"],
        )
    return recorded_folder, recorded


def scratch_project(
    root: Path, plan: reproduce.ReproductionPlan, project: Path
) -> tuple[reproduce.RestoredData, Path]:
    """The recorded data bytes (restored through DVC), the resolved spec and, for a custom
    architecture whose module lies in the project, that module as it is here, in
    ``project``; what was restored, and the spec's path.

    Raises:
        DataVersionError: the recorded data bytes cannot be restored.
    """
    restored = reproduce.restore_data_version(
        root,
        pointer=plan.data_pointer,
        md5=plan.data_md5,
        out=plan.data_out,
        git_rev=plan.git_rev,
        destination=project,
    )
    (project / plan.data_pointer).parent.mkdir(parents=True, exist_ok=True)
    (project / plan.data_pointer).write_text(restored.pointer_text)
    config = project / "configs" / SPEC_NAME
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(plan.spec_yaml)
    # The scratch project's root is put on the import path when the spec loads, so the
    # module sits where the project root had it: the rebuild imports and carries this code.
    for relative, source in reproduce.current_project_code(root, plan.architecture).items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, project / relative)
    return restored, config


def workspace_folder(keep: Path | None) -> Path | None:
    """``keep``, created and checked empty, or None when nothing is kept.

    Raises:
        LineageError: ``keep`` holds files.
    """
    if keep is None:
        return None
    keep.mkdir(parents=True, exist_ok=True)
    if any(keep.iterdir()):
        raise LineageError(f"{keep}: not empty; --keep needs a new or empty folder")
    return keep.resolve()
