"""Every MLflow metric name Stemma logs, in sections, and how older names are read.

A metric is named ``<section>/<measure>``. MLflow's UI groups a run's charts by the part
before the ``/``, so a training run shows its losses (``train/``, ``val/``) apart from
its test metrics (``test/``) and its bookkeeping (``data/``, ``gate/``):

=========  ==============  =========================================================
section    run             measures
=========  ==============  =========================================================
train      train           ``loss``, ``epoch_seconds``, ``samples_per_second`` per
                           epoch; ``seconds``, ``best_epoch``, ``epochs_run``
val        train           ``loss`` per epoch
test       train           every metric of the task on the test split (``roc_auc``...)
data       train           ``checks_evaluated``, ``checks_failed``
gate       train           ``passed`` (1 or 0)
score      score           rows, parts, ``seconds``, ``rows_per_second``, latencies,
                           ``cpu_seconds``, ``cpu_s_per_million``, ``cost_per_million``
                           (multiclass: ``rows_predicted.<class>``)
drift      monitor         ``detected``, ``features_drifted``, ``feature.<column>.<stat>``,
                           ``prediction.<stat>``, ``performance.<metric>``...
shadow     shadow          ``agreement``, ``<metric>_difference``, latencies, segments...
canary     canary step     ``fraction``, ``metric_difference``, error rate, latencies...
quantize   quantize        ``fp32.<measure>``, ``<method>.passed``, ``<method>.speedup``...
latency    train           the registered version's probe: ``p50_ms_b1``...``p99_ms_b4096``,
                           ``rows_per_s``, ``cpu_s_per_million``, ``cost_per_million``
retrain    retrain         ``new_rows``, ``unlabelled_rows``...
=========  ==============  =========================================================

Names are stored in tracking servers: never change one, add a new name. Runs logged by
a Stemma older than the sections carry flat names (``test_roc_auc``, ``train_loss``,
``best_epoch``, ``quantize.bf16.speedup``, ``agreement``); read a metric with
:func:`read_metric`, which falls back to its flat name (:func:`flat_name`).
"""

from __future__ import annotations

from collections.abc import Mapping

#: Between a metric's section and its measure.
SEPARATOR = "/"

# --- Sections ------------------------------------------------------------------------
TRAIN = "train"  # train run: the training loop
VAL = "val"  # train run: the validation split, per epoch
TEST = "test"  # train run: the test split
DATA = "data"  # train run: the data checks
GATE = "gate"  # train run: the gate's decision
SCORE = "score"  # score run
DRIFT = "drift"  # monitor run: the drift report
SHADOW = "shadow"  # shadow run
CANARY = "canary"  # canary step run
QUANTIZE = "quantize"  # quantize run
LATENCY = "latency"  # train run: the registered version's latency probe
COMPRESS = "compress"  # compress run: each candidate against its parent
COMPARE = "compare"  # compare run: a version and every variant of it
RETRAIN = "retrain"  # retrain run


def metric_name(section: str, measure: str) -> str:
    """``<section>/<measure>``."""
    return f"{section}{SEPARATOR}{measure}"


