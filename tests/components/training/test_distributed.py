"""Distributed data-parallel training under torchrun (gloo on this CPU), against one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from stemma.components.errors import SpecError, TrainingError
from stemma.components.model.artifact import weights_sha256
from stemma.components.model.networks import build_network
from stemma.components.spec import DistributedSpec, TrainSpec, load_spec
from stemma.components.training.distributed import resolve_backend, train_distributed
from stemma.components.training.loop import (
    CHECKPOINT_NAME,
    predict_raw,
    train_network,
)
from stemma.components.training.metrics import evaluate_scores

CONFIG = {"architecture": "mlp", "hidden": [32, 16], "dropout": 0.1, "params": {}}
INPUTS = 12
EPOCHS = 10
#: How far apart the two runs' test ROC AUC may be.
AUC_TOLERANCE = 0.01


def make_problem(rows: int, seed: int = 7) -> dict[str, np.ndarray]:
    """A generated binary table with an interaction term, split 4:1:1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, INPUTS)).astype(np.float32)
    logits = x @ rng.standard_normal(INPUTS) + 0.8 * x[:, 0] * x[:, 1]
    y = (logits + rng.standard_normal(rows) > 0).astype(np.float32)
    train, valid = rows * 4 // 6, rows * 5 // 6
    return {
        "x_train": x[:train],
        "y_train": y[:train],
        "x_val": x[train:valid],
        "y_val": y[train:valid],
        "x_test": x[valid:],
        "y_test": y[valid:],
    }


def spec(epochs: int = EPOCHS, **distributed) -> TrainSpec:
    return TrainSpec(
        epochs=epochs,
        batch_size=128,
        device="cpu",
        seed=7,
        early_stopping=None,
        distributed=DistributedSpec(nproc_per_node=2, **distributed),
    )


def run(problem, train: TrainSpec, **options):
    network = build_network(CONFIG, INPUTS, 1, seed=train.seed)
    return train_distributed(
        network,
        problem["x_train"],
        problem["y_train"],
        problem["x_val"],
        problem["y_val"],
        train=train,
        task="binary",
        network_config=CONFIG,
        progress=False,
        **options,
    )


def roc_auc_of(network: nn.Module, problem) -> float:
    scores = 1 / (1 + np.exp(-predict_raw(network, problem["x_test"]).ravel()))
    return evaluate_scores("binary", problem["y_test"], scores)["roc_auc"]


