"""Networks the runtime tests and benchmarks run: a custom residual MLP, one that cannot export."""

from __future__ import annotations

import torch
from torch import nn

from stemma.components.model.networks import MLP


class ResidualBlock(nn.Module):
    """``x + Linear(GELU(Linear(LayerNorm(x))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(self.norm(x))


class ResidualMLP(nn.Module):
    """A user's own module: a 128-wide residual MLP with LayerNorm."""

    def __init__(self, n_inputs: int, n_outputs: int = 1, width: int = 128, blocks: int = 2):
        super().__init__()
        self.stem = nn.Linear(n_inputs, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class BranchyMLP(MLP):
    """The built-in MLP's weights behind a Python branch on the data: torch.export refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > float("inf"):  # never taken, but it reads the data
            return -self.layers(x)
        return self.layers(x)
