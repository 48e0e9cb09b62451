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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from stemma.components.errors import StemmaError, TrainingError
from stemma.components.model.artifact import load_weights, save_weights
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
from stemma.components.training.epochs import (
    CHECKPOINT_NAME,
    Progress,
    autocast_factory,
    deterministic,
    epoch_row,
    epoch_seeds,
    load_checkpoint,
    loss_functions,
    loss_total,
    make_optimizer,
    record_epoch,
    run_fingerprint,
    save_checkpoint,
    train_steps,
)
from stemma.components.training.loop import trained_result


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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if job["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(int(job["threads"]))
    dist.init_process_group(backend=str(job["backend"]))
    try:
        run = _RankRun.start(job, folder, rank, device)
        with deterministic(device):
            for epoch in range(run.state.epoch + 1, run.train.epochs + 1):
                if run.state.stopped_early:
                    break
                _stop_if_orphaned(int(job["parent_pid"]))
                run.epoch(epoch)
        if rank == 0:
            run.write_result()
    finally:
        dist.destroy_process_group()


@dataclass
class _RankRun:
    """One rank's network, optimizer, data share and progress."""

    folder: Path
    rank: int
    device: torch.device
    train: TrainSpec
    network: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler[int]
    arrays: dict[str, torch.Tensor]
    val_rows: int
    amp_dtype: torch.dtype | None
    task: str
    fingerprint: dict[str, Any]
    checkpoint: Path | None
    state: Progress
    resumed_from: int | None

    @classmethod
    def start(cls, job: dict[str, Any], folder: Path, rank: int, device: torch.device) -> _RankRun:
        """Build the network from the job, resume rank 0's checkpoint, wrap it in DDP."""
        from safetensors.torch import load_file

        world = int(os.environ.get("WORLD_SIZE", "1"))
        train = TrainSpec.model_validate(job["train"])
        task = str(job["task"])
        arrays = load_file(str(folder / DATA_FILE))
        network = build_network(job["network_config"], int(job["n_inputs"]), int(job["n_outputs"]))
        load_weights(network, folder / INITIAL_WEIGHTS_FILE)
        network = network.to(device)
        network.train()
        optimizer = make_optimizer(network, train)
        x_train, x_val = arrays["x_train"], arrays["x_val"]
        fingerprint = run_fingerprint(network, train, task, x_train.numpy(), x_val.numpy())
        fingerprint["settings"]["processes"] = world
        state = Progress()
        checkpoint = (
            Path(job["checkpoint_dir"]) / CHECKPOINT_NAME if job["checkpoint_dir"] else None
        )
        if checkpoint is not None and checkpoint.exists():
            # Every rank loads rank 0's checkpoint: the same weights, optimizer and progress.
            state = load_checkpoint(checkpoint, network, optimizer, fingerprint)
        model = DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
        # The sampler deals out row numbers: it only needs the dataset's length.
        row_numbers: Dataset[int] = cast("Dataset[int]", range(len(x_train)))
        sampler: DistributedSampler[int] = DistributedSampler(
            row_numbers, num_replicas=world, rank=rank, shuffle=True, seed=train.seed
        )
        # Each rank's contiguous share of the validation rows; the sums are all-reduced.
        share = -(-len(x_val) // world)
        on_device = {
            "x_train": x_train.to(device),
            "y_train": arrays["y_train"].to(device),
            "x_val": x_val[rank * share : (rank + 1) * share].to(device),
            "y_val": arrays["y_val"][rank * share : (rank + 1) * share].to(device),
        }
        return cls(
            folder=folder,
            rank=rank,
            device=device,
            train=train,
            network=network,
            model=model,
            optimizer=optimizer,
            sampler=sampler,
            arrays=on_device,
            val_rows=len(x_val),
            amp_dtype=torch.bfloat16 if job["precision"] == "bf16" else None,
            task=task,
            fingerprint=fingerprint,
            checkpoint=checkpoint,
            state=state,
            resumed_from=state.epoch or None,
        )

    def epoch(self, epoch: int) -> None:
        """Train epoch ``epoch`` on this rank's rows; rank 0 checkpoints and reports it."""
        train, device = self.train, self.device
        autocast = autocast_factory(device, self.amp_dtype)
        loss_fn, loss_sum_fn = loss_functions(self.task)
        # The sampler shuffles (seeded by train.seed and the epoch); dropout is seeded here.
        _, dropout_seed = epoch_seeds(train.seed, epoch)
        # Dropout draws differ per rank (their rows differ too), reproducibly.
        torch.manual_seed(
            int(np.random.SeedSequence([dropout_seed, self.rank]).generate_state(1)[0])
        )
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=device)
        started = time.perf_counter()
        x_train, y_train = self.arrays["x_train"], self.arrays["y_train"]
        batch = per_process_batch(train.batch_size, self.sampler.num_replicas)
        losses = train_steps(
            self.model, self.optimizer, loss_fn, x_train, y_train, order, batch, autocast
        )
        sizes = [min(batch, len(order) - start) for start in range(0, len(order), batch)]
        train_sum = torch.stack(
            [loss.float() * size for loss, size in zip(losses, sizes, strict=True)]
        ).sum()
        rows = torch.tensor(float(len(order)), device=x_train.device)
        val_sum = loss_total(
            self.network, loss_sum_fn, self.arrays["x_val"], self.arrays["y_val"], autocast
        )
        totals = torch.stack([train_sum, rows, val_sum]).double()
        dist.all_reduce(totals)
        train_total, rows_total, val_total = totals.tolist()
        seconds = time.perf_counter() - started
        row = epoch_row(
            epoch, train_total / rows_total, val_total / self.val_rows, seconds, len(x_train), train
        )
        record_epoch(self.state, row, self.network, train)
        if self.rank == 0:
            if self.checkpoint is not None:
                save_checkpoint(
                    self.checkpoint, self.network, self.optimizer, self.state, self.fingerprint
                )
            with open(self.folder / EPOCHS_FILE, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(row) + "\n")

    def write_result(self) -> None:
        """Rank 0: the best weights and the history, for the process that started the job."""
        result = trained_result(
            self.network, self.state, self.device, self.amp_dtype, self.resumed_from
        )
        save_weights(result.network, self.folder / RESULT_WEIGHTS_FILE)
        summary = {key: value for key, value in vars(result).items() if key != "network"}
        (self.folder / RESULT_FILE).write_text(json.dumps(summary), encoding="utf-8")


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
