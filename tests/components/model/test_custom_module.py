"""A custom network (`model.architecture: module:Class`) from the project's own code.

Real Prefect API, MLflow store, git and DVC project. The project's root is on the import
path wherever Stemma runs from; the logged model carries the module (MLflow `code_paths`),
so `mlflow.pyfunc.load_model(...).predict(...)` works in a fresh process started in
another folder with no PYTHONPATH; the code's digests are on the logged model and in the
lineage record; `stemma reproduce` names a module edited since training; a class that
cannot be imported is a one-screen error naming the module, the class and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes

from stemma.components.errors import SpecError
from stemma.components.model.artifact import code_sha256, decode_manifest, log_pyfunc_model
from stemma.components.model.networks import build_network
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform import tags
from stemma.components.platform.lineage import read_run_record, record_node
from stemma.components.runtime.loading import logged_model_id
from stemma.components.spec import FeaturesSpec, load_spec, put_project_on_import_path
from tests.support import dvc_add, git

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = f"resmlp-{uuid.uuid4().hex[:6]}"
MODULE = "mymodels"
RESIDUAL_MLP = textwrap.dedent(
    """\
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.linear = nn.Linear(width, width)

        def forward(self, x):
            return x + torch.relu(self.linear(self.norm(x)))


    class ResMLP(nn.Module):
        def __init__(self, n_inputs, n_outputs, width=16, blocks=2):
            super().__init__()
            self.stem = nn.Linear(n_inputs, width)
            self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
            self.head = nn.Linear(width, n_outputs)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))
    """
)
SPEC = f"""\
pipeline: {{name: {NAME}, experiment: {NAME}, model_name: {NAME}}}
data:
  path: data/cancer.parquet
  task: binary
  target: malignant
  id: sample_id
  features:
    numeric: [radius, texture, perimeter, smoothness, concavity]
    categorical: [size_band]
model:
  architecture: "{MODULE}:ResMLP"
  params: {{width: 16, blocks: 2}}
train: {{epochs: 2, batch_size: 64, seed: 3, device: cpu, early_stopping: null}}
gate: {{metric: roc_auc}}
"""


def cancer_frame() -> pd.DataFrame:
    table = load_breast_cancer(as_frame=True).frame
    return pd.DataFrame(
        {
            "sample_id": np.arange(len(table)),
            "radius": table["mean radius"],
            "texture": table["mean texture"],
            "perimeter": table["mean perimeter"],
            "smoothness": table["mean smoothness"],
            "concavity": table["worst concavity"],
            "size_band": pd.qcut(table["mean area"], 3, labels=["small", "mid", "large"]).astype(
                str
            ),
            "malignant": 1 - table["target"],
        }
    )


def make_project(root: Path) -> Path:
    """A git + DVC project with the residual MLP in `mymodels.py` at its root; its spec."""
    from dvc.repo import Repo

    root.mkdir(parents=True)
    git(root, "init", "-q")
    Repo.init(str(root))
    (root / "data").mkdir()
    cancer_frame().to_parquet(root / "data" / "cancer.parquet", index=False)
    dvc_add(root)
    (root / f"{MODULE}.py").write_text(RESIDUAL_MLP)
    (root / "configs").mkdir()
    (root / "configs" / "cancer.yaml").write_text(SPEC)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root / "configs" / "cancer.yaml"


@pytest.fixture(scope="module")
def import_state():
    """sys.path and the user modules as they were: restored when the module's tests end."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [n for n in sys.modules if n.split(".")[0] in (MODULE, "netpkg")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def trained(import_state, tmp_path_factory) -> dict:
    """The project trained by the real training flow, run from another folder."""
    from stemma.flows.train import train_flow

    assert MODULE not in sys.modules
    config = make_project(tmp_path_factory.mktemp("custom") / "project")
    summary = train_flow(config=str(config))
    return {"root": config.parent.parent, "config": config, **summary}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_model(frame: pd.DataFrame, architecture: str, project: Path, workdir: Path, **spec):
    """Fit, build (seeded) and log a custom network as the training flow would; its info."""
    features = FeaturesSpec(**spec["features"])
    preprocessor = fit_preprocessor(frame, features, task=spec["task"], target=spec["target"])
    config = {"architecture": architecture, "hidden": [], "dropout": 0.0, "params": {}}
    network = build_network(config, preprocessor.n_inputs, seed=5)
    with mlflow.start_run(experiment_id=mlflow.create_experiment(uuid.uuid4().hex)):
        info, _ = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame,
            task=spec["task"],
            workdir=workdir,
            project_root=project,
        )
    return info


