"""Batch scoring: registry loading, schema checks, chunked scoring, rejects, resume (real MLflow)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.runtime.loading import UntrustedModelError
from stemma.components.scoring import engine as scoring
from stemma.components.scoring import output, pipeline
from stemma.components.scoring.engine import (
    SUCCESS_FILE,
    check_input_schema,
    input_files,
    load_scoring_model,
    score_files,
)
from stemma.components.scoring.inputs import ChunkEncoder
from stemma.components.scoring.output import PROGRESS_FILE
from stemma.components.spec import FeaturesSpec
from tests.support import isolated_mlflow, log_trained_model

FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["elevel", "car"])
FEATURE_COLUMNS = ["salary", "age", "elevel", "car"]
MODEL = "credit-score"
ID = "application_id"
CARS = ["coupe", "sedan", "van"]


def synthetic_frame(rows: int, seed: int, first_id: int = 0) -> pd.DataFrame:
    """Raw rows as they arrive: float and int numerics, int and string categories."""
    rng = np.random.default_rng(seed)
    salary = rng.uniform(20_000, 150_000, rows)
    return pd.DataFrame(
        {
            ID: np.arange(first_id, first_id + rows, dtype=np.int64),
            "salary": salary,
            "age": rng.integers(18, 80, rows),
            "elevel": rng.integers(0, 5, rows),
            "car": rng.choice(CARS, rows),
            "approved": (salary > 80_000).astype(np.int64),
            "price": salary / 10 + rng.normal(0, 100, rows),
        }
    )


def with_bad_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with one row of each kind that cannot be scored (rows 3, 5, 8, 13, 21)."""
    bad = frame.copy()
    bad.loc[3, "salary"] = np.nan
    bad.loc[5, "salary"] = np.inf
    bad.loc[8, "car"] = None
    bad.loc[13, "car"] = "truck"
    bad.loc[21, ["elevel", "car"]] = [9, "truck"]
    return bad


EXPECTED_REASONS = {
    3: "salary is missing",
    5: "salary is infinite",
    8: "car is missing",
    13: "car=truck is not a known category",
    21: "elevel=9 is not a known category; car=truck is not a known category",
}


def register(
    client: MlflowClient,
    name: str,
    experiment_id: str,
    workdir: Path,
    *,
    seed: int,
    task: str = "binary",
    alias: str | None = None,
) -> str:
    """Log a small model from code and register it as a new version of ``name``."""
    frame = synthetic_frame(256, seed=1)
    target = "approved" if task == "binary" else "price"
    _, _, info, sha256, run_id = log_trained_model(
        frame,
        FEATURES,
        task=task,
        target=target,
        experiment_id=experiment_id,
        workdir=workdir,
        seed=seed,
    )
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        model_id=info.model_id,
        tags={WEIGHTS_TAG: sha256},
    )
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A local MLflow store with `credit-score` v1 (@champion) and v2; URIs restored after."""
    root = tmp_path_factory.mktemp("scoring-store")
    with isolated_mlflow():
        uri = configure_tracking(root)
        experiment_id = ensure_experiment("scoring", root)
        client = MlflowClient()
        register(client, MODEL, experiment_id, root / "v1", seed=3, alias="champion")
        register(client, MODEL, experiment_id, root / "v2", seed=4)
        yield {"root": root, "uri": uri, "experiment_id": experiment_id, "client": client}


@pytest.fixture(scope="module")
def champion(store):
    return load_scoring_model(f"models:/{MODEL}@champion")


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def read_parts(folder: Path) -> pd.DataFrame:
    parts = sorted(folder.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True)


def folder_bytes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------------
# Loading the model


def test_load_scoring_model_resolves_an_alias_without_pyfunc(store, champion):
    version = store["client"].get_model_version(MODEL, "1")

    assert (champion.model_uri, champion.version, champion.alias) == (
        f"models:/{MODEL}/1",
        "1",
        "champion",
    )
    assert champion.reference == f"models:/{MODEL}@champion"
    assert champion.weights_sha256 == version.tags[WEIGHTS_TAG]
    assert champion.run_id == version.run_id
    assert (champion.task, champion.threshold) == ("binary", 0.5)
    assert champion.signature_columns == [
        ("salary", "double"),
        ("age", "long"),
        ("elevel", "long"),
        ("car", "string"),
    ]
    assert not champion.network.training


def test_load_scoring_model_by_version_number(store):
    model = load_scoring_model(f"models:/{MODEL}/2")

    assert (model.model_uri, model.version, model.alias) == (f"models:/{MODEL}/2", "2", None)
    assert model.weights_sha256 == store["client"].get_model_version(MODEL, "2").tags[WEIGHTS_TAG]


@pytest.mark.parametrize(
    "reference,headline,detail",
    [
        (
            f"models:/{MODEL}@nope",
            f"model '{MODEL}' has no alias 'nope'",
            "its aliases: champion -> v1",
        ),
        (f"models:/{MODEL}/99", f"model '{MODEL}' has no version 99", "its versions: 1, 2"),
        ("models:/nobody@champion", "no registered model named 'nobody'", "train and register"),
        (MODEL, f"'{MODEL}' is not a model reference", "models:/<name>@<alias>"),
    ],
    ids=["missing-alias", "missing-version", "missing-model", "malformed"],
)
def test_load_scoring_model_explains_what_exists(store, reference, headline, detail):
    with pytest.raises(RegistryError) as caught:
        load_scoring_model(reference)

    assert caught.value.headline == headline
    assert any(detail in line for line in caught.value.details), caught.value.details


def test_tampered_weights_are_refused(store, tmp_path):
    client = store["client"]
    version = register(client, "tampered", store["experiment_id"], tmp_path / "model", seed=5)
    folder = Path(urlparse(client.get_model_version_download_uri("tampered", version)).path)
    weights = next(folder.rglob("weights.safetensors"))
    load_scoring_model(f"models:/tampered/{version}")  # intact: loads
    payload = bytearray(weights.read_bytes())
    payload[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(payload))

    with pytest.raises(UntrustedModelError, match="its files differ from the digests") as caught:
        load_scoring_model(f"models:/tampered/{version}")
    assert caught.value.details[0].startswith("artifacts/weights.safetensors: changed (recorded ")


def test_a_weights_tag_that_disagrees_with_the_file_is_refused(store, tmp_path):
    """Files intact, but the version's weights hash names other weights."""
    client = store["client"]
    version = register(client, "retagged", store["experiment_id"], tmp_path / "model", seed=5)
    client.set_model_version_tag("retagged", version, WEIGHTS_TAG, "0" * 64)

    with pytest.raises(UntrustedModelError, match="does not match the sha256 recorded"):
        load_scoring_model(f"models:/retagged/{version}")


