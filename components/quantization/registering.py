"""Logging a passing variant as a model and registering it beside its fp32 parent.

:func:`log_variant_model` logs a variant as a pickle-free pyfunc model (the parent's
``preprocess.json``, a ``network.json`` naming the method, the variant's weights and, for
an ONNX Runtime method, its own ``network.onnx``, every file in the hashed manifest).
:func:`register_variant` registers it as a version of the parent's registered model with
``stemma.quantize.*`` tags and the alias ``v<parent>-<method>`` (``v7-int8-dynamic``), all
or nothing; the fastest passing variant of a parent also gets ``v<parent>-quantized``
(:func:`update_served_alias`), which batch scoring serves when the spec's
``quantize.serve`` is on (:func:`served_reference` says which model it loads, and honours
the spec's ``compress.serve``: ``cheapest`` serves the ``v<parent>-cheapest`` alias a
comparison of every variant sets).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import RegistryError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.refs import (
    ModelRefError,
    format_model_ref,
    logged_model_id,
    parse_model_ref,
)
from stemma.components.quantization.results import FAILED, REJECTED, Comparison
from stemma.components.spec import CompressSpec, QuantizeSpec

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from stemma.components.model.quantized import QuantizedNetwork

_LOG = logging.getLogger(__name__)

#: Model version tags of a variant (``tags.VERSION_TAGS["variant"]``); its numbers and
#: reasons are in the quantize run's lineage record (the variant's ``run_id``).
TAG_PREFIX = tag_names.QUANTIZE_PREFIX
METHOD_TAG = tag_names.QUANTIZE_METHOD
PARENT_VERSION_TAG = tag_names.QUANTIZE_PARENT_VERSION
PARENT_WEIGHTS_TAG = tag_names.QUANTIZE_PARENT_WEIGHTS_SHA256
#: ``registering`` from the moment the version exists until it is verified and aliased,
#: then ``registered``. Nothing serves a version that is still ``registering``.
STATUS_TAG = tag_names.QUANTIZE_STATUS
STATUS_REGISTERING = "registering"
STATUS_REGISTERED = "registered"
#: ``host:pid`` of the process registering a version, so a later run can tell whether
#: the process that left a ``registering`` version behind is gone.
OWNER_TAG = tag_names.QUANTIZE_OWNER
#: Parent version tag: the latest quantize decision for each method, as JSON.
SUMMARY_TAG = tag_names.QUANTIZE_SUMMARY
#: A ``registering`` version this old is abandoned whoever owns it (registration takes seconds).
STALE_REGISTRATION_SECONDS = 600

#: Alias of a passing variant, and of the one batch scoring serves for a parent version.
METHOD_ALIAS = "v{version}-{method}"
SERVED_ALIAS = "v{version}-quantized"
#: Alias of the cheapest passing variant of a parent, set by a comparison of its variants.
CHEAPEST_ALIAS = "v{version}-cheapest"
#: What a version is served as (``compress.serve``), and the alias each choice follows.
SERVE_PARENT, SERVE_QUANTIZED, SERVE_CHEAPEST = "parent", "quantized", "cheapest"
#: Rows of the test split logged with a variant as its input example.
INPUT_EXAMPLE_ROWS = 5


def method_alias(parent_version: str, method: str) -> str:
    """The alias of a passing variant: ``v7-int8-dynamic``."""
    return METHOD_ALIAS.format(version=parent_version, method=method.replace("_", "-"))


def served_alias(parent_version: str) -> str:
    """The alias of the variant batch scoring serves for a parent: ``v7-quantized``."""
    return SERVED_ALIAS.format(version=parent_version)


def cheapest_alias(parent_version: str) -> str:
    """The alias of a parent's cheapest passing variant: ``v7-cheapest``."""
    return CHEAPEST_ALIAS.format(version=parent_version)


