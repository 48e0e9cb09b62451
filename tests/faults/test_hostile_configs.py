"""Hostile specs: YAML bombs, deep nesting, huge files, code-running tags and paths that
leave the project are refused quickly, with one clear line, before anything runs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from stemma.components.errors import SpecError
from stemma.components.spec import (
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    MAX_SPEC_NODES,
    LoadedSpec,
    load_spec,
)

#: The loader's own time for any hostile file; it answers in milliseconds.
LOADER_SECONDS = 1.0
#: A whole `stemma validate` process, interpreter start-up included.
COMMAND_SECONDS = 5.0

VALID = """\
pipeline:
  name: credit
data:
  path: data/train.csv
  target: approved
  features:
    numeric: [salary, age]
train:
  epochs: 3
"""


def make_project(root: Path, text: str = VALID) -> Path:
    """A project folder (marked by data.dvc) with a data file and the spec ``text``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.dvc").write_text("outs: []\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "train.csv").write_text("salary,age,approved\n1,20,0\n")
    config = root / "configs" / "credit.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(text)
    return config


def refused(config: Path, overrides: tuple[str, ...] = ()) -> tuple[SpecError, float]:
    """Load ``config``; return the error and how long the loader took."""
    started = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_spec(config, overrides)
    return caught.value, time.perf_counter() - started


def billion_laughs(levels: int = 10) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            VALID + billion_laughs(),
            14,
            f"refused: more than {MAX_SPEC_NODES:,} values once aliases are expanded",
        ),
        (
            VALID + "deep: " + "[" * 100_000 + "]" * 100_000 + "\n",
            10,
            f"refused: nesting deeper than {MAX_SPEC_DEPTH} levels",
        ),
        (
            VALID + "loop: &loop [*loop]\n",
            10,
            "refused: alias *loop refers to a value that contains it",
        ),
    ],
    ids=["billion-laughs", "100000-deep", "recursive-alias"],
)
def test_yaml_bombs_are_refused_in_one_line(tmp_path, fault_ledger, text, line, message):
    config = make_project(tmp_path / "project", text)
    error, seconds = refused(config)
    fault_ledger.executed(False)
    assert error.render() == f"{config}:{line}: {message}"
    assert seconds < LOADER_SECONDS


@pytest.mark.fault_case("bad_input")
def test_a_50_mb_spec_is_refused_unread(tmp_path, fault_ledger):
    config = make_project(tmp_path / "project")
    with config.open("a") as handle:
        handle.write("# padding\n" * (50 * 1024 * 1024 // 10))
    error, seconds = refused(config)
    fault_ledger.executed(False)
    assert error.render() == (
        f"{config}: refused: larger than {MAX_SPEC_BYTES // 1024:,} KiB, the most a spec may be"
    )
    assert seconds < LOADER_SECONDS


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize(
    "tag", ["!!python/object/apply:os.system", "!!python/name:os.system"], ids=["apply", "name"]
)
def test_a_python_tag_is_refused_and_never_runs(tmp_path, fault_ledger, tag):
    marker = tmp_path / "executed"
    text = VALID.replace("  epochs: 3", f"  epochs: {tag} ['touch {marker}']")
    config = make_project(tmp_path / "project", text)
    error, seconds = refused(config)
    fault_ledger.executed(marker.exists())
    assert not marker.exists()
    assert error.render() == (
        f"{config}:9: refused: tag {tag.split(':')[0]}:os.system is not allowed: a spec holds "
        "plain YAML (mappings, lists, strings, numbers, booleans, null)"
    )
    assert seconds < LOADER_SECONDS


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.params=" + "{" + billion_laughs(6).replace("\n", ", ").rstrip(", ") + "}",
            f"model.params: override value refused: more than {MAX_SPEC_NODES:,} values once "
            "aliases are expanded",
        ),
        (
            "model.params=" + "[" * 10_000 + "]" * 10_000,
            f"model.params: override value refused: nesting deeper than {MAX_SPEC_DEPTH} levels",
        ),
        (
            "train.epochs=!!python/object/apply:os.system ['true']",
            "train.epochs: override value refused: tag !!python/object/apply:os.system is not "
            "allowed",
        ),
        (
            "model.params." + ".".join(["a"] * 100) + "=1",
            f"nesting deeper than {MAX_SPEC_DEPTH} levels",
        ),
    ],
    ids=["billion-laughs", "deep-value", "python-tag", "deep-key"],
)
def test_overrides_are_held_to_the_same_limits(tmp_path, fault_ledger, override, message):
    config = make_project(tmp_path / "project")
    error, seconds = refused(config, (override,))
    fault_ledger.executed(False)
    assert len(error.details) == 1
    assert message in error.details[0]
    assert seconds < LOADER_SECONDS