# ---------------------------------------------------------------------------------------
# Input files and schemas


def test_input_files_lists_a_folder_sorted_and_skips_markers(tmp_path):
    for name in ("b.parquet", "a.parquet", "_SUCCESS", ".hidden.parquet", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.parquet").write_bytes(b"")

    assert input_files(tmp_path) == [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    assert input_files(tmp_path / "b.parquet") == [tmp_path / "b.parquet"]


@pytest.mark.parametrize(
    "names,message",
    [
        ([], "holds no .parquet or .csv files"),
        (["a.parquet", "b.csv"], "mixes csv and parquet files"),
    ],
    ids=["empty-folder", "mixed-formats"],
)
def test_input_files_refuses_unusable_folders(tmp_path, names, message):
    for name in names:
        (tmp_path / name).write_bytes(b"")

    with pytest.raises(DataError, match=message):
        input_files(tmp_path)


def test_input_files_refuses_missing_paths_and_other_formats(tmp_path):
    (tmp_path / "rows.json").write_text("{}")

    with pytest.raises(DataError, match="no such file or folder"):
        input_files(tmp_path / "missing")
    with pytest.raises(DataError, match=r"cannot score a \.json file"):
        input_files(tmp_path / "rows.json")


def test_schema_problems_of_every_file_are_reported_together(champion, tmp_path):
    good = synthetic_frame(10, seed=1)
    first = good.drop(columns=["salary"]).assign(car=1, notes="x")  # missing, wrong type, extra
    second = good.drop(columns=[ID]).assign(age=good["age"] + 0.5)  # no id, wrong type
    files = [
        write_parquet(first, tmp_path / "a.parquet"),
        write_parquet(second, tmp_path / "b.parquet"),
    ]

    with pytest.raises(DataError) as caught:
        check_input_schema(files, champion, id_column=ID, extra_columns="error")

    error = caught.value
    assert error.headline.startswith(f"the input does not match the signature of {MODEL} v1")
    assert "6 problems in 2 files" in error.headline
    assert error.details[:6] == [
        "a.parquet: missing 1 column: salary (double)",
        "a.parquet: column car is int64, the model needs string",
        "b.parquet: column age is double, the model needs long",
        f"b.parquet: missing the id column {ID}",
        "a.parquet: extra 3 columns: approved, price, notes",
        "b.parquet: extra 2 columns: approved, price",
    ]
    assert any("score.extra_columns: ignore" in line for line in error.details)


def test_extra_columns_are_returned_when_ignored(champion, tmp_path):
    path = write_parquet(synthetic_frame(10, seed=1).assign(notes="x"), tmp_path / "a.parquet")

    extras = check_input_schema([path], champion, id_column=ID, extra_columns="ignore")

    assert extras == ["approved", "price", "notes"]


def test_a_double_column_accepts_integers(champion, tmp_path):
    frame = synthetic_frame(10, seed=1)
    frame["salary"] = frame["salary"].round().astype(np.int32)

    assert check_input_schema(
        [write_parquet(frame, tmp_path / "a.parquet")],
        champion,
        id_column=None,
        extra_columns="ignore",
    ) == [ID, "approved", "price"]


def test_score_files_checks_the_schema_before_writing(champion, tmp_path):
    path = write_parquet(synthetic_frame(10, seed=1).drop(columns=["car"]), tmp_path / "in.parquet")

    with pytest.raises(DataError, match="missing 1 column: car"):
        score_files(champion, [path], tmp_path / "out", id_column=ID, chunk_rows=4, progress=False)

    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Scoring


def test_scores_equal_the_pyfunc_model_in_input_order(store, champion, tmp_path):
    frame = synthetic_frame(2_500, seed=7)
    source = write_parquet(frame, tmp_path / "in.parquet")
    threads = torch.get_num_threads()

    result = score_files(
        champion, [source], tmp_path / "out", id_column=ID, chunk_rows=1_000, progress=False
    )

    scored = read_parts(tmp_path / "out")
    expected = mlflow.pyfunc.load_model(champion.model_uri).predict(frame[FEATURE_COLUMNS])
    assert list(scored.columns) == [ID, "prediction", "score"]
    assert scored[ID].tolist() == frame[ID].tolist()
    np.testing.assert_allclose(scored["score"], expected["score"], rtol=1e-6)
    assert scored["prediction"].tolist() == expected["prediction"].tolist()
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [
        "part-00000-00000.parquet",
        "part-00000-00001.parquet",
        "part-00000-00002.parquet",
    ]
    assert (result.rows_input, result.rows_scored, result.rows_rejected) == (2_500, 2_500, 0)
    assert (result.parts_written, result.parts_skipped) == (3, 0)
    assert torch.get_num_threads() == threads, "torch's thread count must be restored"


def test_parts_carry_the_model_and_input_digest(champion, tmp_path):
    source = write_parquet(synthetic_frame(50, seed=7), tmp_path / "in.parquet")

    result = score_files(
        champion, [source], tmp_path / "out", id_column=ID, chunk_rows=20, progress=False
    )

    part = tmp_path / "out" / "part-00000-00002.parquet"
    fields = {
        key.decode(): value.decode()
        for key, value in pq.read_metadata(part).metadata.items()
        if key.startswith(b"stemma.")
    }
    # The footer's key-value metadata and the Arrow schema pandas and pyarrow read agree
    # (the metadata goes into the footer once the input is hashed, after the rows).
    schema = pq.read_schema(part)
    assert {key.decode(): value.decode() for key, value in schema.metadata.items()} == fields
    assert schema.field("prediction").nullable is False
    assert fields == {
        "stemma.model_uri": f"models:/{MODEL}/1",
        "stemma.model_version": "1",
        "stemma.weights_sha256": champion.weights_sha256,
        "stemma.input_digest": hashlib.md5(source.read_bytes()).hexdigest(),
        "stemma.input_file": "in.parquet",
        "stemma.fingerprint": result.manifest["fingerprint"],
    }


@pytest.mark.parametrize(
    "ids",
    [
        pa.array(np.arange(100, dtype=np.int64)),
        pa.array([f"a-{i}" for i in range(100)], pa.large_string()),
        pa.array(np.arange(100).astype("datetime64[ns]")).cast(pa.timestamp("ns", tz="UTC")),
        pa.array([f"a-{i % 7}" for i in range(100)]).dictionary_encode(),
        pa.array([None if i % 9 == 0 else i for i in range(100)], pa.int32()),
    ],
    ids=["int64", "large_string", "timestamp", "dictionary", "nullable"],
)
def test_a_part_whose_metadata_comes_last_has_the_bytes_pyarrow_writes(ids):
    """Parts are encoded before the input's digest is known, and the metadata (with the
    schema pyarrow stores, ARROW:schema) is added to the footer at the end: the bytes are
    those of a writer given the whole schema up front, so parts written before this
    still resume."""
    from stemma.components.scoring.output import parquet_options, prefixed, stored_schema

    schema = pa.schema(
        [
            pa.field(ID, ids.type),
            pa.field("prediction", pa.int64(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
        ]
    )
    table = pa.Table.from_arrays(
        [ids, pa.array(np.arange(100) % 2), pa.array(np.linspace(0, 1, 100))], schema=schema
    )
    whole = schema.with_metadata(prefixed({"input_digest": "0" * 32, "model_version": "3"}))
    upfront, late = pa.BufferOutputStream(), pa.BufferOutputStream()
    with pq.ParquetWriter(upfront, whole, **parquet_options(whole)) as writer:
        writer.write_table(table.replace_schema_metadata(whole.metadata))
    with pq.ParquetWriter(late, schema, store_schema=False, **parquet_options(schema)) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata(stored_schema(whole))

    assert late.getvalue().to_pybytes() == upfront.getvalue().to_pybytes()
    assert pq.read_table(pa.BufferReader(late.getvalue())).schema.equals(whole, check_metadata=True)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_every_row_is_scored_or_rejected_once_with_its_reason(champion, tmp_path, suffix):
    frames = [with_bad_rows(synthetic_frame(40, seed=8)), synthetic_frame(30, seed=9, first_id=40)]
    folder = tmp_path / "batches"
    folder.mkdir()
    for index, frame in enumerate(frames):
        path = folder / f"day_{index}.{suffix}"
        frame.to_parquet(path, index=False) if suffix == "parquet" else frame.to_csv(
            path, index=False
        )

    result = score_files(
        champion, input_files(folder), tmp_path / "out", id_column=ID, chunk_rows=16, progress=False
    )

    scored = read_parts(tmp_path / "out")
    rejects = read_parts(tmp_path / "out" / "rejects")
    assert list(rejects.columns) == [ID, "row", "reason", *FEATURE_COLUMNS]
    assert dict(zip(rejects["row"], rejects["reason"], strict=True)) == EXPECTED_REASONS
    assert rejects[ID].tolist() == sorted(EXPECTED_REASONS)
    everything = pd.concat([frame[ID] for frame in frames]).tolist()
    assert sorted(scored[ID].tolist() + rejects[ID].tolist()) == everything
    assert scored[ID].tolist() == [i for i in everything if i not in EXPECTED_REASONS]
    assert rejects.loc[rejects["row"] == 13, "car"].item() == "truck"  # the raw value is kept
    manifest = json.loads((tmp_path / "out" / SUCCESS_FILE).read_text())
    assert manifest["rows"] == {"input": 70, "scored": 65, "rejected": 5}
    assert [f["rows"] for f in manifest["input"]["files"]] == [40, 30]
    assert [p["name"] for p in manifest["rejects"]] == [
        "part-00000-00000.parquet",
        "part-00000-00001.parquet",
    ]
    assert len(manifest["parts"]) == 5  # 3 chunks of day_0, 2 of day_1
    assert sum(manifest["score_histogram"]["counts"]) == 65
    assert result.rows_rejected == 5


def test_error_policy_stops_and_names_file_rows_and_reasons(champion, tmp_path):
    source = write_parquet(with_bad_rows(synthetic_frame(40, seed=8)), tmp_path / "in.parquet")

    with pytest.raises(DataError) as caught:
        score_files(
            champion,
            [source],
            tmp_path / "out",
            id_column=ID,
            chunk_rows=100,
            invalid_rows="error",
            unknown_categories="error",
            progress=False,
        )

    error = caught.value
    assert error.headline.startswith(f"{source}: 5 rows cannot be scored")
    assert error.details[:5] == [f"row {row}: {reason}" for row, reason in EXPECTED_REASONS.items()]
    assert any("score.invalid_rows: reject" in line for line in error.details)
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


# With model threads, a chunk is still being scored when the next one is checked: the
# error in the second chunk must not lose the first.
@pytest.mark.parametrize("threads", [1, 3])
def test_invalid_rows_error_while_unknown_categories_are_rejected(champion, tmp_path, threads):
    frame = synthetic_frame(20, seed=8)
    frame.loc[4, "car"] = "truck"
    frame.loc[15, "salary"] = np.nan  # in the second chunk
    source = write_parquet(frame, tmp_path / "in.parquet")

    with pytest.raises(DataError, match=r"1 row cannot be scored.*\n  row 15: salary is missing"):
        score_files(
            champion,
            [source],
            tmp_path / "out",
            id_column=ID,
            chunk_rows=10,
            invalid_rows="error",
            unknown_categories="reject",
            threads=threads,
            progress=False,
        )

    rejects = read_parts(tmp_path / "out" / "rejects")  # the first chunk was done
    assert rejects["reason"].tolist() == ["car=truck is not a known category"]
    assert len(read_parts(tmp_path / "out")) == 9


def test_unknown_categories_can_be_scored_as_unseen(champion, tmp_path):
    frame = synthetic_frame(30, seed=8)
    frame.loc[[2, 7], "car"] = "truck"
    source = write_parquet(frame, tmp_path / "in.parquet")

    result = score_files(
        champion,
        [source],
        tmp_path / "out",
        id_column=ID,
        chunk_rows=16,
        unknown_categories="score",
        progress=False,
    )

    scored = read_parts(tmp_path / "out")
    expected = mlflow.pyfunc.load_model(champion.model_uri).predict(frame[FEATURE_COLUMNS])
    assert result.rows_rejected == 0
    np.testing.assert_allclose(scored["score"], expected["score"], rtol=1e-6)


def test_regression_scores_and_histogram_span_the_values(store, tmp_path):
    version = register(
        store["client"], "price", store["experiment_id"], tmp_path / "m", seed=2, task="regression"
    )
    model = load_scoring_model(f"models:/price/{version}")
    frame = synthetic_frame(300, seed=3)
    source = write_parquet(frame, tmp_path / "in.parquet")

    result = score_files(
        model, [source], tmp_path / "out", id_column=None, chunk_rows=128, progress=False
    )

    scored = read_parts(tmp_path / "out")
    expected = mlflow.pyfunc.load_model(model.model_uri).predict(frame[FEATURE_COLUMNS])
    assert list(scored.columns) == ["score"]
    np.testing.assert_allclose(scored["score"], expected["score"], rtol=1e-6)
    histogram = result.score_histogram
    assert histogram["edges"][0] == pytest.approx(scored["score"].min())
    assert histogram["edges"][-1] == pytest.approx(scored["score"].max())
    assert sum(histogram["counts"]) == 300 and len(histogram["counts"]) == 20


# ---------------------------------------------------------------------------------------
# The output folder


def test_complete_output_is_not_rewritten(champion, tmp_path):
    source = write_parquet(synthetic_frame(50, seed=7), tmp_path / "in.parquet")
    out = tmp_path / "out"
    first = score_files(champion, [source], out, id_column=ID, chunk_rows=20, progress=False)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}

    again = score_files(champion, [source], out, id_column=ID, chunk_rows=20, progress=False)

    assert again.already_complete and not first.already_complete
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps
    assert again.output_digest == first.output_digest
    assert (again.parts_written, again.parts_skipped, again.rows_scored) == (0, 3, 50)
    assert "already holds the scores of credit-score v1" in again.summary()


@pytest.mark.parametrize("change", ["model", "input", "chunk_rows"])
def test_a_change_of_model_or_input_invalidates_the_old_parts(store, champion, tmp_path, change):
    source = write_parquet(synthetic_frame(50, seed=7), tmp_path / "in.parquet")
    out = tmp_path / "out"
    score_files(champion, [source], out, id_column=ID, chunk_rows=10, progress=False)  # 5 parts
    model, chunk_rows = champion, 10
    if change == "model":
        model = load_scoring_model(f"models:/{MODEL}/2")
    elif change == "input":
        write_parquet(synthetic_frame(30, seed=8), source)
    else:
        chunk_rows = 25

    result = score_files(model, [source], out, id_column=ID, chunk_rows=chunk_rows, progress=False)

    assert result.invalidated and result.parts_skipped == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == [entry["name"] for entry in result.manifest["parts"]]
    versions = {pq.read_metadata(p).metadata[b"stemma.model_version"] for p in parts}
    assert versions == {model.version.encode()}
    assert len(read_parts(out)) == result.rows_input


def test_foreign_files_in_the_output_are_refused_and_kept(champion, tmp_path):
    source = write_parquet(synthetic_frame(20, seed=7), tmp_path / "in.parquet")
    out = tmp_path / "out"
    (out / "rejects").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "rejects" / "keep.csv").write_text("mine")

    with pytest.raises(DataError, match="holds files Stemma did not write") as caught:
        score_files(champion, [source], out, id_column=ID, chunk_rows=10, progress=False)

    assert caught.value.details[0] == "notes.txt, rejects/keep.csv"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "rejects"]


def test_output_folder_holding_the_input_is_refused(champion, tmp_path):
    source = write_parquet(synthetic_frame(20, seed=7), tmp_path / "in.parquet")

    with pytest.raises(DataError, match="the output folder holds input files"):
        score_files(champion, [source], tmp_path, id_column=ID, chunk_rows=10, progress=False)


def test_summary_reads_as_one_line(champion, tmp_path):
    source = write_parquet(with_bad_rows(synthetic_frame(40, seed=8)), tmp_path / "in.parquet")

    result = score_files(
        champion, [source], tmp_path / "out", id_column=ID, chunk_rows=16, progress=False
    )

    summary = result.summary()
    assert summary.startswith(f"scored 35 rows (5 rejected) with {MODEL} v1 in ")
    assert summary.endswith(f"-> {tmp_path / 'out'} (3 parts)")
    assert "\n" not in summary
    assert set(result.chunk_latency_ms) == {"p50", "p95", "p99"}
    assert (
        result.output_digest
        == hashlib.sha256((tmp_path / "out" / SUCCESS_FILE).read_bytes()).hexdigest()
    )


def test_a_progress_bar_counts_rows_per_second_when_asked_or_in_a_terminal(
    champion, tmp_path, capsys
):
    source = write_parquet(synthetic_frame(2_000, seed=9), tmp_path / "in.parquet")

    score_files(champion, [source], tmp_path / "bar", id_column=ID, chunk_rows=500, progress=True)
    shown = capsys.readouterr().err
    # The total comes from the Parquet footer, so the bar ends at 100% with a rate.
    assert f"score {MODEL} v1" in shown
    assert "100%" in shown and "2.00k/2.00k" in shown
    assert re.search(r"[\d.]+k?rows/s", shown)

    # By default the bar shows only when stderr is a terminal (captured here: it is not).
    score_files(champion, [source], tmp_path / "quiet", id_column=ID, chunk_rows=500)
    assert capsys.readouterr().err == ""


KILLABLE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from stemma.components.scoring.engine import load_scoring_model, score_files
    model = load_scoring_model(sys.argv[1])
    score_files(model, [Path(sys.argv[2])], Path(sys.argv[3]), id_column=sys.argv[4],
                chunk_rows=int(sys.argv[5]), threads=1, progress=False)
    """
)


def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(store, champion, tmp_path):
    rows, chunk_rows = 100_000, 1_000
    frame = synthetic_frame(rows, seed=11)
    for row in range(17, rows, 997):  # rejects in many chunks
        frame.loc[row, "salary"] = np.nan
    source = write_parquet(frame, tmp_path / "in.parquet")
    reference = f"models:/{MODEL}@champion"
    killed = tmp_path / "killed"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_REGISTRY_URI": store["uri"]}

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLABLE_SCRIPT,
            reference,
            str(source),
            str(killed),
            ID,
            str(chunk_rows),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(list(killed.glob("part-*.parquet"))) < 5 and child.poll() is None:
        assert time.monotonic() < deadline, "the scoring child wrote no parts"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    visible = sorted(killed.glob("part-*.parquet"))
    assert 5 <= len(visible) < rows // chunk_rows and not (killed / SUCCESS_FILE).exists()
    for part in visible:  # a part is either absent or whole
        assert pq.read_metadata(part).num_rows > 0

    resumed = score_files(
        champion, [source], killed, id_column=ID, chunk_rows=chunk_rows, threads=2, progress=False
    )
    uninterrupted = score_files(
        champion,
        [source],
        tmp_path / "clean",
        id_column=ID,
        chunk_rows=chunk_rows,
        threads=2,
        progress=False,
    )

    assert resumed.parts_skipped == len(visible) and resumed.parts_written > 0
    assert not [p for p in killed.rglob("*") if p.name.startswith(".tmp-")]
    assert folder_bytes(killed) == folder_bytes(tmp_path / "clean")
    assert resumed.output_digest == uninterrupted.output_digest
    assert (resumed.rows_scored, resumed.rows_rejected) == (rows - 101, 101)
    assert (
        json.loads((killed / PROGRESS_FILE).read_text())["fingerprint"]
        == resumed.manifest["fingerprint"]
    )


def score_with_threads(
    model, source: Path, root: Path, threads: tuple[int | None, ...], chunk_rows: int
) -> dict[int | None, Path]:
    """Score ``source`` once per thread count, each into its own folder under ``root``."""
    folders = {count: root / f"threads-{count}" for count in threads}
    for count, folder in folders.items():
        score_files(
            model,
            [source],
            folder,
            id_column=ID,
            chunk_rows=chunk_rows,
            threads=count,
            progress=False,
        )
    return folders


def test_the_output_does_not_depend_on_how_many_threads_ran_the_model(champion, tmp_path):
    """By default the chunks left once the input is read run on every core; one thread
    and three give the same bytes too."""
    source = write_parquet(synthetic_frame(60_000, seed=21), tmp_path / "in.parquet")
    # Three forward batches per chunk.
    folders = score_with_threads(champion, source, tmp_path, (None, 1, 3), chunk_rows=20_000)

    assert len(list(folders[None].glob("part-*.parquet"))) == 3
    assert folder_bytes(folders[None]) == folder_bytes(folders[1]) == folder_bytes(folders[3])


# ---------------------------------------------------------------------------------------
# The runtime the network runs on


def dense_outputs(model, frame: pd.DataFrame) -> torch.Tensor:
    """The network's raw outputs on Preprocessor.transform's matrix (the reference)."""
    matrix = torch.from_numpy(model.preprocessor.transform(frame))
    with torch.inference_mode():
        return model.network(matrix)


def test_the_champion_runs_through_its_runtime_on_the_matrix_transform_builds(champion, tmp_path):
    frame = synthetic_frame(500, seed=11)
    frame.loc[[4, 9], "car"] = "truck"  # unknown categories encode as all zeros
    encoder = ChunkEncoder(champion.preprocessor)
    columns = encoder.columns(pa.Table.from_pandas(frame, preserve_index=False))
    matrix = encoder.matrix(columns, 0, len(frame))

    np.testing.assert_array_equal(matrix, champion.preprocessor.transform(frame))
    expected = dense_outputs(champion, frame).numpy()
    np.testing.assert_allclose(champion.runtime.run(matrix), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        torch.from_numpy(expected[4]), dense_outputs(champion, frame.assign(car="van"))[4]
    )
    # The manifest and the summary name the backend that scored.
    source = write_parquet(frame.assign(car="van"), tmp_path / "in.parquet")
    result = score_files(champion, [source], tmp_path / "out", id_column=ID, chunk_rows=200)
    runtime = result.manifest["model"]["runtime"]
    assert runtime == {"backend": champion.runtime.backend, "reason": champion.runtime.reason}
    assert f" on {result.backend}) -> " in result.summary()


class Tanh(torch.nn.Module):
    """A network of the user's own: no ``layers`` stack, a Tanh in the middle."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = torch.nn.Linear(width, 8)
        self.last = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.first(x)))