def serve_choice(quantize: QuantizeSpec | None, compress: CompressSpec | None) -> str:
    """What a version is served as: ``compress.serve`` when the spec sets it, else
    ``quantized`` when ``quantize.serve`` is on (as before ``compress`` existed), else
    ``parent``."""
    if compress is not None and "serve" in compress.model_fields_set:
        return compress.serve
    if quantize is not None and quantize.serve:
        return SERVE_QUANTIZED
    return SERVE_PARENT


def serving_alias(choice: str, version: str) -> str | None:
    """The alias that serves in place of fp32 ``version`` under ``choice``, or None (the
    version itself)."""
    if choice == SERVE_CHEAPEST:
        return cheapest_alias(version)
    if choice == SERVE_QUANTIZED:
        return served_alias(version)
    return None


def alias_serving(
    quantize: QuantizeSpec | None, compress: CompressSpec | None
) -> Callable[[str], str | None] | None:
    """For the online endpoint: the alias that serves in place of an fp32 version under the
    spec's choice (:func:`serve_choice`), so that it serves what batch scoring serves;
    None when the spec serves versions themselves."""
    choice = serve_choice(quantize, compress)
    if choice == SERVE_PARENT:
        return None
    return partial(serving_alias, choice)


def is_variant(version: ModelVersion) -> bool:
    """Whether a model version is a quantized variant (rather than an fp32 model)."""
    return METHOD_TAG in (getattr(version, "tags", None) or {})


def registry_error(action: str, error: Exception) -> RegistryError:
    """A RegistryError for an MLflow call that failed while doing ``action``."""
    return RegistryError(
        f"MLflow model registry: {action}", [getattr(error, "message", str(error))]
    )


def model_versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    """Every version of a registered model."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{model_name}'"))
    except MlflowException as error:
        raise registry_error(f"cannot list the versions of {model_name!r}", error) from error


# ---------------------------------------------------------------------------------------
# Logging a variant as a model


def model_requirements(method: str) -> list[str]:
    """pip requirements of a variant: the fp32 model's, plus torchao or onnxruntime."""
    from stemma.components.model.artifact import model_requirements as fp32_requirements
    from stemma.components.model.quantized import ORT_METHODS, package_version

    library = "onnxruntime" if method in ORT_METHODS else "torchao"
    return [*fp32_requirements(), f"{library}=={package_version(library)}"]


def _variant_runtime_tags(variant: QuantizedNetwork, onnx_sha256: str | None) -> dict[str, str]:
    from stemma.components.model.artifact import (
        ONNX_SHA256_TAG,
        RUNTIME_BACKEND_TAG,
        RUNTIME_REASON_TAG,
    )
    from stemma.components.model.quantized import ONNXRUNTIME

    if onnx_sha256 is not None:
        return {RUNTIME_BACKEND_TAG: ONNXRUNTIME, ONNX_SHA256_TAG: onnx_sha256}
    reason = f"a {variant.method} variant runs on the eager backend"
    return {RUNTIME_BACKEND_TAG: "eager", RUNTIME_REASON_TAG: reason}


def write_variant_files(
    variant: QuantizedNetwork,
    parent_files: Mapping[str, Any],
    parent: Mapping[str, str],
    workdir: Path,
) -> tuple[dict[str, Path], str, str | None]:
    """The variant's model files in ``workdir``.

    Returns:
        ``{artifact name: path}``, the weights' sha256 and the graph's (ONNX Runtime
        methods), or None.
    """
    from stemma.components.model.artifact import MODEL_ARTIFACT_FILES, ONNX_ARTIFACT
    from stemma.components.model.onnx_graph import ONNX_FILE
    from stemma.components.model.quantized import (
        ORT_METHODS,
        save_variant_weights,
        variant_document,
    )
    from stemma.components.platform.files import write_atomically
    from stemma.components.runtime.loading import sha256_file

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {key: workdir / name for key, name in MODEL_ARTIFACT_FILES.items()}
    shutil.copyfile(parent_files["preprocess"], paths["preprocess"])
    document = variant_document(parent_files["document"], variant.method, variant.runtime, parent)
    write_atomically(paths["network"], json.dumps(document, indent=2, sort_keys=True))
    weights_sha256 = save_variant_weights(variant, paths["weights"])
    if variant.method not in ORT_METHODS:
        return paths, weights_sha256, None
    if variant.onnx_file is None:
        raise ValueError(f"the {variant.method} variant has no ONNX graph to log")
    paths[ONNX_ARTIFACT] = workdir / ONNX_FILE
    shutil.copyfile(variant.onnx_file, paths[ONNX_ARTIFACT])
    return paths, weights_sha256, sha256_file(paths[ONNX_ARTIFACT])


