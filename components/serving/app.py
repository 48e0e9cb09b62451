"""The endpoint's HTTP interface: FastAPI routes over the batcher and the model watch.

``POST /v1/predict`` scores rows; ``GET /health`` says the process answers, ``GET /ready``
that a model is loaded; ``GET /metrics`` is Prometheus' text format; ``/docs`` the OpenAPI
page, whose request schema is the served model's signature.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from stemma.components.serving.batching import Batcher, QueueFull
from stemma.components.serving.labels import (
    LABELS_DESCRIPTION,
    LABELS_ERRORS,
    LABELS_PATH,
    LabelsResponse,
    LogFull,
    labels_log,
    labels_request_schema,
    record_labels,
)
from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.routing import ENTITY_HEADER, Answer, build_answer, route_rows
from stemma.components.serving.rows import (
    PreparedRows,
    RequestError,
    ServedModel,
    body_schema,
    prepare_rows,
)
from stemma.components.serving.shadow import ShadowWorker
from stemma.components.serving.watch import CHAMPION, ModelWatch
from stemma.components.spec import EndpointSpec

if TYPE_CHECKING:
    from stemma.components.serving.predlog import PredictionLog

#: Response headers naming what answered.
VERSION_HEADER = "X-Stemma-Model-Version"
VARIANT_HEADER = "X-Stemma-Variant"
MODEL_HEADER = "X-Stemma-Model"
REQUEST_ID_HEADER = "X-Request-Id"
#: Request header: milliseconds within which the caller needs the answer.
DEADLINE_HEADER = "X-Stemma-Deadline-Ms"
#: A caller's request id is echoed only when it looks like one.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PREDICT_PATH = "/v1/predict"
#: MLflow signature types as JSON Schema types, for the OpenAPI page.
JSON_TYPES = {
    "double": "number",
    "float": "number",
    "long": "integer",
    "integer": "integer",
    "string": "string",
    "boolean": "boolean",
}


class RowResult(BaseModel):
    """One row's answer."""

    row: int = Field(description="Position of the row in the request, from 0.")
    id: Any = Field(default=None, description="The row's id column, when the request has it.")
    prediction: int | str | None = Field(
        default=None,
        description="Binary models: the class at the model's threshold (0 or 1). Multiclass "
        "models: the likeliest class (a number or text, as the classes are). Absent for "
        "regression, and where the model's output was not a finite number.",
    )
    score: float | None = Field(
        default=None,
        description="Probability of class 1 (binary), of the predicted class (multiclass), "
        "or the predicted value (regression); null where the model's output was not finite.",
    )
    probabilities: dict[str, float] | None = Field(
        default=None,
        description="Multiclass models only: each class's probability (they sum to 1), by "
        'the class as text, in the model\'s order of classes, e.g. {"barbera": 0.06, '
        '"barolo": 0.91, "grignolino": 0.03}.',
    )
    version: str | None = Field(default=None, description="Model version that scored the row.")
    variant: str | None = Field(
        default=None,
        description="`champion`, or `canary` when a running canary's challenger scored it.",
    )
    rejected: bool = Field(default=False, description="The row could not be scored.")
    reason: str | None = Field(default=None, description="Why it was rejected.")


class PredictResponse(BaseModel):
    """What answered and its answer per row."""

    request_id: str = Field(description="This request's id (X-Request-Id when given).")
    model: str = Field(description="Registered model name.")
    version: str = Field(
        description="Model version that scored the rows (both, comma-separated, when a "
        "canary scored some of them); also the X-Stemma-Model-Version header."
    )
    alias: str = Field(description="The alias the champion is served under.")
    variant: str = Field(
        description="`champion`, `canary`, or `champion, canary` for a request split "
        "between them; also the X-Stemma-Variant header."
    )
    results: list[RowResult] = Field(description="One per row, in request order.")


class ErrorResponse(BaseModel):
    """A refused request."""

    error: str = Field(description="What is wrong.")
    details: list[str] = Field(default_factory=list, description="One problem per line.")
    request_id: str = Field(description="This request's id.")


@dataclass(frozen=True)
class EndpointConfig:
    """Everything the app needs besides the model.

    Attributes:
        endpoint: the spec's ``endpoint`` section.
        policies: ``invalid_rows``, ``unknown_categories``, ``extra_columns`` (the spec's
            ``score`` section).
        id_column: the spec's id column (echoed per row), or None.
        token: the bearer token required on predictions and metrics, or None.
        log: the prediction log (``endpoint.log``), or None.
    """

    endpoint: EndpointSpec
    policies: Mapping[str, str]
    id_column: str | None
    token: str | None
    log: PredictionLog | None = None


