"""The training loop: seeded, resumable, early-stopping and as fast as a hand-written loop.

:func:`train_network` trains a copy of a network on in-memory float32 arrays. On the CPU a
run is bit-for-bit reproducible from its seed: batches are drawn by a generator seeded from
``(seed, epoch)`` and the global RNG (dropout) is re-seeded the same way every epoch, so a
run resumed from its checkpoint ends with exactly the weights of an uninterrupted one. On
CUDA the tensors move to the GPU once and the forward pass runs under bf16 autocast.

Weights are saved and loaded as safetensors by :mod:`stemma.components.model.artifact`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
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

_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16"}


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        network: the trained network, on the CPU, in eval mode, holding the best epoch's
            weights (the last epoch's when early stopping is off).
        history: one row per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``seconds``,
            ``samples_per_second`` (training rows per second of the epoch's wall time).
        best_epoch: the epoch (1-based) whose weights ``network`` holds.
        stopped_early: whether early stopping ended the run before ``train.epochs``.
        device: where it trained (``cpu`` or ``cuda``).
        precision: ``fp32`` or ``bf16`` (autocast).
        resumed_from_epoch: the checkpoint's epoch when the run resumed from one.
    """

    network: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    device: str
    precision: str
    resumed_from_epoch: int | None = None


@dataclass
class _Progress:
    """Everything besides model and optimizer that a checkpoint must carry."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """Pick the device and autocast dtype for ``train.device`` and ``train.precision``.

    ``auto`` trains on CUDA when PyTorch sees a GPU, else on the CPU; precision ``auto``
    means bf16 autocast on a GPU that supports it and plain fp32 on the CPU.

    Returns:
        The device and the autocast dtype (None for fp32).

    Raises:
        TrainingError: CUDA (or bf16 on a GPU without it) was asked for and is unavailable.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"train.device must be auto, cpu or cuda, got {device!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise TrainingError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise TrainingError(
            "train.device is cuda, but PyTorch sees no CUDA device",
            [
                f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
                "set train.device to auto (uses a GPU when there is one) or cpu",
            ],
        )
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    on_gpu = chosen.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not on_gpu):
        return chosen, None
    if on_gpu and not torch.cuda.is_bf16_supported():
        if precision == "auto":
            return chosen, None
        raise TrainingError(
            "train.precision is bf16, but this GPU does not support bfloat16",
            ["set train.precision to auto or fp32"],
        )
    return chosen, torch.bfloat16


