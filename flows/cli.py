"""The `stemma` command line.

Start-up stays light: argparse, yaml and pydantic only. torch, mlflow, great_expectations
and prefect are imported inside the commands that need them, so `stemma --help` and
`stemma validate` answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stemma.components.errors import StemmaError
from stemma.components.platform.redaction import redact_url

#: Exit code when the user interrupts a command with Ctrl-C (128 + SIGINT), as shells
#: report it; SIGTERM gives 143 (128 + 15). Both keep what an interruption keeps.
EXIT_INTERRUPTED = 130
#: Exit code when SIGTERM stops a command (128 + SIGTERM).
EXIT_TERMINATED = 143
#: Exit code for an error Stemma did not anticipate (a bug or an environment problem).
EXIT_UNEXPECTED = 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stemma")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `stemma` command."""
    parser = argparse.ArgumentParser(
        prog="stemma",
        description=(
            "Declarative MLOps pipelines for PyTorch models: versioned data, checks, tracked "
            "training, a registry gate, and lineage from data to prediction."
        ),
        epilog=(
            "exit codes: 0 done; 1 unexpected error; 2 invalid spec; 3 data; 4 training; "
            "5 registry; 6 lineage; 7 not reproduced; 69 an MLflow or Prefect server did not "
            "answer within --server-wait; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). "
            "After 69, 130 or 143 a training run resumes from its checkpoint when run again."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and library logs on errors"
    )
    parser.add_argument(
        "--server-wait",
        type=float,
        metavar="SECONDS",
        help="how long to wait for an MLflow or Prefect server that does not answer before "
        "stopping (a training run stays resumable; default: STEMMA_SERVER_WAIT_S, else 120)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    validate = commands.add_parser(
        "validate",
        help="check a pipeline spec and report every problem at once",
        description="Check a spec (schema, paths, columns, expectations, model imports).",
    )
    _add_spec_arguments(validate)
    validate.add_argument(
        "--deep",
        action="store_true",
        help="also build every expectation with Great Expectations itself (slower: imports GX)",
    )

    commands.add_parser(
        "schema",
        help="print the JSON Schema of the pipeline spec",
        description="Print the JSON Schema of the spec, for editors and the Prefect UI form.",
    )

    run = commands.add_parser("run", help="run a flow", description="Run a Stemma flow.")
    flows = run.add_subparsers(dest="flow", metavar="FLOW")
    flows.required = True
    train = flows.add_parser(
        "train",
        help="validate the data, train, evaluate, register and gate a model",
        description=(
            "Run the training flow as a Prefect flow (ephemeral Prefect unless PREFECT_API_URL "
            "is set), tracked in MLflow (a SQLite store under .stemma/ unless "
            "MLFLOW_TRACKING_URI is set)."
        ),
    )
    _add_spec_arguments(train)
    score = flows.add_parser(
        "score",
        help="score a batch with a registered model (the champion by default)",
        description=(
            "Stream a Parquet/CSV file or folder through a registered model in chunks; write "
            "Parquet parts atomically and a _SUCCESS manifest last. A killed run resumes "
            "from its finished parts when started again."
        ),
    )
    _add_spec_arguments(score)
    score.add_argument("--input", help="file or folder to score (default: score.input)")
    score.add_argument("--output", help="output folder (default: score.output)")
    score.add_argument(
        "--model",
        help="models:/<name>@<alias> or models:/<name>/<version> (default: score.model or @champion)",
    )
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
    monitor = flows.add_parser(
        "monitor",
        help="compare a batch with the model's reference profile and report drift",
        description=(
            "Compare a production batch (and its labels, when given) with the reference "
            "profile saved with the model at training time; log the drift report to MLflow "
            "and emit the Prefect event stemma.drift.detected when it is over the thresholds."
        ),
    )
    _add_spec_arguments(monitor)
    monitor.add_argument(
        "--batch", help="file or folder, one batch (default: monitor.input or score.input)"
    )
    monitor.add_argument(
        "--labels", help="labels of the batch, joined by data.id (default: monitor.labels)"
    )
    monitor.add_argument(
        "--model",
        help="models:/<name>@<alias> or models:/<name>/<version> (default: monitor.model or @champion)",
    )

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
    _add_spec_arguments(quantize)
    quantize.add_argument(
        "--model",
        help="models:/<name>@<alias> or models:/<name>/<version> (default: quantize.model, "
        "else the newest version that passed its gate)",
    )
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
    _add_spec_arguments(shadow)
    shadow.add_argument(
        "--challenger",
        help="models:/<name>@<alias> or models:/<name>/<version> (default: @challenger)",
    )
    shadow.add_argument("--batch", help="file or folder of rows (default: score.input)")
    shadow.add_argument(
        "--labels", help="labels of those rows, joined by data.id (default: evaluate.labels)"
    )
    shadow.add_argument(
        "--output",
        help="the champion's served scores (default: score.output, or score.output-<batch>)",
    )
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
    _add_spec_arguments(retrain)
    retrain.add_argument("--cause", help="MLflow run id of the drift report behind this run")
    retrain.add_argument("--batches", help="production batches (default: retrain.batches)")
    retrain.add_argument("--labels", help="their labels (default: retrain.labels)")
    canary_parser = flows.add_parser(
        "canary",
        help="serve a growing share of entities with the challenger, one step per batch",
        description=(
            "Continue (or start) the canary of the challenger: each batch not processed yet "
            "is one step of evaluate.canary.steps; entities are routed by a stable hash of "
            "their id; guards decide to advance, hold or roll back; at 100% with green "
            "guards the challenger is promoted, and a breach rolls back automatically."
        ),
    )
    _add_spec_arguments(canary_parser)
    canary_parser.add_argument(
        "--challenger",
        help="the version to canary when none is under way (default: @challenger)",
    )
    canary_parser.add_argument(
        "--batches",
        nargs="+",
        metavar="PATH",
        help="files or folders, in order (default: score.input)",
    )
    canary_parser.add_argument(
        "--labels", help="labels of the batches, joined by data.id (default: evaluate.labels)"
    )
    canary_parser.add_argument(
        "--output", help="folder of the canary's predictions (default: score.output-canary)"
    )

    promote = commands.add_parser(
        "promote",
        help="make a model version the champion (compare-and-set)",
        description=(
            "Move the `champion` alias to REF if the champion is still the expected one and "
            "REF passed its gate; the old champion keeps `previous-champion`. Racing "
            "promotions leave exactly one winner; the decision is recorded in MLflow."
        ),
    )
    promote.add_argument("reference", help="models:/<name>/<version> or models:/<name>@<alias>")
    _add_root_argument(promote)
    promote.add_argument("--reason", default="promoted by hand", help="why (recorded)")
    promote.add_argument(
        "--expect-champion",
        help="the version you expect to replace (`none` for no champion; default: the current one)",
    )
    rollback = commands.add_parser(
        "rollback",
        help="return the champion alias to the previous champion",
        description="One-step rollback: `champion` moves back to `previous-champion`.",
    )
    rollback.add_argument("model", help="registered model name, e.g. credit")
    _add_root_argument(rollback)
    rollback.add_argument("--reason", default="rolled back by hand", help="why (recorded)")

    lineage = commands.add_parser(
        "lineage",
        help="show where a model, run, data version or prediction came from (or what it fed)",
        description=(
            "Walk the lineage records from REF: upstream (where it came from) or, with "
            "--downstream, what it fed. Each node shows its kind, id, digest, created time "
            "and the flow run that made it. Answers from MLflow searches on the records' tags."
        ),
    )
    lineage.add_argument(
        "reference",
        metavar="REF",
        help="models:/<name>@<alias>, models:/<name>/<version>, an MLflow run id, a data md5, "
        "data.dvc@<git rev>, a scoring output (folder, _SUCCESS or part file), or a node id",
    )
    _add_root_argument(lineage)
    lineage.add_argument(
        "--downstream", action="store_true", help="what REF fed, instead of where it came from"
    )
    shape = lineage.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the graph as JSON, for tools")
    shape.add_argument(
        "--mermaid", action="store_true", help="print the graph as a Mermaid flowchart, for docs"
    )
    lineage.add_argument(
        "--openlineage",
        metavar="FILE|URL",
        help="also send the graph as OpenLineage run events: JSON lines to FILE, or POSTed to "
        "an http(s) URL (/api/v1/lineage when it has no path)",
    )
    lineage.add_argument(
        "--all",
        dest="all_runs",
        action="store_true",
        help="follow every run from a node (default: the newest 20)",
    )

    reproduce = commands.add_parser(
        "reproduce",
        help="rebuild a registered model from its lineage and compare it with the original",
        description=(
            "Restore the model's data version through DVC (refusing if the bytes differ), take "
            "the resolved spec and seeds its training run logged, warn when the code differs "
            "from the recorded git revision, retrain with the training flow in an isolated "
            "store (nothing is registered, no alias moves), and compare weights and metrics. "
            "Exit 0 when identical, 7 with the differences otherwise."
        ),
    )
    reproduce.add_argument(
        "reference",
        metavar="REF",
        help="models:/<name>/<version>, models:/<name>@<alias>, or a training run id",
    )
    _add_root_argument(reproduce)
    reproduce.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the recorded spec before retraining, to see whether the change alters "
        "the model (repeatable)",
    )
    reproduce.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep the rebuilt project and its store in DIR"
    )

    serve = commands.add_parser(
        "serve",
        help="create the Prefect deployments of a spec and serve them",
        description=(
            "Create one Prefect deployment per flow of the spec (training by hand, nightly "
            "scoring, monitoring after scoring, retraining on schedule and on drift events, "
            "...) on the Prefect server of `stemma up` or PREFECT_API_URL, and run them "
            "until interrupted. Deployments stay unpaused when serving stops."
        ),
    )
    _add_spec_arguments(serve)
    serve.add_argument(
        "--dry-run", action="store_true", help="print the deployments; create nothing"
    )

    up = commands.add_parser(
        "up",
        help="start a Prefect server and an MLflow server on 127.0.0.1",
        description=(
            "Start the Prefect server (UI and API) and the MLflow server on loopback, with "
            "their data under .stemma/, wait until both are healthy and print their URLs. "
            "Starting twice is harmless."
        ),
    )
    _add_root_argument(up)
    up.add_argument("--prefect-port", type=int, default=4200, help="default: 4200")
    up.add_argument("--mlflow-port", type=int, default=5000, help="default: 5000")
    up.add_argument(
        "--prefect-database-url",
        help="PostgreSQL URL for Prefect (default: SQLite under .stemma/prefect-server)",
    )
    up.add_argument(
        "--mlflow-database-url",
        help="PostgreSQL URL for MLflow (default: SQLite .stemma/mlflow.db)",
    )
    up.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for health (default: 120)"
    )
    down = commands.add_parser("down", help="stop the servers `stemma up` started")
    _add_root_argument(down)
    status = commands.add_parser("status", help="say which servers run where")
    _add_root_argument(status)

    demo = commands.add_parser(
        "demo",
        help="play the worked example's whole life over simulated days",
        description=(
            "Build a fresh demo project under .stemma/demo, train the first champion, then "
            "day by day score, monitor, receive labels, retrain on drift, shadow the new "
            "model and promote it when the evidence says so; print a table per day."
        ),
    )
    _add_root_argument(demo)
    demo.add_argument("--days", type=int, default=12, help="simulated days (default: 12)")
    demo.add_argument(
        "--train-rows", type=int, default=20_000, help="first training table (default: 20000)"
    )
    demo.add_argument(
        "--batch-rows", type=int, default=4_000, help="applications per day (default: 4000)"
    )

    data = commands.add_parser("data", help="work with the project's data")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_commands.required = True
    generate = data_commands.add_parser(
        "generate",
        help="generate the worked example's data under data/ and record it with DVC",
        description=(
            "Write the credit example (training table, daily batches and their labels) with "
            "Stemma's seeded generator, then check it against data.dvc (or record it)."
        ),
    )
    generate.add_argument(
        "--root", type=Path, default=Path("."), help="project root (default: current folder)"
    )
    generate.add_argument(
        "--no-dvc", action="store_true", help="only write the files; do not run `dvc add`"
    )
    return parser


