"""Batch scoring fanned out across Dask workers: one task per range of chunks.

The scoring flow plans a scoring in its own process (:func:`.scoring.plan_scoring`: checks,
input digest, output folder made ready), submits one Prefect task per
:class:`~.scoring.ChunkRange` through prefect-dask's ``DaskTaskRunner``, and writes the
manifest once every range is back (:func:`.scoring.finish_scoring`). The output is the one
a single process writes, byte for byte: a part's bytes depend only on its file and chunk
numbers. A killed fan-out resumes like a killed single process, from the parts on disk.

This module holds what is not Prefect: the task runner's settings for ``score.dask``, the
small picklable :class:`ScoringJob` a task receives, and :func:`score_job_range`, the work
one task does on a worker. A worker rebuilds the model from the registry itself, checks
its weights hash against the one the plan was made with, and keeps it for the next task.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from stemma.components.errors import RegistryError
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.scoring.job import RangeResult, ScoringPlan, score_range
from stemma.components.scoring.pipeline import ChunkRange
from stemma.components.spec import DaskSpec

#: The local cluster listens on loopback only; its ports (dashboard too) are chosen free.
LOCAL_HOST = "127.0.0.1"
#: Models a worker process keeps rebuilt between tasks (usually one: the plan's).
MODEL_CACHE_SIZE = 2
#: Threads running the network per range, and the runtime's threads in a worker process:
#: the cluster's threads are the unit of parallelism.
THREADS_PER_TASK = 1


@dataclass(frozen=True)
class ScoringJob:
    """What every fan-out task gets: the plan and where to find its model.

    Attributes:
        plan: from :func:`.scoring.plan_scoring`.
        model_uri: the model version, ``models:/<name>/<version>``.
        weights_sha256: the weights hash the plan's fingerprint was made with.
        tracking_uri: the MLflow tracking store the worker reads the model from.
        registry_uri: the MLflow registry.
        threads: threads running the network in one task.
    """

    plan: ScoringPlan
    model_uri: str
    weights_sha256: str
    tracking_uri: str
    registry_uri: str
    threads: int = THREADS_PER_TASK
    architectures: tuple[str, ...] = ()


def task_runner_options(settings: DaskSpec) -> dict[str, Any]:
    """Keyword arguments of ``prefect_dask.DaskTaskRunner`` for ``score.dask``.

    With an address, the tasks go to that cluster. Without one, the runner starts a local
    cluster of worker processes for the run (one task per thread at a time, the network on
    one torch thread per task, so ``workers * threads_per_worker`` bounds the cores used)
    and closes it afterwards.
    """
    if settings.address is not None:
        return {"address": settings.address}
    return {
        "cluster_kwargs": {
            "n_workers": settings.workers,
            "processes": True,
            "threads_per_worker": settings.threads_per_worker,
            "host": LOCAL_HOST,
            "dashboard_address": f"{LOCAL_HOST}:0",
        }
    }


def make_job(
    model: ScoringModel, plan: ScoringPlan, *, tracking_uri: str, registry_uri: str
) -> ScoringJob:
    """The job of a plan, for the model it was made with."""
    return ScoringJob(
        plan=plan,
        model_uri=model.model_uri,
        weights_sha256=model.weights_sha256,
        tracking_uri=tracking_uri,
        registry_uri=registry_uri,
        architectures=model.architectures,
    )


def score_job_range(job: ScoringJob, chunk_range: ChunkRange) -> RangeResult:
    """Score one range of the job's chunks, in whichever process runs this.

    Raises:
        RegistryError: the worker cannot load the model, or its weights differ from the
            plan's.
        DataError: as :func:`.scoring.score_range`.
    """
    return score_range(worker_model(job), job.plan, chunk_range, threads=job.threads)


_MODELS: OrderedDict[tuple[str, str, str, str], ScoringModel] = OrderedDict()
_MODELS_LOCK = threading.Lock()


def worker_model(job: ScoringJob) -> ScoringModel:
    """The job's model, rebuilt from the registry once per process and then reused.

    Raises:
        RegistryError: it cannot be loaded, or its weights hash is not the plan's.
    """
    from mlflow import MlflowClient

    key = (job.model_uri, job.weights_sha256, job.tracking_uri, job.registry_uri)
    with _MODELS_LOCK:  # threads of one worker share the model; it is loaded once
        model = _MODELS.get(key)
        if model is None:
            _configure_worker()
            client = MlflowClient(tracking_uri=job.tracking_uri, registry_uri=job.registry_uri)
            model = load_scoring_model(
                job.model_uri, client=client, architectures=job.architectures
            )
            if model.weights_sha256 != job.weights_sha256:
                raise RegistryError(
                    f"{job.model_uri}: a worker loaded other weights than the scoring was planned with",
                    [f"planned {job.weights_sha256}", f"loaded  {model.weights_sha256}"],
                )
            _MODELS[key] = model
            while len(_MODELS) > MODEL_CACHE_SIZE:
                _MODELS.popitem(last=False)
        _MODELS.move_to_end(key)
    return model


_WORKER_CONFIGURED = threading.Event()


def _configure_worker() -> None:
    """Once per Dask worker process, before its first model: one runtime thread per task
    (the worker's threads run tasks side by side). Outside a Dask worker, nothing."""
    if _WORKER_CONFIGURED.is_set():
        return
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return  # not in a worker: the process keeps its own setting
    from stemma.components.runtime.backends import set_threads

    set_threads(THREADS_PER_TASK)
    _WORKER_CONFIGURED.set()
