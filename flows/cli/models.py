"""`stemma promote`, `stemma rollback` and `stemma reproduce`: registered model versions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stemma.flows.cli.parser import add_root_argument
from stemma.flows.cli.session import (
    check_servers,
    prepare_environment,
    quiet_known_errors,
    watch_servers,
)


def register_promotion(commands: Any) -> None:
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
    add_root_argument(promote)
    promote.add_argument("--reason", default="promoted by hand", help="why (recorded)")
    promote.add_argument(
        "--expect-champion",
        help="the version you expect to replace (`none` for no champion; default: the current one)",
    )
    promote.set_defaults(handler=promote_command)
    rollback = commands.add_parser(
        "rollback",
        help="return the champion alias to the previous champion",
        description="One-step rollback: `champion` moves back to `previous-champion`.",
    )
    rollback.add_argument("model", help="registered model name, e.g. credit")
    add_root_argument(rollback)
    rollback.add_argument("--reason", default="rolled back by hand", help="why (recorded)")
    rollback.set_defaults(handler=rollback_command)


def register_reproduce(commands: Any) -> None:
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
    add_root_argument(reproduce)
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
    reproduce.set_defaults(handler=reproduce_command)


def promote_command(args: argparse.Namespace) -> int:
    from stemma.flows.promote import format_record, run_promote

    check_servers(args, prefect=False)
    watch_servers(args)
    record = run_promote(
        args.reference, args.root.resolve(), reason=args.reason, expected=args.expect_champion
    )
    print(format_record(record))
    return 0


def rollback_command(args: argparse.Namespace) -> int:
    from stemma.flows.promote import format_record, run_rollback

    check_servers(args, prefect=False)
    watch_servers(args)
    print(format_record(run_rollback(args.model, args.root.resolve(), reason=args.reason)))
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    prepare_environment(root, debug=args.debug, session=args.session)
    check_servers(args)
    from stemma.flows.reproduce import EXIT_NOT_REPRODUCED, run_reproduce

    quiet_known_errors(args.debug)
    watch_servers(args)
    report = run_reproduce(args.reference, root, overrides=args.overrides, keep=args.keep)
    print(report.render())
    if report.code_warnings:
        print("warning: the code differs from the revision that trained the model", file=sys.stderr)
    return 0 if report.reproduced else EXIT_NOT_REPRODUCED