def _add_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="project root (default: current folder)"
    )


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pipeline spec, e.g. configs/credit.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set train.epochs=3 (repeatable; values are YAML)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stemma` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "validate": _cmd_validate,
        "schema": _cmd_schema,
        "run": _cmd_run,
        "data": _cmd_data,
        "demo": _cmd_demo,
        "promote": _cmd_promote,
        "rollback": _cmd_rollback,
        "lineage": _cmd_lineage,
        "reproduce": _cmd_reproduce,
        "serve": _cmd_serve,
        "up": _cmd_up,
        "down": _cmd_down,
        "status": _cmd_status,
    }
    from stemma.components.platform.lifecycle import interruption_exit_code, sigterm_as_interrupt

    args.session = _Session()
    try:
        # SIGTERM takes Ctrl-C's path (checkpoint kept, MLflow run KILLED), exit code 143.
        with sigterm_as_interrupt(), args.session.cleanup:
            return handlers[args.command](args)
    except StemmaError as error:
        if args.debug:
            raise
        print(f"error: {redact_url(error.render())}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interruption:
        outage = args.session.outage()
        if outage is not None:  # the server watch stopped the command
            print(f"error: {outage.render()}", file=sys.stderr)
            return outage.exit_code
        code = interruption_exit_code(interruption)
        word = "terminated" if code == EXIT_TERMINATED else "interrupted"
        print(f"{word}: {_INTERRUPTED.get(_command_key(args), 'stopped')}", file=sys.stderr)
        return code
    except Exception as error:  # anything unforeseen: one line, traceback only with --debug
        outage = args.session.outage(error)
        if outage is not None and not args.debug:  # failed because a server went away
            print(f"error: {outage.render()}", file=sys.stderr)
            return outage.exit_code
        if args.debug:
            raise
        print(
            f"error: unexpected {type(error).__name__}: {redact_url(str(error))}\n"
            "  run again with --debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED


class _Session:
    """What one command started and must stop: a temporary Prefect server, a server watch."""

    def __init__(self) -> None:
        self.cleanup = contextlib.ExitStack()
        self.prefect_server = None  # lifecycle.TemporaryPrefectServer, once started
        self.watch = None  # outages.ServerWatch, once watching
        self.servers: list = []  # outages.Server: what the command talks to
        self.wait_s = 0.0  # how long a server may be down before the command stops

    def outage(self, error: BaseException | None = None) -> StemmaError | None:
        """The outage that stopped the command: the watch's verdict, or a server it finds
        down when ``error`` (a failed request, most likely) ended the command."""
        if self.watch is None:
            return None
        if self.watch.expired is not None:
            return self.watch.expired
        down = self.watch.down()
        if error is not None and down:
            from stemma.components.platform.outages import outage_error

            return outage_error(down[0], self.watch.wait_s, str(error)[:200], waited=False)
        return None


def _check_servers(args: argparse.Namespace, *, prefect: bool = True) -> None:
    """Before any work: check that the servers the command uses answer (waiting up to
    --server-wait for one that does not) and bound MLflow's HTTP retries to that wait.

    The temporary Prefect server is not checked here: it is still starting, and
    :func:`_watch_servers` waits for it.
    """
    from stemma.components.platform import outages

    session: _Session = args.session
    session.wait_s = outages.wait_seconds(args.server_wait)
    temporary = session.prefect_server.api_url if session.prefect_server else None
    session.servers = [
        server for server in outages.servers_in_use() if prefect or server.name != "Prefect"
    ]
    outages.wait_for_servers(
        [server for server in session.servers if server.url != temporary], session.wait_s
    )
    for name, value in outages.mlflow_retry_environment(session.wait_s).items():
        os.environ[name] = value
    if not args.debug:
        import logging

        # urllib3 logs each of MLflow's retries; the watch says it once, in a sentence.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _watch_servers(args: argparse.Namespace) -> None:
    """Before the first request: wait for the temporary Prefect server to start, then watch
    every server the command uses until it ends (see :func:`_check_servers`)."""
    from stemma.components.platform import outages

    session: _Session = args.session
    if session.prefect_server is not None:
        session.prefect_server.wait_until_ready(
            float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        )
    if session.watch is None:
        session.watch = session.cleanup.enter_context(
            outages.ServerWatch(session.servers, session.wait_s)
        )


#: What an interrupted command leaves behind, by command (`run train` as "run train").
_INTERRUPTED = {
    "run train": "training resumes from its last checkpoint when run again",
    "run score": "scoring resumes from its finished parts when run again",
    "serve": "stopped serving; the deployments stay unpaused and scheduled",
}


def _command_key(args: argparse.Namespace) -> str:
    flow = getattr(args, "flow", None)
    return f"{args.command} {flow}" if flow else args.command


def _cmd_validate(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec

    started = time.perf_counter()
    loaded = load_spec(args.config, args.overrides)
    if args.deep and loaded.spec.checks:
        from stemma.components.data.checks import deep_expectation_problems
        from stemma.components.errors import SpecError

        problems = deep_expectation_problems(loaded.spec.checks)
        if problems:
            raise SpecError(
                f"{args.config}: {len(problems)} expectation problem(s)",
                [f"checks[{index}]: {message}" for index, message in problems],
            )
    spec = loaded.spec
    elapsed = time.perf_counter() - started
    # Folders outside the project the spec opens up are worth a reviewer's second look.
    allowed = "".join(
        f"\n  paths may also point into {folder} (pipeline.allowed_roots)"
        for folder in spec.pipeline.allowed_roots
    )
    print(
        f"{args.config}: valid ({spec.pipeline.name}: {len(spec.data.features.all)} features, "
        f"{len(spec.checks)} checks, model {spec.model.architecture}; {elapsed * 1000:.0f} ms)"
        + allowed
    )
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from stemma.components.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec

    if args.flow == "score":
        # The scale-out flags are spec values: they are validated and recorded like --set.
        flags = {
            "runner": "score.runner",
            "workers": "score.dask.workers",
            "address": "score.dask.address",
        }
        for name, key in flags.items():
            if getattr(args, name) is not None:
                args.overrides = [*args.overrides, f"{key}={getattr(args, name)}"]
    # Validate before starting Prefect, so a broken spec fails in a fraction of a second.
    loaded = load_spec(args.config, args.overrides)
    prepare_environment(loaded.root, debug=args.debug, session=args.session)
    _check_servers(args)
    formatter, options = _RUNS[args.flow]
    flow_function = getattr(
        importlib.import_module(f"stemma.flows.{args.flow}"), f"{args.flow}_flow"
    )
    _quiet_known_errors(args.debug)
    _watch_servers(args)
    summary = flow_function(
        config=str(args.config),
        overrides=list(args.overrides),
        **{option: getattr(args, option) for option in options},
    )
    print(formatter(summary))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stemma.components.errors import SpecError

    if not 1 <= args.days <= 30:
        raise SpecError("--days must be between 1 and 30", [f"got {args.days}"])
    if args.train_rows < 2_000 or args.batch_rows < 500:
        raise SpecError("--train-rows must be at least 2000 and --batch-rows at least 500")
    root = args.root.resolve()
    prepare_environment(root, debug=args.debug, session=args.session)
    _check_servers(args)
    from stemma.flows.demo import format_demo, run_demo

    _quiet_known_errors(args.debug)
    _watch_servers(args)
    result = run_demo(root, days=args.days, train_rows=args.train_rows, batch_rows=args.batch_rows)
    print(format_demo(result))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from stemma.flows.data import generate_example_data

    report = generate_example_data(args.root.resolve(), record_with_dvc=not args.no_dvc)
    print(report)
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from stemma.flows.promote import format_record, run_promote

    _check_servers(args, prefect=False)
    _watch_servers(args)
    record = run_promote(
        args.reference, args.root.resolve(), reason=args.reason, expected=args.expect_champion
    )
    print(format_record(record))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from stemma.flows.promote import format_record, run_rollback

    _check_servers(args, prefect=False)
    _watch_servers(args)
    print(format_record(run_rollback(args.model, args.root.resolve(), reason=args.reason)))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec

    loaded = load_spec(args.config, args.overrides)
    # No temporary Prefect server: deployments on it would vanish with this process, so
    # run_serve asks for `stemma up` or PREFECT_API_URL instead.
    prepare_environment(loaded.root, debug=args.debug, session=None)
    _check_servers(args)
    from stemma.flows.serve import run_serve

    _watch_servers(args)

    config = os.path.relpath(loaded.path, loaded.root)
    print(run_serve(loaded, config, list(args.overrides), dry_run=args.dry_run))
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from stemma.flows.lineage import run_lineage

    _check_servers(args, prefect=False)
    _watch_servers(args)
    output = "json" if args.json else "mermaid" if args.mermaid else "tree"
    text = run_lineage(
        args.reference,
        args.root.resolve(),
        downstream=args.downstream,
        output=output,
        openlineage=args.openlineage,
        all_runs=args.all_runs,
    )
    print(text)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    prepare_environment(root, debug=args.debug, session=args.session)
    _check_servers(args)
    from stemma.flows.reproduce import EXIT_NOT_REPRODUCED, run_reproduce

    _quiet_known_errors(args.debug)
    _watch_servers(args)
    report = run_reproduce(args.reference, root, overrides=args.overrides, keep=args.keep)
    print(report.render())
    if report.code_warnings:
        print("warning: the code differs from the revision that trained the model", file=sys.stderr)
    return 0 if report.reproduced else EXIT_NOT_REPRODUCED


def _cmd_up(args: argparse.Namespace) -> int:
    from stemma.flows.services import run_up

    print(
        run_up(
            args.root.resolve(),
            prefect_port=args.prefect_port,
            mlflow_port=args.mlflow_port,
            prefect_database_url=args.prefect_database_url,
            mlflow_database_url=args.mlflow_database_url,
            timeout_s=args.timeout,
        )
    )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from stemma.flows.services import run_down

    print(run_down(args.root.resolve()))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from stemma.flows.services import run_status

    print(run_status(args.root.resolve()))
    return 0


def prepare_environment(
    root: Path, *, debug: bool = False, session: _Session | None = None
) -> None:
    """Defaults for an embedded run, each overridable from the environment.

    Prefect runs ephemerally with its home under the project (``.stemma/prefect``) unless
    ``PREFECT_API_URL`` points at a server. A fresh ephemeral database takes ~17 s to
    migrate, close to Prefect's 20 s start-up limit, so the limit is raised.

    With a ``session`` (the CLI's), the temporary Prefect server is started here, by Stemma
    rather than by Prefect's first flow, so that it starts while the command imports its
    libraries and dies with the command even when the command is killed (Linux); it is
    stopped when the process exits, after Prefect's own exit handlers have sent their last
    logs. ``PREFECT_API_URL`` then points at it, for this process and its children.
    """
    state = root / ".stemma"
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
        # Prefect's SQLite database cannot be created in a folder that does not exist.
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        if session is not None and session.prefect_server is None and _ephemeral_allowed():
            from stemma.components.platform.lifecycle import start_temporary_prefect_server

            server = start_temporary_prefect_server(Path(os.environ["PREFECT_HOME"]))
            if server is not None:
                # Registered before Prefect is imported, so it runs after Prefect's own
                # exit handlers (which flush logs and events to this server).
                atexit.register(server.stop)
                session.prefect_server = server
                os.environ["PREFECT_API_URL"] = server.api_url
                # The temporary server has no UI: no "View at" link to a page that is not there.
                os.environ.setdefault("PREFECT_UI_URL", "")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at <tracking URI>" with the URI's password in it; the
    # summaries name the store with its credentials masked instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not debug:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        # GX announces each temporary docs folder at INFO; the flow reports what matters.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)


def _ephemeral_allowed() -> bool:
    """Whether Prefect would start an ephemeral server here: not turned off, and no API URL
    in the profile of the Prefect home in use."""
    allowed = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    if allowed.strip().lower() in {"0", "false", "no", "off"}:
        return False
    if os.environ.get("PREFECT_PROFILES_PATH") or os.environ.get("PREFECT_PROFILE"):
        return False
    profiles = Path(os.environ["PREFECT_HOME"]) / "profiles.toml"
    return not (profiles.exists() and "PREFECT_API_URL" in profiles.read_text(errors="replace"))


def _quiet_known_errors(debug: bool) -> None:
    """Keep Stemma's own errors out of Prefect's console logs; the CLI prints them once.

    Prefect logs every failed task and flow with the exception and its traceback. For
    errors Stemma raised on purpose (a broken config, a failed check) the CLI prints a
    one-screen message instead, so the console copies are dropped. Only terminal handlers
    are filtered: the Prefect server (and its UI) still receives every record. ``--debug``
    keeps everything.
    """
    if debug:
        return
    import logging

    class _DropStemmaErrors(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], StemmaError))

    loggers = [
        logging.getLogger(),
        *[
            logger
            for name, logger in logging.root.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and name.startswith("prefect")
        ],
    ]
    for logger in loggers:
        for handler in logger.handlers:
            terminal = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if terminal and not any(isinstance(f, _DropStemmaErrors) for f in handler.filters):
                handler.addFilter(_DropStemmaErrors())


def format_train_summary(summary: dict) -> str:
    """The one-screen summary printed at the end of `stemma run train`."""
    gate = summary["gate"]
    lines = [
        f"trained {summary['model_name']} version {summary['model_version']} "
        f"(run {summary['run_id']}, data {summary['data_md5']})",
        f"  {gate['metric']} on the test split: {gate['value']:.4f}",
        f"  gate: {'PASSED' if gate['passed'] else 'FAILED'}"
        + (f", alias '{gate['alias']}'" if gate.get("alias") else ", no alias"),
    ]
    lines += [f"    - {reason}" for reason in gate["reasons"]]
    if summary.get("resumed"):
        lines.append("  resumed an interrupted run from its last checkpoint")
    quantized = summary.get("quantize")
    if quantized and "error" in quantized:
        lines.append(f"  quantize: FAILED: {quantized['error'].splitlines()[0]}")
    elif quantized:
        lines.append(
            "  quantize: "
            + ", ".join(
                f"{v['method']} {v['status']}" + (f" (v{v['version']})" if v["version"] else "")
                for v in quantized["variants"]
            )
        )
    lines.append(f"  MLflow: {summary['tracking_uri']}  (experiment '{summary['experiment']}')")
    if summary.get("ui_hint"):
        lines.append(f"  {summary['ui_hint']}")
    return redact_url("\n".join(lines))


def format_monitor_summary(summary: dict) -> str:
    """The summary printed at the end of `stemma run monitor`: the verdict, then the findings."""
    verdict = "DRIFT" if summary["drift_detected"] else "no drift"
    lines = [
        f"{verdict}: {summary['batch']} vs {summary['model_uri']} "
        f"(v{summary['model_version']}): {summary['summary']}"
    ]
    lines += [f"  - {reason}" for reason in summary["reasons"]]
    if summary.get("labels") and not summary["labelled_rows"]:
        lines.append(f"  no label in {summary['labels']} matched a row of the batch")
    if summary.get("event_id"):
        lines.append(f"  event stemma.drift.detected emitted (id {summary['event_id']})")
    lines.append(
        f"  report: MLflow run {summary['run_id']} (experiment '{summary['experiment']}'), "
        "drift/summary.png"
    )
    return redact_url("\n".join(lines))


def format_quantize_summary(summary: dict) -> str:
    """The comparison table printed at the end of `stemma run quantize`."""

    def number(value: float | None, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    metric = summary["metric"]
    lines = [
        f"quantized {summary['model_name']} v{summary['parent_version']}: {metric} "
        f"{summary['parent_value']:.4f} on {summary['rows']} held-out rows; "
        f"{summary.get('clock', 'wall')}-time ms per forward pass of {summary['batch_rows']} "
        f"rows, {summary['threads']} thread(s), median of {summary['repeats']}",
        "  fp32: "
        + ", ".join(f"{runtime} {ms:.3f} ms" for runtime, ms in summary["parent_ms"].items())
        + f"  (baseline: {summary['baseline_runtime']}); "
        + f"{summary.get('parent_size_bytes', 0) / 1024:.1f} KiB on disk",
        f"  gate: {metric} drop <= {summary['max_metric_drop']:g} and speed-up >= "
        f"{summary['min_speedup']:g}x",
        "",
        f"  {'method':<17}{'status':<10}{metric:>9}{'drop':>9}{'agree':>8}{'|dscore|':>10}"
        f"{'runtime':>10}{'ms':>9}{'speed-up':>10}{'size':>10}  version",
    ]
    for variant in summary["variants"]:
        agreement = variant["agreement"]
        size = variant["size_bytes"]
        lines.append(
            f"  {variant['method']:<17}{variant['status'].upper():<10}"
            f"{number(variant['value'], '.4f'):>9}{number(variant['metric_drop'], '.4f'):>9}"
            f"{number(None if agreement is None else agreement * 100, '.2f', '%'):>8}"
            f"{number(variant['mean_abs_diff'], '.2e'):>10}{variant['runtime'] or '-':>10}"
            f"{number(variant['latency_ms'], '.3f'):>9}{number(variant['speedup'], '.2f', 'x'):>10}"
            f"{number(None if size is None else size / 1024, '.1f', ' KiB'):>10}"
            f"  {('v' + variant['version']) if variant['version'] else '-'}"
        )
        if variant["status"] != "passed":
            lines += [f"      {reason}" for reason in variant["reasons"]]
    lines += [f"  note: {note}" for note in summary["notes"]]
    lines.append("")
    if summary["served_version"]:
        lines.append(
            f"  models:/{summary['model_name']}@{summary['served_alias']} -> "
            f"v{summary['served_version']} (fastest passing variant"
            + (", served by `stemma run score`: quantize.serve is on)" if summary["serve"] else ")")
        )
    else:
        lines.append("  no variant passed: batch scoring keeps the fp32 model")
    if summary["removed_abandoned"]:
        lines.append(
            "  removed half-registered versions left by a killed run: "
            + ", ".join(f"v{v}" for v in summary["removed_abandoned"])
        )
    lines.append(
        f"  MLflow run {summary['run_id']} (quantize/comparison.csv, quantize/tradeoff.png)"
    )
    return redact_url("\n".join(lines))


def format_shadow_summary(summary: dict) -> str:
    """The summary printed at the end of `stemma run shadow`: decision, reasons, numbers."""
    name = summary["model_name"]
    lines = [
        f"shadow: {name} v{summary['challenger_version']} vs champion "
        f"v{summary['champion_version']}: {summary['decision'].upper()}"
    ]
    lines += [f"  - {reason}" for reason in summary["reasons"]]
    distances = summary["distances"]
    lines.append(
        f"  {summary['compared_rows']:,} rows compared, {summary['labelled_rows']:,} labelled; "
        f"decisions agree on {summary['agreement']:.1%}; score PSI {distances['psi']:.4f}, "
        f"KS {distances['ks']:.4f}; challenger error rate {summary['challenger_error_rate']:.2%}"
    )
    if summary.get("promotion"):
        record = summary["promotion"]
        lines.append(
            f"  promotion: {record['outcome']} (champion v{record['from_version']} -> "
            f"v{record['to_version']}, MLflow run {record.get('record_run_id')})"
        )
    lines.append(f"  served: {summary['served_output']}  shadow: {summary['shadow_output']}")
    lines.append(f"  labels: {summary['labels']}")
    lines.append(f"  MLflow run {summary['run_id']} (plots and report under shadow/)")
    return redact_url("\n".join(lines))


def format_canary_summary(summary: dict) -> str:
    """The summary printed at the end of `stemma run canary`: each step, then the state."""
    lines = [f"canary: {summary['describe']}" + (" (started)" if summary["started"] else "")]
    for step in summary["steps"]:
        moved = "" if step["action"] == "none" else f"; {step['action']} {step['outcome']}"
        lines.append(
            f"  {Path(step['batch']).name}: {step['fraction']:.0%} ({step['arm_rows']:,} of "
            f"{step['rows']:,} rows to the challenger) -> {step['decision']}{moved}"
        )
        lines += [f"      {reason}" for reason in step["reasons"]]
    if summary["skipped"]:
        lines.append(f"  already processed: {', '.join(summary['skipped'])}")
    if summary["left"]:
        lines.append(f"  not processed (the canary has ended): {len(summary['left'])} batch(es)")
    lines.append(f"  predictions: {summary['output']}  labels: {summary['labels']}")
    return redact_url("\n".join(lines))


def format_score_summary(summary: dict) -> str:
    """The one-line summary (and where to look) printed at the end of `stemma run score`."""
    lines = [summary["summary"]]
    if summary.get("serving"):
        lines.append(f"  {summary['serving']}")
    if summary["rows"]["rejected"]:
        lines.append(f"  rejected rows and their reasons: {summary['output']}/rejects/")
    if summary["extra_columns"]:
        lines.append(f"  ignored input columns: {', '.join(summary['extra_columns'])}")
    lines.append(f"  manifest: {summary['manifest']}  (MLflow run {summary['run_id']})")
    return redact_url("\n".join(lines))


def format_retrain_summary(summary: dict) -> str:
    """The closing lines of `stemma run retrain`: the outcome and where to look."""
    lines = [summary["summary"]]
    if summary.get("data_md5") and summary.get("previous_data_md5"):
        lines.append(
            f"  data: {summary['previous_data_md5']} -> {summary['data_md5']} "
            f"(+{summary['new_rows']:,} rows"
            + (
                f", committed {summary['data_git_rev'][:10]})"
                if summary.get("data_git_rev")
                else ")"
            )
        )
    cause = summary.get("cause") or {}
    if cause.get("run_id"):
        lines.append(f"  cause: {cause['kind']} {cause['run_id']} on {cause.get('batch') or '?'}")
    if summary.get("run_id"):
        lines.append(f"  MLflow run {summary['run_id']}")
    return redact_url("\n".join(lines))


#: ``stemma run FLOW`` runs ``stemma.flows.FLOW.FLOW_flow``: its summary's formatter, and the
#: command-line options passed to it besides the config and the overrides.
_RUNS: dict[str, tuple[Callable[[dict], str], tuple[str, ...]]] = {
    "train": (format_train_summary, ()),
    "score": (format_score_summary, ("input", "output", "model")),
    "monitor": (format_monitor_summary, ("batch", "labels", "model")),
    "quantize": (format_quantize_summary, ("model",)),
    "shadow": (format_shadow_summary, ("challenger", "batch", "labels", "output")),
    "retrain": (format_retrain_summary, ("cause", "batches", "labels")),
    "canary": (format_canary_summary, ("challenger", "batches", "labels", "output")),
}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