def outside_paths_project(tmp_path: Path, spec_lines: str) -> tuple[Path, Path, Path]:
    """A project under ``tmp_path/project`` with ``spec_lines`` appended to its spec, and a
    folder ``tmp_path/outside`` beside it; returns (config, project, outside)."""
    outside = tmp_path / "outside"
    (outside / "batches").mkdir(parents=True)
    project = tmp_path / "project"
    config = make_project(project, VALID + spec_lines.format(outside=outside))
    return config, project, outside


def outside_message(field: str, value: str, project: Path) -> str:
    return (
        f"{field}: {value} resolves outside the project ({(project / value).resolve()}); "
        "to allow it, add its folder to pipeline.allowed_roots"
    )


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize(
    ("spec_lines", "field", "value"),
    [
        ("score:\n  output: ../../../x\n", "score.output", "../../../x"),
        ("score:\n  output: {outside}/scores\n", "score.output", "{outside}/scores"),
        ("monitor:\n  labels: ../outside/labels\n", "monitor.labels", "../outside/labels"),
        ("evaluate:\n  labels: ../../elsewhere\n", "evaluate.labels", "../../elsewhere"),
        ("retrain:\n  batches: data/../../outside\n", "retrain.batches", "data/../../outside"),
    ],
    ids=["traversal", "absolute", "monitor-labels", "evaluate-labels", "retrain-batches"],
)
def test_paths_outside_the_project_are_refused_at_validation(
    tmp_path, fault_ledger, spec_lines, field, value
):
    config, project, outside = outside_paths_project(tmp_path, spec_lines)
    value = value.format(outside=outside)
    error, seconds = refused(config)
    fault_ledger.executed(False)
    # (`evaluate` also wants a data.id, which this spec lacks: one more line for that.)
    assert f"credit.yaml:11 {outside_message(field, value, project)}" in error.details
    assert len(error.details) == (2 if field == "evaluate.labels" else 1)
    assert seconds < LOADER_SECONDS


@pytest.mark.fault_case("bad_input")
def test_a_system_file_as_data_is_refused_at_validation(tmp_path, fault_ledger):
    config = make_project(tmp_path / "project", VALID.replace("data/train.csv", "/etc/passwd"))
    error, _ = refused(config)
    fault_ledger.executed(False)
    # Only the one problem: no advice to `dvc add` it, no guess at its format.
    assert error.details == [
        "credit.yaml:4 data.path: /etc/passwd resolves outside the project (/etc/passwd); to "
        "allow it, add its folder to pipeline.allowed_roots"
    ]


@pytest.mark.fault_case("bad_input")
def test_a_symlink_inside_the_project_that_leads_outside_is_refused(tmp_path, fault_ledger):
    config, project, outside = outside_paths_project(tmp_path, "score:\n  input: link/batches\n")
    (project / "link").symlink_to(outside, target_is_directory=True)
    error, _ = refused(config)
    fault_ledger.executed(False)
    assert error.details == [
        f"credit.yaml:11 score.input: link/batches resolves outside the project "
        f"({outside.resolve()}/batches); to allow it, add its folder to pipeline.allowed_roots"
    ]


