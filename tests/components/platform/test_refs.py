"""The one ``models:/`` parser, formatter and alias rule."""

import pytest

from stemma.components.errors import StemmaError
from stemma.components.platform.refs import (
    ModelRef,
    ModelRefError,
    alias_problem,
    check_alias,
    format_model_ref,
    is_valid_alias,
    logged_model_id,
    parse_model_ref,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("models:/credit/7", ModelRef("credit", "7", None)),
        ("models:/credit@champion", ModelRef("credit", None, "champion")),
        ("  models:/credit@challenger\n", ModelRef("credit", None, "challenger")),
        ("models:/credit@v1-quantized", ModelRef("credit", None, "v1-quantized")),
        # Names the old spec rule refused but MLflow allows.
        ("models:/_internal/3", ModelRef("_internal", "3", None)),
        ("models:/my model@champion", ModelRef("my model", None, "champion")),
        ("models:/crédit@champion", ModelRef("crédit", None, "champion")),
        # Aliases the old spec rule refused but MLflow allows (\w is Unicode).
        ("models:/credit@champiön", ModelRef("credit", None, "champiön")),
        ("models:/credit@CHAMPION_2", ModelRef("credit", None, "CHAMPION_2")),
        # MLflow splits an alias at the last '@'.
        ("models:/a@b@champion", ModelRef("a@b", None, "champion")),
    ],
)
def test_parse(text, expected):
    parsed = parse_model_ref(text)
    assert parsed == expected
    name, version, alias = parsed
    assert (name, version, alias) == tuple(expected)


@pytest.mark.parametrize(
    "text,why",
    [
        ("credit/7", "does not start with models:/"),
        ("models:/credit", "neither a version nor an alias"),
        ("models:/credit/x", "not a number"),
        ("models:/credit/7/8", "not a number"),
        ("models:/credit/²", "not a number"),
        ("models:/credit@", "may hold only"),
        ("models:/@champion", "empty"),
        ("models:/ /3", "empty"),
        ("models:/../3", "not a plain name"),
        # Aliases the old loading, lineage and promote rules accepted; MLflow refuses them.
        ("models:/credit@champion.v2", "may hold only"),
        ("models:/credit@has space", "may hold only"),
        ("models:/credit@a:b", "may hold only"),
        ("models:/credit@latest", "reserved"),
        ("models:/credit@LATEST", "reserved"),
        ("models:/credit@v3", "reserved"),
        ("models:/credit@" + "a" * 256, "longer than 255"),
    ],
)
def test_parse_refuses(text, why):
    with pytest.raises(ModelRefError, match="is not a model reference") as caught:
        parse_model_ref(text)
    assert why in caught.value.render()
    assert isinstance(caught.value, StemmaError) and isinstance(caught.value, ValueError)


def test_alias_rule():
    assert is_valid_alias("champion") and is_valid_alias("previous-champion")
    assert is_valid_alias("v1-bf16") and is_valid_alias("a" * 255)
    assert not is_valid_alias("") and not is_valid_alias("a.b") and not is_valid_alias("v12")
    assert alias_problem("champion") is None
    assert check_alias("challenger") == "challenger"
    with pytest.raises(ModelRefError, match="not a valid model alias"):
        check_alias("champion\n")


def test_alias_rule_matches_mlflow():
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
    )

    for alias in ["champion", "a.b", "a b", "v1", "v1-x", "latest", "ü", "a-_9", "a/b", "x" * 256]:
        try:
            _validate_model_alias_name(alias)
            _validate_model_alias_name_reserved(alias)
            mlflow_accepts = True
        except MlflowException:
            mlflow_accepts = False
        assert is_valid_alias(alias) == mlflow_accepts, alias


def test_format_round_trips():
    assert format_model_ref("credit", version=7) == "models:/credit/7"
    assert format_model_ref("credit", alias="champion") == "models:/credit@champion"
    for text in ["models:/credit/7", "models:/credit@champion"]:
        assert str(parse_model_ref(text)) == text
    with pytest.raises(ValueError):
        format_model_ref("credit")
    with pytest.raises(ValueError):
        format_model_ref("credit", version="1", alias="champion")


def test_logged_model_id():
    assert logged_model_id("models:/m-0123abcd") == "m-0123abcd"
    assert logged_model_id("models:/credit/3") is None
    assert logged_model_id("models:/m-x/3") is None
    assert logged_model_id("runs:/m-0123/model") is None
