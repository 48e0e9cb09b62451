"""Distillation: students trained on a teacher's soft targets, on real tables.

Teachers are MLPs trained by the training loop on scikit-learn's bundled tables
(breast_cancer: binary, wine: three classes, diabetes: regression), encoded by a fitted
Stemma preprocessor; students are half-width MLPs or a custom module written to a file.
"""

from __future__ import annotations

import hashlib
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes

from stemma.components.compression.distillation import (
    DistillResult,
    TemperedStudent,
    blended_targets,
    count_parameters,
    distill_network,
    read_production_rows,
    soft_targets,
    student_config,
    training_targets,
)
from stemma.components.errors import CompressionError, DataError, TrainingError
from stemma.components.model.networks import NetworkImportError, build_network
from stemma.components.model.onnx_graph import export_onnx
from stemma.components.model.preprocessing import Preprocessor, fit_preprocessor
from stemma.components.runtime.backends import build_runtime, load_onnx_runtime
from stemma.components.spec import FeaturesSpec, TrainSpec
from stemma.components.spec.compress import DistillSpec, StudentSpec
from stemma.components.training.loop import predict_raw, train_network
from stemma.components.training.metrics import evaluate_scores
from tests.support import wine_frame

SEED = 11
TEACHER_CONFIG = {"architecture": "mlp", "hidden": [64, 32], "dropout": 0.1, "params": {}}
#: Largest loss of the test metric a half-width student may show against its teacher.
METRIC_LIMITS = {"binary": ("roc_auc", 0.01), "multiclass": ("roc_auc", 0.02)}
#: Largest growth of the test rmse a regression student may show, as a share of the teacher's.
RMSE_GROWTH = 0.10


@dataclass(frozen=True)
class Table:
    """A table split and encoded by a fitted preprocessor, and a teacher trained on it."""

    task: str
    preprocessor: Preprocessor
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    truth_test: np.ndarray  # 0/1, class codes or values in the target's units
    teacher: torch.nn.Module
    train: TrainSpec

    @property
    def n_inputs(self) -> int:
        return self.preprocessor.n_inputs

    @property
    def n_outputs(self) -> int:
        return self.preprocessor.n_outputs

    def scores(self, network: torch.nn.Module) -> np.ndarray:
        return np.asarray(self.preprocessor.decode_output(predict_raw(network, self.x_test)))

    def metrics(self, network: torch.nn.Module) -> dict[str, float]:
        return evaluate_scores(self.task, self.truth_test, self.scores(network))

    def distil(self, config: dict | None = None, **options) -> DistillResult:
        settings = options.pop("settings", DistillSpec())
        return distill_network(
            options.pop("teacher", self.teacher),
            config if config is not None else student_config(StudentSpec(), TEACHER_CONFIG),
            n_inputs=self.n_inputs,
            n_outputs=self.n_outputs,
            settings=settings,
            train=options.pop("train", self.train),
            task=self.task,
            x_train=self.x_train,
            y_train=self.y_train,
            x_val=self.x_val,
            y_val=self.y_val,
            **options,
        )


def _table(frame: pd.DataFrame, target: str, task: str, epochs: int) -> Table:
    """Split 60/20/20 (seeded), fit the preprocessor on the training rows, train a teacher."""
    order = np.random.default_rng(SEED).permutation(len(frame))
    cut_val, cut_test = int(0.6 * len(frame)), int(0.8 * len(frame))
    parts = [frame.iloc[order[:cut_val]], frame.iloc[order[cut_val:cut_test]]]
    test = frame.iloc[order[cut_test:]]
    features = FeaturesSpec(numeric=[name for name in frame.columns if name != target])
    pre = fit_preprocessor(parts[0], features, task=task, target=target)
    arrays = [
        array for part in parts for array in (pre.transform(part), pre.encode_target(part, target))
    ]
    if task == "regression":
        truth = test[target].to_numpy(dtype=np.float64)
    else:
        truth = pre.class_codes(test[target])
    train = TrainSpec(epochs=epochs, batch_size=32, learning_rate=3e-3, seed=SEED, device="cpu")
    network = build_network(TEACHER_CONFIG, pre.n_inputs, pre.n_outputs, seed=SEED)
    teacher = train_network(network, *arrays, train=train, task=task).network
    return Table(task, pre, *arrays, pre.transform(test), truth, teacher, train)


@pytest.fixture(scope="module")
def cancer() -> Table:
    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [name.replace(" ", "_") for name in frame.columns]
    return _table(frame, "target", "binary", epochs=30)


@pytest.fixture(scope="module")
def wine() -> Table:
    frame = wine_frame().drop(columns="wine_id")
    return _table(frame, "cultivar", "multiclass", epochs=40)