@pytest.mark.fault_case("bad_input")
def test_an_allowed_root_outside_the_project_is_accepted(tmp_path, fault_ledger):
    config, project, outside = outside_paths_project(
        tmp_path, "score:\n  input: {outside}/batches\n  output: ../outside/scores\n"
    )
    text = config.read_text().replace(
        "  name: credit\n", f"  name: credit\n  allowed_roots: [{outside}]\n"
    )
    config.write_text(text)
    loaded = load_spec(config)
    fault_ledger.executed(False)
    assert loaded.spec.pipeline.allowed_roots == [str(outside)]
    assert loaded.resolve(loaded.spec.score.output) == project / "../outside/scores"
    # ...and only that root: another folder outside is still refused, from the file or a run.
    with pytest.raises(SpecError, match=r"\.\./elsewhere resolves outside the project"):
        loaded.resolve("../elsewhere")
    with pytest.raises(SpecError, match=r"score\.output: /tmp resolves outside"):
        load_spec(config, ["score.output=/tmp"])


@pytest.mark.fault_case("bad_input")
def test_overrides_and_run_arguments_cannot_leave_the_project(tmp_path, fault_ledger):
    config = make_project(tmp_path / "project")
    error, _ = refused(config, ("score.output=../../../x", "data.path=/etc/passwd"))
    fault_ledger.executed(False)
    project = tmp_path / "project"
    assert [line.split(" (from")[0] for line in error.details] == [
        f"credit.yaml {outside_message('data.path', '/etc/passwd', project)}",
        f"credit.yaml {outside_message('score.output', '../../../x', project)}",
    ]
    assert all("(from --set " in line for line in error.details)
    # A path given to a run (`--input`, `--output`, `--batch`, ...) goes through the same check.
    loaded: LoadedSpec = load_spec(config)
    with pytest.raises(SpecError) as caught:
        loaded.resolve(str(tmp_path / "elsewhere"))
    assert caught.value.render() == (
        f"credit.yaml: {tmp_path / 'elsewhere'} resolves outside the project "
        f"({(tmp_path / 'elsewhere').resolve()}); to allow it, add its folder to "
        "pipeline.allowed_roots"
    )
    assert loaded.resolve("outputs/scores") == tmp_path / "project" / "outputs" / "scores"


@pytest.mark.fault_case("bad_input")
def test_validate_refuses_a_yaml_bomb_in_one_line(tmp_path, fault_ledger, stemma_exe):
    config = make_project(tmp_path / "project", VALID + billion_laughs())
    started = time.perf_counter()
    done = subprocess.run(
        [*stemma_exe, "validate", str(config)], capture_output=True, text=True, timeout=60
    )
    seconds = time.perf_counter() - started
    fault_ledger.executed(False)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {config}:14: refused: more than {MAX_SPEC_NODES:,} values once aliases are "
        "expanded"
    ]
    assert seconds < COMMAND_SECONDS


@pytest.mark.fault_case("bad_input")
def test_validate_reports_every_path_problem_with_the_others(tmp_path, fault_ledger, stemma_exe):
    text = VALID.replace("data/train.csv", "/etc/passwd").replace("epochs: 3", "epochs: 0")
    config = make_project(tmp_path / "project", text + "score:\n  output: ../../../x\n")
    done = subprocess.run(
        [*stemma_exe, "validate", str(config)], capture_output=True, text=True, timeout=60
    )
    fault_ledger.executed(False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {config}: 3 problems in the spec",
        "  credit.yaml:4 data.path: /etc/passwd resolves outside the project (/etc/passwd); "
        "to allow it, add its folder to pipeline.allowed_roots",
        "  credit.yaml:9 train.epochs: must be greater than 0",
        f"  credit.yaml:11 {outside_message('score.output', '../../../x', config.parents[1])}",
    ]
