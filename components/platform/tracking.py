"""MLflow tracking: where runs go, the data version as a run input, params and metrics.

On a laptop the tracking store is a SQLite file and a local artifact folder under the
project's ``.stemma/``; ``MLFLOW_TRACKING_URI`` (and ``MLFLOW_REGISTRY_URI``) in the
environment point the same code at a server instead.

The training data is logged as a run input whose source is a :class:`DVCDatasetSource`:
the MLflow UI then shows ``source_type=dvc``, the DVC md5 as the dataset digest, and the
DVC pointer, path and git revision in the source, so a run names the exact data version it
read.

Logging the model itself is :mod:`stemma.components.model.artifact`.

mlflow is imported inside the functions that need it, except for the dataset source class,
which must subclass MLflow's; importing this module therefore imports mlflow.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pandas as pd
from mlflow.data.dataset_source import DatasetSource

from stemma.components.errors import DataError, StemmaError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.describe import NOTE_TAG
from stemma.components.platform.redaction import without_credentials

#: Folder under the project root that holds Stemma's local state.
STATE_DIR = ".stemma"
#: SQLite file of the local tracking and registry store, inside :data:`STATE_DIR`.
LOCAL_DB_NAME = "mlflow.db"
#: Local artifact folder, inside :data:`STATE_DIR`; each experiment gets a subfolder.
LOCAL_ARTIFACTS_DIR = "mlartifacts"

# MLflow's limits (mlflow.utils.validation, 3.17): a batch holds at most 100 params or tags
# and 1000 metrics; a param value at most 6000 characters; a dataset digest at most 36.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
MAX_DATASET_DIGEST_LENGTH = 36
#: Appended to a param value cut to :data:`MAX_PARAM_VALUE_LENGTH`, so a reader sees the cut.
TRUNCATION_MARK = "...[truncated]"

_EXPERIMENT_FOLDER = re.compile(r"[^A-Za-z0-9_.-]+")


# ---------------------------------------------------------------------------------------
# Where runs go


#: Tracking URIs served by an MLflow server, which chooses artifact locations itself.
_SERVER_SCHEMES = ("http://", "https://", "databricks")


def local_tracking_uri(root: Path) -> str:
    """The tracking URI of the project's embedded store: ``sqlite:///<root>/.stemma/mlflow.db``."""
    return f"sqlite:///{(Path(root) / STATE_DIR / LOCAL_DB_NAME).resolve()}"


def local_artifact_root(root: Path) -> Path:
    """The project's local artifact folder, ``<root>/.stemma/mlartifacts``."""
    return (Path(root) / STATE_DIR / LOCAL_ARTIFACTS_DIR).resolve()


#: Local URIs this process configured. mlflow.set_tracking_uri (and set_registry_uri)
#: also write MLFLOW_TRACKING_URI (MLFLOW_REGISTRY_URI) into os.environ, so without this
#: memo a second project in the same process would inherit the first one's local store.
_LOCAL_URIS_SET: set[str] = set()
#: Registry URIs this process derived from the tracking URI. MLflow's
#: ``set_registry_uri`` writes ``MLFLOW_REGISTRY_URI`` into the environment, so without
#: this a later project (or a child process) would inherit a stale registry.
_DERIVED_REGISTRY_URIS: set[str] = set()


def _user_uri(variable: str) -> str | None:
    value = os.environ.get(variable, "").strip()
    if variable == "MLFLOW_REGISTRY_URI" and value in _DERIVED_REGISTRY_URIS:
        return None
    return value if value and value not in _LOCAL_URIS_SET else None


def configure_tracking(root: Path) -> str:
    """Point MLflow tracking and registry at the environment's server or the local store.

    ``MLFLOW_TRACKING_URI`` wins when set (``MLFLOW_REGISTRY_URI`` too, else the registry
    follows tracking); otherwise runs go to ``<root>/.stemma/mlflow.db``, whose folder is
    created.

    Args:
        root: the project root.

    Returns:
        The tracking URI in use.
    """
    import mlflow

    uri = _user_uri("MLFLOW_TRACKING_URI")
    if uri is None:
        uri = local_tracking_uri(root)
        (Path(root) / STATE_DIR).mkdir(parents=True, exist_ok=True)
        _LOCAL_URIS_SET.add(uri)
    mlflow.set_tracking_uri(uri)
    registry = _user_uri("MLFLOW_REGISTRY_URI")
    if registry is None:
        registry = uri
        _DERIVED_REGISTRY_URIS.add(uri)
    mlflow.set_registry_uri(registry)
    if registry == uri and uri in _DERIVED_REGISTRY_URIS:
        # Not the user's setting: keep it out of the environment children inherit.
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    return uri


#: The MLflow UI's query naming its layout: runs and models, not the GenAI overview (the
#: UI ignores the experiment's kind tag and keeps the last layout chosen in the browser).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