def train_network(
    network: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    train: TrainSpec,
    task: str,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a copy of ``network`` and return it with its history.

    Args:
        network: the initialised network; it is copied, not changed.
        x_train: training inputs, ``(n, n_inputs)``.
        y_train: training targets, ``(n,)`` or ``(n, n_outputs)``: 0/1 for binary,
            standardised values for regression.
        x_val: validation inputs, for the per-epoch loss and early stopping.
        y_val: validation targets.
        train: the spec's training settings.
        task: ``binary`` (BCE with logits) or ``regression`` (MSE).
        checkpoint_dir: when given, a checkpoint is written there after every epoch, and a
            checkpoint already there is resumed from.
        on_epoch: called with each epoch's history row, after its checkpoint is written
            (only for epochs trained in this call, not for resumed ones).
        progress: show a progress bar over epochs; None shows one when stderr is a terminal.

    Returns:
        The trained network (CPU, eval mode) and how training went.

    Raises:
        TrainingError: bad arrays, a loss that is not finite, an unusable device, or a
            checkpoint that belongs to another network or other settings.
    """
    if task not in ("binary", "regression"):
        raise TrainingError(f"task must be binary or regression, got {task!r}")
    device, amp_dtype = resolve_device(train.device, train.precision)
    x_train, y_train = _checked_arrays("training", x_train, y_train)
    x_val, y_val = _checked_arrays("validation", x_val, y_val)
    if x_train.shape[1] != x_val.shape[1]:
        raise TrainingError(
            f"training and validation inputs differ in width: {x_train.shape[1]} vs {x_val.shape[1]}"
        )

    network = copy.deepcopy(network).to(device)
    network.train()
    optimizer = _make_optimizer(network, train)
    _check_output_shape(network, x_train, y_train)
    loss_fn, loss_sum_fn = _loss_functions(task)
    fingerprint = _fingerprint(network, train, task, x_train, x_val)

    state = _Progress()
    resumed_from: int | None = None
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, network, optimizer, fingerprint)
        resumed_from = state.epoch

    x_train_t, y_train_t = _to_device(x_train, device), _to_device(y_train, device)
    x_val_t, y_val_t = _to_device(x_val, device), _to_device(y_val, device)
    autocast = _autocast_factory(device, amp_dtype)
    show = sys.stderr.isatty() if progress is None else progress

    from tqdm import tqdm

    bar = tqdm(
        total=train.epochs,
        initial=min(state.epoch, train.epochs),
        unit="epoch",
        desc="train",
        disable=not show,
    )
    try:
        with _deterministic(device), _forked_rng(device):
            for epoch in range(state.epoch + 1, train.epochs + 1):
                if state.stopped_early:
                    break
                shuffle_seed, dropout_seed = _epoch_seeds(train.seed, epoch)
                torch.manual_seed(dropout_seed)
                generator = torch.Generator().manual_seed(shuffle_seed)
                started = time.perf_counter()
                train_sum = _train_epoch(
                    network,
                    optimizer,
                    loss_fn,
                    x_train_t,
                    y_train_t,
                    train.batch_size,
                    generator,
                    autocast,
                )
                val_sum = _loss_total(network, loss_sum_fn, x_val_t, y_val_t, autocast)
                # The only host-device synchronisation of the epoch.
                train_total, val_total = torch.stack([train_sum, val_sum]).tolist()
                seconds = time.perf_counter() - started
                row = _epoch_row(
                    epoch,
                    train_total / len(x_train),
                    val_total / len(x_val),
                    seconds,
                    len(x_train),
                    train,
                )
                _record_epoch(state, row, network, train)
                if checkpoint_path is not None:
                    _save_checkpoint(checkpoint_path, network, optimizer, state, fingerprint)
                bar.update(1)
                bar.set_postfix(
                    train_loss=f"{row['train_loss']:.4f}", val_loss=f"{row['val_loss']:.4f}"
                )
                if on_epoch is not None:
                    on_epoch(dict(row))
    finally:
        bar.close()

    network = network.to("cpu")
    if state.best_state:
        network.load_state_dict(state.best_state)
    network.eval()
    return TrainResult(
        network=network,
        history=state.history,
        best_epoch=state.best_epoch,
        stopped_early=state.stopped_early,
        device=device.type,
        precision=_PRECISION_NAMES[amp_dtype],
        resumed_from_epoch=resumed_from,
    )


def predict_raw(network: nn.Module, x: np.ndarray, batch_size: int = EVAL_BATCH_ROWS) -> np.ndarray:
    """Raw network outputs (logits for binary) for ``x``, computed on the CPU in chunks.

    The network's train/eval mode is restored afterwards.

    Returns:
        A float32 array with one row per input row, shaped as the network outputs it.
    """
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            chunks = [
                network(inputs[start : start + batch_size])
                for start in range(0, len(inputs), batch_size)
            ]
            if not chunks:
                chunks = [network(inputs[:0])]
            return torch.cat(chunks).float().numpy()
    finally:
        network.train(was_training)


# ---------------------------------------------------------------------------------------
# The loop


def _epoch_row(
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


def _record_epoch(
    state: _Progress, row: dict[str, Any], network: nn.Module, train: TrainSpec
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
        state.best_state = _cpu_copy(network.state_dict())
    else:
        state.bad_epochs += 1
        state.stopped_early = state.bad_epochs >= stopping.patience and epoch < train.epochs


def _check_output_shape(network: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
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
            ["binary and regression tasks need a network with n_outputs=1"],
        )


def _train_epoch(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> torch.Tensor:
    """One pass over the shuffled rows; returns the summed loss as a device scalar."""
    rows = len(x)
    order = torch.randperm(rows, generator=generator).to(x.device)
    batch_losses = []
    for start in range(0, rows, batch_size):
        index = order[start : start + batch_size]
        with autocast():
            loss = loss_fn(network(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Kept on the device: reading a loss per batch would stall the GPU every step.
        batch_losses.append(loss.detach())
    losses = torch.stack(batch_losses).float()
    # Batch losses are means; the last batch may be short, so weight by its size.
    last = rows - (len(batch_losses) - 1) * batch_size
    return losses[:-1].sum() * batch_size + losses[-1] * last


def _loss_total(
    network: nn.Module,
    loss_sum_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> torch.Tensor:
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
            return torch.stack(parts).sum()
    finally:
        network.train()


def _loss_functions(task: str) -> tuple[nn.Module, nn.Module]:
    if task == "binary":
        return nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(reduction="sum")
    return nn.MSELoss(), nn.MSELoss(reduction="sum")


def _make_optimizer(network: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
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


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """Independent seeds for the batch order and the global RNG of one epoch."""
    shuffle_seed, dropout_seed = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle_seed), int(dropout_seed)


def _autocast_factory(
    device: torch.device, amp_dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if amp_dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
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
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Re-seeding per epoch must not leave the caller's global RNG changed."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


def _checked_arrays(split: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device)


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


# ---------------------------------------------------------------------------------------
# Checkpoints


def _fingerprint(
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


def _save_checkpoint(
    path: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: _Progress,
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


def _load_checkpoint(
    path: Path, network: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any]
) -> _Progress:
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
    return _Progress(
        epoch=int(payload["epoch"]),
        best_loss=float(payload["best_loss"]),
        best_epoch=int(payload["best_epoch"]),
        best_state=dict(payload["best_state"]),
        bad_epochs=int(payload["bad_epochs"]),
        stopped_early=bool(payload["stopped_early"]),
        history=list(payload["history"]),
    )


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            lines.append(
                f"{key}: checkpoint {saved.get(key, 'absent')}, now {current.get(key, 'absent')}"
            )
    return lines