def log_variant_model(
    *,
    variant: QuantizedNetwork,
    parent_files: Mapping[str, Any],
    parent: Mapping[str, str],
    input_example: pd.DataFrame,
    workdir: Path,
) -> tuple[Any, str]:
    """Log a variant as a pickle-free pyfunc model of the active run.

    The model code is the same :mod:`stemma.components.model.serving` file as the fp32
    model's, and the signature the parent's.

    Returns:
        The logged model's info and the sha256 of its weights file.
    """
    import mlflow
    from mlflow.models import ModelSignature

    from stemma.components.model.artifact import (
        architecture_tags,
        record_model_files,
        serving_code_path,
    )

    paths, weights_sha256, onnx_sha256 = write_variant_files(
        variant, parent_files, parent, Path(workdir)
    )
    document = parent_files["document"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on models from code, for this call
        info = mlflow.pyfunc.log_model(
            name=f"variant-{variant.method.replace('_', '-')}",
            python_model=str(serving_code_path()),
            artifacts={key: str(path) for key, path in paths.items()},
            signature=ModelSignature.from_dict(dict(parent_files["signature"])),
            input_example=input_example.head(INPUT_EXAMPLE_ROWS).reset_index(drop=True),
            pip_requirements=model_requirements(variant.method),
            # A custom network's module travels with its variants as with the parent.
            code_paths=[str(path) for path in parent_files.get("code", [])] or None,
            tags={
                tag_names.LOGGED_MODEL_WEIGHTS_SHA256: weights_sha256,
                tag_names.TASK: str(document.get("task")),
                METHOD_TAG: variant.method,
                **architecture_tags(document.get("config") or {}),
                **_variant_runtime_tags(variant, onnx_sha256),
            },
        )
    record_model_files(mlflow.MlflowClient(), info.model_id)
    return info, weights_sha256


# ---------------------------------------------------------------------------------------
# Registering


def owner_id() -> str:
    """``host:pid`` of this process, as :data:`OWNER_TAG` records it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(owner: str) -> bool:
    """Whether the ``host:pid`` that tagged a version is a process of this host that ended."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def remove_abandoned_variants(
    client: MlflowClient, model_name: str, *, now: float | None = None
) -> list[str]:
    """Delete variant versions a killed run left ``registering``; returns their numbers.

    A version is abandoned when the process that tagged it (same host) has ended, or it
    has been ``registering`` for :data:`STALE_REGISTRATION_SECONDS`. Such a version never
    got an alias, so nothing served it.
    """
    from mlflow.exceptions import MlflowException

    now = time.time() if now is None else now
    removed = []
    for version in model_versions(client, model_name):
        found = version.tags or {}
        if found.get(STATUS_TAG) != STATUS_REGISTERING:
            continue
        age = now - (version.creation_timestamp or 0) / 1000.0
        if not (owner_gone(found.get(OWNER_TAG, "")) or age > STALE_REGISTRATION_SECONDS):
            continue
        try:
            client.delete_model_version(model_name, str(version.version))
        except MlflowException as error:
            raise registry_error(
                f"cannot delete the abandoned variant {model_name} v{version.version}", error
            ) from error
        removed.append(str(version.version))
    return removed