@pytest.fixture(scope="module")
def diabetes() -> Table:
    frame = load_diabetes(as_frame=True, scaled=False).frame
    return _table(frame, "target", "regression", epochs=60)


# ---------------------------------------------------------------------------------------
# Students as good as their teachers


def test_a_half_width_student_keeps_the_teachers_roc_auc(cancer: Table) -> None:
    result = cancer.distil()

    metric, limit = METRIC_LIMITS["binary"]
    teacher, student = (
        cancer.metrics(cancer.teacher)[metric],
        cancer.metrics(result.network)[metric],
    )
    assert student >= teacher - limit, (teacher, student)
    assert result.config["hidden"] == [32, 16]
    assert result.parameters_student < result.parameters_teacher == count_parameters(cancer.teacher)
    assert result.rows == {"train": len(cancer.x_train), "production": 0}
    assert 1 <= len(result.history) <= cancer.train.epochs
    assert not result.network.training and not isinstance(result.network, TemperedStudent)
    assert result.notes == ()


def test_a_multiclass_student_keeps_the_teachers_roc_auc(wine: Table) -> None:
    result = wine.distil()

    metric, limit = METRIC_LIMITS["multiclass"]
    teacher, student = wine.metrics(wine.teacher)[metric], wine.metrics(result.network)[metric]
    assert student >= teacher - limit, (teacher, student)
    assert wine.scores(result.network).shape == (len(wine.x_test), 3)


def test_a_regression_student_keeps_the_teachers_rmse(diabetes: Table) -> None:
    result = diabetes.distil(settings=DistillSpec(temperature=3.0))

    teacher = diabetes.metrics(diabetes.teacher)["rmse"]
    student = diabetes.metrics(result.network)["rmse"]
    assert student <= teacher * (1 + RMSE_GROWTH), (teacher, student)
    assert any("temperature does not apply to regression" in note for note in result.notes)


@pytest.mark.parametrize("table_name", ["cancer", "wine"], ids=["binary", "multiclass"])
def test_the_temperature_does_not_soften_the_students_scores(
    table_name: str, request: pytest.FixtureRequest
) -> None:
    table: Table = request.getfixturevalue(table_name)
    temperature = 4.0
    settings = DistillSpec(temperature=temperature, alpha=1.0, epochs=60)

    result = table.distil(settings=settings)

    teacher_scores = table.scores(table.teacher)
    student_scores = table.scores(result.network)
    raw = predict_raw(table.teacher, table.x_test)
    softened = soft_targets(raw, table.task, temperature).reshape(teacher_scores.shape)
    # What the student learnt from is far from the teacher's scores; what it serves is close.
    assert np.abs(softened - teacher_scores).mean() > 0.1
    assert np.abs(student_scores - teacher_scores).mean() < 0.03


# ---------------------------------------------------------------------------------------
# Targets


def test_binary_soft_targets_are_the_sigmoid_of_the_softened_logit() -> None:
    logits = np.array([[0.0], [2 * np.log(3.0)], [-2 * np.log(3.0)]], dtype=np.float32)

    soft = soft_targets(logits, "binary", temperature=2.0)

    np.testing.assert_allclose(soft, [0.5, 0.75, 0.25], rtol=1e-6)
    assert soft.dtype == np.float32 and soft.shape == (3,)


def test_multiclass_soft_targets_are_the_softmax_of_the_softened_logits() -> None:
    logits = 3.0 * np.log(np.array([[1.0, 2.0, 5.0], [4.0, 4.0, 2.0]]))

    soft = soft_targets(logits, "multiclass", temperature=3.0)

    np.testing.assert_allclose(soft, [[1 / 8, 2 / 8, 5 / 8], [0.4, 0.4, 0.2]], rtol=1e-6)


def test_regression_soft_targets_are_the_teachers_values_at_any_temperature() -> None:
    values = np.array([[-1.5], [0.25], [3.0]])

    soft = soft_targets(values, "regression", temperature=7.0)

    np.testing.assert_array_equal(soft, np.array([-1.5, 0.25, 3.0], dtype=np.float32))


def test_a_teacher_with_non_finite_outputs_is_refused() -> None:
    with pytest.raises(CompressionError, match="1 missing or infinite outputs"):
        soft_targets(np.array([[0.1], [np.nan]]), "binary", temperature=1.0)


