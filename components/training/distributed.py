"""Distributed data-parallel training: the training loop under torchrun, one process per device.

Only the loop is distributed. :func:`train_distributed` runs in the flow's process, which
keeps MLflow and Prefect: it writes the prepared arrays and the initial weights to a
folder (safetensors, with a JSON job), starts ``python -m torch.distributed.run`` with
``train.distributed.nproc_per_node`` processes of :mod:`.ddp_worker`, passes each epoch
that rank 0 reports to ``on_epoch`` as it happens, and reads the trained weights back from
the safetensors file rank 0 writes. Nothing crosses a process boundary as a pickle.

In the workers the network is wrapped in ``DistributedDataParallel`` (gloo on the CPU,
NCCL on CUDA), a ``DistributedSampler`` deals each process its share of every epoch's
shuffled rows, and each process takes ``1/N`` of every batch, so ``train.batch_size``
remains the rows of one optimisation step and the gradients are those of a single process
on the same batch. Rank 0 alone writes the per-epoch checkpoint, reports epochs and writes
the result; a run interrupted or killed resumes from that checkpoint when started again
with the same number of processes, and on the CPU ends with the weights of a run that was
never interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemma.components import errors
from stemma.components.errors import StemmaError, TrainingError
from stemma.components.model.artifact import load_weights, save_weights
from stemma.components.spec import TrainSpec
from stemma.components.training.epochs import check_output_shape, checked_inputs
from stemma.components.training.loop import TrainResult, resolve_device

#: The worker module torchrun starts in every process.
WORKER_MODULE = "stemma.components.training.ddp_worker"
#: Files of a job folder.
JOB_FILE = "job.json"
DATA_FILE = "data.safetensors"
INITIAL_WEIGHTS_FILE = "initial.safetensors"
EPOCHS_FILE = "epochs.jsonl"
RESULT_FILE = "result.json"
RESULT_WEIGHTS_FILE = "trained.safetensors"
ERRORS_DIR = "errors"
LOG_FILE = "torchrun.log"
#: Version of the job folder's layout, checked by the worker.
JOB_FORMAT = 1
#: How often the flow looks for new epochs while the workers train, in seconds.
POLL_SECONDS = 0.2
#: How long the workers get to stop after SIGTERM before they are killed, in seconds.
STOP_GRACE_SECONDS = 10.0
#: Lines of torchrun's output shown when a worker failed without saying why.
LOG_TAIL_LINES = 15
#: How often torchrun checks on its workers, in seconds (its default reacts slower).
MONITOR_INTERVAL_SECONDS = 0.1


def resolve_backend(backend: str, device: torch.device) -> str:
    """The collective backend for ``train.distributed.backend`` on ``device``.

    ``auto`` is NCCL when training on CUDA and gloo on the CPU.

    Raises:
        TrainingError: an unknown backend, or NCCL for a CPU run.
    """
    if backend not in ("auto", "gloo", "nccl"):
        raise TrainingError(
            f"train.distributed.backend must be auto, gloo or nccl, got {backend!r}"
        )
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise TrainingError(
            "train.distributed.backend is nccl, but training runs on the CPU",
            ["NCCL only moves CUDA tensors: use gloo (or auto) on the CPU"],
        )
    return backend


def threads_per_process(nproc: int) -> int:
    """torch threads for each of ``nproc`` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // nproc)


