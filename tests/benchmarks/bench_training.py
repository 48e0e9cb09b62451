"""Throughput of `train_network` against the smallest loop that does the same work.

Run with `.venv/bin/pytest tests/benchmarks/bench_training.py -m benchmark -s`.

Both loops train the same initial MLP on the same rows with the same optimiser, batch
order and dropout seeds, so they must end with identical weights; the hand-written one
simply leaves out everything `train_network` adds (validation loss, history, checks).
Runs alternate so that load from other processes on the machine hits both alike; the
ratio reported is the median over rounds of (stemma rate / hand-written rate).
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import numpy as np
import pytest
import torch
from torch import nn

from stemma.components.model.artifact import weights_sha256
from stemma.components.model.networks import build_network
from stemma.components.spec import TrainSpec
from stemma.components.training.loop import train_network

ROWS = 200_000
VALIDATION_ROWS = 20_000
INPUTS = 40
BATCH_SIZE = 512
EPOCHS = 3
SEED = 7
ROUNDS = 7
#: What the loop is meant to reach, and what the test asserts (room for a noisy machine).
TARGET_RATIO = 0.95
ASSERTED_RATIO = 0.8


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((ROWS + VALIDATION_ROWS, INPUTS)).astype(np.float32)
    logits = x @ rng.standard_normal(INPUTS) + rng.standard_normal(len(x))
    y = (logits > 0).astype(np.float32)
    return x[:ROWS], y[:ROWS], x[ROWS:], y[ROWS:]


def _hand_written(
    network: nn.Module, x: np.ndarray, y: np.ndarray, learning_rate: float
) -> nn.Module:
    """The minimal loop: same seeds per epoch as `train_network`, nothing else."""
    model = copy.deepcopy(network)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    inputs = torch.from_numpy(x)
    targets = torch.from_numpy(y).reshape(-1, 1)
    with torch.random.fork_rng(devices=[]):
        for epoch in range(1, EPOCHS + 1):
            shuffle_seed, dropout_seed = np.random.SeedSequence([SEED, epoch]).generate_state(2)
            torch.manual_seed(int(dropout_seed))
            order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(int(shuffle_seed)))
            for start in range(0, ROWS, BATCH_SIZE):
                index = order[start : start + BATCH_SIZE]
                loss = loss_fn(model(inputs[index]), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@pytest.mark.benchmark
def test_train_network_keeps_up_with_a_hand_written_loop() -> None:
    x_train, y_train, x_val, y_val = _data()
    spec = TrainSpec(
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        learning_rate=1e-3,
        optimizer="adam",
        seed=SEED,
        device="cpu",
        precision="fp32",
        early_stopping=None,
    )
    network = build_network(
        {"architecture": "mlp", "hidden": [64, 32], "dropout": 0.1}, INPUTS, seed=SEED
    )

    def run_stemma() -> nn.Module:
        return train_network(
            network, x_train, y_train, x_val, y_val, train=spec, task="binary", progress=False
        ).network

    def run_hand_written() -> nn.Module:
        return _hand_written(network, x_train, y_train, spec.learning_rate)

    # Warm-up: allocator, thread pool and lazy initialisation in torch.
    assert weights_sha256(run_stemma()) == weights_sha256(run_hand_written()), (
        "the two loops must do the same work (same weights) for the comparison to mean anything"
    )
    stemma_rates, hand_rates, paired_ratios = [], [], []
    for round_index in range(ROUNDS):
        # Swap the order every round so neither loop always runs second (warmer caches,
        # or the tail of someone else's burst of load).
        pair = [(run_stemma, stemma_rates), (run_hand_written, hand_rates)]
        for run, rates in pair if round_index % 2 == 0 else pair[::-1]:
            started = time.perf_counter()
            run()
            rates.append(EPOCHS * ROWS / (time.perf_counter() - started))
        paired_ratios.append(stemma_rates[-1] / hand_rates[-1])
    stemma = statistics.median(stemma_rates)
    hand = statistics.median(hand_rates)
    # Runs of a pair are seconds apart, so load from other processes hits both alike; the
    # median of the paired ratios is steadier than the ratio of the two medians.
    ratio = statistics.median(paired_ratios)
    print(
        f"\ntraining throughput: stemma {stemma:,.0f} samples/s, hand-written {hand:,.0f} samples/s, "
        f"ratio {ratio:.3f} (median of paired ratios; target >= {TARGET_RATIO}; {ROWS:,} rows x {INPUTS} inputs, "
        f"batch {BATCH_SIZE}, {EPOCHS} epochs, median of {ROUNDS}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    assert ratio >= ASSERTED_RATIO, f"train_network reaches only {ratio:.2f} of a hand-written loop"
