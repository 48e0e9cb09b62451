"""Structured pruning: whole hidden units removed, leaving a smaller dense network.

A hidden unit can go when it lies between two Linears: ``Linear A → (unit-wise ops)* →
Linear B``, where A's output feeds nothing but that chain and every op in between acts on
each unit alone (an activation, dropout, identity). Removing unit ``j`` then removes row
``j`` of A's weight and bias and column ``j`` of B's weight, and nothing else notices.
:func:`prunable_layers` finds those chains in any ``nn.Module`` by tracing it with
``torch.fx``, so the built-in MLP and a user's own module are pruned alike.

A unit's score is the norm (``l1`` or ``l2``) of its incoming weights (A's row, with its
bias) times the norm of its outgoing weights (B's column): a unit that takes in little or
passes on little matters little. Each layer keeps its ``round(width * (1 - amount))``
best units, in their original order.

Over ``steps`` steps the widths follow a geometric schedule: after step ``i`` of ``k`` a
layer keeps ``round(width * (1 - amount) ** (i / k))`` units (the last step exactly the
final count), so every step removes the same share of what is left, and each step is
followed by ``finetune_epochs`` epochs of :func:`training.loop.train_network` with the
caller's training settings (early stopping off: every epoch runs and the last one's
weights are kept).

Unstructured sparsity (zeroed weights in matrices of the same size) is not offered: it
does not make dense CPU inference any faster.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from stemma.components.errors import CompressionError, StemmaError
from stemma.components.model.networks import MLP_ARCHITECTURE, build_network
from stemma.components.spec import PruneSpec, TrainSpec
from stemma.components.training.loop import train_network

#: Modules that act on each unit alone, so a unit removed before them is simply absent after.
UNITWISE_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
)
#: The same operations as ``torch`` and ``torch.nn.functional`` functions.
UNITWISE_FUNCTIONS = frozenset(
    {
        torch.relu,
        F.relu,
        F.gelu,
        F.silu,
        torch.tanh,
        F.tanh,
        torch.sigmoid,
        F.sigmoid,
        F.leaky_relu,
        F.elu,
        torch.dropout,
        F.dropout,
    }
)
#: ... and as tensor methods (``x.relu()``).
UNITWISE_METHODS = frozenset({"relu", "tanh", "sigmoid"})

#: Why only structured pruning is offered; every result carries it.
NO_UNSTRUCTURED_NOTE = (
    "unstructured sparsity is not offered: it does not speed up dense CPU inference"
)
#: What a user can do with a network that has nothing to prune.
PRUNABLE_SHAPE_HINT = (
    "pruning needs Linear → activation → Linear chains (ReLU, GELU, SiLU, Tanh, Sigmoid, "
    "LeakyReLU, ELU, Dropout, Identity, as modules or torch / torch.nn.functional calls) "
    "whose first Linear feeds nothing else; the built-in mlp architecture always has them"
)
#: Decimals of the largest usable amount an error suggests.
AMOUNT_DECIMALS = 2


@dataclass(frozen=True)
class PrunedLayer:
    """One prunable layer's width before and after pruning.

    Attributes:
        name: module name of the Linear whose output units are removed (``layers.3``).
        before: its output width before pruning.
        after: its output width after pruning.
    """

    name: str
    before: int
    after: int


@dataclass(frozen=True)
class PruneResult:
    """A pruned network and what it takes to store and describe it.

    Attributes:
        network: the pruned, fine-tuned network, on the CPU, in eval mode.
        config: the network config ``networks.build_network`` rebuilds it from.
        layers: each prunable layer's width before and after.
        parameters_before: parameter count of the network given.
        parameters_after: parameter count of the pruned network.
        history: the fine-tune epochs' rows (as ``train_network`` writes them), each with
            the pruning ``step`` (1-based) it followed.
        notes: what a reader of the result should know (one line each).
    """

    network: nn.Module
    config: dict[str, Any]
    layers: tuple[PrunedLayer, ...]
    parameters_before: int
    parameters_after: int
    history: list[dict[str, Any]]
    notes: tuple[str, ...]


def prunable_layers(network: nn.Module) -> list[tuple[str, str]]:
    """The Linear pairs whose hidden units can be removed, in the network's call order.

    Args:
        network: any ``nn.Module``; it is traced with ``torch.fx``, not changed.

    Returns:
        ``(A, B)`` module names for each chain ``Linear A → (unit-wise ops)* → Linear B``
        where A's output feeds only that chain and neither Linear is shared, tied or used
        outside its call.

    Raises:
        CompressionError: the network cannot be traced, or has no such chain.
    """
    graph = _trace(network)
    linear = _single_use_linears(network, graph)
    pairs = []
    for node in graph.nodes:
        if node.target not in linear or node.op != "call_module":
            continue
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.op == "call_module" and user.target in linear and _only_input(user, current):
                pairs.append((node.target, user.target))
                break
            if not _unitwise(user, current, network):
                break
            current = user
    if not pairs:
        raise CompressionError(
            f"{type(network).__name__} has no Linear → activation → Linear chain to prune",
            [PRUNABLE_SHAPE_HINT],
        )
    return pairs


def check_amount(network: nn.Module, amount: float) -> list[PrunedLayer]:
    """The widths pruning ``amount`` would leave; refused before anything changes.

    Args:
        network: the network to prune (not changed).
        amount: share of each prunable layer's units to remove, in ``(0, 1]``.

    Returns:
        One :class:`PrunedLayer` per prunable layer, with its planned width.

    Raises:
        CompressionError: the network has nothing to prune, or the amount leaves a layer no
            unit (every such layer is named, with its width and the largest amount that
            keeps one of its units).
    """
    if not (isinstance(amount, int | float) and 0.0 < amount <= 1.0):
        raise CompressionError(
            f"prune.amount must be in (0, 1], got {amount!r}",
            ["0.5 removes half the hidden units of each prunable layer"],
        )
    modules = dict(network.named_modules())
    plans = []
    for first, _ in prunable_layers(network):
        width = modules[first].out_features
        plans.append(PrunedLayer(first, width, round(width * (1.0 - amount))))
    empty = [plan for plan in plans if plan.after < 1]
    if empty:
        largest = min(_largest_amount(plan.before) for plan in empty)
        raise CompressionError(
            f"prune.amount {amount:g} leaves no unit in layer {empty[0].name} "
            f"(width {empty[0].before})",
            [
                *(
                    f"{plan.name}: width {plan.before}, amount {amount:g} leaves "
                    f"round({plan.before} x {1.0 - amount:.4g}) = {plan.after} units; the "
                    f"largest amount that keeps one is {_largest_amount(plan.before):g}"
                    for plan in empty
                ),
                f"set prune.amount to at most {largest:g}",
            ],
        )
    return plans


def prune_network(
    network: nn.Module,
    config: Mapping[str, Any],
    *,
    settings: PruneSpec,
    train: TrainSpec,
    task: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    progress: bool | None = None,
) -> PruneResult:
    """Prune ``network`` in ``settings.steps`` steps, fine-tuning after each.

    Args:
        network: the trained network; a copy is pruned, the network itself never changes.
        config: the network config it was built from (``networks.network_config``).
        settings: the spec's ``compress.prune`` section.
        train: the spec's training settings; fine-tuning runs them with ``epochs`` set to
            ``settings.finetune_epochs`` and early stopping off.
        task: ``binary``, ``multiclass`` or ``regression``.
        x_train: training inputs (preprocessed), ``(n, n_inputs)``.
        y_train: training targets, as ``train_network`` takes them.
        x_val: validation inputs, for the fine-tune's validation loss.
        y_val: validation targets.
        progress: show fine-tuning's progress bar; None shows it when stderr is a terminal.

    Returns:
        The pruned network, its config and how the pruning went.

    Raises:
        CompressionError: nothing to prune, an amount that leaves a layer no unit (both
            before any change), or a pruned network its config does not rebuild.
        TrainingError: fine-tuning failed (bad arrays, a diverging loss).
    """
    plans = check_amount(network, settings.amount)
    pairs = prunable_layers(network)
    widths = {plan.name: _schedule(plan, settings) for plan in plans}
    pruned = copy.deepcopy(network).to("cpu")
    tune = train.model_copy(
        update={"epochs": max(settings.finetune_epochs, 1), "early_stopping": None}
    )
    history: list[dict[str, Any]] = []
    for step in range(settings.steps):
        targets = {name: counts[step] for name, counts in widths.items()}
        _remove_units(pruned, pairs, targets, settings.criterion)
        if settings.finetune_epochs:
            result = train_network(
                pruned, x_train, y_train, x_val, y_val, train=tune, task=task, progress=progress
            )
            pruned = result.network
            history += [{**row, "step": step + 1} for row in result.history]
    pruned.eval()
    pruned_config = pruned_network_config(config, network, pruned)
    _check_rebuild(pruned, pruned_config, x_val)
    return PruneResult(
        network=pruned,
        config=pruned_config,
        layers=tuple(plans),
        parameters_before=_parameters(network),
        parameters_after=_parameters(pruned),
        history=history,
        notes=_notes(plans, widths, settings),
    )


def pruned_network_config(
    config: Mapping[str, Any], original: nn.Module, pruned: nn.Module
) -> dict[str, Any]:
    """The config ``networks.build_network`` rebuilds ``pruned`` from.

    The built-in MLP keeps its config with the smaller ``hidden`` widths; a custom module
    gets ``"pruned": {"<Linear name>": [out_features, in_features]}`` for every Linear
    whose shape pruning changed (added to those of an earlier pruning).
    """
    result = copy.deepcopy(dict(config))
    linears = [module for module in pruned.modules() if isinstance(module, nn.Linear)]
    if result.get("architecture", MLP_ARCHITECTURE) == MLP_ARCHITECTURE:
        result["hidden"] = [module.out_features for module in linears[:-1]]
        return result
    before = {
        name: (module.out_features, module.in_features)
        for name, module in original.named_modules()
        if isinstance(module, nn.Linear)
    }
    shapes = dict(result.get("pruned") or {})
    for name, module in pruned.named_modules():
        shape = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else None
        if shape is not None and shape != before.get(name):
            shapes[name] = list(shape)
    if shapes:
        result["pruned"] = shapes
    return result


def _trace(network: nn.Module) -> fx.Graph:
    try:
        return fx.symbolic_trace(network).graph
    except Exception as error:  # fx raises many types for untraceable Python
        reason = (str(error).strip().splitlines() or [""])[0]
        raise CompressionError(
            f"cannot find prunable layers of {type(network).__name__}: torch.fx cannot trace "
            f"it: {type(error).__name__}: {reason}",
            [
                "pruning traces forward with torch.fx: Python control flow on tensor values "
                "(if x.sum() > 0, loops over a tensor's length) cannot be traced",
                PRUNABLE_SHAPE_HINT,
            ],
        ) from error


def _single_use_linears(network: nn.Module, graph: fx.Graph) -> set[str]:
    """Names of the plain Linears called once, registered once, with untied parameters and
    not read outside their call (a weight read in forward would see the old shape)."""
    module_names = Counter(
        id(module) for _, module in network.named_modules(remove_duplicate=False)
    )
    parameter_uses = Counter(id(p) for _, p in network.named_parameters(remove_duplicate=False))
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    reads = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    return {
        name
        for name, module in network.named_modules()
        if type(module) is nn.Linear
        and calls[name] == 1
        and module_names[id(module)] == 1
        and all(parameter_uses[id(p)] == 1 for p in module.parameters())
        and not any(read.startswith(f"{name}.") for read in reads)
    }


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    return node.all_input_nodes == [source] and bool(node.args) and node.args[0] is source


def _unitwise(node: fx.Node, source: fx.Node, network: nn.Module) -> bool:
    """Whether ``node`` applies a unit-wise op to ``source`` and to nothing else."""
    if not _only_input(node, source):
        return False
    if node.op == "call_module":
        return isinstance(network.get_submodule(str(node.target)), UNITWISE_MODULES)
    if node.op == "call_function":
        return node.target in UNITWISE_FUNCTIONS
    return node.op == "call_method" and node.target in UNITWISE_METHODS


def _largest_amount(width: int) -> float:
    """The largest amount (to :data:`AMOUNT_DECIMALS`) that keeps one of ``width`` units."""
    scale = 10**AMOUNT_DECIMALS
    amount = math.floor((1.0 - 0.5 / width) * scale) / scale
    while amount > 0 and round(width * (1.0 - amount)) < 1:
        amount = round(amount - 1 / scale, AMOUNT_DECIMALS)
    return amount


def _schedule(plan: PrunedLayer, settings: PruneSpec) -> list[int]:
    """The layer's width after each step: geometric, ending at exactly ``plan.after``."""
    counts, previous = [], plan.before
    for step in range(1, settings.steps + 1):
        kept = round(plan.before * (1.0 - settings.amount) ** (step / settings.steps))
        kept = plan.after if step == settings.steps else min(previous, max(plan.after, kept))
        counts.append(kept)
        previous = kept
    return counts