#: The answers of ``POST /v1/predict`` besides 200, for the OpenAPI page.
PREDICT_ERRORS = {
    400: "malformed JSON, or a malformed deadline",
    401: "missing or wrong bearer token",
    413: "body or rows over the limit",
    422: "columns or rows the model cannot take",
    500: "the model call failed",
    503: "overloaded (with Retry-After), or the deadline cannot be met",
    504: "the deadline passed before the model answered",
}


def build_app(config: EndpointConfig, watch: ModelWatch, metrics: EndpointMetrics) -> FastAPI:
    """The FastAPI app of an endpoint serving ``watch``'s model.

    The batcher and the alias watch start with the app (its lifespan) and stop with it.
    """
    settings = config.endpoint
    batcher = Batcher(
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue_rows=settings.max_queue_rows,
        metrics=metrics,
    )

    shadow = shadow_worker(config, batcher, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if config.log is not None:
            config.log.start()
        batcher.start()
        if shadow is not None:
            shadow.start()
        watch.start()
        try:
            yield
        finally:
            await watch.stop()
            if shadow is not None:
                await shadow.stop()
            await batcher.stop()
            if config.log is not None:  # after the requests in flight recorded their rows
                await asyncio.to_thread(config.log.close)

    # /docs serves Swagger UI's files from the endpoint itself: FastAPI's default page loads
    # them from a CDN and is blank on a machine without internet access.
    app = FastAPIOffline(
        title="Stemma endpoint",
        description=f"Online predictions of `{watch.reference}`.",
        lifespan=lifespan,
        redoc_url=None,
    )
    routes = Routes(config, watch, metrics, batcher, shadow)
    app.add_api_route(
        PREDICT_PATH,
        routes.predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses={
            code: {"model": ErrorResponse, "description": what}
            for code, what in PREDICT_ERRORS.items()
        },
        openapi_extra={"requestBody": {"required": True, "content": {}}},
        summary="Score one row, a list of rows, or columns",
    )
    app.add_api_route("/health", routes.health, methods=["GET"], summary="The process answers")
    app.add_api_route("/ready", routes.ready, methods=["GET"], summary="A model is served")
    app.add_api_route("/metrics", routes.prometheus, methods=["GET"], summary="Prometheus metrics")
    add_labels_route(app, routes, config.log)

    def openapi() -> dict[str, Any]:
        # The request schema is the model's signature: rebuilt when the model changes.
        schema = get_openapi(
            title=app.title, version="1", description=app.description, routes=app.routes
        )
        body = schema["paths"][PREDICT_PATH]["post"]["requestBody"]
        body["content"] = {
            "application/json": {"schema": request_schema(watch.current, config.id_column)}
        }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def add_labels_route(app: FastAPI, routes: Routes, log: PredictionLog | None) -> None:
    """``POST /v1/labels`` (:mod:`.labels`), its request schema naming the spec's columns."""
    app.add_api_route(
        LABELS_PATH,
        routes.labels,
        methods=["POST"],
        response_model=LabelsResponse,
        responses={
            code: {"model": ErrorResponse, "description": what}
            for code, what in LABELS_ERRORS.items()
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": labels_request_schema(log)}},
            }
        },
        summary="Record the labels of scored rows",
        description=LABELS_DESCRIPTION,
    )


def shadow_worker(
    config: EndpointConfig, batcher: Batcher, metrics: EndpointMetrics
) -> ShadowWorker | None:
    """The live shadow's worker, when the spec has ``endpoint.shadow``."""
    settings = config.endpoint
    if settings.shadow is None:
        return None
    return ShadowWorker(
        batcher=batcher,
        sample=settings.shadow.sample,
        max_queue_rows=settings.shadow.max_queue_rows,
        max_batch_size=settings.max_batch_size,
        policies=config.policies,
        metrics=metrics,
        log=config.log,
    )


