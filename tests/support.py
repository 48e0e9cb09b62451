"""Helpers shared by tests: MLflow stores of their own, and real git + DVC projects."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Small enough to train in seconds, large enough for a meaningful test split.
SMALL_TRAIN_ROWS = 4_000
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Stemma Tests",
    "GIT_AUTHOR_EMAIL": "tests@stemma.invalid",
    "GIT_COMMITTER_NAME": "Stemma Tests",
    "GIT_COMMITTER_EMAIL": "tests@stemma.invalid",
}

#: Variables through which MLflow (and Stemma's tracking defaults) pick a store.
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def isolated_mlflow() -> Iterator[None]:
    """Clear MLflow's store settings for the block, and restore them afterwards.

    Ends any run the block left active, so one test's run never leaks into the next.
    """
    import mlflow

    saved = {name: os.environ.pop(name, None) for name in URI_VARIABLES}
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def log_trained_model(
    frame,
    features,
    *,
    task: str,
    target: str,
    experiment_id: str,
    workdir,
    hidden: tuple[int, ...] = (8,),
    dropout: float = 0.0,
    seed: int = 7,
):
    """Fit a preprocessor, build a seeded network and log both as a model in a new run.

    The network keeps its seeded initial weights: tests of logging, serving and scoring
    need a real model, not a good one.

    Returns:
        ``(preprocessor, network, model_info, weights_sha256, run_id)``.
    """
    import mlflow

    from stemma.components.model.artifact import log_pyfunc_model
    from stemma.components.model.networks import build_network, network_config
    from stemma.components.model.preprocessing import fit_preprocessor
    from stemma.components.spec import ModelSpec

    preprocessor = fit_preprocessor(frame, features, task=task, target=target)
    config = network_config(ModelSpec(hidden=list(hidden), dropout=dropout))
    network = build_network(config, preprocessor.n_inputs, preprocessor.n_outputs, seed=seed)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info, sha256 = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame,
            task=task,
            workdir=workdir,
        )
    return preprocessor, network, info, sha256, run.info.run_id


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(
        ["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def dvc_add(root: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(root / "data"))


def rewrite_training_table(project: Path, change) -> None:
    """Change the worked example's training table with ``change`` (a DataFrame in, a
    DataFrame out) and record the change with DVC, as a user would."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = project / "data" / "credit" / "train.parquet"
    frame = change(pd.read_parquet(path))
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    dvc_add(project)


