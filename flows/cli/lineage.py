"""`stemma lineage REF`: where a model, run, data version or prediction came from."""

from __future__ import annotations

import argparse
from typing import Any

from stemma.flows.cli.parser import add_root_argument
from stemma.flows.cli.session import check_servers, watch_servers


def register(commands: Any) -> None:
    lineage = commands.add_parser(
        "lineage",
        help="show where a model, run, data version or prediction came from (or what it fed)",
        description=(
            "Walk the lineage records from REF: upstream (where it came from) or, with "
            "--downstream, what it fed. By default a summary: one line per node with its "
            "kind, short name and key facts (created, aliases, gate, decision, metrics), each "
            "node once and long chains folded; --full shows every node and edge with its "
            "digest, created time and the flow run that made it. Answers from MLflow searches "
            "on the records' tags."
        ),
    )
    lineage.add_argument(
        "reference",
        metavar="REF",
        help="models:/<name>@<alias>, models:/<name>/<version>, an MLflow run id, a data md5, "
        "data.dvc@<git rev>, a scoring output (folder, _SUCCESS or part file), or a node id",
    )
    add_root_argument(lineage)
    lineage.add_argument(
        "--downstream", action="store_true", help="what REF fed, instead of where it came from"
    )
    shape = lineage.add_mutually_exclusive_group()
    shape.add_argument(
        "--full",
        action="store_true",
        help="print every node and edge with digests, times and flow runs (default: a summary)",
    )
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
    lineage.set_defaults(handler=lineage_command)


def lineage_command(args: argparse.Namespace) -> int:
    from stemma.flows.lineage import run_lineage

    check_servers(args, prefect=False)
    watch_servers(args)
    output = "json" if args.json else "mermaid" if args.mermaid else "tree"
    text = run_lineage(
        args.reference,
        args.root.resolve(),
        downstream=args.downstream,
        output=output,
        openlineage=args.openlineage,
        all_runs=args.all_runs,
        full=args.full,
    )
    print(text)
    return 0
