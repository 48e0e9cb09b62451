"""One process of a distributed training job; torchrun starts it once per rank.

``python -m stemma.components.training.ddp_worker JOB.json`` (under torchrun, which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous) reads the job that
:func:`.distributed.train_distributed` wrote, rebuilds the network from its config and
initial weights, wraps it in ``DistributedDataParallel`` and runs the epochs. Every rank
computes the same epoch losses (they are all-reduced) and so takes the same early-stopping
decisions; rank 0 alone writes the checkpoint, appends the epoch's row to the epochs file
and, at the end, writes the trained weights and the result. A Stemma error is written to
``errors/rank-<r>.json`` for the flow to raise as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from stemma.components.errors import StemmaError, TrainingError
from stemma.components.model.networks import build_network
from stemma.components.spec import TrainSpec
from stemma.components.training.distributed import (
    DATA_FILE,
    EPOCHS_FILE,
    ERRORS_DIR,
    INITIAL_WEIGHTS_FILE,
    JOB_FORMAT,
    RESULT_FILE,
    RESULT_WEIGHTS_FILE,
    per_process_batch,
)
from stemma.components.training.loop import (
    CHECKPOINT_NAME,
    EVAL_BATCH_ROWS,
    _autocast_factory,
    _deterministic,
    _epoch_row,
    _epoch_seeds,
    _fingerprint,
    _load_checkpoint,
    _loss_functions,
    _make_optimizer,
    _Progress,
    _record_epoch,
    _save_checkpoint,
    load_weights,
    save_weights,
)


def main(argv: list[str] | None = None) -> int:
    """Run this rank's share of the job; the exit code torchrun reports."""
    arguments = sys.argv[1:] if argv is None else argv
    job_path = Path(arguments[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        job = json.loads(job_path.read_text(encoding="utf-8"))
        if job.get("format") != JOB_FORMAT:
            raise TrainingError(
                f"{job_path}: a job of format {job.get('format')}, not {JOB_FORMAT}"
            )
        train_rank(job, job_path.parent, rank)
    except StemmaError as error:
        _report(job_path.parent, rank, type(error).__name__, error.headline, error.details)
        return 1
    except Exception as error:  # reported with the rank, so the flow can say where
        _report(job_path.parent, rank, type(error).__name__, f"{type(error).__name__}: {error}", [])
        raise
    return 0


def train_rank(job: dict[str, Any], folder: Path, rank: int) -> None:
    """The epochs of one rank."""
    from safetensors.torch import load_file

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    train = TrainSpec.model_validate(job["train"])
    task = str(job["task"])
    if job["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(int(job["threads"]))
    dist.init_process_group(backend=str(job["backend"]))
    try:
        arrays = load_file(str(folder / DATA_FILE))
        network = build_network(job["network_config"], int(job["n_inputs"]), int(job["n_outputs"]))
        load_weights(network, folder / INITIAL_WEIGHTS_FILE)
        network = network.to(device)
        network.train()
        optimizer = _make_optimizer(network, train)
        x_train, y_train = arrays["x_train"], arrays["y_train"]
        x_val, y_val = arrays["x_val"], arrays["y_val"]
        fingerprint = _fingerprint(network, train, task, x_train.numpy(), x_val.numpy())
        fingerprint["settings"]["processes"] = world

        state = _Progress()
        resumed_from: int | None = None
        checkpoint = (
            Path(job["checkpoint_dir"]) / CHECKPOINT_NAME if job["checkpoint_dir"] else None
        )
        if checkpoint is not None and checkpoint.exists():
            # Every rank loads rank 0's checkpoint: the same weights, optimizer and progress.
            state = _load_checkpoint(checkpoint, network, optimizer, fingerprint)
            resumed_from = state.epoch

        model = DistributedDataParallel(
            network, device_ids=[local_rank] if device.type == "cuda" else None
        )
        amp_dtype = torch.bfloat16 if job["precision"] == "bf16" else None
        autocast = _autocast_factory(device, amp_dtype)
        loss_fn, loss_sum_fn = _loss_functions(task)
        # The sampler deals out row numbers: it only needs the dataset's length.
        row_numbers: Dataset[int] = cast("Dataset[int]", range(len(x_train)))
        sampler: DistributedSampler[int] = DistributedSampler(
            row_numbers, num_replicas=world, rank=rank, shuffle=True, seed=train.seed
        )
        batch = per_process_batch(train.batch_size, world)
        x_train, y_train = x_train.to(device), y_train.to(device)
        # Each rank's contiguous share of the validation rows; the sums are all-reduced.
        share = -(-len(x_val) // world)
        x_share = x_val[rank * share : (rank + 1) * share].to(device)
        y_share = y_val[rank * share : (rank + 1) * share].to(device)

        with _deterministic(device):
            for epoch in range(state.epoch + 1, train.epochs + 1):
                if state.stopped_early:
                    break
                _stop_if_orphaned(int(job["parent_pid"]))
                # The sampler shuffles (seeded by train.seed and the epoch); dropout is seeded here.
                _, dropout_seed = _epoch_seeds(train.seed, epoch)
                # Dropout draws differ per rank (their rows differ too), reproducibly.
                torch.manual_seed(
                    int(np.random.SeedSequence([dropout_seed, rank]).generate_state(1)[0])
                )
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), dtype=torch.long, device=device)
                started = time.perf_counter()
                train_sum, rows = _train_epoch(
                    model, optimizer, loss_fn, x_train, y_train, order, batch, autocast
                )
                val_sum = _loss_total(network, loss_sum_fn, x_share, y_share, autocast)
                totals = torch.stack([train_sum, rows, val_sum]).double()
                dist.all_reduce(totals)
                train_total, rows_total, val_total = totals.tolist()
                seconds = time.perf_counter() - started
                row = _epoch_row(
                    epoch,
                    train_total / rows_total,
                    val_total / len(x_val),
                    seconds,
                    len(x_train),
                    train,
                )
                _record_epoch(state, row, network, train)
                if rank == 0:
                    if checkpoint is not None:
                        _save_checkpoint(checkpoint, network, optimizer, state, fingerprint)
                    with open(folder / EPOCHS_FILE, "a", encoding="utf-8") as stream:
                        stream.write(json.dumps(row) + "\n")

        if rank == 0:
            network = network.to("cpu")
            if state.best_state:
                network.load_state_dict(state.best_state)
            save_weights(network, folder / RESULT_WEIGHTS_FILE)
            result = {
                "history": state.history,
                "best_epoch": state.best_epoch,
                "stopped_early": state.stopped_early,
                "device": device.type,
                "precision": "bf16" if amp_dtype is not None else "fp32",
                "resumed_from_epoch": resumed_from,
            }
            (folder / RESULT_FILE).write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    autocast: Callable[[], Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over this rank's rows; the summed loss and the row count, as device scalars.

    Every rank has as many rows (the sampler pads), so all take the same number of steps
    and meet at each step's gradient all-reduce.
    """
    losses, sizes = [], []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        with autocast():
            loss = loss_fn(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        optimizer.step()
        losses.append(loss.detach().float() * len(index))
        sizes.append(len(index))
    return torch.stack(losses).sum(), torch.tensor(float(sum(sizes)), device=x.device)


def _loss_total(
    network: nn.Module,
    loss_sum_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """The summed loss over this rank's validation rows (without DDP: no gradient sync)."""
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
            if not parts:  # more ranks than validation rows
                return torch.zeros((), device=x.device)
            return torch.stack(parts).sum().float()
    finally:
        network.train()


def _stop_if_orphaned(parent_pid: int) -> None:
    """Stop when the process that started the job is gone, rather than train for nobody."""
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        raise TrainingError(
            f"the process that started this training ({parent_pid}) is gone: stopping"
        ) from None
    except PermissionError:  # alive, under another user
        return


def _report(folder: Path, rank: int, kind: str, headline: str, details: list[str]) -> None:
    path = folder / ERRORS_DIR / f"rank-{rank}.json"
    document = {"kind": kind, "headline": headline, "details": list(details)}
    # OSError: the folder is gone with the flow that made it, so there is nobody to tell.
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(document), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
