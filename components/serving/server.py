"""An endpoint from a spec, and uvicorn serving it on a socket Stemma binds.

:func:`build_endpoint` loads the served model (a refused or missing model is an error
before anything listens) and builds the app; :class:`EndpointServer` runs it under
uvicorn, in the calling thread (the CLI) or in a background one (tests, benchmarks).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import SpecError, StemmaError
from stemma.components.platform.refs import format_model_ref, parse_model_ref
from stemma.components.serving.app import EndpointConfig, build_app
from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.predlog import PredictionLog
from stemma.components.serving.rows import ServedModel
from stemma.components.serving.watch import (
    ModelWatch,
    RegistryView,
    registry_callables,
    served_version,
    warm,
)
from stemma.components.spec import EndpointSpec, Spec

if TYPE_CHECKING:
    from fastapi import FastAPI
    from mlflow import MlflowClient

#: Hosts that keep the endpoint on this machine.
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: Connections uvicorn holds at once beyond the queue's rows (it answers 503 past that).
EXTRA_CONNECTIONS = 64
#: Seconds uvicorn waits for requests in flight when stopping.
GRACEFUL_SHUTDOWN_S = 10


class EndpointError(StemmaError):
    """The endpoint cannot start or stop as asked."""


@dataclass(frozen=True)
class Endpoint:
    """A built endpoint: its app, the model watch, the metrics and the prediction log."""

    app: FastAPI
    watch: ModelWatch
    metrics: EndpointMetrics
    settings: EndpointSpec
    log: PredictionLog | None = None


def build_endpoint(
    spec: Spec,
    *,
    client: MlflowClient | None = None,
    environ: Mapping[str, str] | None = None,
    root: Path | None = None,
    served_alias: Callable[[str], str | None] | None = None,
) -> Endpoint:
    """Load the spec's model under ``endpoint.alias``, warm it, and build the app.

    With ``served_alias`` (``quantization.registering.alias_serving`` of the spec), the
    endpoint serves what batch scoring serves: the variant whose alias stands in for the
    champion's version (``v7-cheapest``) when the registry has it, following both as they
    move; ``/ready`` and ``/health`` say which.

    Args:
        spec: the pipeline spec (its ``endpoint`` section, defaults when absent; the
            ``score`` section's row policies; ``data.id``).
        client: the registry's client (default: one on the configured registry).
        environ: where ``endpoint.token_env`` is read (default: ``os.environ``).
        root: the project root, which a relative ``endpoint.log.path`` is under (default:
            the working directory).
        served_alias: the alias of a version's served variant, or None to serve the
            champion itself.

    Raises:
        SpecError: ``endpoint.token_env`` names a variable that is unset or empty, or
            ``endpoint.log`` cannot hold the model's rows (:class:`.predlog.PredictionLog`).
        LogError: ``endpoint.log.path`` is a folder that cannot be made.
        RegistryError: no such model or alias, or its files are refused
            (:class:`.runtime.loading.UntrustedModelError`).
    """
    from mlflow import MlflowClient

    settings = spec.endpoint or EndpointSpec()
    token = read_token(settings.token_env, os.environ if environ is None else environ)
    reference = format_model_ref(spec.pipeline.registered_model_name, alias=settings.alias)
    load, resolve = registry_callables(
        client or MlflowClient(), reference, architectures=(spec.model.architecture,)
    )
    target, champion = first_served(reference, settings.alias, resolve, served_alias)
    model = load(target)
    warm(model)
    metrics = EndpointMetrics(settings.max_batch_size)
    watch = ModelWatch(
        ServedModel.of(model, settings.alias),
        reference=reference,
        load=load,
        resolve=resolve,
        poll_s=settings.poll_s,
        metrics=metrics,
        follow_canary=settings.canary,
        shadow_alias=settings.shadow.alias if settings.shadow is not None else None,
        served_alias=served_alias,
        serves_for=champion,
    )
    log = PredictionLog.from_spec(
        spec,
        root or Path.cwd(),
        model.signature_columns,
        model.task,
        classes=model.preprocessor.class_names(),
        metrics=metrics,
    )
    if log is not None:
        log.prepare()  # an unwritable folder is an error before anything listens
    config = EndpointConfig(
        endpoint=settings,
        policies={
            "invalid_rows": spec.score.invalid_rows,
            "unknown_categories": spec.score.unknown_categories,
            "extra_columns": spec.score.extra_columns,
        },
        id_column=spec.data.id,
        token=token,
        log=log,
    )
    return Endpoint(build_app(config, watch, metrics), watch, metrics, settings, log)


def first_served(
    reference: str,
    alias: str,
    resolve: Callable[[], RegistryView],
    served_alias: Callable[[str], str | None] | None,
) -> tuple[str, str | None]:
    """What the endpoint loads at start: ``reference`` (the champion's alias), or the
    variant serving in its place (:func:`.watch.served_version`) with the champion's
    version, else None."""
    if served_alias is None:
        return reference, None
    aliases = resolve().aliases
    if alias not in aliases:
        return reference, None  # the load reports the missing alias
    version, via = served_version(aliases[alias], aliases, served_alias)
    if via is None:
        return reference, None
    return format_model_ref(parse_model_ref(reference).name, version=version), aliases[alias]


def read_token(variable: str | None, environ: Mapping[str, str]) -> str | None:
    """The bearer token from the variable ``endpoint.token_env`` names (None: no token)."""
    if variable is None:
        return None
    token = environ.get(variable, "").strip()
    if not token:
        raise SpecError(
            f"endpoint.token_env names {variable}, which is not set or empty",
            [f"export {variable}=<token> before starting the endpoint, or remove token_env"],
        )
    return token


class EndpointServer:
    """uvicorn serving an app on a socket bound here (port 0: any free port).

    Args:
        app: the ASGI app.
        host: address to bind.
        port: port to bind (0: the system picks a free one; :attr:`url` says which).
        max_connections: connections held at once; uvicorn answers 503 past them.
    """

    def __init__(self, app: Any, host: str, port: int, *, max_connections: int) -> None:
        import uvicorn

        self.socket = bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            limit_concurrency=max_connections,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve(self) -> None:
        """Serve in this thread until stopped (uvicorn handles SIGINT and SIGTERM)."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout_s: float = 30.0) -> EndpointServer:
        """Serve in a background thread; return once uvicorn accepts connections."""
        self._thread = threading.Thread(target=self.serve, name="stemma-endpoint", daemon=True)
        self._thread.start()
        limit = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > limit:
                raise EndpointError(f"the endpoint did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving: requests in flight are answered first."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> EndpointServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        EndpointError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on each connection (it skips
    # sockets made with protocol 0); on the listener too, which connections inherit.
    # Without it a keep-alive answer written in two parts waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise EndpointError(
            f"cannot listen on {host}:{port}: {error.strerror or error}",
            ["pick another port (--port, or endpoint.port; 0 takes any free port)"],
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def max_connections(settings: EndpointSpec) -> int:
    """Connections the server holds at once: one per queued row at most, plus a margin."""
    return settings.max_queue_rows + EXTRA_CONNECTIONS
