"""`stemma init`: start a project in the current folder, with a spec inferred from a table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from stemma.flows.cli.parser import add_root_argument
from stemma.flows.cli.session import logger_levels


def register(commands: Any) -> None:
    init = commands.add_parser(
        "init",
        help="start a project here: git, DVC, .gitignore, and a spec inferred from a table",
        description=(
            "Make the folder a Stemma project: git and DVC initialised, a .gitignore for run "
            "state, outputs and production data, the folders data/, production/ and configs/. "
            "With DATA_FILE the table is copied under data/ (unless it is there), versioned "
            "by DVC (data.dvc), and configs/NAME.yaml is written with the task, features and "
            "checks inferred from it. The target (and id) come from the flags, or are asked "
            "for on a terminal. Nothing is committed in git. An existing project is never "
            "overwritten."
        ),
    )
    init.add_argument(
        "data_file", nargs="?", type=Path, metavar="DATA_FILE", help="a CSV or Parquet table"
    )
    init.add_argument("--target", metavar="COL", help="the label column to predict")
    init.add_argument(
        "--id",
        dest="id_column",
        metavar="COL",
        help="the entity id column (default: a column named like an id with unique values)",
    )
    init.add_argument(
        "--name", help="pipeline name and spec file name (default: the folder's name)"
    )
    add_root_argument(init)
    init.set_defaults(handler=init_command)


def init_command(args: argparse.Namespace) -> int:
    from stemma.components.data import project
    from stemma.components.errors import SpecError

    root = args.root.resolve()
    name = args.name or project.default_name(root)
    project.check_name(name)
    source = args.data_file
    if source is None and (args.target or args.id_column):
        raise SpecError("--target and --id describe a table: give DATA_FILE too")
    project.refuse_existing(root, name, source)
    spec_text, summary = None, []
    if source is not None:
        spec_text, summary = _infer(args, root, name, source)
    import dvc.repo  # noqa: F401  (DVC sets its logger's level on import: quiet it after)

    levels = {} if args.debug or args.verbose else {"dvc": logging.WARNING}
    with logger_levels(levels):
        report = project.create_project(root, name=name, source=source, spec_text=spec_text)
    print(_report_text(report, summary))
    return 0


def _infer(args: argparse.Namespace, root: Path, name: str, source: Path) -> tuple[str, list[str]]:
    """The spec's text and summary lines; every refusal happens here, before any change."""
    from stemma.components.data import inference, project, starter_spec

    frame = inference.read_table(source)
    ask = _ask if sys.stdin.isatty() and sys.stdout.isatty() else None
    target, id_column, notes = inference.choose_columns(
        frame, target=args.target, id_column=args.id_column, ask=ask, source=str(source)
    )
    inferred = inference.infer_spec(
        frame,
        name=name,
        data_path=project.data_placement(root, source),
        target=target,
        id_column=id_column,
        notes=notes,
    )
    text = starter_spec.render_spec(inferred)
    starter_spec.check_spec_text(text, str(source))
    summary = [
        f"{inferred.task} target {inferred.target!r}"
        + (f", id {inferred.id_column!r}" if inferred.id_column else ", no id column"),
        f"{len(inferred.numeric)} numeric and {len(inferred.categorical)} categorical "
        f"features, {len(inferred.checks)} checks",
        *inferred.notes,
        *(f"left out: {column}: {reason}" for column, reason in inferred.left_out),
    ]
    return text, summary


def _ask(question: str, default: str | None) -> str:
    """Ask on the terminal; an empty answer (or end of input) takes the default."""
    suffix = f" [{default}]" if default else ""
    try:
        return input(f"{question}{suffix}: ").strip() or (default or "")
    except EOFError:
        return default or ""


def _report_text(report: Any, summary: list[str]) -> str:
    lines = [f"created a Stemma project in {report.root}"]
    lines.append(f"  git: {'initialised' if report.git_created else 'the repository there'}")
    lines.append(f"  dvc: {'initialised' if report.dvc_created else 'the repository there'}")
    if report.data_path:
        copied = f" (copied from {report.copied_from})" if report.copied_from else ""
        lines.append(f"  data: {report.data_path}{copied}, versioned in data.dvc")
        lines.append(f"  spec: {report.config}: " + "; ".join(summary[:2]))
        lines += [f"    {line}" for line in summary[2:]]
    lines.append(
        "  production/: batches to score and their labels (git-ignored, not training data)"
    )
    lines.append("  .gitignore: .stemma/, outputs/, production/, MLflow stores, .venv/")
    lines.append("next:")
    if report.config:
        lines += [
            f"  stemma validate {report.config}      # read the spec first: every value is a guess",
            f"  stemma run train {report.config}",
        ]
    else:
        lines.append("  stemma init data/<table>.csv --target <column>   # the table and its spec")
    lines.append('  git add -A && git commit -m "Start the project"   # nothing is committed yet')
    return "\n".join(lines)
