"""`stemma demo` and `stemma data generate`: the worked example."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from stemma.flows.cli.parser import add_root_argument
from stemma.flows.cli.session import (
    check_servers,
    logger_levels,
    prepare_environment,
    quiet_known_errors,
    watch_servers,
)


def register_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="play the worked example's whole life over simulated days",
        description=(
            "Build a fresh demo project under .stemma/demo, train the first champion, then "
            "day by day score, monitor, receive labels, retrain on drift, shadow the new "
            "model and promote it when the evidence says so; print a table per day."
        ),
    )
    add_root_argument(demo)
    demo.add_argument("--days", type=int, default=12, help="simulated days (default: 12)")
    demo.add_argument(
        "--train-rows", type=int, default=20_000, help="first training table (default: 20000)"
    )
    demo.add_argument(
        "--batch-rows", type=int, default=4_000, help="applications per day (default: 4000)"
    )
    demo.set_defaults(handler=demo_command)


def register_data(commands: Any) -> Any:
    """Add `stemma data` and its actions; return the actions' group."""
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
    data.set_defaults(handler=data_command)
    return data_commands


def demo_command(args: argparse.Namespace) -> int:
    from stemma.components.errors import SpecError

    if not 1 <= args.days <= 30:
        raise SpecError("--days must be between 1 and 30", [f"got {args.days}"])
    if args.train_rows < 2_000 or args.batch_rows < 500:
        raise SpecError("--train-rows must be at least 2000 and --batch-rows at least 500")
    root = args.root.resolve()
    # With `stemma up` running, the demo's flow runs go to its Prefect server; its MLflow
    # runs stay in the demo project's own store, rebuilt with the project on every demo.
    args.session.mlflow_from_services = False
    prepare_environment(root, debug=args.debug, session=args.session)
    check_servers(args)
    from stemma.flows.demo import format_demo, run_demo

    quiet_known_errors(args.debug)
    watch_servers(args)
    with logger_levels(_dvc_quiet(args)):
        result = run_demo(
            root, days=args.days, train_rows=args.train_rows, batch_rows=args.batch_rows
        )
    print(format_demo(result, prefect_ui=_lasting_prefect_ui(args)))
    return 0


def _lasting_prefect_ui(args: argparse.Namespace) -> str | None:
    """The UI of the Prefect server the flow runs went to, unless it was the command's own
    temporary server (gone with the command)."""
    if args.session.prefect_server is not None or not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import PREFECT_UI_URL

    from stemma.components.platform.redaction import redact_url

    url = PREFECT_UI_URL.value()
    return redact_url(str(url).rstrip("/")) if url else None


def _dvc_quiet(args: argparse.Namespace) -> dict[str, int]:
    """DVC's logger at WARNING unless --debug or -v: it prints git hints ("To track the
    changes with git, run: ...") at INFO, and the command's report says what happened."""
    import dvc.repo  # noqa: F401  (DVC sets its logger's level on import: quiet it after)

    return {} if args.debug or args.verbose else {"dvc": logging.WARNING}


def data_command(args: argparse.Namespace) -> int:
    from stemma.flows.data import generate_example_data

    with logger_levels(_dvc_quiet(args)):
        report = generate_example_data(args.root.resolve(), record_with_dvc=not args.no_dvc)
    print(report)
    return 0