def train_distributed(
    network: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    train: TrainSpec,
    task: str,
    network_config: dict[str, Any],
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a copy of ``network`` with DDP in ``train.distributed.nproc_per_node`` processes.

    Takes the arguments of :func:`.loop.train_network`, plus the network's config so that
    the workers rebuild the same module (:func:`.networks.build_network`) before they load
    its initial weights. Rank 0 writes the checkpoint; one of the same network, settings,
    data and process count is resumed from. ``on_epoch`` runs in this process after rank 0
    wrote the epoch's checkpoint.

    Raises:
        TrainingError: bad arrays, an unusable device or backend, a checkpoint of another
            run, or a worker that failed (with the worker's own message when it gave one).
        KeyboardInterrupt: the run was interrupted; the workers are stopped and the last
            checkpoint is kept.
    """
    settings = train.distributed
    if settings is None:
        raise ValueError("train.distributed is not set: train with training.train_network")
    x_train, y_train, x_val, y_val = checked_inputs(task, x_train, y_train, x_val, y_val)
    device, amp_dtype = resolve_device(train.device, train.precision)
    backend = resolve_backend(settings.backend, device)
    nproc = settings.nproc_per_node
    _check_processes(nproc, device, train)
    check_output_shape(network, x_train, y_train)

    with tempfile.TemporaryDirectory(prefix="stemma-ddp-") as scratch:
        folder = Path(scratch)
        _write_job(
            folder,
            network,
            network_config,
            {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val},
            train=train,
            task=task,
            device=device.type,
            precision="bf16" if amp_dtype is not None else "fp32",
            backend=backend,
            checkpoint_dir=checkpoint_dir,
            threads=threads_per_process(nproc),
        )
        show = sys.stderr.isatty() if progress is None else progress
        _run_workers(folder, nproc, train.epochs, on_epoch, show)
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        trained = copy.deepcopy(network).to("cpu")
        load_weights(trained, folder / RESULT_WEIGHTS_FILE)
    return TrainResult(network=trained.eval(), **result)


def _check_processes(nproc: int, device: torch.device, train: TrainSpec) -> None:
    """Refuse more processes than GPUs, or than rows in a batch."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise TrainingError(
            f"train.distributed.nproc_per_node is {nproc}, but PyTorch sees "
            f"{torch.cuda.device_count()} GPU(s)",
            ["run one process per GPU: lower nproc_per_node"],
        )
    if nproc > train.batch_size:
        raise TrainingError(
            f"{nproc} processes cannot share a batch of {train.batch_size} rows",
            ["raise train.batch_size or lower train.distributed.nproc_per_node"],
        )


def torchrun_command(job_folder: Path, nproc: int) -> list[str]:
    """The torchrun command line that trains the job in ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        f"--monitor-interval={MONITOR_INTERVAL_SECONDS}",
        "-m",
        WORKER_MODULE,
        str(job_folder / JOB_FILE),
    ]


def _write_job(
    folder: Path,
    network: nn.Module,
    network_config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    train: TrainSpec,
    task: str,
    device: str,
    precision: str,
    backend: str,
    checkpoint_dir: Path | None,
    threads: int,
) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(folder / DATA_FILE))
    save_weights(network, folder / INITIAL_WEIGHTS_FILE)
    (folder / ERRORS_DIR).mkdir()
    job = {
        "format": JOB_FORMAT,
        "network_config": network_config,
        "n_inputs": int(arrays["x_train"].shape[1]),
        "n_outputs": int(arrays["y_train"].shape[1]),
        "train": train.model_dump(mode="json"),
        "task": task,
        "device": device,
        "precision": precision,
        "backend": backend,
        "threads": threads,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
        # The workers stop when the process that started them is gone (killed, say).
        "parent_pid": os.getpid(),
    }
    (folder / JOB_FILE).write_text(json.dumps(job, indent=2), encoding="utf-8")


def _run_workers(
    folder: Path,
    nproc: int,
    epochs: int,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    show: bool,
) -> None:
    """Run torchrun, relay rank 0's epochs as they come, and turn failures into errors."""
    from tqdm import tqdm

    threads = threads_per_process(nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    bar = tqdm(total=epochs, unit="epoch", desc=f"train ({nproc} processes)", disable=not show)
    with open(folder / LOG_FILE, "wb") as log:
        process = subprocess.Popen(
            torchrun_command(folder, nproc), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            with _stopping_on_error(process):
                for row in _follow_epochs(folder / EPOCHS_FILE, process):
                    bar.update(1)
                    bar.set_postfix(
                        train_loss=f"{row['train_loss']:.4f}", val_loss=f"{row['val_loss']:.4f}"
                    )
                    if on_epoch is not None:
                        on_epoch(dict(row))
        finally:
            bar.close()
    if process.returncode != 0 or not (folder / RESULT_FILE).is_file():
        raise _worker_error(folder, process.returncode)


@contextlib.contextmanager
def _stopping_on_error(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """Stop torchrun and its workers when the caller stops (Ctrl-C, an error in on_epoch)."""
    try:
        yield
    except BaseException:
        if process.poll() is None:
            # torchrun passes SIGTERM on to its workers and waits for them.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise


def _follow_epochs(path: Path, process: subprocess.Popen[bytes]) -> Iterator[dict[str, Any]]:
    """The rows rank 0 appends to the epochs file, until torchrun exits."""
    offset = 0
    pending = b""
    while True:
        finished = process.poll() is not None
        if path.exists():
            with open(path, "rb") as stream:
                stream.seek(offset)
                data = stream.read()
            offset += len(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)
        if finished:
            return
        time.sleep(POLL_SECONDS)


def _worker_error(folder: Path, returncode: int | None) -> StemmaError:
    """The error a worker reported (rank 0's first), else one naming torchrun's output."""
    reports = sorted((folder / ERRORS_DIR).glob("rank-*.json"), key=lambda p: int(p.stem[5:]))
    for path in reports:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        kind = getattr(errors, str(report.get("kind")), None)
        if isinstance(kind, type) and issubclass(kind, StemmaError):
            return kind(str(report["headline"]), [str(line) for line in report["details"]])
        return TrainingError(
            f"distributed training failed in {path.stem}: {report.get('headline')}",
            [str(line) for line in report.get("details", [])],
        )
    log = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return TrainingError(
        f"distributed training failed (torchrun exited with {returncode})",
        [line for line in log[-LOG_TAIL_LINES:] if line.strip()],
    )


def per_process_batch(batch_size: int, world_size: int) -> int:
    """Rows of each process's share of a batch: the batch split ``world_size`` ways."""
    return math.ceil(batch_size / world_size)
