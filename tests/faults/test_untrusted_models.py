"""Crafted registry versions that would run code, or were changed, when loaded.

Each case registers a version straight through MLflow in a store of its own, moves
``champion`` to it and then runs what Stemma runs against a champion: the gate
(``registry.champion_value_on`` and ``decide_gate``), scoring's loader and reproduce's
file check. None may run the version's code; each must refuse it, naming its files.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc import PythonModel

from stemma.components.lineage import reproduce
from stemma.components.model.artifact import MODEL_ARTIFACT_FILES, serving_code_path
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.registry.gate import champion_value_on, decide_gate
from stemma.components.runtime.loading import UntrustedModelError, load_scoring_model
from stemma.components.spec import FeaturesSpec, GateSpec
from tests.support import isolated_mlflow, log_trained_model

FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["car"])
GATE = GateSpec(metric="roc_auc", minimum=0.5)


def synthetic_frame(rows: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    salary = rng.uniform(20_000, 150_000, rows)
    return pd.DataFrame(
        {
            "salary": salary,
            "age": rng.integers(18, 80, rows),
            "car": rng.choice(["sedan", "van"], rows),
            "approved": (salary > 80_000).astype(np.int64),
        }
    )


class PickledPayload(PythonModel):
    """A pyfunc model whose unpickling writes the marker: what `python_model.pkl` can do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("unpickled")
        self.__dict__.update(state)

    def predict(self, context, model_input, params=None):  # pragma: no cover - never runs
        return model_input


def _store_folder(client: MlflowClient, name: str, version: str) -> Path:
    uri = client.get_model_version_download_uri(name, version)
    return Path(uri.removeprefix("file://"))


def _register(client: MlflowClient, name: str, info, run_id: str) -> str:
    client.create_registered_model(name)
    version = client.create_model_version(
        name, info.model_uri, run_id=run_id, model_id=info.model_id
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


def _stemma_version(context: dict, name: str) -> str:
    _, _, info, _, run_id = log_trained_model(
        context["frame"],
        FEATURES,
        task="binary",
        target="approved",
        experiment_id=context["experiment_id"],
        workdir=context["root"] / f"work-{name}",
    )
    return _register(context["client"], name, info, run_id)


def pickled_python_model(context: dict, name: str) -> tuple[str, list[str]]:
    with mlflow.start_run(experiment_id=context["experiment_id"]) as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=PickledPayload(str(context["marker"])), pip_requirements=[]
        )
    return _register(context["client"], name, info, run.info.run_id), ["python_model.pkl"]


def replaced_serving_code(context: dict, name: str) -> tuple[str, list[str]]:
    version = _stemma_version(context, name)
    serving = _store_folder(context["client"], name, version) / "serving.py"
    serving.write_text(f"open({str(context['marker'])!r}, 'w').write('served')\n")
    return version, ["serving.py"]


def foreign_loader_module(context: dict, name: str) -> tuple[str, list[str]]:
    version = _stemma_version(context, name)
    mlmodel = _store_folder(context["client"], name, version) / "MLmodel"
    text = mlmodel.read_text().replace(
        "loader_module: mlflow.pyfunc.loaders.code_model",
        f"loader_module: {context['evil_module']}",
    )
    mlmodel.write_text(text)
    return version, ["MLmodel"]


def tampered_weights(context: dict, name: str) -> tuple[str, list[str]]:
    version = _stemma_version(context, name)
    weights = _store_folder(context["client"], name, version) / "artifacts/weights.safetensors"
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0xFF
    weights.write_bytes(bytes(payload))
    return version, ["artifacts/weights.safetensors"]


def _foreign_architecture(architecture: Callable[[dict], str]):
    def craft(context: dict, name: str) -> tuple[str, list[str]]:
        """network.json rewritten in the store and the digests recorded again: all match."""
        import json

        from stemma.components.model.artifact import record_model_files

        version = _stemma_version(context, name)
        client = context["client"]
        path = _store_folder(client, name, version) / "artifacts/network.json"
        document = json.loads(path.read_text())
        document["config"]["architecture"] = architecture(context)
        path.write_text(json.dumps(document))
        record_model_files(
            client, client.get_model_version(name, version).source[len("models:/") :]
        )
        return version, [architecture(context)]

    return craft


def no_recorded_digests(context: dict, name: str) -> tuple[str, list[str]]:
    """A Stemma-shaped model logged with MLflow alone: nothing recorded its files."""
    source = context["root"] / f"work-{name}-source"
    _, _, _, _, _ = log_trained_model(
        context["frame"],
        FEATURES,
        task="binary",
        target="approved",
        experiment_id=context["experiment_id"],
        workdir=source,
    )
    with mlflow.start_run(experiment_id=context["experiment_id"]) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(serving_code_path()),
            artifacts={key: str(source / file) for key, file in MODEL_ARTIFACT_FILES.items()},
            input_example=context["frame"][FEATURES.all].head(3),
            pip_requirements=[],
        )
    return _register(context["client"], name, info, run.info.run_id), ["serving.py", "MLmodel"]