@pytest.fixture(scope="module")
def package_model(import_state, tmp_path_factory) -> dict:
    """A regression network from a package (`netpkg/__init__.py` + `netpkg/blocks.py`)."""
    project = tmp_path_factory.mktemp("package")
    (project / "netpkg").mkdir()
    (project / "netpkg" / "__init__.py").write_text("from netpkg.blocks import Block\n")
    (project / "netpkg" / "blocks.py").write_text(RESIDUAL_MLP)
    (project / "netpkg" / ".notes").write_text("not code\n")
    (project / "netpkg" / "__pycache__").mkdir()
    (project / "netpkg" / "__pycache__" / "blocks.cpython-311.pyc").write_bytes(b"stale")
    put_project_on_import_path(project)  # what loading its spec does
    table = load_diabetes(as_frame=True).frame
    frame = table[["age", "bmi", "bp", "s1", "target"]].assign(
        sex=np.where(table["sex"] > 0, "m", "f")
    )
    spec = {
        "task": "regression",
        "target": "target",
        "features": {"numeric": ["age", "bmi", "bp", "s1"], "categorical": ["sex"]},
    }
    info = log_model(frame, "netpkg.blocks:ResMLP", project, project / "model", **spec)
    return {"uri": info.model_uri, "model_id": info.model_id, "frame": frame, "root": project}


@pytest.fixture(scope="module")
def outside_model(import_state, tmp_path_factory) -> dict:
    """A network whose module lies outside the project: the model carries no code."""
    name = f"outside_{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("elsewhere")
    (folder / f"{name}.py").write_text(RESIDUAL_MLP)
    project = tmp_path_factory.mktemp("project-without-module")
    sys.path.insert(0, str(folder))
    frame = cancer_frame()
    spec = {"task": "binary", "target": "malignant", "features": {"numeric": ["radius"]}}
    info = log_model(frame, f"{name}:ResMLP", project, project / "model", **spec)
    return {"uri": info.model_uri, "model_id": info.model_id, "module": name, "frame": frame}