def build_project(root: Path, repo_root: Path, *, train_rows: int) -> Path:
    """A Stemma project: git repo, DVC repo, the worked example's spec and generated data."""
    from dvc.repo import Repo

    from stemma.examples.credit import generate_credit_data

    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    Repo.init(str(root))
    (root / "configs").mkdir()
    shutil.copy(repo_root / "configs" / "credit.yaml", root / "configs" / "credit.yaml")
    generate_credit_data(root / "data", train_rows=train_rows, days=2, batch_rows=500)
    dvc_add(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


#: sklearn's wine cultivars 0, 1 and 2, named, for a multiclass project with text classes.
WINE_CLASSES = ("barolo", "grignolino", "barbera")
#: The multiclass project's spec (``{target}``: its label column).
WINE_SPEC = """\
pipeline: {{name: wine}}
data:
  path: data/wine/train.parquet
  task: multiclass
  target: cultivar
  id: wine_id
  features:
    numeric: [{features}]
  split: {{method: random, test_fraction: 0.2, seed: 7}}
model: {{architecture: mlp, hidden: [16]}}
train: {{epochs: 30, batch_size: 32, learning_rate: 0.01, seed: 7}}
gate: {{metric: accuracy, minimum: 0.5}}
score: {{input: data/wine/batches, output: outputs/wine/scores}}
"""


def wine_frame(*, text_classes: bool = True):
    """sklearn's wine (178 rows, 13 numeric features) with an id ``wine_id`` and the label
    ``cultivar``: :data:`WINE_CLASSES` when ``text_classes``, else the integers 0, 1, 2."""
    from sklearn import datasets

    frame = datasets.load_wine(as_frame=True).frame
    frame.columns = [name.replace("/", "_") for name in frame.columns]
    labels = frame.pop("target")
    frame.insert(0, "wine_id", range(len(frame)))
    frame["cultivar"] = labels.map(dict(enumerate(WINE_CLASSES))) if text_classes else labels
    return frame


def build_multiclass_project(root: Path, *, text_classes: bool = True) -> Path:
    """A multiclass Stemma project: git repo, DVC repo, ``configs/wine.yaml`` (:data:`WINE_SPEC`)
    and :func:`wine_frame` as ``data/wine/train.parquet``; ``data/wine/batches`` holds the
    same rows without the label, shuffled into ``day_01.parquet`` and ``day_02.parquet``
    with ids of their own (from 1,000)."""
    from dvc.repo import Repo

    frame = wine_frame(text_classes=text_classes)
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    Repo.init(str(root))
    (root / "configs").mkdir()
    features = [name for name in frame.columns if name not in ("wine_id", "cultivar")]
    spec = WINE_SPEC.format(features=", ".join(features))
    (root / "configs" / "wine.yaml").write_text(spec, encoding="utf-8")
    (root / "data" / "wine" / "batches").mkdir(parents=True)
    frame.to_parquet(root / "data" / "wine" / "train.parquet", index=False)
    batch = frame.drop(columns="cultivar").sample(frac=1.0, random_state=7)
    batch["wine_id"] = range(1_000, 1_000 + len(batch))
    half = len(batch) // 2
    for day, rows in (("day_01", batch[:half]), ("day_02", batch[half:])):
        rows.to_parquet(root / "data" / "wine" / "batches" / f"{day}.parquet", index=False)
    dvc_add(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


def checkpoint_epoch(project: Path) -> int:
    """The epoch of the training checkpoint under the project's ``.stemma``, 0 while none."""
    import torch

    for path in (project / ".stemma" / "checkpoints").glob("*/checkpoint.pt"):
        try:
            return int(torch.load(path, weights_only=True)["epoch"])
        except Exception:  # being replaced right now; read it on the next poll
            return 0
    return 0


def legacy_index_tags(record: dict, run_id: str) -> dict[str, str]:
    """The lineage index tags older Stemma versions wrote (one tag per node, the node as
    JSON, the edges in a tag), so tests can hold a store those versions filled."""
    import json

    from stemma.components.platform import lineage
    from stemma.components.platform import tags as tag_names

    made, used = lineage.record_roles(record, run_id)
    tags = {lineage.INDEX_SCHEMA_TAG: str(record.get("schema", lineage.RECORD_SCHEMA))}
    for node in record.get("nodes", []):
        node_id, kind = str(node["id"]), str(node.get("kind") or "unknown")
        body = json.dumps(
            {key: node.get(key) for key in ("kind", "id", "digest", "attributes")},
            sort_keys=True,
            separators=(",", ":"),
        )
        if node_id in made:
            tags[lineage.made_tag(node_id)] = body
            tags[lineage.kind_tag(tag_names.LINEAGE_MADE_KIND_PREFIX, kind)] = "true"
        elif node_id in used:
            tags[lineage.used_tag(node_id)] = body
            tags[lineage.kind_tag(tag_names.LINEAGE_USED_KIND_PREFIX, kind)] = "true"
    edges = [[e["source"], e["target"], e["relation"]] for e in record.get("edges", [])]
    tags[lineage.EDGES_TAG] = json.dumps(edges, separators=(",", ":"))
    return tags


def run_side_by_side(
    commands: list[list[str]],
    *,
    cwd: Path | list[Path],
    env: dict[str, str],
    timeout_s: float,
    text: bool = False,
) -> list[subprocess.CompletedProcess]:
    """Start independent commands at once and wait for them all: on a 2-core runner two
    `stemma` processes import their libraries side by side. ``cwd``: the folder of every
    command, or one folder per command.

    Returns:
        One ``CompletedProcess`` per command, in order, as ``subprocess.run(...,
        capture_output=True, text=text)`` gives it. A command still running after
        ``timeout_s`` is killed and raises ``subprocess.TimeoutExpired``.
    """
    import tempfile
    from contextlib import ExitStack

    def end(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    with ExitStack() as stack:
        started = []
        folders = cwd if isinstance(cwd, list) else [cwd] * len(commands)
        for command, folder in zip(commands, folders, strict=True):
            out, err = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
            process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=err)
            stack.callback(end, process)
            started.append((process, out, err))
        done = []
        for process, out, err in started:
            process.wait(timeout=timeout_s)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            if text:
                stdout, stderr = stdout.decode(), stderr.decode()
            done.append(
                subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
            )
    return done


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago (tests never assume a
    default port is free)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_log_part(
    log: Path,
    kind: str,
    frame,
    *,
    at: str,
    id_column: str = "application_id",
    version: str = "1",
    score=None,
) -> Path:
    """A part of the endpoint's log in its layout and types, written with pyarrow.

    ``kind`` ``predictions``: ``frame`` holds the features and the id, logged with a score
    (``score``, else 0.5), ``version`` and the log's other columns; ``labels``: the id and
    the target. Ids are text, as the endpoint logs them; ``at`` is the UTC time of the
    rows, which names the day folder and the part.
    """
    import secrets

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    moment = pd.Timestamp(at, tz="UTC")
    rows = len(frame)
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    table = table.set_column(
        table.schema.get_field_index(id_column),
        id_column,
        pa.array([str(value) for value in frame[id_column]], pa.string()),
    )
    times = pa.array([moment.to_pydatetime()] * rows, pa.timestamp("us", "UTC"))
    if kind == "predictions":
        scores = [0.5] * rows if score is None else list(score)
        added = {
            "prediction": pa.array([int(value >= 0.5) for value in scores], pa.int64()),
            "score": pa.array(scores, pa.float64()),
            "stemma_request_id": pa.array([f"r-{index}" for index in range(rows)], pa.string()),
            "stemma_row": pa.array(range(rows), pa.int32()),
            "stemma_time": times,
            "stemma_model_version": pa.array([str(version)] * rows, pa.string()),
            "stemma_variant": pa.array(["champion"] * rows, pa.string()),
            "stemma_latency_ms": pa.array([1.0] * rows, pa.float64()),
        }
    else:
        added = {"stemma_time": times}
    for name, values in added.items():
        table = table.append_column(name, values)
    folder = log / kind / moment.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{moment.strftime('%Y%m%dT%H%M%S%f')}-{secrets.token_hex(4)}.parquet"
    pq.write_table(table, path)
    return path