def _unit_scores(first: nn.Linear, second: nn.Linear, criterion: str) -> torch.Tensor:
    """Each hidden unit's score: the norm of its incoming weights (with bias) times the norm
    of its outgoing weights, in float64."""
    order = 1 if criterion == "l1" else 2
    incoming = first.weight.detach().to("cpu", torch.float64)
    if first.bias is not None:
        incoming = torch.cat([incoming, first.bias.detach().to("cpu", torch.float64)[:, None]], 1)
    outgoing = second.weight.detach().to("cpu", torch.float64)
    return torch.linalg.vector_norm(incoming, ord=order, dim=1) * torch.linalg.vector_norm(
        outgoing, ord=order, dim=0
    )


def _remove_units(
    network: nn.Module, pairs: list[tuple[str, str]], targets: Mapping[str, int], criterion: str
) -> None:
    """Keep each layer's ``targets[name]`` best units (scored on the step's starting
    weights, so a Linear that is both B and A is scored before either change)."""
    modules = dict(network.named_modules())
    rows: dict[str, torch.Tensor] = {}
    columns: dict[str, torch.Tensor] = {}
    for first, second in pairs:
        if targets[first] >= modules[first].out_features:
            continue
        scores = _unit_scores(modules[first], modules[second], criterion)
        # A stable sort keeps the earlier unit of a tie, so the choice is reproducible.
        best = torch.argsort(scores, descending=True, stable=True)[: targets[first]]
        rows[first] = columns[second] = torch.sort(best).values
    for name in rows.keys() | columns.keys():
        _replace_linear(network, name, rows.get(name), columns.get(name))