#: The runs an experiment's page opens on: training runs (the UI reads the filter from the
#: runs page's query; no experiment tag sets a default filter).
TRAINING_RUNS_FILTER = f"tags.`{tag_names.FLOW}` = 'train'"


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI's page of a run, or of an experiment's training runs, on a tracking
    server, in the model-training layout, without the URI's credentials (a link is shown
    and stored; the browser asks for them); None when the runs are not on a server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    server = without_credentials(tracking_uri).rstrip("/")
    if run_id:
        return f"{server}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"
    query = urlencode({"searchFilter": TRAINING_RUNS_FILTER}, quote_via=quote)
    return f"{server}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}&{query}"


#: MLflow's experiment tag choosing the UI's layout, and the value for model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def ensure_experiment(name: str, root: Path) -> str:
    """The id of the experiment ``name``, created if it does not exist.

    Without a tracking server (the local store, or any database URI), a new experiment
    keeps its artifacts under ``<root>/.stemma/mlartifacts/<name>``; against a server,
    the server decides.

    Raises:
        StemmaError: the experiment exists but is deleted (restore it or pick another name),
            or MLflow refused the request.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            # Without a tracking server nothing decides where artifacts go, and MLflow's
            # fallback is ./mlruns of whatever folder the command ran in: keep them with
            # the project instead. A server (http, databricks) keeps its own default.
            if not mlflow.get_tracking_uri().startswith(_SERVER_SCHEMES):
                folder = _EXPERIMENT_FOLDER.sub("_", name).strip("._") or "experiment"
                location = (local_artifact_root(root) / folder).as_uri()
            return client.create_experiment(
                name, artifact_location=location, tags=experiment_tags(name)
            )
    except MlflowException as error:
        raise StemmaError(
            f"MLflow at {mlflow.get_tracking_uri()}: cannot get or create experiment {name!r}",
            [error.message],
        ) from error
    if experiment.lifecycle_stage == "deleted":
        raise StemmaError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted",
            [
                f"restore it: mlflow experiments restore --experiment-id {experiment.experiment_id}",
                "or set pipeline.experiment to another name",
            ],
        )
    for key, value in experiment_tags(name).items():
        # Made by an older Stemma, or by hand: fill what is missing, and keep Stemma's own
        # description current (one written by hand stays).
        found = experiment.tags.get(key)
        if found is None or (
            key == NOTE_TAG and found != value and found.startswith(_NOTE_OPENING)
        ):
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


#: How Stemma's description of an experiment begins (the experiment page shows it).
_NOTE_OPENING = "Runs of the Stemma pipeline"


def experiment_tags(name: str) -> dict[str, str]:
    """An experiment's kind (MLflow opens a model-training experiment on its runs, not on
    the GenAI overview) and its description: what runs it holds, how to list the training
    runs, and how metrics are named."""
    return {
        EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
        NOTE_TAG: (
            f"{_NOTE_OPENING} that writes to `{name}`: training, scoring, "
            "monitoring, shadow and canary evaluation, quantization, retraining and "
            "promotion. Training runs are named `train-<spec>-<time>`; show only them with "
            f"the filter `` {TRAINING_RUNS_FILTER} `` (another flow: `score`, `monitor`, "
            "`shadow`, `canary`, `quantize`, `retrain`, `promote`). Each run's description "
            "says what it read, made and decided. Metrics are grouped by section: `train/` "
            "and `val/` (losses per epoch), `test/` (the test split), `data/`, `gate/`, "
            "`score/`, `drift/`, `shadow/`, `canary/`, `quantize/`, `retrain/`."
        ),
    }


def run_git(root: Path, *args: str) -> str | None:
    """The output of ``git -C root args``, or None when git fails or is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_revision(root: Path) -> tuple[str | None, bool]:
    """The git commit checked out at ``root`` and whether tracked files differ from it.

    Untracked files do not make the tree dirty: outputs such as ``.stemma/`` or ``data/``
    are often untracked by git on purpose.

    Returns:
        ``(sha, dirty)``; ``(None, False)`` outside a git repository, in one without
        commits, or when git is not installed.
    """
    sha = (run_git(root, "rev-parse", "--verify", "--quiet", "HEAD") or "").strip()
    if not sha:
        return None, False
    status = run_git(root, "status", "--porcelain", "--untracked-files=no") or ""
    return sha, bool(status.strip())


