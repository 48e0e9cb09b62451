"""The pieces of an epoch that the single-process loop (:mod:`.loop`) and the DDP worker
(:mod:`.ddp_worker`) share: checked arrays, loss functions and optimizer, per-epoch seeds,
the training steps and the validation loss, the history row and early stopping, and the
checkpoint that makes a run resumable."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemma.components.errors import TrainingError
from stemma.components.spec import TrainSpec

#: File name of the checkpoint inside the checkpoint folder.
CHECKPOINT_NAME = "checkpoint.pt"

#: Version of the checkpoint layout; a checkpoint of another version is not resumed.
CHECKPOINT_FORMAT = 1

#: Momentum of the ``sgd`` optimiser.
SGD_MOMENTUM = 0.9

#: Rows per forward pass when computing the validation loss and predictions.
EVAL_BATCH_ROWS = 65_536


@dataclass
class Progress:
    """Everything besides model and optimizer that a checkpoint must carry."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_row(
    epoch: int,
    train_loss: float,
    val_loss: float,
    seconds: float,
    train_rows: int,
    train: TrainSpec,
) -> dict[str, Any]:
    """The epoch's row of the history (losses, time, throughput).

    Raises:
        TrainingError: a loss is not finite (the training diverged).
    """
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        raise TrainingError(
            f"training diverged at epoch {epoch}: train loss {train_loss}, "
            f"validation loss {val_loss}",
            [
                f"lower train.learning_rate (now {train.learning_rate})",
                "check the inputs for extreme values",
            ],
        )
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "seconds": seconds,
        "samples_per_second": train_rows / seconds,
    }


def record_epoch(
    state: Progress, row: dict[str, Any], network: nn.Module, train: TrainSpec
) -> None:
    """Append the epoch's row and apply early stopping: remember the best weights, count
    epochs without improvement, and stop after ``patience`` of them."""
    epoch, val_loss = row["epoch"], row["val_loss"]
    state.history.append(row)
    state.epoch = epoch
    stopping = train.early_stopping
    if stopping is None:
        state.best_epoch, state.best_loss = epoch, val_loss
    elif val_loss < state.best_loss - stopping.min_delta:
        state.best_epoch, state.best_loss, state.bad_epochs = epoch, val_loss, 0
        state.best_state = cpu_copy(network.state_dict())
    else:
        state.bad_epochs += 1
        state.stopped_early = state.bad_epochs >= stopping.patience and epoch < train.epochs


def check_output_shape(network: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Fail before training, not in the first batch, when outputs and targets disagree."""
    was_training = network.training
    network.eval()  # no dropout, so the probe draws nothing from the RNG
    try:
        with torch.no_grad():
            output = network(torch.from_numpy(x[:2]).to(next(network.parameters()).device))
    finally:
        network.train(was_training)
    if tuple(output.shape[1:]) != y.shape[1:]:
        raise TrainingError(
            f"the network outputs shape {tuple(output.shape)} for 2 rows, but the targets have "
            f"{y.shape[1]} column(s)",
            ["binary and regression tasks need n_outputs=1, multiclass one output per class"],
        )


def loss_functions(task: str) -> tuple[nn.Module, nn.Module]:
    if task == "binary":
        return nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(reduction="sum")
    if task == "multiclass":  # targets are one-hot rows: class probabilities
        return nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    return nn.MSELoss(), nn.MSELoss(reduction="sum")


def make_optimizer(network: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    parameters = list(network.parameters())
    if not parameters:
        raise TrainingError("the network has no trainable parameters")
    if train.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=train.learning_rate, weight_decay=train.weight_decay
        )
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=train.learning_rate,
            momentum=SGD_MOMENTUM,
            weight_decay=train.weight_decay,
        )
    raise TrainingError(f"train.optimizer must be adam, adamw or sgd, got {train.optimizer!r}")


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Independent seeds for the batch order and the global RNG of one epoch."""
    shuffle_seed, dropout_seed = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle_seed), int(dropout_seed)


