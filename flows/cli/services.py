"""`stemma serve`, `stemma up`, `stemma down`, `stemma status`: deployments and servers."""

from __future__ import annotations

import argparse
import os
from typing import Any

from stemma.flows.cli.parser import add_root_argument, add_spec_arguments
from stemma.flows.cli.session import check_servers, prepare_environment, watch_servers


def register_serve(commands: Any) -> None:
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
    add_spec_arguments(serve)
    serve.add_argument(
        "--dry-run", action="store_true", help="print the deployments; create nothing"
    )
    serve.set_defaults(handler=serve_command)


def register_servers(commands: Any) -> None:
    up = commands.add_parser(
        "up",
        help="start a Prefect server and an MLflow server on 127.0.0.1",
        description=(
            "Start the Prefect server (UI and API) and the MLflow server on loopback, with "
            "their data under .stemma/, wait until both are healthy and print their URLs. "
            "Starting twice is harmless."
        ),
    )
    add_root_argument(up)
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
    up.set_defaults(handler=up_command)
    down = commands.add_parser("down", help="stop the servers `stemma up` started")
    add_root_argument(down)
    down.set_defaults(handler=down_command)
    status = commands.add_parser("status", help="say which servers run where")
    add_root_argument(status)
    status.set_defaults(handler=status_command)


def serve_command(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec

    loaded = load_spec(args.config, args.overrides)
    # No temporary Prefect server: deployments on it would vanish with this process, so
    # run_serve asks for `stemma up` or PREFECT_API_URL instead.
    prepare_environment(loaded.root, debug=args.debug, session=None)
    check_servers(args)
    from stemma.flows.serve import run_serve

    watch_servers(args)
    config = os.path.relpath(loaded.path, loaded.root)
    print(run_serve(loaded, config, list(args.overrides), dry_run=args.dry_run))
    return 0


def up_command(args: argparse.Namespace) -> int:
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


def down_command(args: argparse.Namespace) -> int:
    from stemma.flows.services import run_down

    print(run_down(args.root.resolve()))
    return 0


def status_command(args: argparse.Namespace) -> int:
    from stemma.flows.services import run_status

    print(run_status(args.root.resolve()))
    return 0