def register_variant(
    *,
    client: MlflowClient,
    model_name: str,
    parent_version: str,
    method: str,
    model_uri: str,
    run_id: str,
    tags: Mapping[str, str],
    description: str,
    verify: Callable[[str], None],
) -> ModelVersion:
    """Register a passing variant as a version of the parent's model, all or nothing.

    The version is created tagged ``registering`` (with this process as its owner), then
    ``verify(version)`` checks it (loads it back and compares outputs), then it gets its
    alias (:func:`method_alias`) and the tag ``registered``. If anything fails or the run
    is interrupted on the way, the version is deleted again; a process killed outright
    leaves it ``registering``, unaliased, for :func:`remove_abandoned_variants`.

    Raises:
        RegistryError: MLflow refused a step (the version is deleted).
        Exception: whatever ``verify`` raised (the version is deleted).
    """
    from mlflow.exceptions import MlflowException

    from stemma.components.model.artifact import integrity_tags

    try:
        recorded = integrity_tags(client, logged_model_id(model_uri))
        created = client.create_model_version(
            name=model_name,
            source=model_uri,
            run_id=run_id,
            tags={**tags, **recorded, STATUS_TAG: STATUS_REGISTERING, OWNER_TAG: owner_id()},
            description=description,
            model_id=logged_model_id(model_uri),
        )
    except MlflowException as error:
        raise registry_error(
            f"cannot register the {method} variant of v{parent_version}", error
        ) from error
    number = str(created.version)
    try:
        verify(number)
        client.set_registered_model_alias(model_name, method_alias(parent_version, method), number)
        client.set_model_version_tag(model_name, number, STATUS_TAG, STATUS_REGISTERED)
        client.delete_model_version_tag(model_name, number, OWNER_TAG)
        return client.get_model_version(model_name, number)
    except BaseException as error:
        try:
            client.delete_model_version(model_name, number)
        except Exception:  # the original error matters more; the next run cleans up
            _LOG.warning("could not delete half-registered %s v%s", model_name, number)
        if isinstance(error, MlflowException):
            raise registry_error(
                f"cannot finish registering the {method} variant of v{parent_version}", error
            ) from error
        raise


def update_served_alias(
    client: MlflowClient, model_name: str, parent_version: str, comparison: Comparison
) -> str | None:
    """Point ``v<parent>-quantized`` at the fastest passing variant of this comparison.

    The latest measurement of a parent decides: when no variant passed, the alias is
    removed, and so are method aliases of the parent whose method was rejected now.

    Returns:
        The version the alias names, or None.
    """
    from mlflow.exceptions import MlflowException

    passing = [v for v in comparison.variants if v.passed and v.version is not None]
    best = min(passing, key=lambda v: v.latency_ms or math.inf) if passing else None
    alias = served_alias(parent_version)
    try:
        aliases = dict(client.get_registered_model(model_name).aliases or {})
        if best is not None:
            client.set_registered_model_alias(model_name, alias, str(best.version))
        elif alias in aliases:
            client.delete_registered_model_alias(model_name, alias)
        for variant in comparison.variants:
            stale = method_alias(parent_version, variant.method)
            if variant.status in (REJECTED, FAILED) and stale in aliases:
                client.delete_registered_model_alias(model_name, stale)
    except MlflowException as error:
        raise registry_error(f"cannot set the alias {alias}", error) from error
    return None if best is None else str(best.version)


