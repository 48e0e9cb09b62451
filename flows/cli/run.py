"""`stemma run FLOW`: run one flow as a Prefect flow and print its summary."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from stemma.flows.cli import compression, summaries
from stemma.flows.cli.parser import add_spec_arguments
from stemma.flows.cli.session import (
    check_servers,
    prepare_environment,
    quiet_known_errors,
    watch_servers,
)

#: ``stemma run FLOW`` runs ``stemma.flows.FLOW.FLOW_flow``: its summary's formatter, and the
#: command-line options passed to it besides the config and the overrides.
RUNS: dict[str, tuple[Callable[[dict], str], tuple[str, ...]]] = {
    "train": (summaries.format_train_summary, ()),
    "score": (summaries.format_score_summary, ("input", "output", "model")),
    "monitor": (summaries.format_monitor_summary, ("batch", "labels", "model", "days")),
    "quantize": (summaries.format_quantize_summary, ("model",)),
    "compare": (summaries.format_compare_summary, ("model",)),
    "compress": (compression.format_compress_summary, ("model",)),
    "shadow": (
        summaries.format_shadow_summary,
        ("challenger", "batch", "labels", "output", "log"),
    ),
    "retrain": (summaries.format_retrain_summary, ("cause", "batches", "labels")),
    "canary": (
        summaries.format_canary_summary,
        ("challenger", "batches", "labels", "output", "log"),
    ),
}
#: `stemma run score` flags that are spec values: validated and recorded like --set.
SCORE_FLAGS = {
    "runner": "score.runner",
    "workers": "score.dask.workers",
    "address": "score.dask.address",
}
MODEL_REFERENCE = "models:/<name>@<alias> or models:/<name>/<version>"
#: What `--log` without a path stands for (evaluation.steps.ENDPOINT_LOG; kept here so
#: that `stemma --help` imports no evaluation code).
ENDPOINT_LOG = "endpoint.log.path"


def register(commands: Any) -> Any:
    """Add `stemma run` and its flows; return the flows' group."""
    run = commands.add_parser("run", help="run a flow", description="Run a Stemma flow.")
    run.set_defaults(handler=run_command)
    flows = run.add_subparsers(dest="flow", metavar="FLOW")
    flows.required = True
    _add_train(flows)
    _add_score(flows)
    _add_monitor(flows)
    _add_quantize(flows)
    _add_compare(flows)
    compression.add_compress(flows)
    _add_shadow(flows)
    _add_retrain(flows)
    _add_canary(flows)
    return flows


def _add_train(flows: Any) -> None:
    train = flows.add_parser(
        "train",
        help="validate the data, train, evaluate, register and gate a model",
        description=(
            "Run the training flow as a Prefect flow (ephemeral Prefect unless PREFECT_API_URL "
            "is set), tracked in MLflow (a SQLite store under .stemma/ unless "
            "MLFLOW_TRACKING_URI is set)."
        ),
    )
    add_spec_arguments(train)


def _add_score(flows: Any) -> None:
    score = flows.add_parser(
        "score",
        help="score a batch with a registered model (the champion by default)",
        description=(
            "Stream a Parquet/CSV file or folder through a registered model in chunks; write "
            "Parquet parts atomically and a _SUCCESS manifest last. A killed run resumes "
            "from its finished parts when started again."
        ),
    )
    add_spec_arguments(score)
    score.add_argument("--input", help="file or folder to score (default: score.input)")
    score.add_argument(
        "--output",
        help="output folder (default: score.output; with --input, score.output-<input name>)",
    )
    score.add_argument("--model", help=f"{MODEL_REFERENCE} (default: score.model or @champion)")
    score.add_argument(
        "--runner",
        choices=("local", "dask"),
        help="local: one process; dask: one task per range of chunks on a Dask cluster "
        "(default: score.runner)",
    )
    score.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the local Dask cluster (default: score.dask.workers)",
    )
    score.add_argument(
        "--address",
        metavar="URL",
        help="scheduler of a running Dask cluster, tcp://host:port (default: score.dask.address)",
    )


def _add_monitor(flows: Any) -> None:
    monitor = flows.add_parser(
        "monitor",
        help="compare a batch with the model's reference profile and report drift",
        description=(
            "Compare a production batch (and its labels, when given) with the reference "
            "profile saved with the model at training time; log the drift report to MLflow "
            "and emit the Prefect event stemma.drift.detected when it is over the thresholds."
        ),
    )
    add_spec_arguments(monitor)
    monitor.add_argument(
        "--batch",
        help="file or folder, one batch, or the endpoint's prediction log or one of its day "
        "folders (default: monitor.input or score.input)",
    )
    monitor.add_argument(
        "--labels", help="labels of the batch, joined by data.id (default: monitor.labels)"
    )
    monitor.add_argument("--model", help=f"{MODEL_REFERENCE} (default: monitor.model or @champion)")
    monitor.add_argument(
        "--days",
        type=int,
        metavar="N",
        help="with the endpoint's prediction log as the batch (<endpoint.log.path>/predictions): "
        "only its last N complete days, UTC (default: every day)",
    )


def _add_quantize(flows: Any) -> None:
    quantize = flows.add_parser(
        "quantize",
        help="build quantized variants of a registered model and register those that pay",
        description=(
            "Build the variants the spec's quantize section lists (int8 with torchao, bf16, "
            "fp16), measure each against its fp32 parent on the held-out rows it was gated "
            "on (metric, agreement, latency eager and compiled, size), and register those "
            "that clear quantize.max_metric_drop and quantize.min_speedup as versions with "
            "the alias v<parent>-<method>; the fastest also gets v<parent>-quantized."
        ),
    )
    add_spec_arguments(quantize)
    quantize.add_argument(
        "--model",
        help=f"{MODEL_REFERENCE} (default: quantize.model, "
        "else the newest version that passed its gate)",
    )


