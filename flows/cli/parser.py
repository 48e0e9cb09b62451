"""The argument parser: the global options, then each command group's own parsers."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from pathlib import Path

DESCRIPTION = (
    "Declarative MLOps pipelines for PyTorch models: versioned data, checks, tracked "
    "training, a registry gate, and lineage from data to prediction."
)
#: What each exit code means, at the end of every command's help.
EXIT_CODES = """exit codes:
  0 done · 1 unexpected error · 2 invalid spec · 3 data · 4 training · 5 registry
  6 lineage · 7 not reproduced · 69 an MLflow or Prefect server did not answer within
  --server-wait · 130 interrupted (Ctrl-C) · 143 terminated (SIGTERM); after 69, 130 or
  143 a training run resumes from its checkpoint when run again"""
CONFIG = "configs/credit.yaml"
#: Examples at the end of each command's help, by command ("" for `stemma` itself).
EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    "": (
        ("stemma init train.csv --target label", "start a project from a table"),
        (f"stemma validate {CONFIG}", "check a spec and its data's column names"),
        (f"stemma run train {CONFIG}", "train, gate and register the spec's model"),
        (f"stemma run score {CONFIG} --input batch.parquet", "score a batch with the champion"),
        ("stemma lineage models:/credit@champion", "where the champion came from"),
        ("stemma up", "MLflow and Prefect servers with their UIs on 127.0.0.1"),
        ("stemma demo", "the worked example's whole life in a fresh project"),
    ),
    "init": (
        ("stemma init train.csv --target churned", "a project with a spec inferred from a table"),
        ("stemma init", "git, DVC and the folders only; add the table later"),
    ),
    "validate": ((f"stemma validate {CONFIG} --set train.epochs=3", "check with an override"),),
    "run": ((f"stemma run train {CONFIG}", "each flow's help: stemma run FLOW --help"),),
    "run train": (
        (f"stemma run train {CONFIG}", "train, gate and register"),
        (f"stemma -v run train {CONFIG} --set train.epochs=3", "3 epochs, with Prefect's log"),
    ),
    "run score": (
        (f"stemma run score {CONFIG}", "score score.input with the champion"),
        (
            f"stemma run score {CONFIG} --input day_07.parquet --model models:/credit/3",
            "score a file with version 3",
        ),
    ),
    "run monitor": ((f"stemma run monitor {CONFIG} --batch day_07.parquet", "drift of a batch"),),
    "run quantize": ((f"stemma run quantize {CONFIG}", "variants of the champion"),),
    "run compare": (
        (f"stemma run compare {CONFIG}", "the champion's family: metric, latency and cost"),
        (f"stemma run compare {CONFIG} --model models:/credit/3", "version 3 and its variants"),
    ),
    "run compress": ((f"stemma run compress {CONFIG}", "pruned and distilled variants"),),
    "run shadow": (
        (
            f"stemma run shadow {CONFIG} --batch day_07.parquet --labels labels/",
            "challenger beside champion on labelled rows; promote when it is better",
        ),
        (
            f"stemma run shadow {CONFIG} --log outputs/endpoint-log",
            "the endpoint's live shadow scores against its answers, with the labels it got",
        ),
    ),
    "run retrain": (
        (f"stemma run retrain {CONFIG}", "retrain on rows labelled since the data version"),
    ),
    "run canary": (
        (f"stemma run canary {CONFIG} --batches batches/ --labels labels/", "a canary rollout"),
        (f"stemma run canary {CONFIG} --log", "the next steps, on the days the endpoint served"),
    ),
    "promote": (
        ("stemma promote models:/credit/7 --reason 'better on day 7'", "v7 becomes champion"),
    ),
    "rollback": (("stemma rollback credit", "the previous champion returns"),),
    "lineage": (
        ("stemma lineage models:/credit@champion", "where the champion came from"),
        ("stemma lineage data.dvc@HEAD --downstream", "what the current data fed"),
        ("stemma lineage outputs/scores/_SUCCESS", "the model and data behind predictions"),
    ),
    "reproduce": (("stemma reproduce models:/credit/7", "retrain v7 and compare the weights"),),
    "serve": ((f"stemma serve {CONFIG}", "the spec's deployments, on a schedule"),),
    "endpoint": (
        (f"stemma endpoint {CONFIG}", "serve the champion on http://127.0.0.1:8080"),
        (f"stemma endpoint {CONFIG} --port 9000 --set endpoint.alias=challenger", "another alias"),
    ),
    "up": (("stemma up", "servers with UIs, data under .stemma/"),),
    "down": (("stemma down", "stop them"),),
    "status": (("stemma status", "where the servers run, and since when"),),
    "schema": (("stemma schema > spec.schema.json", "for an editor's completion"),),
    "data": (("stemma data generate --no-dvc", "only the files"),),
    "demo": (("stemma demo --days 12", "twelve simulated days"),),
    "data generate": (("stemma data generate", "the worked example's data, recorded with DVC"),),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("stemma")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `stemma` command (each sets its ``handler``)."""
    from stemma.flows.cli import data, endpoint, lineage, models, project, run, services, spec

    parser = argparse.ArgumentParser(prog="stemma", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks and library logs on errors"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print Prefect's and MLflow's log lines (flow and task states, store set-up); "
        "without it a command prints its progress, its summary and warnings",
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
    project.register(commands)
    spec.register(commands)
    flows = run.register(commands)
    models.register_promotion(commands)
    lineage.register(commands)
    models.register_reproduce(commands)
    services.register_serve(commands)
    endpoint.register(commands)
    services.register_servers(commands)
    data.register_demo(commands)
    nested = data.register_data(commands)
    finish_help(parser, "")
    for name, command in commands.choices.items():
        finish_help(command, name)
    for group, names in ((flows, "run"), (nested, "data")):
        for name, command in group.choices.items():
            finish_help(command, f"{names} {name}")
    return parser


def finish_help(parser: argparse.ArgumentParser, command: str) -> None:
    """End ``parser``'s help with the command's :data:`EXAMPLES` and the exit codes; its
    description is wrapped here, so that the examples keep their lines."""
    width = min(shutil.get_terminal_size().columns, 100) - 2
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if parser.description:
        parser.description = textwrap.fill(parser.description, width)
    examples = [f"  {line}\n      {what}" for line, what in EXAMPLES.get(command, ())]
    parser.epilog = "\n".join(["examples:", *examples, "", ""] if examples else []) + EXIT_CODES


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
