"""The endpoint's Prometheus metrics, in a registry of its own (one per endpoint)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Latency buckets in seconds, 0.1 ms to 1 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
#: The latency histograms, each over :data:`LATENCY_BUCKETS`. (name, help.)
LATENCY_HISTOGRAMS = (
    ("request_seconds", "Time from a prediction request's arrival to its response."),
    ("queue_wait_seconds", "Time a request's rows waited for the model."),
    ("inference_seconds", "Time of one model call (a batch of coalesced requests)."),
)
#: The histograms of a model call's size, over :func:`batch_buckets`. (name, help.)
BATCH_HISTOGRAMS = (
    ("batch_rows", "Rows per model call."),
    ("batch_requests", "Requests coalesced per model call."),
)
#: Prefix of every metric name.
PREFIX = "stemma_endpoint"
#: The prediction log's counters (endpoint.log), each by kind: predictions, shadow, labels.
LOG_COUNTERS = (
    ("log_rows", "Rows written to the log's parts, by kind."),
    (
        "log_dropped_rows",
        "Rows not logged because the log's buffer was full (or the log closed), by kind.",
    ),
    ("log_parts", "Parts the log wrote, by kind."),
    (
        "log_failed_writes",
        "Parts the log failed to write (their rows wait for the next try), by kind.",
    ),
)

#: A multiclass model's counters: its answers by predicted class, and the labels it
#: received of no class it knows. (name, help, label names.)
CLASS_COUNTERS = (
    (
        "predictions",
        "Rows a multiclass model answered, by predicted class, model version and variant.",
        ("class", "version", "variant"),
    ),
    (
        "unknown_labels",
        "Labels POST /v1/labels recorded that are no class of the served multiclass model, "
        "neither directly nor through data.labels.",
        (),
    ),
)


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, which is a bucket of its own."""
    edges = [1.0]
    while edges[-1] * 2 < max_batch_size:
        edges.append(edges[-1] * 2)
    if edges[-1] != max_batch_size:
        edges.append(float(max_batch_size))
    return tuple(edges)


class EndpointMetrics:
    """Latency, queue wait and inference time, batch sizes, queue depth, requests and loads.

    Attributes:
        registry: the registry :meth:`exposition` renders.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.latency, self.queue_wait, self.inference = (
            Histogram(f"{PREFIX}_{name}", text, buckets=LATENCY_BUCKETS, registry=registry)
            for name, text in LATENCY_HISTOGRAMS
        )
        self.batch_rows, self.batch_requests = (
            Histogram(
                f"{PREFIX}_{name}", text, buckets=batch_buckets(max_batch_size), registry=registry
            )
            for name, text in BATCH_HISTOGRAMS
        )
        self.queue_rows = Gauge(
            f"{PREFIX}_queue_rows", "Rows waiting for the model.", registry=registry
        )
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Prediction requests answered, by HTTP status, model version and variant "
            "(champion, canary, or both for a request split between them).",
            ["status", "version", "variant"],
            registry=registry,
        )
        self.rows = Counter(
            f"{PREFIX}_rows",
            "Rows answered, by outcome (scored or rejected), model version and variant.",
            ["outcome", "version", "variant"],
            registry=registry,
        )
        self.shadow_rows = Counter(
            f"{PREFIX}_shadow_rows",
            "Rows offered to the shadow, by outcome (scored; dropped: its queue was full; "
            "unfit: it cannot take them; failed: its model call failed) and its version.",
            ["outcome", "version"],
            registry=registry,
        )
        self.model_loads = Counter(
            f"{PREFIX}_model_loads",
            "Loads of a new version after the alias moved, by result (swapped or failed).",
            ["result"],
            registry=registry,
        )
        self.model = Gauge(
            f"{PREFIX}_model_info",
            "The version served (1) under its alias.",
            ["model", "version", "alias"],
            registry=registry,
        )

        self.predictions, self.unknown_labels = (
            Counter(f"{PREFIX}_{name}", text, labels, registry=registry)
            for name, text, labels in CLASS_COUNTERS
        )
        self.log_rows, self.log_dropped_rows, self.log_parts, self.log_failed_writes = (
            Counter(f"{PREFIX}_{name}", text, ["kind"], registry=registry)
            for name, text in LOG_COUNTERS
        )

    def serving(self, model: str, version: str, alias: str) -> None:
        """Record the version now served (the previous one's series is removed)."""
        self.model.clear()
        self.model.labels(model=model, version=version, alias=alias).set(1)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
