"""Credentials in URLs are masked wherever Stemma writes text; everything else is kept."""

from __future__ import annotations

import pytest

from stemma.components.platform import lineage
from stemma.components.platform.redaction import (
    contains_credentials,
    redact,
    redact_url,
    without_credentials,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pw@host:5000/x", "http://user:***@host:5000/x"),
        ("postgresql://app:p@ss@db/mlflow?x=1", "postgresql://app:***@db/mlflow?x=1"),
        ("https://ghp_token@github.com/o/r.git", "https://***@github.com/o/r.git"),
        (
            'open {"uri":"http://u:p@h","mail":"a@b.c"} now',
            'open {"uri":"http://u:***@h","mail":"a@b.c"} now',
        ),
        ("(see http://u:pw@h) and http://h/x@y", "(see http://u:***@h) and http://h/x@y"),
        ("http://user:***@host", "http://user:***@host"),
        (
            "tests@stemma.invalid, sqlite:///tmp/mlflow.db",
            "tests@stemma.invalid, sqlite:///tmp/mlflow.db",
        ),
        (
            '"stemma://dvc:data.dvc@4d34e097409e80fb49903fa73f2ee939.dir" via http://u:pw@h',
            '"stemma://dvc:data.dvc@4d34e097409e80fb49903fa73f2ee939.dir" via http://u:***@h',
        ),
    ],
    ids=[
        "password",
        "at-in-password",
        "token",
        "json",
        "prose",
        "already-masked",
        "no-url",
        "asset-key",
    ],
)
def test_redact_url_masks_only_the_user_part(text, expected):
    assert redact_url(text) == expected
    assert contains_credentials(text) == (text != expected)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://stemma:s3cret@127.0.0.1:5000/api", "http://127.0.0.1:5000/api"),
        ("https://ghp_token@mlflow.example.com", "https://mlflow.example.com"),
        ("http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api"),
    ],
)
def test_without_credentials_drops_the_whole_user_part(url, expected):
    assert without_credentials(url) == expected


def test_redact_walks_nested_values_without_changing_the_input():
    value = {"http://a:b@c": ["http://d:e@f", 3, ("x", None)], "n": {"k": "http://g:h@i/j"}}
    assert redact(value) == {
        "http://a:***@c": ["http://d:***@f", 3, ("x", None)],
        "n": {"k": "http://g:***@i/j"},
    }
    assert value["n"]["k"] == "http://g:h@i/j"


def test_asset_keys_of_data_versions_are_kept_whole():
    # `stemma lineage --json` prints every node's asset key: a data version's
    # `stemma://dvc:data.dvc@<md5>` is no user part and keeps its pointer and md5.
    key = lineage.asset_key(lineage.data_node_id("data.dvc", "4d34e097409e80fb49903fa73f2ee939"))
    document = {"nodes": [{"asset_key": key}], "tracking": "http://stemma:SECRET@mlflow:5000"}
    assert redact(document) == {
        "nodes": [{"asset_key": key}],
        "tracking": "http://stemma:***@mlflow:5000",
    }
    assert "dvc:data.dvc@4d34e097409e80fb49903fa73f2ee939" in key
    assert not contains_credentials(key)


def test_lineage_records_never_hold_a_password():
    facts = lineage.ScoringLineage(
        pipeline="credit",
        input_path="s3://reader:SECRET@bucket/batches",
        input_digest="0" * 32,
        input_files={"s3://reader:SECRET@bucket/batches/a.parquet": "1" * 32},
        data_pointer=None,
        data_md5=None,
        model_name="credit",
        model_version="1",
        weights_sha256="2" * 64,
        run_id="3" * 32,
        experiment_id="1",
        flow_run_id=None,
        output_path="outputs/scores",
        manifest_sha256="4" * 64,
        parts={},
        rows_scored=1,
        rows_rejected=0,
    )
    record = lineage.build_scoring_record(facts)
    assert "SECRET" not in str(record)
    assert "s3://reader:***@bucket/batches" in str(record)


def test_openlineage_events_never_hold_a_password():
    from openlineage.client.serde import Serde

    from stemma.components.lineage.openlineage import build_events
    from tests.components.lineage.test_lineage_export import _graph

    events = build_events(_graph(), tracking_uri="http://stemma:SECRET@mlflow:5000")
    text = "".join(Serde.to_json(event) for event in events)
    assert "SECRET" not in text
    assert "http://stemma:***@mlflow:5000" in text
