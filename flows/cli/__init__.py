"""The `stemma` command line: one module per command group.

Start-up stays light: argparse, yaml and pydantic only. torch, mlflow, great_expectations
and prefect are imported inside the commands that need them, so `stemma --help` and
`stemma validate` answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stemma.components.errors import StemmaError
from stemma.components.platform.redaction import redact_url
from stemma.flows.cli.parser import build_parser
from stemma.flows.cli.session import Session, prepare_environment, quiet_console
from stemma.flows.cli.summaries import (
    format_canary_summary,
    format_monitor_summary,
    format_quantize_summary,
    format_retrain_summary,
    format_score_summary,
    format_shadow_summary,
    format_train_summary,
)

__all__ = [
    "build_parser",
    "format_canary_summary",
    "format_monitor_summary",
    "format_quantize_summary",
    "format_retrain_summary",
    "format_score_summary",
    "format_shadow_summary",
    "format_train_summary",
    "main",
    "prepare_environment",
]

#: Exit code when the user interrupts a command with Ctrl-C (128 + SIGINT), as shells
#: report it; SIGTERM gives 143 (128 + 15). Both keep what an interruption keeps.
EXIT_INTERRUPTED = 130
#: Exit code when SIGTERM stops a command (128 + SIGTERM).
EXIT_TERMINATED = 143
#: Exit code for an error Stemma did not anticipate (a bug or an environment problem).
EXIT_UNEXPECTED = 1
#: What an interrupted command leaves behind, by command (`run train` as "run train").
INTERRUPTED = {
    "run train": "training resumes from its last checkpoint when run again",
    "run score": "scoring resumes from its finished parts when run again",
    "serve": "stopped serving; the deployments stay unpaused and scheduled",
    "endpoint": "the endpoint stopped after answering the requests in flight",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `stemma` console script; returns the exit code."""
    from stemma.components.platform.lifecycle import interruption_exit_code, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    args.session = Session()
    try:
        # SIGTERM takes Ctrl-C's path (checkpoint kept, MLflow run KILLED), exit code 143.
        with (
            sigterm_as_interrupt(),
            quiet_console(args.debug, verbose=args.verbose),
            args.session.cleanup,
        ):
            return args.handler(args)
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
        print(f"{word}: {INTERRUPTED.get(_command_key(args), 'stopped')}", file=sys.stderr)
        return code
    except Exception as error:  # anything unforeseen: one line, traceback only with --debug
        return _unexpected(args, error)


def _unexpected(args: argparse.Namespace, error: Exception) -> int:
    outage = args.session.outage(error)
    if outage is not None and not args.debug:
        print(f"error: {outage.render()}", file=sys.stderr)  # failed because a server went away
        return outage.exit_code
    if args.debug:
        raise error
    print(
        f"error: unexpected {type(error).__name__}: {redact_url(str(error))}\n"
        "  run again with --debug for the traceback",
        file=sys.stderr,
    )
    return EXIT_UNEXPECTED


def _command_key(args: argparse.Namespace) -> str:
    flow = getattr(args, "flow", None)
    command = getattr(args, "command", "")
    return f"{command} {flow}" if flow else command
