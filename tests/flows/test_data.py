"""`stemma data generate`: the worked example's bytes are exactly the version data.dvc records."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from stemma.components.data.tables import dir_md5
from stemma.components.errors import DataVersionError
from stemma.examples.credit import generate_credit_data
from stemma.flows.data import generate_example_data, recorded_md5


def test_regenerated_example_matches_the_committed_data_dvc(repo_root, tmp_path):
    generate_credit_data(tmp_path / "data")
    committed = yaml.safe_load((repo_root / "data.dvc").read_text())["outs"][0]
    actual, entries = dir_md5(tmp_path / "data")
    assert actual == committed["md5"]
    assert len(entries) == committed["nfiles"]


def test_generate_checks_an_existing_pointer_without_dvc(repo_root, tmp_path):
    shutil.copy(repo_root / "data.dvc", tmp_path / "data.dvc")
    report = generate_example_data(tmp_path, record_with_dvc=False)
    assert f"data.dvc: matches ({recorded_md5(tmp_path / 'data.dvc')})" in report


def test_generate_refuses_bytes_that_differ_from_the_pointer(repo_root, tmp_path):
    text = (repo_root / "data.dvc").read_text()
    recorded = recorded_md5(repo_root / "data.dvc")
    (tmp_path / "data.dvc").write_text(text.replace(recorded, "0" * 32 + ".dir"))
    with pytest.raises(DataVersionError, match="regenerated data has md5"):
        generate_example_data(tmp_path, record_with_dvc=False)


def test_generate_records_a_first_version_with_dvc(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    report = generate_example_data(tmp_path)
    assert "(recorded)" in report
    assert recorded_md5(tmp_path / "data.dvc") == dir_md5(tmp_path / "data")[0]
    assert (tmp_path / ".dvc").is_dir()
    # a second run finds the same bytes and leaves the version alone
    assert "(unchanged)" in generate_example_data(tmp_path)
