"""The argument parser: the global options, then each command group's own parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = (
    "Declarative MLOps pipelines for PyTorch models: versioned data, checks, tracked "
    "training, a registry gate, and lineage from data to prediction."
)
EPILOG = (
    "exit codes: 0 done; 1 unexpected error; 2 invalid spec; 3 data; 4 training; "
    "5 registry; 6 lineage; 7 not reproduced; 69 an MLflow or Prefect server did not "
    "answer within --server-wait; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). "
    "After 69, 130 or 143 a training run resumes from its checkpoint when run again."
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("stemma")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `stemma` command (each sets its ``handler``)."""
    from stemma.flows.cli import data, lineage, models, run, services, spec

    parser = argparse.ArgumentParser(prog="stemma", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    spec.register(commands)
    run.register(commands)
    models.register_promotion(commands)
    lineage.register(commands)
    models.register_reproduce(commands)
    services.register_serve(commands)
    services.register_servers(commands)
    data.register_demo(commands)
    data.register_data(commands)
    return parser


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="project root (default: current folder)"
    )


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pipeline spec, e.g. configs/credit.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set train.epochs=3 (repeatable; values are YAML)",
    )