@pytest.mark.parametrize(
    ("task", "soft", "hard", "expected"),
    [
        ("binary", [0.5, 0.9], [1.0, 0.0], [0.65, 0.63]),
        (
            "multiclass",
            [[0.2, 0.8], [0.5, 0.5]],
            [[1.0, 0.0], [0.0, 1.0]],
            [[0.44, 0.56], [0.35, 0.65]],
        ),
        ("regression", [[2.0], [-1.0]], [0.0, 1.0], [1.4, -0.4]),
    ],
    ids=["binary", "multiclass", "regression"],
)
def test_blended_targets_weigh_soft_by_alpha_and_hard_by_the_rest(
    task: str, soft: list, hard: list, expected: list
) -> None:
    blended = blended_targets(np.array(soft), np.array(hard), task, alpha=0.7)

    np.testing.assert_allclose(blended, expected, rtol=1e-6)


def test_blended_targets_refuse_arrays_that_do_not_match() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        blended_targets(np.zeros((3, 2)), np.zeros((2, 2)), "multiclass", alpha=0.5)


def test_production_rows_get_the_soft_target_alone() -> None:
    soft = np.array([0.8, 0.3])
    hard = np.array([1.0, 0.0])
    production = np.array([0.6, 0.1, 0.95])

    targets = training_targets(soft, hard, "binary", 0.5, production)

    np.testing.assert_allclose(targets, [0.9, 0.15, 0.6, 0.1, 0.95], rtol=1e-6)


def test_production_rows_are_learnt_from(cancer: Table) -> None:
    production = cancer.x_test[:40]

    result = cancer.distil(x_production=production)
    alone = cancer.distil()

    assert result.rows == {"train": len(cancer.x_train), "production": 40}
    trained = result.network.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in alone.network.state_dict().items())


# ---------------------------------------------------------------------------------------
# Student configs


def test_the_default_student_halves_the_teachers_widths_rounding_up() -> None:
    teacher = {"architecture": "mlp", "hidden": [64, 33, 1], "dropout": 0.1, "params": {}}

    config = student_config(StudentSpec(dropout=0.05), teacher)

    assert config == {"architecture": "mlp", "hidden": [32, 17, 1], "dropout": 0.05, "params": {}}


def test_the_students_own_widths_win() -> None:
    assert student_config(StudentSpec(hidden=[8]), TEACHER_CONFIG)["hidden"] == [8]


def test_an_mlp_student_of_a_custom_teacher_needs_its_widths() -> None:
    teacher = {"architecture": "mymodels:ResMLP", "hidden": [], "dropout": 0.0, "params": {}}

    with pytest.raises(CompressionError, match="no hidden widths") as caught:
        student_config(StudentSpec(), teacher)

    assert "compress.distill.student.hidden" in caught.value.render()


def test_a_student_no_smaller_than_its_teacher_is_trained_and_noted(cancer: Table) -> None:
    config = student_config(StudentSpec(hidden=[64, 64]), TEACHER_CONFIG)

    result = cancer.distil(config, settings=DistillSpec(epochs=2))

    assert result.parameters_student > result.parameters_teacher
    assert any("not fewer than the teacher's" in note for note in result.notes)


# ---------------------------------------------------------------------------------------
# Custom students


@pytest.fixture
def student_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of user students on sys.path, under a name no other test uses."""
    name = f"user_students_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Narrow(nn.Module):
                def __init__(self, n_inputs, n_outputs, width=8):
                    super().__init__()
                    self.body = nn.Sequential(
                        nn.Linear(n_inputs, width), nn.Tanh(), nn.Linear(width, n_outputs)
                    )

                def forward(self, x):
                    return self.body(x)

            class ThreeOutputs(nn.Module):
                def __init__(self, n_inputs, n_outputs):
                    super().__init__()
                    self.linear = nn.Linear(n_inputs, 3)

                def forward(self, x):
                    return self.linear(x)
            """
        )
    )
    (tmp_path / f"{name}_broken.py").write_text(
        "import torch\nraise ImportError('no GPU kernels here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_broken", None)


def test_a_custom_student_class_is_distilled_and_rebuilt_from_its_config(
    cancer: Table, student_module: str
) -> None:
    student = StudentSpec(architecture=f"{student_module}:Narrow", params={"width": 8})
    config = student_config(student, TEACHER_CONFIG)

    result = cancer.distil(config)

    rebuilt = build_network(result.config, cancer.n_inputs, cancer.n_outputs)
    rebuilt.load_state_dict(result.network.state_dict())
    np.testing.assert_array_equal(
        predict_raw(rebuilt, cancer.x_test), predict_raw(result.network, cancer.x_test)
    )
    assert type(result.network).__name__ == "Narrow"
    metric, limit = METRIC_LIMITS["binary"]
    teacher = cancer.metrics(cancer.teacher)[metric]
    assert cancer.metrics(result.network)[metric] >= teacher - 2 * limit


