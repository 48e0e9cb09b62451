"""Which model batch scoring loads when the spec serves quantized variants."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from stemma.components.platform.refs import ModelRefError, format_model_ref, parse_model_ref
from stemma.components.quantization.registering import (
    METHOD_TAG,
    SUMMARY_TAG,
    is_variant,
    served_alias,
)
from stemma.components.spec import QuantizeSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


def served_reference(
    quantize: QuantizeSpec | None,
    reference: str,
    *,
    explicit: bool = False,
    client: MlflowClient | None = None,
) -> tuple[str, str | None]:
    """The model batch scoring should load, and a line saying which and why.

    With ``quantize.serve`` on, a reference to an fp32 version (the champion, or the
    spec's ``score.model``) becomes the alias of its served variant
    (:func:`.registering.served_alias`) when one passed its gate; otherwise the fp32
    model is scored and the line says why (its variants were rejected, or it was never
    quantized). A reference given on the command line (``explicit``) is scored as it is.

    Returns:
        ``(reference, note)``; the note is None when serving variants is off.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if quantize is None or not quantize.serve or explicit:
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
    alias = served_alias(number)
    if alias not in aliases:
        return reference, f"serving fp32 {name} v{number}: {_why_no_variant(version)}"
    try:
        variant = client.get_model_version(name, str(aliases[alias]))
        method = (variant.tags or {}).get(METHOD_TAG, "quantized")
    except MlflowException:
        method = "quantized"
    return (
        format_model_ref(name, alias=alias),
        f"serving the {method} variant {name} v{aliases[alias]} of {name} v{number} "
        f"({reference}), which passed its quantization gate",
    )


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