def test_any_network_scores_as_it_computes_with_the_eager_reason_in_the_summary(champion, tmp_path):
    import dataclasses

    from stemma.components.runtime.backends import build_runtime

    preprocessor = champion.preprocessor
    torch.manual_seed(0)
    custom = Tanh(preprocessor.n_inputs).eval()
    runtime = build_runtime(custom, width=preprocessor.n_inputs, eager_reason="no ONNX file here")
    model = dataclasses.replace(champion, network=custom, runtime=runtime)
    frame = synthetic_frame(3_000, seed=12)
    source = write_parquet(frame, tmp_path / "in.parquet")

    result = score_files(model, [source], tmp_path / "out", id_column=ID, chunk_rows=1_000)

    expected = preprocessor.decode_output(dense_outputs(model, frame).numpy())
    np.testing.assert_allclose(read_parts(tmp_path / "out")["score"], expected, rtol=1e-6)
    assert result.backend == "eager (no ONNX file here)"
    assert "rows/s on eager (no ONNX file here)) -> " in result.summary()


def test_the_backend_is_part_of_the_fingerprint_and_both_score_alike(champion, tmp_path):
    """Eager and ONNX Runtime may differ in the last bits: a folder scored by one is
    scored again by the other, never mixed; the scores agree to float rounding."""
    if champion.runtime.backend != "onnxruntime":
        pytest.skip(f"the champion runs on {champion.runtime.label}")
    eager = load_scoring_model(f"models:/{MODEL}@champion", backend="eager")
    assert eager.runtime.backend == "eager"
    source = write_parquet(synthetic_frame(5_000, seed=14), tmp_path / "in.parquet")
    fast = score_files(champion, [source], tmp_path / "out", id_column=ID, chunk_rows=2_000)
    fast_scores = read_parts(tmp_path / "out")["score"].to_numpy()

    slow = score_files(eager, [source], tmp_path / "out", id_column=ID, chunk_rows=2_000)

    assert slow.invalidated and slow.parts_skipped == 0
    assert slow.manifest["fingerprint"] != fast.manifest["fingerprint"]
    np.testing.assert_allclose(read_parts(tmp_path / "out")["score"], fast_scores, rtol=1e-6)