@pytest.mark.parametrize(
    ("suffix", "message"),
    [("_missing:Student", "No module named"), ("_broken:Student", "no GPU kernels here")],
    ids=["missing-module", "failing-import"],
)
def test_a_student_that_does_not_import_names_its_module(
    cancer: Table, student_module: str, suffix: str, message: str
) -> None:
    architecture = f"{student_module}{suffix}"
    config = student_config(StudentSpec(architecture=architecture), TEACHER_CONFIG)

    with pytest.raises(NetworkImportError, match=message) as caught:
        cancer.distil(config)

    assert architecture.partition(":")[0] in caught.value.render()


def test_a_student_of_the_wrong_output_width_is_refused(cancer: Table, student_module: str) -> None:
    config = student_config(
        StudentSpec(architecture=f"{student_module}:ThreeOutputs"), TEACHER_CONFIG
    )

    with pytest.raises(TrainingError, match=r"shape \(batch, 1\), got \(2, 3\)"):
        cancer.distil(config)


# ---------------------------------------------------------------------------------------
# Teachers


def test_two_runs_give_identical_students(wine: Table) -> None:
    first = wine.distil(x_production=wine.x_test)
    second = wine.distil(x_production=wine.x_test)

    assert first.network.state_dict().keys() == second.network.state_dict().keys()
    for name, tensor in first.network.state_dict().items():
        assert torch.equal(tensor, second.network.state_dict()[name]), name
    assert [row["val_loss"] for row in first.history] == [row["val_loss"] for row in second.history]


def test_a_distillation_resumed_from_its_checkpoint_ends_with_the_same_student(
    cancer: Table, tmp_path: Path
) -> None:
    train = cancer.train.model_copy(update={"early_stopping": None})
    first = cancer.distil(settings=DistillSpec(epochs=3), train=train, checkpoint_dir=tmp_path)
    resumed = cancer.distil(settings=DistillSpec(epochs=6), train=train, checkpoint_dir=tmp_path)
    straight = cancer.distil(settings=DistillSpec(epochs=6), train=train)

    assert (tmp_path / "checkpoint.pt").exists()
    for name, tensor in straight.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
    assert len(resumed.history) == 6
    assert resumed.history[:3] == first.history  # read back, timings included: not retrained


def test_a_runtime_teacher_gives_the_student_a_module_teacher_gives(cancer: Table) -> None:
    runtime = build_runtime(cancer.teacher, width=cancer.n_inputs, backend="eager")

    from_runtime = cancer.distil(teacher=runtime)
    from_module = cancer.distil()

    for name, tensor in from_module.network.state_dict().items():
        assert torch.equal(tensor, from_runtime.network.state_dict()[name]), name
    assert from_runtime.parameters_teacher == count_parameters(cancer.teacher)


def test_an_onnx_runtime_teacher_needs_its_parameter_count(cancer: Table, tmp_path: Path) -> None:
    assert export_onnx(cancer.teacher, cancer.n_inputs, tmp_path / "network.onnx").exported
    runtime = load_onnx_runtime(tmp_path / "network.onnx", width=cancer.n_inputs)

    with pytest.raises(ValueError, match="pass parameters_teacher"):
        cancer.distil(teacher=runtime)
    result = cancer.distil(teacher=runtime, parameters_teacher=count_parameters(cancer.teacher))

    metric, limit = METRIC_LIMITS["binary"]
    teacher = cancer.metrics(cancer.teacher)[metric]
    assert cancer.metrics(result.network)[metric] >= teacher - limit
    assert result.parameters_teacher == count_parameters(cancer.teacher)


def test_a_teacher_of_another_input_width_is_refused(cancer: Table) -> None:
    narrower = build_network(TEACHER_CONFIG, cancer.n_inputs - 1, 1, seed=SEED)
    runtime = build_runtime(narrower, width=cancer.n_inputs - 1, backend="eager")

    with pytest.raises(CompressionError, match=f"takes {cancer.n_inputs - 1} input columns"):
        cancer.distil(teacher=runtime)
    with pytest.raises(CompressionError, match="teacher network fails"):
        cancer.distil(teacher=narrower)


def test_production_rows_of_another_width_are_refused(cancer: Table) -> None:
    with pytest.raises(CompressionError, match="x_production: shape"):
        cancer.distil(x_production=cancer.x_test[:, :-1])