def _replace_linear(
    network: nn.Module, name: str, rows: torch.Tensor | None, columns: torch.Tensor | None
) -> None:
    old = network.get_submodule(name)
    assert isinstance(old, nn.Linear)  # prunable_layers offers only Linear layers
    weight, bias = old.weight.detach(), None if old.bias is None else old.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    # skip_init: the weights are copied in next, so drawing initial ones would only move the RNG.
    new = nn.utils.skip_init(
        nn.Linear,
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent), child, new)


def _check_rebuild(network: nn.Module, config: Mapping[str, Any], x: np.ndarray) -> None:
    """Refuse a result whose config would not rebuild it: a stored model must load."""
    inputs = torch.from_numpy(np.ascontiguousarray(x[:2], dtype=np.float32))
    with torch.no_grad():
        outputs = network(inputs)
    n_outputs = int(outputs.shape[1]) if outputs.ndim == 2 else 1
    try:
        rebuilt = build_network(config, inputs.shape[1], n_outputs, seed=0)
        rebuilt.load_state_dict(network.state_dict())
    except (StemmaError, RuntimeError) as error:
        raise CompressionError(
            "the pruned network cannot be rebuilt from its config",
            [*str(error).splitlines()[:3], "the config must be the one the network was built from"],
        ) from error


def _parameters(network: nn.Module) -> int:
    return sum(parameter.numel() for parameter in network.parameters())


def _notes(
    plans: list[PrunedLayer], widths: Mapping[str, list[int]], settings: PruneSpec
) -> tuple[str, ...]:
    notes = [NO_UNSTRUCTURED_NOTE]
    if settings.steps > 1:
        notes.append(
            f"{settings.steps} steps on a geometric schedule: each removes the same share "
            "of the units left"
        )
        notes += [
            f"{plan.name}: " + " → ".join(map(str, [plan.before, *widths[plan.name]]))
            for plan in plans
        ]
    if not settings.finetune_epochs:
        notes.append("no fine-tuning (prune.finetune_epochs is 0)")
    notes += [
        f"{plan.name} keeps all its {plan.before} units at amount {settings.amount:g}"
        for plan in plans
        if plan.after == plan.before
    ]
    return tuple(notes)