def read_run_artifact(client: Any, run_id: str, artifact: str) -> str | None:
    """The text of run ``run_id``'s artifact ``artifact``, or None when the run has none (an
    older run, or a store whose artifacts are gone)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stemma-artifact-") as scratch:
        try:
            path = client.download_artifacts(run_id, artifact, scratch)
            return Path(path).read_text(encoding="utf-8")
        except Exception:  # no such artifact, or one that cannot be read
            return None


# ---------------------------------------------------------------------------------------
# The data version as a run input


@dataclass(frozen=True)
class DVCDatasetSource(DatasetSource):
    """A data file versioned by DVC, as MLflow records a run input's source.

    Attributes:
        path: the data file, relative to the project root (``data/credit/train.parquet``).
        dvc_file: the DVC pointer that versions it (``data.dvc``).
        md5: the data version: the md5 the pointer records (``<hex>.dir`` for a folder).
        file_md5: the md5 of the file itself (differs from ``md5`` when a folder is tracked).
        git_rev: the git commit of the pointer, or None outside git.
        repo: the project root, or the git remote URL the data can be fetched from.
    """

    path: str
    dvc_file: str
    md5: str
    file_md5: str | None = None
    git_rev: str | None = None
    repo: str | None = None

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> str:
        """The local path of the data file, when it is present in a local ``repo``.

        Raises:
            DataError: the file is not here; the message says how to fetch this version.
        """
        if self.repo and "://" not in self.repo:
            local = Path(self.repo) / self.path
            if local.exists():
                return str(local)
        where = self.repo or "<repository URL>"
        rev = f" --rev {self.git_rev}" if self.git_rev else ""
        raise DataError(
            f"{self.path} (DVC version {self.md5}) is not available locally",
            [f"fetch it with: dvc get {where} {self.path}{rev}"],
        )

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        # Built explicitly from a DVC pointer, never guessed from a string.
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DVCDatasetSource:
        raise NotImplementedError("a DVCDatasetSource is built from a DVC pointer, not resolved")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DVCDatasetSource:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in source_dict.items() if key in known})


def _register_dataset_source() -> None:
    # Registered so that mlflow.data.get_source(run.inputs.dataset_inputs[i]) gives a
    # DVCDatasetSource back; the UI shows the source JSON either way.
    from mlflow.data.dataset_source_registry import (
        get_registered_sources,
        register_dataset_source,
    )

    if DVCDatasetSource not in get_registered_sources():
        register_dataset_source(DVCDatasetSource)  # type: ignore[arg-type]  # takes the class


_register_dataset_source()


def dataset_digest(md5: str) -> str:
    """The digest MLflow stores for a DVC version: the md5, cut to MLflow's 36 characters.

    A DVC folder md5 (``<32 hex>.dir``) is exactly 36 characters and is kept whole, so the
    digest reads as it does in the ``.dvc`` file; the source always holds the full value.
    """
    return md5[:MAX_DATASET_DIGEST_LENGTH]


def log_dataset(
    frame: pd.DataFrame,
    *,
    name: str,
    source: DVCDatasetSource,
    context: str,
    digest: str,
    target: str | None = None,
) -> None:
    """Log a table as an input of the active run, identified by its DVC version.

    The input's digest is the DVC md5 (see :func:`dataset_digest`), its source the DVC
    path, pointer and git revision, its schema the frame's columns and types and its
    profile the row and cell counts.

    Args:
        frame: the rows the run used (not modified).
        name: dataset name shown in the UI (``credit-train``).
        source: where the rows come from.
        context: what the run did with them (``training``, ``test``).
        digest: the data version, normally ``source.md5``.
        target: the label column, if the frame has one.
    """
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    require_active_run("log_dataset")
    dataset = from_pandas(
        frame, source=source, name=name, digest=dataset_digest(digest), targets=target
    )
    with quiet_integer_hint():  # the schema is inferred when the input is logged
        mlflow.log_input(dataset, context=context)


def log_dataset_reference(
    *,
    name: str,
    source: DatasetSource | str,
    context: str,
    digest: str,
    columns: Mapping[str, str] | None = None,
) -> None:
    """Log a dataset too large to load as an input of the active run: source, digest, schema.

    Batch scoring streams its input and never holds it in memory, so the run input is
    built from what is known without the rows: where they are, their digest, and the
    column types.

    Args:
        name: dataset name shown in the UI (``credit-batch``).
        source: a :class:`DVCDatasetSource` for DVC-tracked input, or a local path.
        context: what the run did with the rows (``scoring``).
        digest: the input's content digest.
        columns: column name to MLflow type (``double``, ``long``, ``string``...).
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    require_active_run("log_dataset_reference")
    if isinstance(source, str):
        with warnings.catch_warnings():  # MLflow warns that a local path has two readers
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(source)
    schema = (
        Schema([ColSpec(kind, column) for column, kind in columns.items()]) if columns else None
    )
    # MetaDataset leaves `profile` abstract in its typing but implements it at runtime.
    dataset = MetaDataset(  # type: ignore[abstract]
        source=source, name=name, digest=dataset_digest(digest), schema=schema
    )
    mlflow.log_input(dataset, context=context)