def test_parts_store_integers_delta_encoded_and_scores_uncompressed(champion, tmp_path):
    source = write_parquet(synthetic_frame(3_000, seed=13), tmp_path / "in.parquet")
    score_files(champion, [source], tmp_path / "out", id_column=ID, chunk_rows=5_000)

    (part,) = (tmp_path / "out").glob("part-*.parquet")
    group = pq.ParquetFile(part).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert "DELTA_BINARY_PACKED" in columns[ID].encodings
    assert "DELTA_BINARY_PACKED" in columns["prediction"].encodings
    assert "PLAIN" in columns["score"].encodings
    # No dictionary is tried: near-unique scores, and 0/1 predictions cheaper delta-encoded.
    assert not any("DICTIONARY" in encoding for c in columns.values() for encoding in c.encodings)
    assert {columns[name].compression for name in columns} == {"UNCOMPRESSED"}
    # Min/max only where they can tell parts apart: the ids, not the 0-1 columns.
    assert columns[ID].is_stats_set
    assert not columns["score"].is_stats_set and not columns["prediction"].is_stats_set
    # Sequential ids take a few bits each, not eight bytes.
    assert columns[ID].total_compressed_size < 3_000


def test_parts_are_written_a_row_group_at_a_time_as_their_scores_come(
    store, champion, tmp_path, monkeypatch
):
    """Row groups of a fixed size, each written once the batches holding its rows are
    done: the bytes do not depend on how many threads scored, rejected rows leave the
    kept rows' ids and scores aligned, and the prediction and score are required columns."""
    monkeypatch.setattr(pipeline, "PART_ROW_GROUP_ROWS", 1_500)
    monkeypatch.setattr(pipeline, "FORWARD_BATCH_ROWS", 700)  # row groups span batches
    frame = with_bad_rows(synthetic_frame(9_000, seed=29))
    source = write_parquet(frame, tmp_path / "in.parquet")
    folders = score_with_threads(champion, source, tmp_path, (1, 2), chunk_rows=4_000)

    assert folder_bytes(folders[1]) == folder_bytes(folders[2])
    parts = sorted(folders[2].glob("part-*.parquet"))
    sizes = [
        [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        for metadata in (pq.read_metadata(part) for part in parts)
    ]
    assert sizes == [[1_500, 1_500, 995], [1_500, 1_500, 1_000], [1_000]]  # 5 rows rejected
    schema = pq.read_schema(parts[0])
    assert schema.field(ID).nullable
    assert not schema.field("prediction").nullable and not schema.field("score").nullable
    scored = read_parts(folders[2])
    kept = frame.drop(index=list(EXPECTED_REASONS))
    expected = mlflow.pyfunc.load_model(champion.model_uri).predict(kept[FEATURE_COLUMNS])
    assert scored[ID].tolist() == kept[ID].tolist()
    np.testing.assert_allclose(scored["score"], expected["score"], rtol=1e-6)
    assert scored["prediction"].tolist() == expected["prediction"].tolist()


def test_integer_categories_are_looked_up_whatever_their_span_and_type():
    """Vocabularies from 1, from 0, through negatives and too wide for a table; values
    inside, between, below and above them, in narrow and wide integer types."""
    vocabularies = {
        "from_one": [3, 1, 5, 2],
        "from_zero": [0, 4, 2],
        "negative": [-3, 0, 2],
        "wide": [0, 70_000, 5],
    }
    frame = pd.DataFrame(
        {name: np.resize(values, 8) for name, values in vocabularies.items()} | {"x": 1.0}
    )
    preprocessor = fit_preprocessor(
        frame, FeaturesSpec(numeric=["x"], categorical=list(vocabularies)), task="binary"
    )
    encoder = ChunkEncoder(preprocessor)
    probes = [-(2**40), -4, -3, -1, 0, 1, 2, 3, 4, 5, 6, 69_999, 70_000, 2**40]
    nonnegative = [v for v in probes if v >= 0]  # columns with no value below any span
    for arrow_type, candidates in itertools.product(
        (pa.int64(), pa.int32(), pa.int16()), (probes, nonnegative)
    ):
        values = [v for v in candidates if -(2**15) <= v < 2**15 or arrow_type == pa.int64()]
        table = pa.table(
            {name: pa.array(values, arrow_type) for name in vocabularies}
            | {"x": pa.array(np.ones(len(values)))}
        )
        columns = encoder.columns(table)
        for name, vocabulary, codes, known in zip(
            vocabularies, preprocessor.vocabularies, columns.codes, columns.all_known, strict=True
        ):
            vocabulary = [int(v) for v in vocabulary]
            expected = [vocabulary.index(v) if v in vocabulary else -1 for v in values]
            assert codes.tolist() == expected, (name, arrow_type)
            assert not known
        reasons = {(problem.column, problem.kind) for problem in columns.problems}
        assert reasons == {(name, "unknown") for name in vocabularies}


def test_huge_finite_values_are_not_reported_as_infinite():
    """Values near the float64 limit (whose sum overflows) are finite: only a real
    infinity is reported as infinite, and NaN as missing."""
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "c": [1, 2, 1]})
    preprocessor = fit_preprocessor(
        frame, FeaturesSpec(numeric=["x"], categorical=["c"]), task="binary"
    )
    encoder = ChunkEncoder(preprocessor)
    huge = pa.table({"x": [1e308, 1e308, 1.0], "c": [1, 2, 1]})
    assert encoder.columns(huge).problems == []
    broken = pa.table({"x": [1e308, np.inf, np.nan], "c": [1, 2, 1]})
    problems = {problem.kind: problem.mask.tolist() for problem in encoder.columns(broken).problems}
    assert problems == {"missing": [False, False, True], "infinite": [False, True, False]}


def test_the_score_histogram_bins_exactly_as_numpy_does():
    bins = scoring.HISTOGRAM_BINS
    edges = np.linspace(0.0, 1.0, bins + 1)
    # The shortcut moves scores down only: no score times bins falls short of an edge
    # the score has reached.
    assert all(np.floor(edges[k] * bins) >= k for k in range(1, bins))
    rng = np.random.default_rng(3)
    around_edges = np.concatenate([edges, np.nextafter(edges, -1), np.nextafter(edges, 2)])
    samples = {
        "uniform": rng.random(100_000),
        "edges and their neighbours": np.clip(around_edges, 0.0, 1.0),
        "ends": np.array([0.0, 1.0, 1.0]),
        "empty": np.empty(0),
        "outside [0, 1] and NaN": np.array([-0.1, 0.2, 1.5, np.nan, 0.7]),
    }
    for name, values in samples.items():
        expected = np.histogram(values, bins=bins, range=(0.0, 1.0))[0]
        assert output.unit_histogram(values).tolist() == expected.tolist(), name