LOAD_AND_PREDICT = textwrap.dedent(
    """\
    import json, sys
    import mlflow, pandas as pd
    folder, out = sys.argv[1], {}
    for key, (uri, module) in json.loads(sys.argv[2]).items():
        try:
            answer = mlflow.pyfunc.load_model(uri, suppress_warnings=True).predict(
                pd.read_parquet(f"{folder}/{key}.parquet")
            )
        except Exception as error:
            out[key] = {"error": type(error).__name__, "message": str(error)}
            continue
        answer.to_parquet(f"{folder}/{key}-predicted.parquet")
        out[key] = {"module_file": sys.modules[module].__file__}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def variant_model(trained) -> str:
    """An int8 variant of the trained custom network, registered by the quantize flow."""
    import torch

    from stemma.flows.quantize import quantize_flow

    # The flow sets the process's thread count for its timings, as `stemma run quantize`
    # sets its own process's; the reproduce test below retrains in this process and must
    # run with the count `trained` was trained with.
    threads = torch.get_num_threads()
    result = quantize_flow(
        config=str(trained["config"]),
        overrides=[
            "quantize.methods=[int8_dynamic]",
            "quantize.repeats=3",
            "quantize.min_speedup=0.01",
            "quantize.max_metric_drop=0.5",
        ],
        model=f"models:/{NAME}/{trained['model_version']}",
    )
    torch.set_num_threads(threads)
    (variant,) = result["variants"]
    assert variant["version"] is not None, variant
    return f"models:/{NAME}/{variant['version']}"


@pytest.fixture(scope="module")
def fresh_process(trained, package_model, outside_model, variant_model, tmp_path_factory) -> dict:
    """Each model loaded and asked to predict in one new Python process, started in an
    empty folder with no PYTHONPATH: what it predicted or the error it raised."""
    folder = tmp_path_factory.mktemp("elsewhere-cwd")
    models = {
        "trained": (f"models:/{NAME}/{trained['model_version']}", MODULE, cancer_frame()),
        "package": (package_model["uri"], "netpkg", package_model["frame"]),
        "outside": (outside_model["uri"], outside_model["module"], outside_model["frame"]),
        "variant": (variant_model, MODULE, cancer_frame()),
    }
    for key, (_, _, frame) in models.items():
        frame.head(40).to_parquet(folder / f"{key}.parquet")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    arguments = json.dumps({key: [uri, module] for key, (uri, module, _) in models.items()})
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(folder), arguments],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for key, answer in answers.items():
        if "module_file" in answer:
            answer["predicted"] = pd.read_parquet(folder / f"{key}-predicted.parquet")
    return {"answers": answers, "models": models}


def predicted_here(uri: str, frame: pd.DataFrame) -> pd.DataFrame:
    return mlflow.pyfunc.load_model(uri, suppress_warnings=True).predict(frame.head(40))


@pytest.mark.parametrize(
    "key", ["trained", "package", "variant"], ids=["module-file", "package", "int8-variant"]
)
def test_a_logged_model_predicts_in_a_fresh_process_started_elsewhere(fresh_process, key):
    uri, module, frame = fresh_process["models"][key]
    answer = fresh_process["answers"][key]

    assert "error" not in answer, answer
    # the module came from the model's own code/ folder, not from the project
    assert f"{os.sep}code{os.sep}{module}" in answer["module_file"]
    pd.testing.assert_frame_equal(answer["predicted"], predicted_here(uri, frame))
    assert answer["predicted"]["score"].std() > 0


def test_the_trained_model_carries_the_module_and_records_its_digests(trained):
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, trained["model_version"])
    logged = client.get_logged_model(logged_model_id(version))
    source = sha256_of(trained["root"] / f"{MODULE}.py")

    manifest = decode_manifest(logged.tags[tags.MODEL_FILES])
    assert manifest[f"code/{MODULE}.py"] == source
    assert not [path for path in manifest if path.startswith("code/") and "pycache" in path]
    digest = code_sha256({f"{MODULE}.py": source})
    assert logged.tags[tags.ARCHITECTURE_CODE_SHA256] == digest
    assert logged.tags[tags.ARCHITECTURE_SHA256] == source
    record = read_run_record(client, trained["run_id"])
    assert record_node(record, "run")["attributes"]["code_sha256"] == digest
    assert record.artifacts[f"model/code/{MODULE}.py"] == f"sha256:{source}"
    # the version's tags stay within their budget: the digest is the logged model's
    assert tags.ARCHITECTURE_CODE_SHA256 not in version.tags


def test_a_package_is_carried_whole_without_caches_or_hidden_files(package_model):
    logged = mlflow.MlflowClient().get_logged_model(package_model["model_id"])
    manifest = decode_manifest(logged.tags[tags.MODEL_FILES])
    root = package_model["root"]

    carried = {path: digest for path, digest in manifest.items() if path.startswith("code/")}
    assert carried == {
        "code/netpkg/__init__.py": sha256_of(root / "netpkg" / "__init__.py"),
        "code/netpkg/blocks.py": sha256_of(root / "netpkg" / "blocks.py"),
    }
    digest = code_sha256({path.removeprefix("code/"): d for path, d in carried.items()})
    assert logged.tags[tags.ARCHITECTURE_CODE_SHA256] == digest


def test_a_module_outside_the_project_is_not_carried_and_its_load_names_the_fix(
    outside_model, fresh_process
):
    logged = mlflow.MlflowClient().get_logged_model(outside_model["model_id"])
    manifest = decode_manifest(logged.tags[tags.MODEL_FILES])
    answer = fresh_process["answers"]["outside"]
    module = outside_model["module"]

    assert not [path for path in manifest if path.startswith("code/")]
    assert tags.ARCHITECTURE_CODE_SHA256 not in logged.tags
    assert answer["error"] == "NetworkImportError", answer
    message = answer["message"]
    assert f"cannot import class 'ResMLP' from module '{module}'" in message
    assert "ModuleNotFoundError" in message
    assert "install the package, or add its folder to PYTHONPATH" in message


def test_validate_finds_the_project_module_from_another_folder(trained, stemma_exe, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [*stemma_exe, "validate", str(trained["config"])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "import not_installed_xyz\n",
            "{module} imports 'not_installed_xyz', which is not installed here: install it",
        ),
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        ("class Other:\n    pass\n", "module '{module}' has no attribute 'ResMLP'"),
        (None, "put {module}.py (or the package folder {module}/) in the project root {root}"),
    ],
    ids=["missing-dependency", "fails-at-import", "no-such-class", "no-such-module"],
)
def test_a_module_that_cannot_be_imported_is_a_clear_spec_error(
    import_state, tmp_path, source, expected
):
    name = f"broken_{uuid.uuid4().hex[:8]}"
    config = tmp_path / "configs" / "broken.yaml"
    config.parent.mkdir()
    (tmp_path / ".git").mkdir()  # the project root
    (tmp_path / "data").mkdir()
    cancer_frame().to_parquet(tmp_path / "data" / "cancer.parquet", index=False)
    config.write_text(SPEC.replace(f"{MODULE}:ResMLP", f"{name}:ResMLP"))
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)

    with pytest.raises(SpecError) as caught:
        load_spec(config)
    sys.modules.pop(name, None)
    text = caught.value.render()
    expected = expected.format(module=name, root=tmp_path.resolve())
    assert "broken.yaml:11 model.architecture: " in text, text
    assert expected in text, text
    assert caught.value.exit_code == 2


def test_reproduce_names_a_module_edited_since_training(trained, tmp_path):
    from stemma.flows.reproduce import run_reproduce

    project = tmp_path / "project"
    shutil.copytree(trained["root"], project, symlinks=True)
    module = project / f"{MODULE}.py"
    # an edit that leaves the network as it was: only the carried code differs
    module.write_text(module.read_text() + "\n# width 32 next time\n")
    sys.modules.pop(MODULE, None)  # as in a new `stemma reproduce` process

    report = run_reproduce(f"models:/{NAME}/{trained['model_version']}", project)

    text = report.render()
    assert not report.reproduced
    assert any(
        f"the module of model.architecture {MODULE}:ResMLP changed since training" in warning
        for warning in report.code_warnings
    ), text
    recorded = sha256_of(trained["root"] / f"{MODULE}.py")
    line = f"module file {MODULE}.py: changed (trained with {recorded}, here {sha256_of(module)})"
    assert line in report.code_warnings, text
    assert f"{MODULE}:ResMLP: the model carries its module ({MODULE}.py)" in text
    # the rebuild ran the project's code: same weights, every other file of the model equal
    assert report.verdict.reproduced_sha256 == trained["weights_sha256"]
    assert report.verdict.tensors == [] and report.verdict.metrics == []
    assert [p.split(":")[0] for p in report.verdict.files] == [f"code/{MODULE}.py"], text