#: Longest error text kept in a run's `stemma.error` tag.
MAX_ERROR_TAG_CHARS = 4000


def end_run_after(error: BaseException) -> bool:
    """End the active run after ``error``: KILLED when interrupted, FAILED otherwise.

    An interruption is Ctrl-C, SIGTERM, or a stop because a server did not answer (see
    :func:`.lifecycle.is_interruption`). The run keeps the reason in its tags
    (``stemma.status``, ``stemma.error``), so the MLflow UI says why a run stopped without
    a traceback. When the tracking server itself is down (:func:`.outages.is_down`),
    nothing is sent: the run stays RUNNING and a rerun resumes it.

    Returns:
        Whether the run may be resumed: an interruption, or any error while the tracking
        server is down (the run's own work did not fail).
    """
    import mlflow

    from stemma.components.platform.lifecycle import is_interruption
    from stemma.components.platform.outages import is_down

    if is_down(mlflow.get_tracking_uri()):
        # Leave the run RUNNING on the server, but take it off this process's stack, or
        # MLflow's exit handler would retry ending it for as long as its retries allow.
        with _single_quick_attempt(), suppress(Exception):
            mlflow.end_run(status="KILLED")
        return True
    interrupted = is_interruption(error)
    headline = error.headline if isinstance(error, StemmaError) else repr(error)
    mlflow.set_tags(
        {
            tag_names.STATUS: "interrupted" if interrupted else "failed",
            tag_names.ERROR: headline[:MAX_ERROR_TAG_CHARS],
        }
    )
    mlflow.end_run(status="KILLED" if interrupted else "FAILED")
    return interrupted


#: MLflow's HTTP settings for a request to a server known to be down: one try, briefly.
_QUICK_ATTEMPT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


@contextmanager
def _single_quick_attempt() -> Iterator[None]:
    """MLflow requests inside the block try once, for 2 s at most (MLflow reads these
    variables on every request); the previous values come back after it."""
    saved = {name: os.environ.get(name) for name in _QUICK_ATTEMPT}
    os.environ.update(_QUICK_ATTEMPT)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------
# Params and metrics


@contextmanager
def quiet_integer_hint() -> Iterator[None]:
    """Silence MLflow's hint that integer columns cannot hold missing values.

    It fires for every integer column of every schema MLflow infers; Stemma's schemas come
    from the real data, so the types are the data's types, and the enforcement error a
    NaN later causes repeats the hint where it matters.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        yield


def require_active_run(caller: str) -> str:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{caller} must be called inside an active MLflow run")
    return run.info.run_id


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def truncate_param(value: str) -> str:
    """A param value cut to MLflow's limit, with :data:`TRUNCATION_MARK` where it was cut."""
    if len(value) <= MAX_PARAM_VALUE_LENGTH:
        return value
    return value[: MAX_PARAM_VALUE_LENGTH - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def log_params_flat(params: Mapping[str, str]) -> None:
    """Log flat ``key -> value`` params on the active run, in batches MLflow accepts.

    Values longer than MLflow's limit are cut (see :func:`truncate_param`); credentials in
    a URL are masked (see :func:`~.redaction.redact_url`), since params are shown to anyone
    who can read the experiment.
    """
    from mlflow import MlflowClient

    log_batches(MlflowClient(), require_active_run("log_params_flat"), params=params)


def log_batches(
    client: Any,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    step: int = 0,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """Log params (as :func:`log_params_flat` does), metrics (with one timestamp, at
    ``step``) and tags (values as strings) on run ``run_id``, in as few requests as MLflow
    allows."""
    from mlflow.entities import Metric, Param, RunTag

    from stemma.components.platform.redaction import redact_url

    labels = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    for batch in _chunks(labels, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=list(batch))
    entries = [
        Param(redact_url(key), truncate_param(redact_url(str(value))))
        for key, value in (params or {}).items()
    ]
    for batch in _chunks(entries, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=list(batch))
    timestamp = int(time.time() * 1000)
    measures = [
        Metric(key, float(value), timestamp, step) for key, value in (metrics or {}).items()
    ]
    for batch in _chunks(measures, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=list(batch))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def log_metrics_batch(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics on the active run with one timestamp, in as few requests as MLflow allows.

    Args:
        metrics: name -> value; non-finite values are logged as they are (MLflow keeps NaN).
        step: the step of every value (0 when None).
    """
    from mlflow import MlflowClient

    run_id = require_active_run("log_metrics_batch")
    log_batches(MlflowClient(), run_id, metrics=metrics, step=step or 0)


def log_epoch(row: Mapping[str, Any], step: int) -> None:
    """Log one epoch's numbers (losses, metrics, learning rate...) at ``step``, in one request.

    Values that are not numbers (strings, None, booleans) are skipped.
    """
    log_metrics_batch({key: value for key, value in row.items() if _is_number(value)}, step=step)
