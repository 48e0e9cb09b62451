"""The training loop: seeded, resumable, early-stopping and as fast as a hand-written loop.

:func:`train_network` trains a copy of a network on in-memory float32 arrays. On the CPU a
run is bit-for-bit reproducible from its seed: batches are drawn by a generator seeded from
``(seed, epoch)`` and the global RNG (dropout) is re-seeded the same way every epoch, so a
run resumed from its checkpoint ends with exactly the weights of an uninterrupted one. On
CUDA the tensors move to the GPU once and the forward pass runs under bf16 autocast.

Weights are saved and loaded as safetensors by :mod:`stemma.components.model.artifact`.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemma.components.errors import TrainingError
from stemma.components.spec import TrainSpec
from stemma.components.training.epochs import (
    CHECKPOINT_NAME,
    EVAL_BATCH_ROWS,
    Progress,
    autocast_factory,
    check_output_shape,
    checked_inputs,
    deterministic,
    epoch_row,
    epoch_seeds,
    forked_rng,
    load_checkpoint,
    loss_functions,
    loss_total,
    make_optimizer,
    record_epoch,
    run_fingerprint,
    save_checkpoint,
    to_device,
    train_steps,
)

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
    x_train, y_train, x_val, y_val = checked_inputs(task, x_train, y_train, x_val, y_val)
    device, amp_dtype = resolve_device(train.device, train.precision)
    network = copy.deepcopy(network).to(device)
    network.train()
    optimizer = make_optimizer(network, train)
    check_output_shape(network, x_train, y_train)
    fingerprint = run_fingerprint(network, train, task, x_train, x_val)

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = Progress()
    if checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, network, optimizer, fingerprint)
    resumed_from = state.epoch if state.epoch else None

    epoch = _Epoch(
        network,
        optimizer,
        loss_functions(task),
        tuple(to_device(a, device) for a in (x_train, y_train, x_val, y_val)),
        autocast_factory(device, amp_dtype),
        train,
    )
    bar = _progress_bar(train, state, progress)
    try:
        with deterministic(device), forked_rng(device):
            for number in range(state.epoch + 1, train.epochs + 1):
                if state.stopped_early:
                    break
                row = epoch.run(number)
                record_epoch(state, row, network, train)
                if checkpoint_path is not None:
                    save_checkpoint(checkpoint_path, network, optimizer, state, fingerprint)
                bar.update(1)
                bar.set_postfix(
                    train_loss=f"{row['train_loss']:.4f}", val_loss=f"{row['val_loss']:.4f}"
                )
                if on_epoch is not None:
                    on_epoch(dict(row))
    finally:
        bar.close()
    return trained_result(network, state, device, amp_dtype, resumed_from)


def _progress_bar(train: TrainSpec, state: Progress, progress: bool | None) -> Any:
    """A bar over the epochs; None shows it when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=train.epochs,
        initial=min(state.epoch, train.epochs),
        unit="epoch",
        desc="train",
        disable=not (sys.stderr.isatty() if progress is None else progress),
    )


def trained_result(
    network: nn.Module,
    state: Progress,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    resumed_from: int | None,
) -> TrainResult:
    """The trained network on the CPU, in eval mode, holding the best epoch's weights."""
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


@dataclass
class _Epoch:
    """One epoch of the single-process loop: seeded shuffle and dropout, then the losses."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    losses: tuple[nn.Module, nn.Module]
    tensors: tuple[torch.Tensor, ...]
    autocast: Callable[[], Any]
    train: TrainSpec

    def run(self, number: int) -> dict[str, Any]:
        """Train epoch ``number`` (1-based) and return its history row."""
        x_train, y_train, x_val, y_val = self.tensors
        loss_fn, loss_sum_fn = self.losses
        shuffle_seed, dropout_seed = epoch_seeds(self.train.seed, number)
        torch.manual_seed(dropout_seed)
        generator = torch.Generator().manual_seed(shuffle_seed)
        started = time.perf_counter()
        batch = self.train.batch_size
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        losses = torch.stack(
            train_steps(
                self.network, self.optimizer, loss_fn, x_train, y_train, order, batch, self.autocast
            )
        ).float()
        # Batch losses are means; the last batch may be short, so weight by its size.
        last = len(x_train) - (len(losses) - 1) * batch
        train_sum = losses[:-1].sum() * batch + losses[-1] * last
        val_sum = loss_total(self.network, loss_sum_fn, x_val, y_val, self.autocast)
        # The only host-device synchronisation of the epoch.
        train_total, val_total = torch.stack([train_sum, val_sum]).tolist()
        seconds = time.perf_counter() - started
        return epoch_row(
            number,
            train_total / len(x_train),
            val_total / len(x_val),
            seconds,
            len(x_train),
            self.train,
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
