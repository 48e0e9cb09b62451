"""The endpoint's prediction log: rows in, Parquet parts out, in a real folder and in moto's S3.

The log is built from a spec as the endpoint builds it; its writer thread writes real parts,
which are read back with pyarrow and listed with batch scoring's `input_files`. One test
SIGKILLs a process that writes big parts, again and again, and reads every part it left.
"""

from __future__ import annotations

import gc
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stemma.components.data.prediction_log import LABELS, PREDICTIONS, SHADOW
from stemma.components.errors import SpecError
from stemma.components.platform.files import TEMP_PREFIX
from stemma.components.scoring.inputs import input_files
from stemma.components.serving import predlog
from stemma.components.serving.logstore import LogError
from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.predlog import PredictionLog
from stemma.components.spec import Spec
from tests.support import free_port

SIGNATURE = [("salary", "double"), ("age", "long"), ("car", "string")]
ID = "application_id"
TARGET = "approved"
PART_NAME = re.compile(r"^part-(\d{8}T\d{12})-[0-9a-f]{8}\.parquet$")
#: 2024-03-01 12:00:00 UTC.
NOON = 1_709_294_400.0


def make_spec(*, task: str = "binary", id_column: str | None = ID, **log: object) -> Spec:
    return Spec.model_validate(
        {
            "pipeline": {"name": "logged", "experiment": "logged", "model_name": "logged"},
            "data": {
                "path": "data/train.parquet",
                "task": task,
                "target": TARGET,
                "id": id_column,
                "features": {"numeric": ["salary", "age"], "categorical": ["car"]},
            },
            "endpoint": {"log": {"path": "logs", **log}},
        }
    )


def make_log(root: Path, *, signature=SIGNATURE, task: str = "binary", classes=(), **log: object):
    metrics = EndpointMetrics(8)
    built = PredictionLog.from_spec(
        make_spec(task=task, **log), root, signature, task, classes=classes, metrics=metrics
    )
    assert built is not None
    return built, metrics


def record(log: PredictionLog, request_id: str, rows: int = 2, *, received: float = NOON):
    """A request's scored rows, with integers in the double column as JSON gives them."""
    features = pa.table(
        {
            "salary": list(range(1000, 1000 + rows)),
            "age": [30 + row for row in range(rows)],
            "car": [f"car{row}" for row in range(rows)],
            "extra": [0] * rows,
        }
    )
    log.record(
        features,
        request_id=request_id,
        received=received,
        ids=[row if row % 2 else f"a-{row}" for row in range(rows)],
        versions=["3"] * rows,
        variants=["champion"] * rows,
        predictions=[row % 2 for row in range(rows)],
        scores=[0.25 + row / 100 for row in range(rows)],
        latency_ms=1.5,
        rows=[2 * row for row in range(rows)],
    )


def parts(root: Path, kind: str) -> list[Path]:
    """The parts a reader sees: temporary files (``.tmp-...``) are not parts."""
    found = (root / "logs" / kind).glob("*/*.parquet")
    return sorted(path for path in found if not path.name.startswith("."))


