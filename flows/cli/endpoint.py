"""`stemma endpoint`: the online endpoint serving a spec's model under an alias."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from stemma.flows.cli.parser import add_spec_arguments
from stemma.flows.cli.session import check_servers, use_running_services

#: Command-line flags that are spec values: validated and reported like --set.
ENDPOINT_FLAGS = {"host": "endpoint.host", "port": "endpoint.port"}


def register(commands: Any) -> None:
    endpoint = commands.add_parser(
        "endpoint",
        help="serve the model online over HTTP (batching, alias hot-swap, metrics)",
        description=(
            "Serve models:/<model>@champion (endpoint.alias) over HTTP on 127.0.0.1 unless "
            "told otherwise: POST /v1/predict takes a row, a list of rows or "
            '{"columns": ...}; concurrent requests are coalesced into one model call; '
            "when the alias moves, the new version is loaded, checked and swapped in "
            "without dropping a request. /docs, /health, /ready and /metrics (Prometheus). "
            "Runs until interrupted."
        ),
    )
    add_spec_arguments(endpoint)
    endpoint.add_argument("--host", help="address to listen on (default: endpoint.host)")
    endpoint.add_argument(
        "--port", type=int, help="port to listen on, 0 for any free one (default: endpoint.port)"
    )
    endpoint.set_defaults(handler=endpoint_command)


def endpoint_command(args: argparse.Namespace) -> int:
    from stemma.components.spec import load_spec

    for name, key in ENDPOINT_FLAGS.items():
        if getattr(args, name) is not None:
            args.overrides = [*args.overrides, f"{key}={getattr(args, name)}"]
    # The endpoint serves from the registry and reads no data file: a replica's container
    # holds the specs, not the data, so data paths are not checked.
    loaded = load_spec(args.config, args.overrides, check_paths=False)  # before any import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout: the URLs
    use_running_services(loaded.root, mlflow=True)
    check_servers(args, prefect=False)
    from stemma.components.platform.redaction import redact_url
    from stemma.components.platform.tracking import configure_tracking
    from stemma.components.quantization.registering import alias_serving
    from stemma.components.serving.server import (
        LOOPBACK,
        EndpointServer,
        build_endpoint,
        max_connections,
    )

    store = configure_tracking(loaded.root)
    _log_to_stderr(args.debug)
    spec = loaded.spec
    endpoint = build_endpoint(
        spec, root=loaded.root, served_alias=alias_serving(spec.quantize, spec.compress)
    )
    settings = endpoint.settings
    server = EndpointServer(
        endpoint.app, settings.host, settings.port, max_connections=max_connections(settings)
    )
    model = endpoint.watch.current.model
    print(
        f"serving {model.label} ({endpoint.watch.reference}, {model.runtime.label}) "
        f"from {redact_url(store)}\n"
        f"  {server.url}/v1/predict · docs {server.url}/docs · metrics {server.url}/metrics\n"
        f"  batches up to {settings.max_batch_size} rows, waits up to {settings.max_wait_ms} "
        f"ms, queue {settings.max_queue_rows} rows; alias checked every {settings.poll_s} s"
        + ("; bearer token required" if settings.token_env else "")
        + (f"\n  {endpoint.watch.serving_note}" if endpoint.watch.serving_note else ""),
        flush=True,
    )
    if settings.host not in LOOPBACK and not settings.token_env:
        print(
            f"warning: listening on {settings.host} without a token: anyone who reaches "
            "this port can use the model (set endpoint.token_env)",
            file=sys.stderr,
        )
    server.serve()
    print("endpoint stopped", file=sys.stderr)
    return 0


def _log_to_stderr(debug: bool) -> None:
    """The endpoint's log lines (swaps, failed loads) on stderr, one line each."""
    logger = logging.getLogger("stemma.components.serving")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