class Routes:
    """The endpoint's request handlers, over its model watch, batcher and metrics."""

    def __init__(
        self,
        config: EndpointConfig,
        watch: ModelWatch,
        metrics: EndpointMetrics,
        batcher: Batcher,
        shadow: ShadowWorker | None = None,
    ) -> None:
        self.config = config
        self.watch = watch
        self.metrics = metrics
        self.batcher = batcher
        self.shadow = shadow

    async def predict(self, request: Request) -> Response:
        """Score the body's rows with the models served when the request arrived."""
        started = time.perf_counter()
        received = time.time()
        request_id = _request_id(request)
        served = self.watch.current
        canary = self.watch.canary if self.config.endpoint.canary else None
        settings = self.config.endpoint
        try:
            _authorize(request, self.config.token)
            body = await _read_json(request, settings.max_body_bytes)
            prepared = prepare_rows(
                served,
                body,
                max_rows=settings.max_rows_per_request,
                policies=self.config.policies,
                id_column=self.config.id_column,
            )
            routed = route_rows(
                served, canary, prepared, request.headers.get(ENTITY_HEADER), self.config.policies
            )
            deadline_s = _deadline_s(request)
            outputs = await asyncio.gather(
                *(_score(self.batcher, arm.served, arm.matrix, deadline_s) for arm in routed.arms)
            )
        except RequestError as error:
            return self.refuse(error, request_id, served.model.version, started)
        answer = build_answer(prepared, routed, outputs, request_id=request_id, alias=served.alias)
        latency_s = time.perf_counter() - started
        self.count(answer, len(prepared.rejected) + len(routed.rejected))
        self.metrics.latency.observe(latency_s)
        self.after_answer(prepared, answer, request_id, received, latency_s)
        return Response(
            orjson.dumps(answer.body),  # scores are finite or None (null) already
            media_type="application/json",
            headers={
                VERSION_HEADER: answer.header("version"),
                VARIANT_HEADER: answer.header("variant"),
                MODEL_HEADER: served.model.name,
                REQUEST_ID_HEADER: request_id,
            },
        )

    def count(self, answer: Answer, rejected: int) -> None:
        """Count an answered request and its rows, by version and variant."""
        version, variant = answer.header("version"), answer.header("variant")
        self.metrics.requests.labels(status="200", version=version, variant=variant).inc()
        for (row_version, row_variant), rows in Counter(
            zip(answer.versions, answer.variants, strict=True)
        ).items():
            self.metrics.rows.labels(
                outcome="scored", version=row_version, variant=row_variant
            ).inc(rows)
        if rejected:
            self.metrics.rows.labels(outcome="rejected", version=version, variant=variant).inc(
                rejected
            )
        for row_version, row_variant, name, rows in answer.counts:
            self.metrics.predictions.labels(name, row_version, row_variant).inc(rows)

    def after_answer(
        self,
        prepared: PreparedRows,
        answer: Answer,
        request_id: str,
        received: float,
        latency_s: float,
    ) -> None:
        """Hand the scored rows to the prediction log and, when sampled, to the shadow."""
        log, shadow = self.config.log, self.watch.shadow
        if (log is None and shadow is None) or len(answer.positions) == 0:
            return
        order = np.argsort(answer.positions, kind="stable")
        positions = answer.positions[order]
        if shadow is not None and self.shadow is not None:
            # The request's rows as they are: the shadow worker picks and encodes them
            # only when the model is quiet.
            self.shadow.offer(
                shadow,
                prepared.table,
                positions,
                prepared.ids,
                request_id=request_id,
                received=received,
                busy=self.batcher.queued_rows > 0,
            )
        if log is None:
            return
        pick = order.tolist()
        log.record(
            prepared.table.take(positions),
            request_id=request_id,
            received=received,
            ids=None if prepared.ids is None else [prepared.ids[p] for p in positions.tolist()],
            versions=[answer.versions[i] for i in pick],
            variants=[answer.variants[i] for i in pick],
            predictions=(
                None if answer.predictions is None else [answer.predictions[i] for i in pick]
            ),
            scores=[answer.scores[i] for i in pick],
            latency_ms=latency_s * 1000.0,
            rows=positions.tolist(),
            probabilities=(
                None if answer.probabilities is None else [answer.probabilities[i] for i in pick]
            ),
        )

    async def health(self) -> dict[str, str]:
        """The process answers (and, when the spec serves a variant in the champion's
        place, which model serves)."""
        note = self.watch.serving_note
        return {"status": "ok"} if note is None else {"status": "ok", "serving": note}

    async def ready(self) -> Response:
        """What is served (a model is loaded before the endpoint listens), and the last
        version that failed to load, if it still names the alias's target."""
        served = self.watch.current
        body: dict[str, Any] = {
            "ready": True,
            "model": served.model.name,
            "version": served.model.version,
            "alias": served.alias,
            "runtime": served.model.runtime.label,
            "queued_rows": self.batcher.queued_rows,
        }
        if self.watch.serves_for is not None:
            version, alias = self.watch.serves_for
            body["serves_for"] = {"version": version, "alias": alias}
        canary = self.watch.canary
        if canary is not None:
            body["canary"] = {
                "version": canary.served.model.version,
                "control": canary.route.control,
                "fraction": canary.route.fraction,
            }
        shadow = self.watch.shadow
        if shadow is not None and self.shadow is not None:
            body["shadow"] = {
                "version": shadow.model.version,
                "alias": shadow.alias,
                "queued_rows": self.shadow.queued_rows,
            }
        failure = self.watch.failure
        if failure is not None:
            body["last_failed_load"] = {"version": failure.version, "reason": failure.reason}
        others = {
            role: {"version": failed.version, "reason": failed.reason}
            for role, failed in self.watch.failures.items()
            if role != CHAMPION
        }
        if others:
            body["failed_loads"] = others
        return JSONResponse(body, headers={VERSION_HEADER: served.model.version})

    async def prometheus(self, request: Request) -> Response:
        """The metrics in Prometheus' text format (behind the token, when there is one)."""
        try:
            _authorize(request, self.config.token)
        except RequestError as error:
            return self.refuse(error, _request_id(request), self.watch.current.model.version)
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    async def labels(self, request: Request) -> Response:
        """Record the body's labels in the prediction log (checked first, all or none)."""
        request_id = _request_id(request)
        settings = self.config.endpoint
        try:
            _authorize(request, self.config.token)
            log = labels_log(self.config.log)
            body = await _read_json(request, settings.max_body_bytes)
            recorded = record_labels(
                log,
                body,
                max_rows=settings.max_rows_per_request,
                preprocessor=self.watch.current.model.preprocessor,
            )
        except RequestError as error:
            return refusal(error, request_id)
        if recorded.unknown:
            self.metrics.unknown_labels.inc(recorded.unknown)
        return JSONResponse(recorded.body(), headers={REQUEST_ID_HEADER: request_id})

    def refuse(
        self, error: RequestError, request_id: str, version: str, started: float | None = None
    ) -> Response:
        """A refused request's answer: its status, the error and its details, counted."""
        self.metrics.requests.labels(status=str(error.status), version=version, variant="").inc()
        if started is not None:
            self.metrics.latency.observe(time.perf_counter() - started)
        return refusal(error, request_id)