def test_a_teacher_of_another_task_is_refused(wine: Table) -> None:
    student = student_config(StudentSpec(), TEACHER_CONFIG)

    with pytest.raises(CompressionError, match=r"outputs of shape \(\d+, 3\)"):
        distill_network(
            wine.teacher,
            student,
            n_inputs=wine.n_inputs,
            n_outputs=1,
            settings=DistillSpec(),
            train=wine.train,
            task="binary",
            x_train=wine.x_train,
            y_train=wine.y_train[:, 0],
            x_val=wine.x_val,
            y_val=wine.y_val[:, 0],
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_student_distils_on_the_gpu_from_a_gpu_teacher(cancer: Table) -> None:
    train = cancer.train.model_copy(update={"device": "cuda"})
    teacher = cancer.teacher.to("cuda")
    try:
        result = cancer.distil(teacher=teacher, train=train)
    finally:
        cancer.teacher.to("cpu")

    assert next(result.network.parameters()).device.type == "cpu"
    metric, limit = METRIC_LIMITS["binary"]
    teacher_metric = cancer.metrics(cancer.teacher)[metric]
    assert cancer.metrics(result.network)[metric] >= teacher_metric - limit


# ---------------------------------------------------------------------------------------
# Production rows from files


@pytest.fixture
def production_preprocessor() -> Preprocessor:
    frame = pd.DataFrame(
        {"dose": [1.0, 2.0, 3.0, 4.0], "age": [30, 40, 50, 60], "site": ["a", "b", "a", "c"]}
    )
    features = FeaturesSpec(numeric=["dose", "age"], categorical=["site"])
    return fit_preprocessor(frame, features, task="binary")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_production_rows_are_read_from_parquet_parts_and_csv(
    tmp_path: Path, production_preprocessor: Preprocessor
) -> None:
    folder = tmp_path / "batches"
    folder.mkdir()
    part_1 = pd.DataFrame(
        {"id": [1, 2], "dose": [1.5, np.nan], "age": [35, 45], "site": ["a", "b"]}
    )
    part_2 = pd.DataFrame({"id": [3], "dose": [2.5], "age": [55], "site": ["zz"]})
    part_1.to_parquet(folder / "part-0.parquet", index=False)
    part_2.to_parquet(folder / "part-1.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    csv = tmp_path / "late.csv"
    csv.write_text("site,age,dose,extra\nc,61,3.5,x\nb,62,inf,y\na,63,0.5,z\n")

    matrix, records = read_production_rows([folder, csv], production_preprocessor)

    kept = pd.DataFrame(
        {"dose": [1.5, 2.5, 3.5, 0.5], "age": [35, 55, 61, 63], "site": ["a", "zz", "c", "a"]}
    )
    np.testing.assert_array_equal(matrix, production_preprocessor.transform(kept))
    assert records == [
        {
            "path": str(folder / "part-0.parquet"),
            "md5": _md5(folder / "part-0.parquet"),
            "rows": "1",
            "dropped": "1",
        },
        {
            "path": str(folder / "part-1.parquet"),
            "md5": _md5(folder / "part-1.parquet"),
            "rows": "1",
            "dropped": "0",
        },
        {"path": str(csv), "md5": _md5(csv), "rows": "2", "dropped": "1"},
    ]


def test_a_missing_production_path_is_named(
    tmp_path: Path, production_preprocessor: Preprocessor
) -> None:
    missing = tmp_path / "nowhere" / "batch.parquet"

    with pytest.raises(DataError, match="no such file or folder") as caught:
        read_production_rows([missing], production_preprocessor)

    assert str(missing) in caught.value.render()
    assert "compress.distill.production_batches" in caught.value.render()


def test_an_unreadable_production_file_is_named(
    tmp_path: Path, production_preprocessor: Preprocessor
) -> None:
    damaged = tmp_path / "batch.parquet"
    damaged.write_bytes(b"not parquet at all")

    with pytest.raises(DataError, match="not a readable parquet file") as caught:
        read_production_rows([damaged], production_preprocessor)

    assert str(damaged) in caught.value.render()


def test_a_production_file_without_a_feature_column_is_named(
    tmp_path: Path, production_preprocessor: Preprocessor
) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text("dose,site\n1.0,a\n")

    with pytest.raises(DataError, match="cannot encode") as caught:
        read_production_rows([batch], production_preprocessor)

    assert "missing feature columns: age" in caught.value.render()
    assert str(batch) in caught.value.render()


def test_text_in_a_numeric_production_column_is_named(
    tmp_path: Path, production_preprocessor: Preprocessor
) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text("dose,age,site\nhigh,30,a\n")

    with pytest.raises(DataError, match="cannot encode") as caught:
        read_production_rows([batch], production_preprocessor)

    assert "dose is string, not a number" in caught.value.render()
