"""Networks: the built-in MLP and any ``torch.nn.Module`` named by import path.

A network is described by a small JSON-safe config (:func:`network_config`) that is stored
with the model, so serving and ``stemma reproduce`` rebuild exactly the same module from
it (:func:`build_network`) and then load the weights; nothing is unpickled.

This module imports torch at the top: import it only where torch is needed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import site
import sysconfig
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stemma.components.errors import RegistryError, StemmaError, TrainingError
from stemma.components.spec import ModelSpec

#: Name of the built-in architecture in specs and configs.
MLP_ARCHITECTURE = "mlp"
#: Architectures Stemma ships; a loaded model may always name these.
BUILTIN_ARCHITECTURES = frozenset({MLP_ARCHITECTURE})

#: Rows of the dummy batch a custom network is tried on before training.
_PROBE_ROWS = 2


class NetworkImportError(StemmaError):
    """A custom network's class cannot be imported where the network is built (training,
    or a load of a logged model): its module is not importable here, fails to import, or
    lacks the class. The message names the module, the class and the fix."""


class MLP(nn.Module):
    """A feed-forward network: ``Linear → ReLU → Dropout`` per hidden layer, then ``Linear``.

    Args:
        n_inputs: width of the input matrix.
        n_outputs: number of raw outputs (1 for binary classification and regression).
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int = 1,
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if n_inputs < 1 or n_outputs < 1:
            raise ValueError(
                f"n_inputs and n_outputs must be positive, got {n_inputs}, {n_outputs}"
            )
        if any(width < 1 for width in hidden):
            raise ValueError(f"hidden widths must be positive, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs
        layers: list[nn.Module] = []
        width_in = n_inputs
        for width in hidden:
            # Dropout stays in the stack even at p=0 so that parameter names do not depend
            # on the dropout setting.
            layers += [nn.Linear(width_in, width), nn.ReLU(), nn.Dropout(dropout)]
            width_in = width
        layers.append(nn.Linear(width_in, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def network_config(model: ModelSpec) -> dict[str, Any]:
    """The JSON-safe description of a network that :func:`build_network` rebuilds it from."""
    return {
        "architecture": model.architecture,
        "hidden": [int(width) for width in model.hidden],
        "dropout": float(model.dropout),
        "params": dict(model.params),
    }


def allowed_architectures(model: ModelSpec) -> frozenset[str]:
    """The architectures a model loaded for this spec may name: the built-ins and its own."""
    return BUILTIN_ARCHITECTURES | {model.architecture}


def is_custom(architecture: str) -> bool:
    """Whether an architecture is an import path rather than a built-in."""
    return architecture not in BUILTIN_ARCHITECTURES


def architecture_source_sha256(import_path: str) -> str:
    """The sha256 of the source file that defines a custom architecture's module.

    The module is located without being executed (only its parent packages are
    imported), so a recorded hash can be checked before any of its code runs.

    Raises:
        TrainingError: the path is malformed, or the source file cannot be read.
        NetworkImportError: the module cannot be found.
    """
    module_name, separator, class_name = import_path.partition(":")
    if not separator or not module_name or not class_name:
        raise TrainingError(
            f"model.architecture {import_path!r}: expected `mlp` or an import path `package.module:Class`"
        )
    try:
        found = importlib.util.find_spec(module_name)
    except Exception as error:  # a parent package that fails to import, a bad name
        found = None
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = "no such module"
    origin = getattr(found, "origin", None)
    if found is None or not origin or not found.has_location:
        raise NetworkImportError(
            f"model.architecture {import_path}: cannot find the source of module {module_name!r} ({reason})",
            [_importable_fix(module_name)],
        )
    try:
        with open(origin, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:
        raise TrainingError(
            f"model.architecture {import_path}: cannot read {origin}: {error}"
        ) from error


def project_code_location(import_path: str, root: Path) -> Path | None:
    """Where the top-level module of a custom architecture lives, when it is project code.

    ``mymodels.nets:ResMLP`` is found as ``mymodels``: its file (``<root>/mymodels.py``) or
    package folder (``<root>/mymodels/``), located the way ``import`` would find it (the
    spec's root is first on the import path once the spec is loaded), without running it.

    Returns:
        The file or folder, when it lies inside ``root`` and outside every site-packages and
        standard library folder; None for a built-in, an installed module, one found outside
        the project, a namespace package spread over several folders, or one not found.
    """
    if not is_custom(import_path):
        return None
    top = import_path.partition(":")[0].partition(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except Exception:  # a name that cannot be looked up is not project code to carry
        return None
    if found is None:
        return None
    folders = list(found.submodule_search_locations or [])
    if found.has_location and found.origin:
        location = Path(found.origin).parent if folders else Path(found.origin)
    elif len(folders) == 1:  # a namespace package in one folder
        location = Path(folders[0])
    else:
        return None
    location = location.resolve()
    project = Path(root).resolve()
    if location == project or not location.is_relative_to(project):
        return None
    if any(location.is_relative_to(folder) for folder in _installed_folders()):
        return None
    return location


def _installed_folders() -> list[Path]:
    """Folders of installed and standard-library code (a virtualenv may sit in the project)."""
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    folders = [sysconfig.get_paths()[name] for name in names]
    folders += [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(folder).resolve() for folder in folders if folder]


def check_architecture(architecture: Any, allowed: Collection[str], label: str) -> str:
    """Refuse, without importing anything, an architecture outside ``allowed``.

    Args:
        architecture: what a stored ``network.json`` names.
        allowed: from :func:`allowed_architectures` (the caller's spec).
        label: the model, for the message (``credit v3``).

    Returns:
        The architecture.

    Raises:
        RegistryError: it is neither a built-in nor in ``allowed``.
    """
    if isinstance(architecture, str) and (
        architecture in BUILTIN_ARCHITECTURES or architecture in allowed
    ):
        return architecture
    permitted = ", ".join(sorted({*BUILTIN_ARCHITECTURES, *allowed}))
    raise RegistryError(
        f"{label}: network.json names architecture {architecture!r}, which this spec does not "
        "allow; it was not imported",
        [
            f"allowed: {permitted} (the built-ins and the spec's model.architecture)",
            "load it with a spec whose model.architecture names that class, if you trust it",
        ],
    )


def build_network(
    config: Mapping[str, Any],
    n_inputs: int,
    n_outputs: int = 1,
    *,
    seed: int | None = None,
    allowed: Collection[str] | None = None,
) -> nn.Module:
    """Build the network a config describes.

    ``mlp`` builds :class:`MLP` from ``hidden`` and ``dropout``; ``package.module:Class``
    imports the class and calls ``Class(n_inputs=..., n_outputs=..., **params)``, then
    checks on a dummy batch that it maps ``(batch, n_inputs)`` to ``(batch, n_outputs)``.
    A custom network's config may carry ``"pruned": {"<Linear name>": [out, in], ...}``
    (structured pruning narrowed those Linears): each is then replaced by a fresh
    ``nn.Linear`` of that shape, ready for the pruned weights.

    Args:
        config: output of :func:`network_config`.
        n_inputs: width of the preprocessed input matrix.
        n_outputs: number of raw outputs.
        seed: when given, the initial weights are drawn from this seed (the global RNG is
            left as it was), so the same config and seed always give the same network.
        allowed: for a config read from a stored model, the architectures it may name
            (:func:`allowed_architectures`); None for a config built from the caller's own spec.

    Raises:
        NetworkImportError: the class cannot be imported here (the message names the module,
            the class and the fix).
        TrainingError: the class is not an ``nn.Module``, its constructor or a forward pass
            fails, its output has the wrong shape, or a ``pruned`` entry names no Linear.
        RegistryError: the config names an architecture outside ``allowed``.
    """
    architecture = config.get("architecture", MLP_ARCHITECTURE)
    if allowed is not None:
        check_architecture(architecture, allowed, "the stored network")
    if seed is None:
        return _build(config, architecture, n_inputs, n_outputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(config, architecture, n_inputs, n_outputs)


def _build(
    config: Mapping[str, Any], architecture: str, n_inputs: int, n_outputs: int
) -> nn.Module:
    if architecture == MLP_ARCHITECTURE:
        return MLP(
            n_inputs,
            n_outputs,
            hidden=tuple(config.get("hidden", (64, 32))),
            dropout=float(config.get("dropout", 0.1)),
        )
    network = _build_custom(config, architecture, n_inputs, n_outputs)
    if "pruned" in config:
        _resize_linears(network, config["pruned"], architecture)
        _probe(network, architecture, n_inputs, n_outputs)
    return network


def _resize_linears(network: nn.Module, pruned: Any, architecture: str) -> None:
    """Replace each Linear that structured pruning narrowed with a fresh one of its stored
    ``[out_features, in_features]`` (same bias setting); the weights are loaded afterwards."""
    if not isinstance(pruned, Mapping):
        raise TrainingError(
            f"model.architecture {architecture}: network config's pruned must map Linear "
            f"module names to [out_features, in_features], got {type(pruned).__name__}"
        )
    linears = {name: module for name, module in network.named_modules() if name}
    for name, shape in pruned.items():
        module = linears.get(name)
        if not isinstance(module, nn.Linear):
            found = "no such submodule" if module is None else f"a {type(module).__name__}"
            raise TrainingError(
                f"model.architecture {architecture}: network config's pruned names {name!r}, "
                f"which is {found}, not a torch.nn.Linear of the network",
                ["a pruned entry must name a Linear submodule the class builds"],
            )
        if not (
            isinstance(shape, Sequence)
            and len(shape) == 2
            and all(type(width) is int and width > 0 for width in shape)
        ):
            raise TrainingError(
                f"model.architecture {architecture}: network config's pruned shape of "
                f"{name!r} must be [out_features, in_features] of positive integers, got {shape!r}"
            )
        parent_name, _, child = name.rpartition(".")
        replacement = nn.Linear(
            shape[1],
            shape[0],
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        setattr(network.get_submodule(parent_name), child, replacement)


def _build_custom(
    config: Mapping[str, Any], architecture: str, n_inputs: int, n_outputs: int
) -> nn.Module:
    cls = _import_class(architecture)
    params = dict(config.get("params") or {})
    try:
        network = cls(n_inputs=n_inputs, n_outputs=n_outputs, **params)
    except Exception as error:  # a user's constructor can fail in any way
        raise TrainingError(
            f"model.architecture {architecture}: the constructor failed: {type(error).__name__}: {error}",
            [
                f"it is called as {architecture.partition(':')[2]}(n_inputs={n_inputs}, "
                f"n_outputs={n_outputs}, **model.params) with params {sorted(params)}"
            ],
        ) from error
    if not isinstance(network, nn.Module):
        raise TrainingError(
            f"model.architecture {architecture}: built a {type(network).__name__}, not a torch.nn.Module"
        )
    _probe(network, architecture, n_inputs, n_outputs)
    return network


def _import_class(import_path: str) -> type:
    module_name, separator, class_name = import_path.partition(":")
    if not separator or not module_name or not class_name:
        raise TrainingError(
            f"model.architecture {import_path!r}: expected `mlp` or an import path `package.module:Class`"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure is the user's to see
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        if missing and not f"{module_name}.".startswith(f"{missing}."):
            fix = f"{module_name} imports {missing!r}, which is not installed here: install it"
        else:
            fix = _importable_fix(module_name)
        raise NetworkImportError(
            f"model.architecture {import_path}: cannot import class {class_name!r} from module "
            f"{module_name!r}: {type(error).__name__}: {error}",
            [fix],
        ) from error
    cls = getattr(module, class_name, None)
    if cls is None:
        where = getattr(module, "__file__", None) or "a namespace package"
        raise NetworkImportError(
            f"model.architecture {import_path}: module {module_name!r} has no {class_name!r} "
            f"(imported from {where})",
            [
                f"check the class name; if {where} is not your module, another module named "
                f"{module_name!r} came first on the import path: rename yours"
            ],
        )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TrainingError(
            f"model.architecture {import_path}: {class_name} is not a torch.nn.Module class"
        )
    return cls


def _importable_fix(module_name: str) -> str:
    top = module_name.partition(".")[0]
    return (
        f"make {top!r} importable where the model is built: run Stemma on the spec of the "
        f"project holding {top}.py or {top}/ (its root is put on the import path), install "
        f"the package, or add its folder to PYTHONPATH; a model logged by Stemma carries its "
        "project's module in code/, which mlflow.pyfunc.load_model imports"
    )


def _probe(network: nn.Module, architecture: str, n_inputs: int, n_outputs: int) -> None:
    """Run a dummy batch through a custom network so shape mistakes surface before training."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            output = network(torch.zeros(_PROBE_ROWS, n_inputs))
    except Exception as error:
        raise TrainingError(
            f"model.architecture {architecture}: forward pass on a ({_PROBE_ROWS}, {n_inputs}) batch "
            f"failed: {type(error).__name__}: {error}"
        ) from error
    finally:
        network.train(was_training)
    expected = (_PROBE_ROWS, n_outputs)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TrainingError(
            f"model.architecture {architecture}: forward must return a tensor of shape "
            f"(batch, {n_outputs}), got {got} for a batch of {_PROBE_ROWS}"
        )