def refusal(error: RequestError, request_id: str) -> JSONResponse:
    """A refused request's answer: its status, the error and its details (and Retry-After
    when the queue or the log's buffer is full)."""
    headers = {REQUEST_ID_HEADER: request_id}
    if isinstance(error, QueueFull | LogFull):
        headers["Retry-After"] = str(error.retry_after_s)
    body = {"error": error.headline, "details": error.details, "request_id": request_id}
    return JSONResponse(body, status_code=error.status, headers=headers)


def request_schema(served: ServedModel, id_column: str | None) -> dict[str, Any]:
    """The JSON Schema of a request body, from the served model's signature."""
    properties: dict[str, Any] = {
        name: {
            "type": [JSON_TYPES.get(kind, "string"), "null"],
            "description": f"MLflow type {kind}",
        }
        for name, kind in served.model.signature_columns
    }
    if id_column is not None and id_column not in properties:
        properties[id_column] = {"description": "Row id, echoed in the answer."}
    required = [name for name, _ in served.model.signature_columns]
    return body_schema(properties, required, one=f"A row for {served.model.label}", many="Rows")


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    return given if given and REQUEST_ID.match(given) else uuid.uuid4().hex


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Constant-time comparison: the time taken says nothing about the token.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise RequestError(401, "a bearer token is required: Authorization: Bearer <token>")


async def _read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON, refused past ``limit`` bytes without reading the rest."""
    too_big = RequestError(
        413,
        f"the body is larger than the limit of {limit} bytes",
        ["send fewer rows per request, or raise endpoint.max_body_bytes"],
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # NaN or Infinity, which Python's reader takes (the row policies then decide)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, "the body is not valid JSON", [str(error)[:200]]) from None


def _deadline_s(request: Request) -> float | None:
    text = request.headers.get(DEADLINE_HEADER)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise RequestError(400, f"{DEADLINE_HEADER} must be a positive number of milliseconds")
    return value / 1000.0


async def _score(
    batcher: Batcher, served: ServedModel, matrix: np.ndarray, deadline_s: float | None
) -> np.ndarray:
    """The raw outputs of one arm's rows, through the batcher."""
    if len(matrix) == 0:
        return np.empty(0, dtype=np.float32)
    job = batcher.submit(served, matrix, deadline_s)
    if deadline_s is None:
        return await job.future
    try:
        return await asyncio.wait_for(asyncio.shield(job.future), deadline_s)
    except TimeoutError:
        job.future.cancel()  # the batcher skips it if it has not run yet
        raise RequestError(504, "the deadline passed before the model answered") from None
