"""The training flow's steps without the flow: split and preprocess, fit, score the test split.

Each step takes the spec and plain data and returns plain data; tracking, registration
and lineage stay with the flow that calls them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stemma.components.data import tables
from stemma.components.errors import DataError
from stemma.components.model import networks
from stemma.components.model import preprocessing as features
from stemma.components.platform import metric_names
from stemma.components.platform.tracking import STATE_DIR
from stemma.components.spec import LoadedSpec, Spec
from stemma.components.training import loop, metrics

#: Folder under the project's state that keeps an interrupted run's checkpoint.
CHECKPOINTS_DIR = "checkpoints"
#: File in a checkpoint folder naming the MLflow run to resume.
RUN_MARKER = "mlflow_run.json"


@dataclass(frozen=True)
class PreparedData:
    """The splits as the network sees them, and the test rows as they were read."""

    preprocessor: features.Preprocessor
    test_frame: pd.DataFrame
    rows: dict[str, int]
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray

    def y_test(self, target: str) -> np.ndarray:
        """The test split's labels: class codes (classification) or values."""
        if self.preprocessor.task == "regression":
            return self.test_frame[target].to_numpy(dtype=np.float64)
        return self.preprocessor.known_codes(self.test_frame[target], target).astype(np.float64)


def prepare_data(spec: Spec, frame: pd.DataFrame) -> PreparedData:
    """Split the table, check each split holds both classes (binary), fit the preprocessing.

    Raises:
        DataError: a split of a binary task holds only one class.
    """
    data = spec.data
    train_frame, valid_frame, test_frame = tables.split_table(frame, data.split)
    if data.task == "binary":
        splits = (("training", train_frame), ("validation", valid_frame), ("test", test_frame))
        for name, part in splits:
            if part[data.target].nunique() < 2:
                raise DataError(
                    f"{data.path}: the {name} split holds only one class of {data.target!r}",
                    ["add rows of the other class or change data.split (fractions, seed)"],
                )
    preprocessor = features.fit_preprocessor(
        train_frame,
        data.features,
        task=data.task,
        target=data.target,
        classes=data.classes,
        labels=data.labels,
    )
    return PreparedData(
        preprocessor=preprocessor,
        test_frame=test_frame,
        rows={"train": len(train_frame), "validation": len(valid_frame), "test": len(test_frame)},
        x_train=preprocessor.transform(train_frame),
        y_train=preprocessor.encode_target(train_frame, data.target),
        x_valid=preprocessor.transform(valid_frame),
        y_valid=preprocessor.encode_target(valid_frame, data.target),
        x_test=preprocessor.transform(test_frame),
    )


def fit_network(
    spec: Spec,
    prepared: PreparedData,
    checkpoint_dir: Path,
    on_epoch: Callable[[dict], None],
) -> loop.TrainResult:
    """Build the spec's network and train it, in this process or with torchrun."""
    config = networks.network_config(spec.model)
    network = networks.build_network(
        config,
        prepared.preprocessor.n_inputs,
        prepared.preprocessor.n_outputs,
        seed=spec.train.seed,
    )
    arrays = (prepared.x_train, prepared.y_train, prepared.x_valid, prepared.y_valid)
    options: dict[str, Any] = {
        "train": spec.train,
        "task": spec.data.task,
        "checkpoint_dir": checkpoint_dir,
        "on_epoch": on_epoch,
    }
    if spec.train.distributed is None:
        return loop.train_network(network, *arrays, **options)
    from stemma.components.training.distributed import train_distributed

    # torchrun runs only the loop; the caller's on_epoch is fed the epochs rank 0 reports.
    return train_distributed(network, *arrays, network_config=config, **options)


def missing_epochs(result: loop.TrainResult, logged_steps: Iterable[int]) -> list[dict]:
    """The epochs of a resumed run's history whose metrics the run has not logged."""
    logged = set(logged_steps)
    return [row for row in result.history if int(row["epoch"]) not in logged]


def scores_on_test_split(prepared: PreparedData, result: loop.TrainResult) -> np.ndarray:
    """The trained network's scores on the test split, decoded (probabilities or values)."""
    raw = loop.predict_raw(result.network, prepared.x_test)
    return np.asarray(prepared.preprocessor.decode_output(raw))


def evaluate(
    spec: Spec, prepared: PreparedData, result: loop.TrainResult, plots: Path
) -> dict[str, float]:
    """The test metrics; the evaluation plots and the training history are drawn in ``plots``."""
    y_true = prepared.y_test(spec.data.target)
    scores = scores_on_test_split(prepared, result)
    classes = prepared.preprocessor.class_names() or None
    values = metrics.evaluate_scores(spec.data.task, y_true, scores, classes=classes)
    metrics.plot_evaluation(spec.data.task, y_true, scores, plots, classes=classes)
    metrics.plot_history(result.history, plots / "training_history.png")
    return values


def checkpoint_folder(loaded: LoadedSpec, data_md5: str) -> Path:
    """Where an interrupted run of this exact spec on this exact data keeps its state."""
    fingerprint = hashlib.sha256(
        json.dumps(
            {"spec": loaded.spec.model_dump(mode="json"), "data": data_md5}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    name = f"{loaded.spec.pipeline.name}-{fingerprint}"
    return loaded.root / STATE_DIR / CHECKPOINTS_DIR / name


def remember_run(folder: Path, run_id: str) -> None:
    """Note in the checkpoint folder which MLflow run it belongs to."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_MARKER).write_text(json.dumps({"run_id": run_id}))


def resumable_run_id(folder: Path, client: Any) -> str | None:
    """The MLflow run an interrupted run left in ``folder``, if it still exists."""
    marker = folder / RUN_MARKER
    if not marker.exists():
        return None
    run_id = json.loads(marker.read_text()).get("run_id")
    try:
        run = client.get_run(run_id)
    except Exception:  # the store was reset or the run deleted: start afresh
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def epoch_params(result: loop.TrainResult) -> tuple[Mapping[str, str], Mapping[str, float]]:
    """What the run logs about the training itself: resolved device and precision (params),
    the epochs' time, best epoch and epochs run (metrics)."""
    return (
        {"resolved.device": result.device, "resolved.precision": result.precision},
        {
            metric_names.TRAIN_SECONDS: sum(float(row["seconds"]) for row in result.history),
            metric_names.TRAIN_BEST_EPOCH: result.best_epoch,
            metric_names.TRAIN_EPOCHS_RUN: len(result.history),
        },
    )


#: The MLflow metric of each number of a history row (the epoch itself is the step).
EPOCH_METRICS = {
    "train_loss": metric_names.TRAIN_LOSS,
    "val_loss": metric_names.VAL_LOSS,
    "seconds": metric_names.TRAIN_EPOCH_SECONDS,
    "samples_per_second": metric_names.TRAIN_SAMPLES_PER_SECOND,
}


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """An epoch's history row as MLflow metrics (``train/loss``, ``val/loss``, ...)."""
    return {name: float(row[key]) for key, name in EPOCH_METRICS.items() if key in row}
