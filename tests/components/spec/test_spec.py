"""The spec: schema, line numbers, every problem at once, overrides and semantic checks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from stemma.components.errors import SpecError
from stemma.components.spec import Spec, apply_overrides, flatten, json_schema, load_spec

VALID = textwrap.dedent(
    """\
    pipeline:
      name: credit
    data:
      path: data/train.csv
      target: approved
      id: application_id
      features:
        numeric: [salary, age]
        categorical: [car]
    checks:
      - expect_column_values_to_not_be_null: {column: salary}
    model:
      architecture: mlp
      hidden: [8]
    train:
      epochs: 3
      batch_size: 64
    gate:
      metric: roc_auc
      minimum: 0.5
    """
)


def make_project(tmp_path: Path, text: str = VALID, *, with_data: bool = True) -> Path:
    (tmp_path / "data.dvc").write_text("outs: []\n")
    if with_data:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "train.csv").write_text("salary,age,car,approved\n1,20,3,0\n")
    config = tmp_path / "configs" / "p.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(text)
    return config


def problems_of(config: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(config, overrides)
    return caught.value.details


def test_valid_spec_loads_with_defaults(tmp_path):
    config = make_project(tmp_path)
    loaded = load_spec(config)
    assert loaded.root == tmp_path
    assert loaded.spec.pipeline.registered_model_name == "credit"
    assert loaded.spec.train.optimizer == "adam"
    assert loaded.resolve(loaded.spec.data.path) == tmp_path / "data" / "train.csv"


def test_worked_example_spec_is_valid(repo_root):
    loaded = load_spec(repo_root / "configs" / "credit.yaml", check_paths=False)
    assert loaded.spec.data.features.all[:2] == ["salary", "commission"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  epochs: 3", "  epochs: 0", "p.yaml:16 train.epochs: must be greater than 0"),
        ("  epochs: 3", "  epoch: 3", "p.yaml:16 train.epoch: unknown key"),
        (
            "  epochs: 3",
            "  epochs: many",
            "p.yaml:16 train.epochs: must be a valid integer",
        ),
        (
            "  hidden: [8]",
            "  hidden: [8, -1]",
            "p.yaml:14 model.hidden[1]: must be greater than 0",
        ),
        (
            "  name: credit",
            "  name: ''",
            "p.yaml:2 pipeline.name: string should have at least 1 character",
        ),
        ("  target: approved\n", "", "p.yaml:3 data.target: required but missing"),
        (
            "  architecture: mlp",
            "  architecture: transformer",
            "p.yaml:13 model.architecture: must be one of mlp",
        ),
        (
            "  metric: roc_auc",
            "  metric: rmse",
            "p.yaml:19 gate.metric: 'rmse' is not a binary metric",
        ),
        (
            "  minimum: 0.5",
            "  maximum: 0.5",
            "p.yaml:20 gate.maximum: roc_auc is better when higher",
        ),
    ],
    ids=[
        "out-of-range",
        "typo-key",
        "wrong-type",
        "list-item",
        "empty-name",
        "missing",
        "architecture",
        "metric-task",
        "metric-direction",
    ],
)
def test_problem_is_reported_with_line_and_path(tmp_path, old, new, expected):
    assert old in VALID
    config = make_project(tmp_path, VALID.replace(old, new))
    problems = problems_of(config)
    assert any(line.startswith(expected) for line in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    text = (
        VALID.replace("  epochs: 3", "  epochs: -1")
        .replace("  batch_size: 64", "  batch_sise: 64")
        .replace("categorical: [car]", "categorical: [car, age]")
        .replace("path: data/train.csv", "path: data/missing.csv")
    )
    problems = problems_of(make_project(tmp_path, text))
    joined = "\n".join(problems)
    assert len(problems) == 4, joined
    assert "train.epochs: must be greater than 0" in joined
    assert "train.batch_sise: unknown key" in joined
    assert "data.features.categorical[1]: column 'age' is declared more than once" in joined
    assert "data.path:" in joined and "missing.csv does not exist" in joined
    # sorted by line, each with its line
    lines = [int(p.split()[0].split(":")[1]) for p in problems]
    assert lines == sorted(lines)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "id: application_id",
            "id: salary",
            "data.id: column 'salary' is also declared as a feature",
        ),
        (
            "target: approved",
            "target: age",
            "data.target: column 'age' is also declared as a feature",
        ),
        (
            "numeric: [salary, age]\n    categorical: [car]",
            "numeric: []\n    categorical: []",
            "declare at least one",
        ),
    ],
    ids=["id-is-feature", "target-is-feature", "no-features"],
)
def test_column_roles_are_consistent(tmp_path, old, new, expected):
    text = VALID.replace(old, new)
    assert text != VALID
    problems = problems_of(make_project(tmp_path, text))
    assert any(expected in line for line in problems), problems


def test_time_split_needs_a_time_column(tmp_path):
    text = VALID.replace(
        "  id: application_id\n", "  id: application_id\n  split: {method: time}\n"
    )
    problems = problems_of(make_project(tmp_path, text))
    assert any(
        "data.split.time_column: required when split.method is `time`" in p for p in problems
    )


def test_unknown_expectation_is_an_error_not_dropped(tmp_path):
    text = VALID.replace(
        "expect_column_values_to_not_be_null", "expect_column_values_to_not_be_nul"
    )
    problems = problems_of(make_project(tmp_path, text))
    assert len(problems) == 1
    assert problems[0].startswith("p.yaml:11 checks[0].expect_column_values_to_not_be_nul:")
    assert "expect_column_values_to_not_be_null" in problems[0]  # the suggestion


def test_expectation_with_bad_kwargs_is_an_error(tmp_path):
    text = VALID.replace("{column: salary}", "{colum: salary}")
    problems = problems_of(make_project(tmp_path, text))
    assert any(
        "checks[0].expect_column_values_to_not_be_null" in p and "colum" in p for p in problems
    ), problems


def test_check_must_be_a_single_key_mapping(tmp_path):
    text = VALID.replace(
        "  - expect_column_values_to_not_be_null: {column: salary}",
        "  - expect_column_values_to_not_be_null: {column: salary}\n    expect_column_to_exist: {column: age}",
    )
    problems = problems_of(make_project(tmp_path, text))
    assert any("checks[0]: each check is a one-key mapping" in p for p in problems), problems


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        (
            "no_such_module_xyz:Net",
            "cannot import module 'no_such_module_xyz': ModuleNotFoundError",
        ),
        ("json:Missing", "module 'json' has no attribute 'Missing'"),
        ("json:JSONDecoder", "json:JSONDecoder is not a torch.nn.Module"),
    ],
    ids=["no-module", "no-class", "not-a-module"],
)
def test_model_class_must_import(tmp_path, architecture, expected):
    text = VALID.replace("architecture: mlp", f"architecture: '{architecture}'")
    problems = problems_of(make_project(tmp_path, text))
    assert any("model.architecture: " + expected in p for p in problems), problems


def test_custom_model_class_that_imports_is_accepted(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self, n_inputs, n_outputs):\n        super().__init__()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    text = VALID.replace("architecture: mlp", "architecture: 'my_nets:Net'")
    assert load_spec(make_project(tmp_path, text)).spec.model.architecture == "my_nets:Net"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pipeline: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping of sections"),
    ],
    ids=["bad-yaml", "not-a-mapping"],
)
def test_unparseable_spec(tmp_path, text, expected):
    config = make_project(tmp_path, text)
    with pytest.raises(SpecError, match=expected):
        load_spec(config)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_named_in_errors(tmp_path):
    config = make_project(tmp_path)
    loaded = load_spec(config, ["train.epochs=7", "model.hidden=[4, 2]"])
    assert loaded.spec.train.epochs == 7
    assert loaded.spec.model.hidden == [4, 2]
    problems = problems_of(config, ("train.epochs=0",))
    assert problems == ["p.yaml train.epochs: must be greater than 0 (from --set train.epochs=0)"]
    assert "must look like" in problems_of(config, ("train.epochs",))[0]
    assert problems_of(config, ("trian.epochs=2",)) == [
        "p.yaml trian: unknown key (not part of the spec; did you mean `train`?) (from --set trian.epochs=2)"
    ]


def test_unknown_keys_suggest_the_closest_known_key(tmp_path):
    text = VALID.replace("  epochs: 3", "  epocs: 3").replace("  name: credit", "  nmae: credit")
    problems = problems_of(make_project(tmp_path, text))
    assert (
        "p.yaml:16 train.epocs: unknown key (not part of the spec; did you mean `epochs`?)"
        in problems
    )
    assert (
        "p.yaml:2 pipeline.nmae: unknown key (not part of the spec; did you mean `name`?)"
        in problems
    )


def test_overrides_do_not_mutate_the_input():
    raw = {"train": {"epochs": 3}}
    merged, problems, _ = apply_overrides(raw, ["train.epochs=5", "gate.minimum=0.9"])
    assert raw == {"train": {"epochs": 3}}
    assert merged == {"train": {"epochs": 5}, "gate": {"minimum": 0.9}}
    assert not problems


def test_flatten_gives_one_param_per_leaf(tmp_path):
    flat = flatten(load_spec(make_project(tmp_path)).spec)
    assert flat["train.epochs"] == "3"
    assert flat["model.hidden"] == "[8]"
    assert flat["data.features.numeric"] == "[salary, age]"
    assert flat["checks"].startswith("[{expect_column_values_to_not_be_null")


def test_schema_describes_every_field():
    schema = json_schema()
    undescribed = []

    def walk(name: str, node: dict) -> None:
        for field_name, field in node.get("properties", {}).items():
            if "description" not in field:
                undescribed.append(f"{name}.{field_name}")

    walk("Spec", schema)
    for definition_name, definition in schema["$defs"].items():
        walk(definition_name, definition)
    assert not undescribed
    assert set(schema["properties"]) == set(Spec.model_fields)
    json.dumps(schema)  # serialisable


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("endpoint.port=70000", "endpoint.port: must be less than or equal to 65535"),
        (
            "endpoint={max_queue_rows: 10, max_rows_per_request: 11}",
            "endpoint.max_rows_per_request: must be at most max_queue_rows (10)",
        ),
        ("endpoint.token_env=my-token", "endpoint.token_env: string should match pattern"),
        ("endpoint.max_wait_ms=-1", "endpoint.max_wait_ms: must be greater than or equal to 0"),
    ],
    ids=["port", "rows-over-queue", "token-env-name", "negative-wait"],
)
def test_endpoint_settings_are_bounded(tmp_path, override, expected):
    problems = problems_of(make_project(tmp_path), (override,))
    assert any(expected in problem for problem in problems), problems


def test_endpoint_settings_default_to_loopback_and_the_champion(tmp_path):
    from stemma.components.spec import EndpointSpec

    loaded = load_spec(make_project(tmp_path), ("endpoint.port=9000",))
    assert loaded.spec.endpoint is not None and loaded.spec.endpoint.port == 9000
    defaults = EndpointSpec()
    assert (defaults.host, defaults.alias, defaults.token_env) == ("127.0.0.1", "champion", None)