def descendants() -> set[int]:
    """Processes started under this one, but multiprocessing's resource tracker."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module")
def problem():
    return make_problem(9_000)


@pytest.fixture(scope="module")
def uninterrupted(problem, tmp_path_factory):
    """Two processes, checkpointing every epoch, never interrupted."""
    reported = []
    result = run(
        problem,
        spec(),
        checkpoint_dir=tmp_path_factory.mktemp("uninterrupted"),
        on_epoch=reported.append,
    )
    return result, reported


# ---------------------------------------------------------------------------------------
# Backend and checks before anything starts


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [
        ("auto", "cpu", "gloo"),
        ("auto", "cuda", "nccl"),
        ("gloo", "cpu", "gloo"),
        ("gloo", "cuda", "gloo"),
        ("nccl", "cuda", "nccl"),
    ],
    ids=["auto-cpu", "auto-cuda", "gloo-cpu", "gloo-cuda", "nccl-cuda"],
)
def test_backend_auto_is_nccl_on_cuda_and_gloo_on_the_cpu(backend, device, expected):
    assert resolve_backend(backend, torch.device(device)) == expected


def test_nccl_on_the_cpu_is_refused():
    with pytest.raises(TrainingError, match="nccl") as caught:
        resolve_backend("nccl", torch.device("cpu"))
    assert "gloo" in caught.value.render()


def test_the_spec_reports_distributed_problems_with_the_rest(repo_root):
    with pytest.raises(SpecError) as caught:
        load_spec(
            repo_root / "configs" / "credit.yaml",
            [
                "train.device=cpu",
                "train.batch_size=4",
                "train.distributed.backend=nccl",
                "train.distributed.nproc_per_node=8",
            ],
            check_paths=False,
        )
    text = caught.value.render()
    assert "train.distributed.backend: nccl needs CUDA" in text
    assert "train.distributed.nproc_per_node: 8 processes cannot share a batch of 4" in text
    loaded = load_spec(
        repo_root / "configs" / "credit.yaml",
        ["train.distributed.nproc_per_node=2"],
        check_paths=False,
    )
    assert loaded.spec.train.distributed == DistributedSpec(nproc_per_node=2, backend="auto")


def test_problems_are_raised_before_any_process_starts(problem):
    before = descendants()
    with pytest.raises(TrainingError, match="cannot share a batch"):
        run(problem, spec().model_copy(update={"batch_size": 1}))
    bad = dict(problem, y_train=problem["y_train"][:-1])
    with pytest.raises(TrainingError, match="targets"):
        run(bad, spec())
    with pytest.raises(ValueError, match=r"train\.distributed is not set"):
        run(problem, spec().model_copy(update={"distributed": None}))
    assert descendants() == before


# ---------------------------------------------------------------------------------------
# Training


def test_two_processes_train_as_well_as_one(problem, uninterrupted):
    single_spec = spec().model_copy(update={"distributed": None})
    network = build_network(CONFIG, INPUTS, 1, seed=7)
    initial = weights_sha256(network)
    single = train_network(
        network,
        problem["x_train"],
        problem["y_train"],
        problem["x_val"],
        problem["y_val"],
        train=single_spec,
        task="binary",
        progress=False,
    )
    result, reported = uninterrupted

    single_auc = roc_auc_of(single.network, problem)
    ddp_auc = roc_auc_of(result.network, problem)
    assert single_auc > 0.85
    assert abs(ddp_auc - single_auc) <= AUC_TOLERANCE, (single_auc, ddp_auc)
    # Rank 0 alone reports: each epoch once, in order, as the history records it.
    assert [row["epoch"] for row in reported] == list(range(1, EPOCHS + 1))
    assert reported == result.history
    final_val = result.history[-1]["val_loss"]
    assert final_val == pytest.approx(single.history[-1]["val_loss"], rel=0.05)
    assert (result.device, result.precision, result.best_epoch) == ("cpu", "fp32", EPOCHS)
    assert result.resumed_from_epoch is None and not result.network.training
    assert weights_sha256(network) == initial, "the caller's network must not change"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_process_per_gpu_trains_over_nccl_in_bf16(problem, tmp_path):
    """On a GPU machine ``device: auto`` trains each process on its own GPU (NCCL, the
    backend ``auto`` picks there) under bf16 autocast, and the network comes back on
    the CPU as good as the CPU runs'."""
    train = TrainSpec(
        epochs=EPOCHS,
        batch_size=128,
        device="auto",
        precision="auto",
        seed=7,
        early_stopping=None,
        distributed=DistributedSpec(nproc_per_node=torch.cuda.device_count()),
    )
    reported: list[dict] = []

    result = run(problem, train, checkpoint_dir=tmp_path, on_epoch=reported.append)

    assert (result.device, result.precision, result.best_epoch) == ("cuda", "bf16", EPOCHS)
    assert [row["epoch"] for row in reported] == list(range(1, EPOCHS + 1))
    assert all(p.device.type == "cpu" for p in result.network.parameters())
    assert roc_auc_of(result.network, problem) > 0.85


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
    problem, uninterrupted, tmp_path
):
    before = descendants()

    def stop_after_second_epoch(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(problem, spec(), checkpoint_dir=tmp_path, on_epoch=stop_after_second_epoch)
    assert descendants() == before, "torchrun and its workers must be stopped"
    saved = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert 2 <= saved["epoch"] < EPOCHS
    # One process does not take over a two-process checkpoint (its batches differ).
    with pytest.raises(TrainingError, match="other training settings") as caught:
        train_network(
            build_network(CONFIG, INPUTS, 1, seed=7),
            problem["x_train"],
            problem["y_train"],
            problem["x_val"],
            problem["y_val"],
            train=spec(),
            task="binary",
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert "processes: checkpoint 2, now absent" in caught.value.render()

    reported = []
    resumed = run(problem, spec(), checkpoint_dir=tmp_path, on_epoch=reported.append)

    reference, _ = uninterrupted
    assert resumed.resumed_from_epoch == saved["epoch"]
    assert [row["epoch"] for row in reported] == list(range(saved["epoch"] + 1, EPOCHS + 1))
    assert weights_sha256(resumed.network) == weights_sha256(reference.network)
    losses = [(row["train_loss"], row["val_loss"]) for row in resumed.history]
    assert losses == [(row["train_loss"], row["val_loss"]) for row in reference.history]


KILLABLE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.components.training.test_distributed import make_problem, run, spec
    def report(row):
        print("epoch", row["epoch"], flush=True)
    run(make_problem(24_000), spec(epochs=8), checkpoint_dir=Path(sys.argv[1]), on_epoch=report)
    """
)


def test_workers_of_a_killed_flow_stop_and_the_next_run_resumes(repo_root, tmp_path):
    scratch = tmp_path / "scratch"  # the job folder a killed flow cannot remove lands here
    scratch.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_SCRIPT, str(tmp_path)],
        cwd=repo_root,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in child.stdout:
            if line.strip() == "epoch 2":
                break
        else:
            pytest.fail(f"training never reached epoch 2: {child.stderr.read()[-3000:]}")
        workers = psutil.Process(child.pid).children(recursive=True)
        child.send_signal(signal.SIGKILL)  # the flow's process only: not torchrun, not workers
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert workers, "torchrun and its workers should have been running"

    # The workers notice at their next epoch that nobody is waiting for them, and stop.
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers still training after the flow was killed: {alive}"
    (job,) = scratch.glob("stemma-ddp-*")
    reports = [path.read_text() for path in (job / "errors").glob("rank-*.json")]
    assert any("gone: stopping" in report for report in reports), reports
    saved = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert 2 <= saved["epoch"] < 8

    reported = []
    resumed = run(
        make_problem(24_000), spec(epochs=8), checkpoint_dir=tmp_path, on_epoch=reported.append
    )
    assert resumed.resumed_from_epoch == saved["epoch"]
    assert [row["epoch"] for row in resumed.history] == list(range(1, 9))
    assert [row["epoch"] for row in reported] == list(range(saved["epoch"] + 1, 9))


def test_a_worker_failure_reaches_the_caller_as_a_stemma_error(problem, tmp_path):
    before = descendants()
    extreme = dict(problem, x_train=problem["x_train"] * np.float32(1e18))
    diverging = spec(epochs=3).model_copy(update={"learning_rate": 10.0, "optimizer": "sgd"})

    with pytest.raises(TrainingError) as caught:
        run(extreme, diverging, checkpoint_dir=tmp_path)

    text = caught.value.render()
    assert "training diverged at epoch 1" in text and "lower train.learning_rate" in text
    assert descendants() == before, "no worker may outlive a failed run"
    assert not (tmp_path / CHECKPOINT_NAME).exists()


class FailsWhileTraining(nn.Module):
    """Maps its inputs like a linear layer, and fails in the first training step."""

    def __init__(self, n_inputs: int, n_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_inputs, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("this network refuses to train")
        return self.linear(x)


def test_an_unexpected_worker_error_names_the_rank_and_the_error(problem, repo_root):
    config = {"architecture": f"{__name__}:FailsWhileTraining", "params": {}}
    network = build_network(config, INPUTS, 1, seed=7)
    cwd = Path.cwd()
    os.chdir(repo_root)  # the workers import the class from here, as a user's own module
    try:
        with pytest.raises(TrainingError) as caught:
            train_distributed(
                network,
                problem["x_train"],
                problem["y_train"],
                problem["x_val"],
                problem["y_val"],
                train=spec(epochs=1),
                task="binary",
                network_config=config,
                progress=False,
            )
    finally:
        os.chdir(cwd)
    text = caught.value.render()
    assert "distributed training failed in rank-0" in text
    assert "RuntimeError: this network refuses to train" in text
