"""The command line: exit codes, one-screen errors, and a light start-up."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.flows.cli import build_parser, main

HEAVY = ("torch", "mlflow", "great_expectations", "prefect")


def run_cli(stemma_exe, *args, cwd=None, env=None):
    return subprocess.run(
        [*stemma_exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands(stemma_exe):
    result = run_cli(stemma_exe, "--help")
    assert result.returncode == 0
    for command in ("validate", "schema", "run", "data"):
        assert command in result.stdout


def test_every_command_help_has_examples_that_parse_and_the_exit_codes(capsys):
    from stemma.flows.cli.parser import EXAMPLES

    commands = [name.split() for name in EXAMPLES]
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = re.findall(r"^    (\w+) ", capsys.readouterr().out, flags=re.MULTILINE)
    assert "lineage" in listed and not set(listed) - set(EXAMPLES)  # every command has some
    assert ["run", "score"] in commands and [] in commands
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "examples:\n  stemma" in text and "exit codes:" in text, command
        assert "130 interrupted" in text
    for command, _ in (example for examples in EXAMPLES.values() for example in examples):
        words = shlex.split(command.partition(">")[0])
        assert words[0] == "stemma"
        build_parser().parse_args(words[1:])  # exits (code 2) on an example that is wrong


def test_validate_worked_example_imports_nothing_heavy(repo_root, tmp_path):
    """`stemma validate` on the worked example loads none of the heavy libraries."""
    config = tmp_path / "credit.yaml"
    config.write_text((repo_root / "configs" / "credit.yaml").read_text())
    (tmp_path / "data" / "credit").mkdir(parents=True)
    columns = ["application_id", "approved", "salary", "commission", "age", "hvalue", "hyears"]
    columns += ["loan", "elevel", "car", "zipcode"]
    pq.write_table(pa.table({c: [1] for c in columns}), tmp_path / "data/credit/train.parquet")
    (tmp_path / "data.dvc").write_text("outs: []\n")
    probe = textwrap.dedent(
        f"""
        import sys
        from stemma.flows.cli import build_parser, main
        code = main(["validate", {str(config)!r}])
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print("HEAVY=" + ",".join(heavy))
        sys.exit(code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout
    assert "valid (credit: 9 features, 8 checks, model mlp" in result.stdout
    assert "column names match data/credit/train.parquet" in result.stdout


def test_help_imports_nothing_heavy():
    probe = (
        "import sys\nfrom stemma.flows.cli import build_parser\nbuild_parser().format_help()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def write_broken_spec(tmp_path, repo_root):
    text = (repo_root / "configs" / "credit.yaml").read_text()
    text = text.replace("  epochs: 20", "  epochs: 0").replace(
        "  batch_size: 512", "  batch_sise: 512"
    )
    config = tmp_path / "credit.yaml"
    config.write_text(text)
    (tmp_path / "data.dvc").write_text("outs: []\n")
    return config


def test_validate_reports_every_problem_and_exits_2(stemma_exe, tmp_path, repo_root):
    config = write_broken_spec(tmp_path, repo_root)
    result = run_cli(stemma_exe, "validate", str(config))
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err
    assert "3 problems in the spec" in err
    assert "credit.yaml:38 train.epochs: must be greater than 0" in err
    assert "credit.yaml:39 train.batch_sise: unknown key" in err
    assert "data.path:" in err and "does not exist" in err


def test_a_command_leaves_the_console_settings_of_the_process_as_they_were(
    tmp_path, repo_root, monkeypatch, capsys
):
    from stemma.flows.cli.session import CONSOLE_LEVELS

    for variable in CONSOLE_LEVELS:
        monkeypatch.delenv(variable, raising=False)
    assert main(["validate", str(write_broken_spec(tmp_path, repo_root))]) == 2
    # quiet for the command and the processes it starts, not for the next command: a
    # later `-v` in the same process, or a child it starts, prints Prefect's lines again
    assert not [variable for variable in CONSOLE_LEVELS if variable in os.environ]
    assert "3 problems in the spec" in capsys.readouterr().err


DIABETES_SPEC = """
pipeline: {name: diabetes}
data:
  path: data/diabetes.csv
  task: regression
  target: progression
  id: patient
  features: {numeric: [age, bmi, bp, s1], categorical: [sex]}
checks:
  - expect_column_values_to_not_be_null: {column: bmi}
  - expect_column_pair_values_a_to_be_greater_than_b: {column_A: s1, column_B: bp}
gate: {metric: rmse}
"""


def diabetes_project(tmp_path, spec_text, rows):
    """A regression table (scikit-learn's diabetes columns) as CSV, with its spec."""
    (tmp_path / "data").mkdir()
    header = "patient,age,sex,bmi,bp,s1,progression"
    (tmp_path / "data" / "diabetes.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "data.dvc").write_text("outs: []\n")
    config = tmp_path / "diabetes.yaml"
    config.write_text(spec_text)
    return config


def test_validate_names_every_column_the_data_lacks_with_the_closest(stemma_exe, tmp_path):
    spec = DIABETES_SPEC.replace("[age, bmi, bp, s1]", "[age, bmy, bp, s1]")
    spec = spec.replace("column_B: bp", "column_B: blood_pressure").replace("patient", "patient_id")
    config = diabetes_project(tmp_path, spec, ["1,59,2,32.1,101,157,151"])
    result = run_cli(stemma_exe, "validate", str(config))
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "3 column name(s) not in data/diabetes.csv" in err
    assert (
        "data.features.numeric: `bmy` is not a column of diabetes.csv; did you mean `bmi`?" in err
    )
    assert "data.id: `patient_id` is not a column of diabetes.csv; did you mean `patient`?" in err
    assert (
        "checks[1] expect_column_pair_values_a_to_be_greater_than_b: `blood_pressure` is not a "
        "column of diabetes.csv" in err
    )
    assert err.count("bmy") == 1 and "Traceback" not in err  # printed once


def test_validate_reads_the_header_only(stemma_exe, tmp_path):
    """Rows are not read: a row the CSV parser would refuse does not matter to validate."""
    config = diabetes_project(tmp_path, DIABETES_SPEC, ['1,"unclosed', "2,3"])
    result = run_cli(stemma_exe, "validate", str(config))
    assert result.returncode == 0, result.stderr
    assert "column names match data/diabetes.csv" in result.stdout


def test_validate_refuses_a_data_file_it_cannot_read(stemma_exe, tmp_path):
    config = diabetes_project(tmp_path, DIABETES_SPEC.replace("diabetes.csv", "d.parquet"), [])
    (tmp_path / "data" / "d.parquet").write_bytes(b"not parquet")
    result = run_cli(stemma_exe, "validate", str(config))
    assert result.returncode == 3  # a data error, as `stemma run` reports it
    assert "d.parquet: cannot read the file as parquet" in result.stderr
    assert "magic bytes not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(stemma_exe, tmp_path, repo_root):
    config = write_broken_spec(tmp_path, repo_root)
    result = run_cli(stemma_exe, "--debug", "validate", str(config))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "SpecError" in result.stderr


def test_overrides_on_the_command_line(tmp_path, repo_root, capsys):
    config = write_broken_spec(tmp_path, repo_root)
    code = main(
        ["validate", str(config), "--set", "train.epochs=2", "--set", "train.batch_sise=null"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "train.epochs" not in err  # fixed by the override
    assert (
        "train.batch_sise: unknown key (not part of the spec; did you mean `batch_size`?) (from --set train.batch_sise=null)"
        in err
    )


def test_schema_is_json_with_descriptions(stemma_exe):
    result = run_cli(stemma_exe, "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "Stemma pipeline spec"
    assert "description" in schema["$defs"]["TrainSpec"]["properties"]["epochs"]


@pytest.mark.parametrize(
    "argv", [["validate"], ["run"], ["nonsense"]], ids=["no-config", "no-flow", "unknown"]
)
def test_usage_errors_exit_2(stemma_exe, argv):
    result = run_cli(stemma_exe, *argv)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_status_and_down_with_nothing_running(stemma_exe, tmp_path):
    status = run_cli(stemma_exe, "status", "--root", str(tmp_path))
    assert status.returncode == 0, status.stderr
    assert "Prefect UI: not running" in status.stdout and "MLflow UI: not running" in status.stdout
    down = run_cli(stemma_exe, "down", "--root", str(tmp_path))
    assert down.returncode == 0, down.stderr
    assert "no stemma servers are running" in down.stdout.lower()


def test_up_refuses_a_port_in_use_with_the_flag_to_change(stemma_exe, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(stemma_exe, "up", "--root", str(tmp_path), "--mlflow-port", str(port))
    assert result.returncode != 0
    assert f"127.0.0.1:{port} is in use" in result.stderr and "--mlflow-port" in result.stderr
    assert "Traceback" not in result.stderr


def test_promote_unknown_model_exits_5_without_traceback(stemma_exe, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    result = run_cli(stemma_exe, "promote", "models:/nobody/1", "--root", str(tmp_path), env=env)
    assert result.returncode == 5, result.stderr
    assert "nobody" in result.stderr
    assert "Traceback" not in result.stderr
