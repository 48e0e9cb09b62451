"""The training flow's plain steps: split checks, resumed epochs, the checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from stemma.components.errors import DataError
from stemma.components.spec import load_spec
from stemma.components.training import steps


def test_missing_epochs_are_the_ones_the_run_has_not_logged() -> None:
    result = SimpleNamespace(history=[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])
    assert steps.missing_epochs(result, [1, 3]) == [{"epoch": 2}]  # type: ignore[arg-type]
    assert steps.missing_epochs(result, range(1, 4)) == []  # type: ignore[arg-type]


def test_a_split_with_one_class_is_a_data_error(repo_root: Path, tmp_path: Path) -> None:
    loaded = load_spec(repo_root / "configs" / "credit.yaml", check_paths=False)
    spec = loaded.spec
    columns = {name: [1.0] * 40 for name in spec.data.features.numeric}
    columns.update({name: ["a"] * 40 for name in spec.data.features.categorical})
    frame = pd.DataFrame({**columns, spec.data.target: [0] * 40})
    with pytest.raises(DataError, match="holds only one class"):
        steps.prepare_data(spec, frame)


def test_the_checkpoint_folder_depends_on_the_spec_and_the_data(repo_root: Path) -> None:
    loaded = load_spec(repo_root / "configs" / "credit.yaml", check_paths=False)
    changed = load_spec(
        repo_root / "configs" / "credit.yaml", ["train.epochs=3"], check_paths=False
    )
    first = steps.checkpoint_folder(loaded, "md5-a")
    assert first == steps.checkpoint_folder(loaded, "md5-a")
    assert first != steps.checkpoint_folder(loaded, "md5-b")
    assert first != steps.checkpoint_folder(changed, "md5-a")
    assert first.parent == loaded.root / ".stemma" / "checkpoints"


def test_a_remembered_run_that_is_gone_is_not_resumed(tmp_path: Path) -> None:
    class Client:
        def get_run(self, run_id: str) -> None:
            raise LookupError(run_id)

    assert steps.resumable_run_id(tmp_path, Client()) is None
    steps.remember_run(tmp_path / "folder", "r1")
    assert steps.resumable_run_id(tmp_path / "folder", Client()) is None
