"""Networks: the built-in MLP, configs, and user classes by import path."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from stemma.components.errors import RegistryError, TrainingError
from stemma.components.model.artifact import weights_sha256
from stemma.components.model.networks import (
    MLP,
    NetworkImportError,
    allowed_architectures,
    architecture_source_sha256,
    build_network,
    network_config,
)
from stemma.components.spec import ModelSpec


def test_mlp_has_the_requested_layers() -> None:
    network = MLP(12, 1, hidden=(64, 32), dropout=0.25)

    linears = [layer for layer in network.layers if isinstance(layer, nn.Linear)]
    dropouts = [layer for layer in network.layers if isinstance(layer, nn.Dropout)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (12, 64),
        (64, 32),
        (32, 1),
    ]
    assert [layer.p for layer in dropouts] == [0.25, 0.25]
    assert network(torch.zeros(5, 12)).shape == (5, 1)


def test_mlp_without_hidden_layers_is_linear() -> None:
    network = MLP(3, 2, hidden=())
    assert [type(layer) for layer in network.layers] == [nn.Linear]
    assert network(torch.zeros(4, 3)).shape == (4, 2)


def test_dropout_does_not_change_parameter_names() -> None:
    assert MLP(4, dropout=0.0).state_dict().keys() == MLP(4, dropout=0.5).state_dict().keys()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_inputs": 0}, "n_inputs and n_outputs must be positive"),
        ({"n_inputs": 3, "hidden": (8, 0)}, "hidden widths must be positive"),
        ({"n_inputs": 3, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
    ids=["no-inputs", "zero-width", "dropout-one"],
)
def test_mlp_rejects_impossible_shapes(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MLP(**arguments)


def test_network_config_is_json_safe_and_rebuilds_the_spec() -> None:
    spec = ModelSpec(architecture="mlp", hidden=[16, 8], dropout=0.2, params={"unused": [1, 2]})

    config = network_config(spec)

    assert (
        json.loads(json.dumps(config))
        == config
        == {
            "architecture": "mlp",
            "hidden": [16, 8],
            "dropout": 0.2,
            "params": {"unused": [1, 2]},
        }
    )
    network = build_network(config, n_inputs=5)
    assert isinstance(network, MLP)
    assert [m.out_features for m in network.layers if isinstance(m, nn.Linear)] == [16, 8, 1]


def test_a_seed_fixes_the_initial_weights_without_touching_the_global_rng() -> None:
    config = network_config(ModelSpec())
    state = torch.random.get_rng_state()

    first = build_network(config, 6, seed=11)
    second = build_network(config, 6, seed=11)
    other = build_network(config, 6, seed=12)

    assert weights_sha256(first) == weights_sha256(second) != weights_sha256(other)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of user classes, good and bad, on sys.path under a fresh name."""
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Linear(nn.Module):
                def __init__(self, n_inputs, n_outputs, bias=True):
                    super().__init__()
                    self.linear = nn.Linear(n_inputs, n_outputs, bias=bias)

                def forward(self, x):
                    return self.linear(x)

            class NotAModule:
                def __init__(self, n_inputs, n_outputs):
                    pass

            class Exploding(nn.Module):
                def __init__(self, n_inputs, n_outputs):
                    raise RuntimeError("boom in the constructor")

            class WrongShape(nn.Module):
                def __init__(self, n_inputs, n_outputs):
                    super().__init__()
                    self.linear = nn.Linear(n_inputs, 3)

                def forward(self, x):
                    return self.linear(x)

            class FailingForward(nn.Module):
                def __init__(self, n_inputs, n_outputs):
                    super().__init__()
                    self.linear = nn.Linear(n_inputs + 1, n_outputs)

                def forward(self, x):
                    return self.linear(x)

            def factory(n_inputs, n_outputs):
                return nn.Linear(n_inputs, n_outputs)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_user_class_is_built_with_its_params(user_module: str) -> None:
    network = build_network(
        {"architecture": f"{user_module}:Linear", "params": {"bias": False}}, 4, 2
    )

    assert network.linear.bias is None
    assert network(torch.zeros(3, 4)).shape == (3, 2)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "no_such_package_xyz.nets:Net",
            "cannot import class 'Net' from module 'no_such_package_xyz.nets': ModuleNotFoundError",
        ),
        (
            "{module}:Missing",
            "module '{module}' has no 'Missing' \\(imported from .*{module}.py\\)",
        ),
    ],
    ids=["no-module", "no-class"],
)
def test_a_user_class_that_cannot_be_imported_is_a_network_import_error(
    user_module: str, target: str, message: str
) -> None:
    import_path = target.format(module=user_module)

    with pytest.raises(NetworkImportError, match=message.format(module=user_module)) as caught:
        build_network({"architecture": import_path}, 4)
    assert caught.value.headline.startswith(f"model.architecture {import_path}: ")
    assert caught.value.details


@pytest.mark.parametrize(
    ("target", "params", "message"),
    [
        ("{module}:NotAModule", {}, "NotAModule is not a torch.nn.Module class"),
        ("{module}:factory", {}, "factory is not a torch.nn.Module class"),
        ("{module}:Exploding", {}, "the constructor failed: RuntimeError: boom in the constructor"),
        (
            "{module}:Linear",
            {"width": 3},
            "the constructor failed: TypeError: .*unexpected keyword argument 'width'",
        ),
        ("{module}:WrongShape", {}, r"must return a tensor of shape \(batch, 1\), got \(2, 3\)"),
        ("{module}:FailingForward", {}, r"forward pass on a \(2, 4\) batch failed: RuntimeError"),
    ],
    ids=[
        "not-a-module",
        "a-function",
        "constructor-raises",
        "bad-params",
        "wrong-shape",
        "forward-fails",
    ],
)
def test_unusable_user_classes_are_training_errors(
    user_module: str, target: str, params: dict, message: str
) -> None:
    import_path = target.format(module=user_module)

    with pytest.raises(TrainingError, match=message.format(module=user_module)) as caught:
        build_network({"architecture": import_path, "params": params}, 4)
    assert caught.value.headline.startswith(f"model.architecture {import_path}: ")


def test_an_architecture_that_is_no_import_path_is_refused() -> None:
    with pytest.raises(
        TrainingError, match=r"expected `mlp` or an import path `package\.module:Class`"
    ):
        build_network({"architecture": "transformer"}, 4)


def test_a_stored_network_may_name_only_the_allowed_architectures(
    user_module: str, tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    foreign = f"foreign_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{foreign}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    allowed = allowed_architectures(ModelSpec(architecture=f"{user_module}:Linear"))

    assert allowed == {"mlp", f"{user_module}:Linear"}
    assert build_network({"architecture": f"{user_module}:Linear"}, 4, allowed=allowed)
    for architecture in (f"{foreign}:Net", "os:system"):
        with pytest.raises(RegistryError, match="which this spec does not allow") as caught:
            build_network({"architecture": architecture}, 4, allowed=allowed)
        assert "it was not imported" in caught.value.headline
    assert not marker.exists()
    assert foreign not in sys.modules


def test_an_architecture_source_is_hashed_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"unrun_{uuid.uuid4().hex[:8]}"
    source = tmp_path / f"{name}.py"
    source.write_text("raise SystemExit('must not run')\n")

    assert architecture_source_sha256(f"{name}:Net") == file_sha256(source)
    assert name not in sys.modules
    with pytest.raises(NetworkImportError, match="cannot find the source of module"):
        architecture_source_sha256("no_such_module_here:Net")


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