def counter(metrics: EndpointMetrics, name: str, kind: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == f"stemma_endpoint_{name}_total" and sample.labels["kind"] == kind:
                return sample.value
    return 0.0


def wait_for(condition, timeout_s: float = 10.0) -> None:
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# Rows in, parts out


def test_rows_shadow_rows_and_labels_round_trip_with_fixed_columns(tmp_path):
    log, metrics = make_log(tmp_path)
    log.start()
    record(log, "r-1", rows=3)
    record(log, "r-2", rows=1, received=NOON + 1.25)
    log.record_shadow(
        request_id="r-1",
        received=NOON,
        rows=[0, 4],
        ids=[1, "a-0"],
        version="4",
        predictions=[1, None],
        scores=[0.75, None],
    )
    assert log.record_labels(pa.table({ID: ["1", "a-0"], TARGET: [1, 0]})) == 2
    log.close()

    day = tmp_path / "logs" / PREDICTIONS / "2024-03-01"
    files = input_files(day)
    assert files == parts(tmp_path, PREDICTIONS) and len(files) == 1
    table = pq.read_table(day)
    assert table.schema == log.schemas[PREDICTIONS]
    assert table.schema.names == [
        "salary", "age", "car", ID, "prediction", "score", "stemma_request_id",
        "stemma_row", "stemma_time", "stemma_model_version", "stemma_variant",
        "stemma_latency_ms",
    ]  # fmt: skip
    assert table.schema.field("salary").type == pa.float64()  # request gave integers
    rows = table.to_pylist()
    assert [row["salary"] for row in rows] == [1000.0, 1001.0, 1002.0, 1000.0]
    assert [row[ID] for row in rows] == ["a-0", "1", "a-2", "a-0"]
    assert [row["stemma_row"] for row in rows] == [0, 2, 4, 0]
    assert [row["stemma_request_id"] for row in rows] == ["r-1"] * 3 + ["r-2"]
    assert rows[3]["stemma_time"] == datetime(2024, 3, 1, 12, 0, 1, 250000, tzinfo=UTC)
    assert {row["stemma_variant"] for row in rows} == {"champion"}
    assert [row["prediction"] for row in rows] == [0, 1, 0, 0]
    assert rows[1]["score"] == pytest.approx(0.26)

    shadow = pq.read_table(tmp_path / "logs" / SHADOW).to_pylist()
    assert shadow == [
        {
            ID: "1",
            "stemma_request_id": "r-1",
            "stemma_row": 0,
            "stemma_time": datetime(2024, 3, 1, 12, tzinfo=UTC),
            "stemma_model_version": "4",
            "stemma_variant": "shadow",
            "prediction": 1,
            "score": 0.75,
        },
        {
            ID: "a-0",
            "stemma_request_id": "r-1",
            "stemma_row": 4,
            "stemma_time": datetime(2024, 3, 1, 12, tzinfo=UTC),
            "stemma_model_version": "4",
            "stemma_variant": "shadow",
            "prediction": None,
            "score": None,
        },
    ]
    labels = pq.read_table(tmp_path / "logs" / LABELS)
    assert labels.schema == log.schemas[LABELS]
    assert labels.select([ID, TARGET]).to_pylist() == [
        {ID: "1", TARGET: 1},
        {ID: "a-0", TARGET: 0},
    ]
    assert counter(metrics, "log_rows", PREDICTIONS) == 4
    assert counter(metrics, "log_parts", SHADOW) == 1
    assert log.dropped_rows == 0


def test_a_regression_model_logs_no_prediction_column_and_float_targets(tmp_path):
    log, _ = make_log(tmp_path, task="regression")
    log.record(
        pa.table({"salary": [1.5], "age": [40], "car": ["c"]}),
        request_id="r",
        received=NOON,
        ids=None,
        versions=["1"],
        variants=["canary"],
        predictions=None,
        scores=[1234.5],
        latency_ms=2.0,
    )
    log.record_labels(pa.table({ID: ["9"], TARGET: [7]}))
    log.close()

    rows = pq.read_table(tmp_path / "logs" / PREDICTIONS).to_pylist()
    assert "prediction" not in rows[0] and rows[0]["score"] == 1234.5
    assert (rows[0][ID], rows[0]["stemma_variant"]) == (None, "canary")
    assert pq.read_table(tmp_path / "logs" / LABELS).schema.field(TARGET).type == pa.float64()


IRIS = ("setosa", "versicolor", "virginica")


@pytest.mark.parametrize(
    ("classes", "prediction_type"),
    [(IRIS, pa.string()), ((3, 5, 8), pa.int64())],
    ids=["text-classes", "whole-number-classes"],
)
def test_a_multiclass_log_holds_the_class_and_each_class_probability(
    tmp_path, classes, prediction_type
):
    log, _ = make_log(tmp_path, task="multiclass", classes=classes)
    first, second, third = classes
    keys = [str(name) for name in classes]
    given = [
        dict(zip(keys, (0.7, 0.2, 0.1), strict=True)),
        # A version of other classes (a later champion): the log's classes only.
        {keys[1]: 0.4, keys[2]: 0.35, "another": 0.25},
        None,  # the model's output was not finite
    ]
    log.record(
        pa.table({"salary": [1.0, 2.0, 3.0], "age": [30, 40, 50], "car": ["a", "b", "c"]}),
        request_id="r",
        received=NOON,
        ids=[1, 2, 3],
        versions=["2"] * 3,
        variants=["champion"] * 3,
        predictions=[first, second, None],
        scores=[0.7, 0.4, None],
        latency_ms=1.0,
        probabilities=given,
    )
    log.record_shadow(
        request_id="r",
        received=NOON,
        rows=[0],
        ids=[1],
        version="3",
        predictions=[third],
        scores=[0.5],
        probabilities=[dict(zip(keys, (0.1, 0.4, 0.5), strict=True))],
    )
    log.record_labels(pa.table({ID: ["1", "2"], TARGET: [str(first), "not a class"]}))
    log.close()

    columns = ["prediction", "score", *(f"probability_{name}" for name in classes)]
    served = pq.read_table(tmp_path / "logs" / PREDICTIONS)
    assert served.schema == log.schemas[PREDICTIONS]
    assert served.schema.names[3:9] == [ID, *columns]  # after the features
    assert served.schema.field("prediction").type == prediction_type
    assert served.select(columns).to_pylist() == [
        dict(zip(columns, (first, 0.7, 0.7, 0.2, 0.1), strict=True)),
        dict(zip(columns, (second, 0.4, None, 0.4, 0.35), strict=True)),
        dict.fromkeys(columns),
    ]
    shadow = pq.read_table(tmp_path / "logs" / SHADOW)
    assert shadow.select(columns).to_pylist() == [
        dict(zip(columns, (third, 0.5, 0.1, 0.4, 0.5), strict=True))
    ]
    labels = pq.read_table(tmp_path / "logs" / LABELS)
    assert labels.schema.field(TARGET).type == pa.string()  # as sent, matched later
    assert labels.column(TARGET).to_pylist() == [str(first), "not a class"]


def test_a_feature_named_like_a_class_probability_stops_the_start(tmp_path):
    signature = [*SIGNATURE, ("probability_virginica", "double")]
    with pytest.raises(SpecError) as raised:
        make_log(tmp_path, signature=signature, task="multiclass", classes=IRIS)
    assert (
        "the model's feature 'probability_virginica' is named like a column the endpoint's "
        "log adds" in raised.value.details
    )
    assert "probability_setosa" in raised.value.details[-1]
    # The same name is a plain feature of a binary model.
    make_log(tmp_path, signature=signature)


def test_parts_rotate_by_rows_and_close_writes_the_rest(tmp_path):
    log, metrics = make_log(tmp_path, rotate_rows=10, rotate_s=3600)
    log.start()
    for request in range(25):
        record(log, f"r-{request}", rows=1, received=NOON + request)
    wait_for(lambda: len(parts(tmp_path, PREDICTIONS)) == 2)
    log.close()

    written = parts(tmp_path, PREDICTIONS)
    assert [pq.read_metadata(part).num_rows for part in written] == [10, 10, 5]
    assert counter(metrics, "log_parts", PREDICTIONS) == 3
    table = pq.read_table(tmp_path / "logs" / PREDICTIONS)
    assert sorted(table.column("stemma_request_id").to_pylist()) == sorted(
        f"r-{request}" for request in range(25)
    )


def test_parts_rotate_by_time_without_more_rows(tmp_path):
    log, _ = make_log(tmp_path, rotate_rows=1000, rotate_s=0.2)
    log.start()
    record(log, "first", rows=3)
    wait_for(lambda: len(parts(tmp_path, PREDICTIONS)) == 1, timeout_s=5)
    record(log, "second", rows=2, received=NOON + 1)
    wait_for(lambda: len(parts(tmp_path, PREDICTIONS)) == 2, timeout_s=5)
    assert [pq.read_metadata(part).num_rows for part in parts(tmp_path, PREDICTIONS)] == [3, 2]
    log.close()


def test_parts_go_to_the_utc_day_of_their_first_row_named_by_its_time(tmp_path):
    log, _ = make_log(tmp_path, rotate_rows=1)
    before_midnight = datetime(2024, 3, 1, 23, 59, 59, 999999, tzinfo=UTC).timestamp()
    record(log, "late", rows=1, received=before_midnight)
    record(log, "early", rows=1, received=before_midnight + 0.5)
    log.close()

    days = sorted(folder.name for folder in (tmp_path / "logs" / PREDICTIONS).iterdir())
    assert days == ["2024-03-01", "2024-03-02"]
    late = parts(tmp_path, PREDICTIONS)[0]
    assert late.parent.name == "2024-03-01"
    assert PART_NAME.match(late.name).group(1) == "20240301T235959999999"
    assert input_files(late.parent) == [late]


def test_sampling_keeps_a_share_of_requests_chosen_by_request_id(tmp_path):
    log, _ = make_log(tmp_path, sample=0.3)
    ids = [f"request-{number}" for number in range(2000)]
    for request_id in ids:
        record(log, request_id, rows=2)
        log.record_shadow(
            request_id=request_id,
            received=NOON,
            rows=[0],
            ids=[1],
            version="4",
            predictions=[1],
            scores=[0.5],
        )
    log.close()

    predictions = pq.read_table(tmp_path / "logs" / PREDICTIONS)
    logged = set(predictions.column("stemma_request_id").to_pylist())
    assert logged == {request_id for request_id in ids if log.sampled(request_id)}
    assert 450 <= len(logged) <= 750  # 600 expected
    shadowed = set(
        pq.read_table(tmp_path / "logs" / SHADOW).column("stemma_request_id").to_pylist()
    )
    assert shadowed == logged  # a request's rows and its shadow rows together or not at all
    assert log.dropped_rows == 0


@pytest.mark.parametrize(
    ("signature", "id_column", "named"),
    [
        ([*SIGNATURE, ("score", "double")], ID, "feature 'score' is named like a column"),
        ([*SIGNATURE, ("stemma_time", "long")], ID, "feature 'stemma_time'"),
        ([*SIGNATURE, (ID, "long")], ID, f"data.id {ID!r} is a feature of the model"),
        (SIGNATURE, "stemma_row", "data.id 'stemma_row' is named like a column"),
    ],
    ids=["score", "stemma-column", "id-as-feature", "id-named-like-a-column"],
)
def test_columns_that_clash_with_the_log_stop_the_start(tmp_path, signature, id_column, named):
    with pytest.raises(SpecError) as raised:
        PredictionLog.from_spec(make_spec(id_column=id_column), tmp_path, signature, "binary")
    assert "the endpoint's log cannot hold the model's rows" in raised.value.headline
    assert any(named in line for line in raised.value.details), raised.value.details


def test_no_log_without_endpoint_log_and_none_outside_the_project(tmp_path):
    spec = make_spec().model_copy(update={"endpoint": None})
    assert PredictionLog.from_spec(spec, tmp_path, SIGNATURE, "binary") is None
    with pytest.raises(SpecError, match=re.escape("endpoint.log.path: ../elsewhere resolves")):
        PredictionLog.from_spec(make_spec(path="../elsewhere"), tmp_path, SIGNATURE, "binary")
    (tmp_path / "logs").write_text("a file where the folder goes")
    log = PredictionLog.from_spec(make_spec(), tmp_path, SIGNATURE, "binary")
    with pytest.raises(LogError, match="cannot be written to"):
        log.prepare()


# ---------------------------------------------------------------------------------------
# Failures and overload


def test_a_failed_write_keeps_its_rows_for_the_next_try(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(predlog, "RETRY_S", 0.2)
    log, metrics = make_log(tmp_path, rotate_rows=4, rotate_s=3600)
    log.start()
    blocker = tmp_path / "logs" / PREDICTIONS / "2024-03-01"
    blocker.write_text("a file where the day folder goes")
    record(log, "kept", rows=4)
    wait_for(lambda: counter(metrics, "log_failed_writes", PREDICTIONS) >= 1)
    assert "cannot write 4 predictions rows to" in caplog.text
    assert "trying again" in caplog.text
    blocker.unlink()
    wait_for(lambda: len(parts(tmp_path, PREDICTIONS)) == 1)
    log.close()

    table = pq.read_table(tmp_path / "logs" / PREDICTIONS)
    assert table.column("stemma_request_id").to_pylist() == ["kept"] * 4  # once, not twice
    assert log.dropped_rows == 0
    assert "car0" not in caplog.text  # values never reach the log lines


def test_past_max_buffered_rows_record_drops_and_counts_without_blocking(tmp_path):
    log, metrics = make_log(tmp_path, rotate_rows=100, max_buffered_rows=100, rotate_s=3600)
    log.start()
    # The writer cannot write: the buffer fills, and record() must still return at once.
    (tmp_path / "logs" / PREDICTIONS / "2024-03-01").write_text("blocks the day folder")
    features = pa.table({"salary": [1.0], "age": [30], "car": ["a"]})
    took = []
    gc.disable()  # a collection of the whole test process is no wait of record()'s
    try:
        for request in range(3000):
            started = time.perf_counter()
            log.record(
                features,
                request_id=f"r-{request}",
                received=NOON,
                ids=[request],
                versions=["3"],
                variants=["champion"],
                predictions=[1],
                scores=[0.5],
                latency_ms=1.0,
            )
            took.append(time.perf_counter() - started)
    finally:
        gc.enable()
    took.sort()
    assert took[len(took) // 2] < 0.001, f"median {took[len(took) // 2] * 1e6:.0f} us"
    assert took[int(len(took) * 0.99)] < 0.02, f"p99 {took[int(len(took) * 0.99)] * 1e3:.1f} ms"
    assert log.dropped(PREDICTIONS) == 2900
    assert counter(metrics, "log_dropped_rows", PREDICTIONS) == 2900
    assert log.record_labels(pa.table({ID: ["1"] * 101, TARGET: [1] * 101})) == 0
    assert log.dropped(LABELS) == 101

    (tmp_path / "logs" / PREDICTIONS / "2024-03-01").unlink()
    log.close()
    table = pq.read_table(tmp_path / "logs" / PREDICTIONS)
    assert table.column("stemma_request_id").to_pylist() == [f"r-{n}" for n in range(100)]
    record(log, "after-close", rows=1)
    assert log.dropped(PREDICTIONS) == 2901


def test_rows_a_caller_got_wrong_are_left_out_and_the_others_written(tmp_path, caplog):
    log, metrics = make_log(tmp_path)
    record(log, "good", rows=2)
    log.record(
        pa.table({"salary": ["not a number"], "age": [1], "car": ["c"]}),
        request_id="bad",
        received=NOON,
        ids=None,
        versions=["1"],
        variants=["champion"],
        predictions=[1],
        scores=[0.5],
        latency_ms=1.0,
    )
    log.close()
    table = pq.read_table(tmp_path / "logs" / PREDICTIONS)
    assert table.column("stemma_request_id").to_pylist() == ["good", "good"]
    assert log.dropped(PREDICTIONS) == 1 and counter(metrics, "log_rows", PREDICTIONS) == 2
    assert "1 row of predictions left out: column salary: string values" in caplog.text
    assert "not a number" not in caplog.text  # the log lines never quote a row's values


# ---------------------------------------------------------------------------------------
# Killed mid-write

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np, pyarrow as pa
    from stemma.components.serving.predlog import PredictionLog
    from tests.components.serving.test_predlog import SIGNATURE, make_spec

    root = Path(sys.argv[1])
    log = PredictionLog.from_spec(
        make_spec(rotate_rows=200_000, max_buffered_rows=600_000),
        root, SIGNATURE, "binary",
    )
    log.start()
    rows = 200_000
    rng = np.random.default_rng()
    features = pa.table({
        "salary": rng.random(rows), "age": rng.integers(18, 90, rows),
        "car": pa.array(rng.integers(0, 10**9, rows).astype(str)),
    })
    number = 0
    while True:  # faster than the writer: past 3 parts' rows, record() drops
        log.record(
            features, request_id=f"r-{number}", received=time.time(), ids=None,
            versions=["1"] * rows, variants=["champion"] * rows,
            predictions=np.zeros(rows, dtype=np.int64), scores=rng.random(rows),
            latency_ms=1.0,
        )
        number += 1
        time.sleep(0.05)
    """
)


def started(writer: subprocess.Popen, root: Path) -> bool:
    assert writer.poll() is None, "the writer exited"
    return (root / "logs" / PREDICTIONS).is_dir()


def test_a_writer_killed_mid_write_leaves_only_whole_parts(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    chance = random.Random(7)
    dead: list[int] = []
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=environment)
        try:
            wait_for(lambda writer=writer: started(writer, tmp_path), timeout_s=60)
            time.sleep(chance.uniform(0.5, 2.5))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        dead.append(writer.pid)

    visible = parts(tmp_path, PREDICTIONS)
    assert visible, "the writer wrote no part before it was killed"
    for part in visible:
        table = pq.read_table(part)  # whole: a cut file would fail to read
        assert table.num_rows == 200_000
    # A leftover the kills may or may not have left, and one of a writer that runs (ours).
    day = visible[0].parent
    (day / f"{TEMP_PREFIX}{dead[-1]}-part-dead.parquet").write_bytes(b"PAR1 cut short")
    live = day / f"{TEMP_PREFIX}{os.getpid()}-part-live.parquet"
    live.write_bytes(b"PAR1 being written")

    log, _ = make_log(tmp_path)
    log.prepare()
    left = sorted(entry.name for entry in day.iterdir() if entry.name.startswith("."))
    assert left == [live.name]
    assert input_files(day) == visible
    assert pq.read_table(day).num_rows == 200_000 * len(visible)


# ---------------------------------------------------------------------------------------
# S3


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on a free loopback port, with a bucket, named by AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "stemma-test",
        "AWS_SECRET_ACCESS_KEY": "stemma-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="predictions")
    try:
        yield client
    finally:
        server.stop()


def test_parts_land_under_the_s3_prefix_and_read_back(s3, tmp_path):
    import s3fs

    log, metrics = make_log(tmp_path, path="s3://predictions/online/credit", rotate_rows=3)
    log.start()
    for request in range(4):
        record(log, f"r-{request}", rows=1)
    log.record_labels(pa.table({ID: ["1"], TARGET: [1]}))
    log.close()

    keys = sorted(
        item["Key"] for item in s3.list_objects_v2(Bucket="predictions").get("Contents", [])
    )
    assert len(keys) == 3
    assert all(key.startswith("online/credit/") for key in keys)
    layout = re.compile(r"^online/credit/(predictions|labels)/(\d{4}-\d\d-\d\d)/(.+)$")
    for key in keys:
        kind, day, name = layout.match(key).groups()
        assert PART_NAME.match(name), key
        assert day == (
            "2024-03-01" if kind == PREDICTIONS else datetime.now(UTC).date().isoformat()
        )
    filesystem = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    table = pq.read_table("predictions/online/credit/predictions/2024-03-01", filesystem=filesystem)
    assert table.schema == log.schemas[PREDICTIONS]
    assert sorted(table.column("stemma_request_id").to_pylist()) == [f"r-{n}" for n in range(4)]
    assert counter(metrics, "log_parts", PREDICTIONS) == 2
    assert not tmp_path.joinpath("logs").exists()