def in_section(section: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` with each name put under ``section`` (``agreement`` → ``shadow/agreement``)."""
    return {metric_name(section, measure): value for measure, value in metrics.items()}


# --- Names Stemma reads back ---------------------------------------------------------
TRAIN_LOSS = metric_name(TRAIN, "loss")  # per epoch
VAL_LOSS = metric_name(VAL, "loss")  # per epoch
TRAIN_EPOCH_SECONDS = metric_name(TRAIN, "epoch_seconds")  # per epoch
TRAIN_SAMPLES_PER_SECOND = metric_name(TRAIN, "samples_per_second")  # per epoch
TRAIN_SECONDS = metric_name(TRAIN, "seconds")  # the epochs' time, summed
TRAIN_BEST_EPOCH = metric_name(TRAIN, "best_epoch")  # the epoch whose weights were kept
TRAIN_EPOCHS_RUN = metric_name(TRAIN, "epochs_run")
DATA_CHECKS_EVALUATED = metric_name(DATA, "checks_evaluated")
DATA_CHECKS_FAILED = metric_name(DATA, "checks_failed")
GATE_PASSED = metric_name(GATE, "passed")
SCORE_SECONDS = metric_name(SCORE, "seconds")  # the scoring's wall time
SCORE_CPU_SECONDS = metric_name(SCORE, "cpu_seconds")  # the scoring's CPU time
SCORE_COST_PER_MILLION = metric_name(SCORE, "cost_per_million")  # on cost.scoring
LATENCY_COST_PER_MILLION = metric_name(LATENCY, "cost_per_million")  # on cost.serving
DRIFT_DETECTED = metric_name(DRIFT, "detected")
DRIFT_ASSESSED = metric_name(DRIFT, "assessed")
DRIFT_FEATURES_DRIFTED = metric_name(DRIFT, "features_drifted")
CANARY_FRACTION = metric_name(CANARY, "fraction")  # the challenger's share of traffic

#: The names an older Stemma logged that no section rule derives (see :func:`flat_name`).
FLAT_NAMES = {
    TRAIN_LOSS: "train_loss",
    VAL_LOSS: "val_loss",
    TRAIN_EPOCH_SECONDS: "seconds",
    DATA_CHECKS_EVALUATED: "checks_evaluated",
    DATA_CHECKS_FAILED: "checks_failed",
    GATE_PASSED: "gate_passed",
    DRIFT_DETECTED: "drift_detected",
    DRIFT_ASSESSED: "drift_assessed",
}
#: How an older Stemma joined a section's measure, where it kept the section at all.
_FLAT_SECTION_PREFIXES = {TEST: "test_", QUANTIZE: "quantize."}

#: Names a run's key metrics start with (lineage nodes, the Prefect summary), in the
#: order they are chosen: the numbers a decision rests on.
KEY_METRIC_PREFIXES = (
    metric_name(TEST, ""),
    GATE_PASSED,
    metric_name(SHADOW, "agreement"),
    metric_name(SHADOW, "decision_promote"),
    CANARY_FRACTION,
    metric_name(CANARY, "metric_difference"),
    DRIFT_DETECTED,
    DRIFT_FEATURES_DRIFTED,
    metric_name(QUANTIZE, ""),
    VAL_LOSS,
)


def flat_name(name: str) -> str | None:
    """The flat name an older Stemma logged the metric ``name`` under (``test/roc_auc`` →
    ``test_roc_auc``, ``shadow/agreement`` → ``agreement``); None for a name without a
    section."""
    if name in FLAT_NAMES:
        return FLAT_NAMES[name]
    section, separator, measure = name.partition(SEPARATOR)
    if not separator:
        return None
    return _FLAT_SECTION_PREFIXES.get(section, "") + measure


def read_metric(metrics: Mapping[str, float], name: str) -> float | None:
    """The value of the metric ``name`` in a run's ``metrics``, under its flat name in a run
    an older Stemma logged; None when the run has neither."""
    if name in metrics:
        return float(metrics[name])
    flat = flat_name(name)
    return float(metrics[flat]) if flat is not None and flat in metrics else None


#: Sectioned names of the flat names an older Stemma logged that tell their section.
_SECTIONED_NAMES = {
    **{flat: name for name, flat in FLAT_NAMES.items()},
    "best_epoch": TRAIN_BEST_EPOCH,
    "epochs_run": TRAIN_EPOCHS_RUN,
    "samples_per_second": TRAIN_SAMPLES_PER_SECOND,
}


def sectioned_name(name: str) -> str:
    """The sectioned name of a metric an older Stemma logged under a flat name that tells
    its section: a training run's names (``test_roc_auc`` → ``test/roc_auc``,
    ``best_epoch`` → ``train/best_epoch``), a quantize run's (``quantize.bf16.speedup``)
    and a monitor run's verdict (``drift_detected``). Any other name is returned as is."""
    if name in _SECTIONED_NAMES:
        return _SECTIONED_NAMES[name]
    for section, prefix in _FLAT_SECTION_PREFIXES.items():
        if name.startswith(prefix):
            return metric_name(section, name.removeprefix(prefix))
    return name


def sectioned_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics by their sectioned names, whichever Stemma logged them
    (:func:`sectioned_name`)."""
    return {sectioned_name(name): value for name, value in metrics.items()}


def metric_rank(name: str) -> tuple[int, str]:
    """Where a metric named ``name`` comes among a run's metrics: by the first of
    :data:`KEY_METRIC_PREFIXES` its sectioned name starts with (others after them all),
    then by name."""
    sectioned = sectioned_name(name)
    ranks = [rank for rank, start in enumerate(KEY_METRIC_PREFIXES) if sectioned.startswith(start)]
    return (min(ranks, default=len(KEY_METRIC_PREFIXES)), name)