def _add_compare(flows: Any) -> None:
    compare = flows.add_parser(
        "compare",
        help="compare a version with every variant of it: metric, latency, size and cost",
        description=(
            "Measure a registered fp32 version and every registered variant of it "
            "(quantized, pruned, distilled, and variants of those) on the held-out rows it "
            "was gated on: the gate metric and its drop, p50/p95/p99 latency at batches of "
            "1, 64 and 4,096 rows, rows/s, size, CPU-seconds and cost per million "
            "predictions on cost.scoring's machine. Logs the table and a trade-off plot, and "
            "sets the alias v<parent>-cheapest on the cheapest passing variant, which "
            "compress.serve: cheapest serves."
        ),
    )
    add_spec_arguments(compare)
    compare.add_argument(
        "--model",
        help=f"{MODEL_REFERENCE} of the fp32 parent (default: compress.model, "
        "else the newest version that passed its gate)",
    )


def _add_shadow(flows: Any) -> None:
    shadow = flows.add_parser(
        "shadow",
        help="score a batch with the challenger beside the champion and decide",
        description=(
            "The champion scores the batch (the served output, where `stemma run score` "
            "writes); the challenger scores the same rows into <output>-shadow. One MLflow "
            "run compares them (agreement, score distances, latency, and with labels the "
            "primary metric with a paired-bootstrap interval, overall and per segment) and "
            "decides promote, reject or wait; evaluate.shadow.auto_promote promotes."
        ),
    )
    add_spec_arguments(shadow)
    shadow.add_argument("--challenger", help=f"{MODEL_REFERENCE} (default: @challenger)")
    shadow.add_argument("--batch", help="file or folder of rows (default: score.input)")
    shadow.add_argument(
        "--labels", help="labels of those rows, joined by data.id (default: evaluate.labels)"
    )
    shadow.add_argument(
        "--output",
        help="the champion's served scores (default: score.output, or score.output-<batch>)",
    )
    shadow.add_argument(
        "--log",
        nargs="?",
        const=ENDPOINT_LOG,
        metavar="PATH",
        help="judge what the online endpoint logged instead of scoring a batch: the "
        "challenger's live shadow scores (shadow/) paired with the champion's answers "
        "(predictions/), the labels it received (labels/) joined by data.id; PATH is the "
        "log folder or one day folder, <log>/predictions/YYYY-MM-DD (without PATH: "
        "endpoint.log.path)",
    )


def _add_retrain(flows: Any) -> None:
    retrain = flows.add_parser(
        "retrain",
        help="retrain on newly labelled production rows; promote only on the shadow's word",
        description=(
            "Gather production rows whose labels arrived since the current data version "
            "(the newest labelled batch is held out for the shadow comparison), record them "
            "as a new DVC data version, then train, gate, shadow against the champion and "
            "promote when the shadow decides so. Exits early with too few new rows; a "
            "second run while one runs does nothing."
        ),
    )
    add_spec_arguments(retrain)
    retrain.add_argument("--cause", help="MLflow run id of the drift report behind this run")
    retrain.add_argument("--batches", help="production batches (default: retrain.batches)")
    retrain.add_argument("--labels", help="their labels (default: retrain.labels)")


def _add_canary(flows: Any) -> None:
    canary = flows.add_parser(
        "canary",
        help="serve a growing share of entities with the challenger, one step per batch",
        description=(
            "Continue (or start) the canary of the challenger: each batch not processed yet "
            "is one step of evaluate.canary.steps; entities are routed by a stable hash of "
            "their id; guards decide to advance, hold or roll back; at 100% with green "
            "guards the challenger is promoted, and a breach rolls back automatically."
        ),
    )
    add_spec_arguments(canary)
    canary.add_argument(
        "--challenger", help="the version to canary when none is under way (default: @challenger)"
    )
    canary.add_argument(
        "--batches",
        nargs="+",
        metavar="PATH",
        help="files or folders, in order (default: score.input)",
    )
    canary.add_argument(
        "--labels", help="labels of the batches, joined by data.id (default: evaluate.labels)"
    )
    canary.add_argument(
        "--output", help="folder of the canary's predictions (default: score.output-canary)"
    )
    canary.add_argument(
        "--log",
        nargs="?",
        const=ENDPOINT_LOG,
        metavar="PATH",
        help="judge what the online endpoint served instead of batches: each UTC day of its "
        "log since the canary started is one step once the day is over, the rows the "
        "challenger served against those of the control; PATH is the log folder or one "
        "day folder, <log>/predictions/YYYY-MM-DD (without PATH: endpoint.log.path)",
    )


def run_command(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec

    if args.flow == "score":
        for name, key in SCORE_FLAGS.items():
            if getattr(args, name) is not None:
                args.overrides = [*args.overrides, f"{key}={getattr(args, name)}"]
    # Validate before starting Prefect, so a broken spec fails in a fraction of a second.
    loaded = load_spec(args.config, args.overrides)
    prepare_environment(loaded.root, debug=args.debug, session=args.session)
    check_servers(args)
    formatter, options = RUNS[args.flow]
    flow_function = getattr(
        importlib.import_module(f"stemma.flows.{args.flow}"), f"{args.flow}_flow"
    )
    quiet_known_errors(args.debug)
    watch_servers(args)
    summary = flow_function(
        config=str(args.config),
        overrides=list(args.overrides),
        **{option: getattr(args, option) for option in options},
    )
    print(formatter(summary))
    return 0