CASES = {
    "pickled-python-model": pickled_python_model,
    "serving-code-replaced": replaced_serving_code,
    "mlmodel-loader-module": foreign_loader_module,
    "tampered-weights": tampered_weights,
    "network-names-os-system": _foreign_architecture(lambda context: "os:system"),
    "network-names-a-marker-module": _foreign_architecture(
        lambda context: f"{context['evil_module']}:Net"
    ),
    "no-recorded-digests": no_recorded_digests,
}


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory):
    """A store of its own, and a module on sys.path whose import writes the marker."""
    root = tmp_path_factory.mktemp("untrusted")
    marker = root / "code-ran"
    evil_module = f"stemma_evil_{uuid.uuid4().hex[:8]}"
    (root / "modules").mkdir()
    (root / "modules" / f"{evil_module}.py").write_text(
        textwrap.dedent(
            f"""
            open({str(marker)!r}, "w").write("imported")
            from torch import nn
            class Net(nn.Linear):
                def __init__(self, n_inputs, n_outputs):
                    super().__init__(n_inputs, n_outputs)
            """
        )
    )
    sys.path.insert(0, str(root / "modules"))
    try:
        with isolated_mlflow():
            configure_tracking(root)
            yield {
                "root": root,
                "marker": marker,
                "evil_module": evil_module,
                "frame": synthetic_frame(),
                "client": MlflowClient(),
                "experiment_id": ensure_experiment("untrusted", root),
            }
    finally:
        sys.path.remove(str(root / "modules"))


@pytest.mark.fault_case("untrusted")
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_an_untrusted_champion_never_runs_and_is_refused(context, case, fault_ledger, tmp_path):
    name = f"untrusted-{case}"
    version, named = CASES[case](context, name)
    client, frame, marker = context["client"], context["frame"], context["marker"]
    reference = f"models:/{name}/{version}"
    y_true = frame["approved"].to_numpy()

    # The gate, as the train flow runs it, under both settings.
    scored = champion_value_on(
        reference, frame, y_true, task="binary", metric="roc_auc", client=client
    )
    closed = decide_gate(
        GATE, "binary", 0.9, version, scored.value,
        champion_error=scored.error, champion_untrusted=scored.untrusted,
    )  # fmt: skip
    ignoring = GATE.model_copy(update={"untrusted_champion": "ignore"})
    ignored = decide_gate(
        ignoring, "binary", 0.9, version, scored.value,
        champion_error=scored.error, champion_untrusted=scored.untrusted,
    )  # fmt: skip
    # Scoring's loader.
    with pytest.raises(UntrustedModelError) as caught:
        load_scoring_model(f"models:/{name}@champion", client=client)
    # Reproduce's file check on the registered folder.
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version),
            dst_path=str(tmp_path),
        )
    )
    entry = client.get_model_version(name, version)
    problems = reproduce.recorded_file_problems(
        reproduce.recorded_manifest(client, entry), downloaded
    )

    fault_ledger.executed(marker.exists())
    assert not marker.exists(), f"code of {case} ran: {marker.read_text()}"
    assert context["evil_module"] not in sys.modules

    assert scored.value is None and scored.untrusted is True, scored
    assert not closed.passed and closed.alias is None
    assert any(
        "cannot decide: champion" in line and "not trusted" in line for line in closed.reasons
    )
    assert ignored.passed and ignored.alias == "champion" and ignored.ignored_champion == version
    message = caught.value.render()
    architecture_case = case.startswith("network-names")
    for file in named:
        assert file in message, message
        assert file in scored.error, scored.error
        if not architecture_case:
            assert any(file in line for line in problems), problems
    if architecture_case:
        assert "it was not imported" in message
        assert problems == []  # its files are what was recorded: only the spec refuses it
    else:
        assert problems


def test_a_trusted_champion_scores_as_its_pyfunc_model_does(context):
    """The gate's own loader gives the scores MLflow's pyfunc model gives."""
    name = "trusted-pyfunc-parity"
    version = _stemma_version(context, name)
    frame, client = context["frame"], context["client"]

    scored = champion_value_on(
        f"models:/{name}/{version}", frame, frame["approved"].to_numpy(),
        task="binary", metric="roc_auc", client=client,
    )  # fmt: skip
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(frame[FEATURES.all])
    from stemma.components.training.metrics import evaluate_scores

    expected = evaluate_scores("binary", frame["approved"].to_numpy(), pyfunc["score"].to_numpy())
    assert scored.error is None
    assert scored.value == pytest.approx(expected["roc_auc"], abs=1e-12)