def autocast_factory(
    device: torch.device, amp_dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if amp_dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> list[torch.Tensor]:
    """One pass over the rows ``order`` lists, in batches; each batch's mean loss.

    The losses are kept on the device: reading a loss per batch would stall the GPU every
    step. Under DDP every rank has as many rows (the sampler pads), so all take the same
    number of steps and meet at each step's gradient all-reduce.
    """
    losses = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        with autocast():
            loss = loss_fn(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the gradients are averaged across ranks here
        optimizer.step()
        losses.append(loss.detach())
    return losses


def loss_total(
    network: nn.Module,
    loss_sum_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> torch.Tensor:
    """The summed loss over the rows of ``x`` (zero for none: more ranks than validation
    rows), in eval mode and without gradients (so without DDP's gradient sync)."""
    network.eval()
    try:
        with torch.inference_mode(), autocast():
            parts = [
                loss_sum_fn(
                    network(x[start : start + EVAL_BATCH_ROWS]).float(),
                    y[start : start + EVAL_BATCH_ROWS],
                )
                for start in range(0, len(x), EVAL_BATCH_ROWS)
            ]
            if not parts:
                return torch.zeros((), device=x.device)
            return torch.stack(parts).sum().float()
    finally:
        network.train()


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training, then the caller's setting back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # cuBLAS is only deterministic with CUBLAS_WORKSPACE_CONFIG set before CUDA starts; on a
    # GPU, warn about nondeterministic kernels instead of failing the run.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Re-seeding per epoch must not leave the caller's global RNG changed."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


def checked_arrays(split: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    targets = np.ascontiguousarray(y, dtype=np.float32)
    if targets.ndim == 1:
        targets = targets.reshape(-1, 1)
    if inputs.ndim != 2 or targets.ndim != 2:
        raise TrainingError(
            f"{split} arrays must be 2-D inputs and 1-D or 2-D targets, got {inputs.shape} and {y.shape}"
        )
    if len(inputs) == 0:
        raise TrainingError(
            f"the {split} split has no rows",
            ["use more data or change data.split so that every split gets rows"],
        )
    if len(inputs) != len(targets):
        raise TrainingError(f"{split} inputs have {len(inputs)} rows but targets {len(targets)}")
    for name, values in (("inputs", inputs), ("targets", targets)):
        if not np.isfinite(values).all():
            count = int((~np.isfinite(values)).sum())
            raise TrainingError(f"{split} {name} hold {count} missing or infinite values")
    return inputs, targets


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device)


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def run_fingerprint(
    network: nn.Module, train: TrainSpec, task: str, x_train: np.ndarray, x_val: np.ndarray
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed bit-for-bit (epochs may grow)."""
    return {
        "shapes": {name: list(tensor.shape) for name, tensor in network.state_dict().items()},
        "settings": {
            "task": task,
            "optimizer": train.optimizer,
            "learning_rate": train.learning_rate,
            "weight_decay": train.weight_decay,
            "batch_size": train.batch_size,
            "seed": train.seed,
            "early_stopping": train.early_stopping.model_dump() if train.early_stopping else None,
            "train_rows": len(x_train),
            "validation_rows": len(x_val),
        },
    }


def save_checkpoint(
    path: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Progress,
    fingerprint: dict[str, Any],
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": state.epoch,
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_state": state.best_state,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
        "history": state.history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    # Atomic: a crash leaves either the previous checkpoint or this one, never half of one.
    os.replace(temporary, path)


def load_checkpoint(
    path: Path, network: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any]
) -> Progress:
    start_over = f"delete {path.parent} to start training from scratch"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file can fail in many ways
        raise TrainingError(f"{path}: cannot read the checkpoint: {error}", [start_over]) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(
            f"{path}: not a Stemma checkpoint of format {CHECKPOINT_FORMAT}", [start_over]
        )
    saved = payload["fingerprint"]
    if saved["shapes"] != fingerprint["shapes"]:
        differences = _differences(saved["shapes"], fingerprint["shapes"])
        raise TrainingError(
            f"{path}: the checkpoint belongs to a network of a different shape",
            [*differences, start_over],
        )
    if saved["settings"] != fingerprint["settings"]:
        differences = _differences(saved["settings"], fingerprint["settings"])
        raise TrainingError(
            f"{path}: the checkpoint was written with other training settings or data",
            [*differences, start_over],
        )
    try:
        network.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise TrainingError(
            f"{path}: the checkpoint does not fit this network: {error}", [start_over]
        ) from error
    return Progress(
        epoch=int(payload["epoch"]),
        best_loss=float(payload["best_loss"]),
        best_epoch=int(payload["best_epoch"]),
        best_state=dict(payload["best_state"]),
        bad_epochs=int(payload["bad_epochs"]),
        stopped_early=bool(payload["stopped_early"]),
        history=list(payload["history"]),
    )


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key}: checkpoint {saved.get(key, 'absent')}, now {current.get(key, 'absent')}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def checked_inputs(
    task: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four arrays as float32, checked for shape and finite values.

    Raises:
        TrainingError: an unknown task, or arrays that cannot be trained on.
    """
    if task not in ("binary", "multiclass", "regression"):
        raise TrainingError(f"task must be binary, multiclass or regression, got {task!r}")
    x_train, y_train = checked_arrays("training", x_train, y_train)
    x_val, y_val = checked_arrays("validation", x_val, y_val)
    if x_train.shape[1] != x_val.shape[1]:
        raise TrainingError(
            f"training and validation inputs differ in width: {x_train.shape[1]} vs {x_val.shape[1]}"
        )
    return x_train, y_train, x_val, y_val
