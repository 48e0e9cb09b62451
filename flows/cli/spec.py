"""`stemma validate` and `stemma schema`: the spec, without running anything."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stemma.flows.cli.parser import add_spec_arguments


def register(commands: Any) -> None:
    validate = commands.add_parser(
        "validate",
        help="check a pipeline spec and report every problem at once",
        description="Check a spec (schema, paths, columns, expectations, model imports).",
    )
    add_spec_arguments(validate)
    validate.add_argument(
        "--deep",
        action="store_true",
        help="also build every expectation with Great Expectations itself (slower: imports GX)",
    )
    validate.set_defaults(handler=validate_command)
    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the pipeline spec",
        description="Print the JSON Schema of the spec, for editors and the Prefect UI form.",
    )
    schema.set_defaults(handler=schema_command)


def validate_command(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec
    from stemma.components.spec.document import data_tracking_problem

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
    data_note = _check_column_names(args.config, loaded)
    elapsed = time.perf_counter() - started
    # Folders outside the project the spec opens up are worth a reviewer's second look.
    allowed = "".join(
        f"\n  paths may also point into {folder} (pipeline.allowed_roots)"
        for folder in spec.pipeline.allowed_roots
    )
    print(
        f"{args.config}: valid ({spec.pipeline.name}: {len(spec.data.features.all)} features, "
        f"{len(spec.checks)} checks, model {spec.model.architecture}; {elapsed * 1000:.0f} ms)"
        + f"\n  {data_note}"
        + allowed
    )
    untracked = data_tracking_problem(spec.data, loaded.root)
    if untracked:
        print(f"warning: {untracked}", file=sys.stderr)
    return 0


def _check_column_names(config: str, loaded: Any) -> str:
    """Every column the spec names is in the data file's header (no rows are read)."""
    from stemma.components.data.tables import column_name_problems
    from stemma.components.errors import SpecError

    path = loaded.resolve(loaded.spec.data.path)
    if not path.is_file():
        return f"{loaded.spec.data.path} is not there yet: column names not checked"
    problems = column_name_problems(path, loaded.spec.data, loaded.spec.checks)
    if problems:
        raise SpecError(
            f"{config}: {len(problems)} column name(s) not in {loaded.spec.data.path}",
            problems,
        )
    return f"column names match {loaded.spec.data.path}"


def schema_command(args: argparse.Namespace) -> int:
    from stemma.components.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