def summary_tag(comparison: Comparison, run_id: str, served: str | None) -> str:
    """The parent's :data:`SUMMARY_TAG`: each method's outcome and numbers, compact JSON."""

    def rounded(value: float | None, digits: int = 6) -> float | None:
        return None if value is None else round(float(value), digits)

    document = {
        "run_id": run_id,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "metric": comparison.metric,
        "max_metric_drop": comparison.max_metric_drop,
        "metric_drop_limit": comparison.metric_drop_limit,
        "min_speedup": comparison.min_speedup,
        "baseline": f"fp32 {comparison.baseline_runtime} {comparison.baseline_ms:.3f} ms",
        "served_version": served,
        "variants": {
            v.method: {
                "status": v.status,
                "version": v.version,
                "metric_drop": rounded(v.metric_drop),
                "speedup": rounded(v.speedup, 3),
                "reasons": list(v.reasons),
            }
            for v in comparison.variants
        },
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------
# Serving


def served_reference(
    quantize: QuantizeSpec | None,
    reference: str,
    *,
    explicit: bool = False,
    client: MlflowClient | None = None,
    compress: CompressSpec | None = None,
) -> tuple[str, str | None]:
    """The model batch scoring should load, and a line saying which and why.

    What is served follows :func:`serve_choice`: with ``quantized`` (``quantize.serve``
    on), a reference to an fp32 version (the champion, or the spec's ``score.model``)
    becomes the alias of its served variant (:func:`served_alias`) when one passed its
    gate; with ``cheapest`` (``compress.serve``), the alias of its cheapest passing
    variant (:func:`cheapest_alias`) when a comparison set one. Otherwise the fp32 model is
    scored and the line says why (its variants were rejected, it was never quantized or
    compared, or it is its own cheapest). A reference given on the command line
    (``explicit``) is scored as it is.

    Returns:
        ``(reference, note)``; the note is None when serving variants is off.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    choice = serve_choice(quantize, compress)
    if choice == SERVE_PARENT or explicit:
        return reference, None
    try:
        parsed = parse_model_ref(reference)
    except ModelRefError:
        return reference, None  # the loader explains what a reference looks like
    client = client or MlflowClient()
    name = parsed.name
    try:
        if parsed.alias:
            version = client.get_model_version_by_alias(name, parsed.alias)
        else:
            version = client.get_model_version(name, str(parsed.version))
        aliases = dict(client.get_registered_model(name).aliases or {})
    except MlflowException:
        return reference, None  # the loader reports a missing model, alias or version
    if is_variant(version):
        return reference, f"serving {name} v{version.version}, a variant named directly"
    number = str(version.version)
    alias = serving_alias(choice, number) or served_alias(number)
    if alias not in aliases:
        why = (
            _why_not_compared(client, version)
            if choice == SERVE_CHEAPEST
            else _why_no_variant(version)
        )
        return reference, f"serving fp32 {name} v{number}: {why}"
    try:
        variant = client.get_model_version(name, str(aliases[alias]))
        method = (variant.tags or {}).get(METHOD_TAG, "quantized")
    except MlflowException:
        method = "quantized"
    passed = (
        "the cheapest variant that passed its gate, by its last comparison"
        if choice == SERVE_CHEAPEST
        else "which passed its quantization gate"
    )
    return (
        format_model_ref(name, alias=alias),
        f"serving the {method} variant {name} v{aliases[alias]} of {name} v{number} "
        f"({reference}), {passed}",
    )


#: Flows whose runs compare a version's variants and set its cheapest alias.
COMPARING_FLOWS = ("compare", "compress")


def _why_not_compared(client: MlflowClient, version: ModelVersion) -> str:
    """Why an fp32 version has no cheapest alias: never compared, or it is its own cheapest."""
    never = "never compared (run `stemma run compare`)"
    try:
        experiment = client.get_run(str(version.run_id)).info.experiment_id
        runs = client.search_runs(
            [experiment],
            filter_string=f"tags.`{tag_names.MODEL_VERSION}` = '{version.version}'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
    except Exception:  # only the reason of a note: the version is served either way
        return never
    for run in runs:
        found = run.data.tags
        if found.get(tag_names.FLOW) in COMPARING_FLOWS and run.info.status == "FINISHED":
            return (
                f"its last comparison (run {run.info.run_id}) found no passing variant "
                "cheaper than it"
            )
    return never


def _why_no_variant(version: ModelVersion) -> str:
    raw = (version.tags or {}).get(SUMMARY_TAG)
    if not raw:
        return "it has not been quantized (run `stemma run quantize`)"
    try:
        document = json.loads(raw)
        variants = document.get("variants", {})
    except (ValueError, AttributeError):
        return "no quantized variant passed its gate"
    parts = []
    for method, outcome in variants.items():
        reasons = [r for r in outcome.get("reasons", []) if " > " in r or " < " in r]
        detail = "; ".join(reasons or outcome.get("reasons", [])[:1])
        parts.append(f"{method} {outcome.get('status')} ({detail})" if detail else method)
    return "no quantized variant passed its gate: " + ", ".join(parts)
