"""The training flow's gate without the flow: judge a candidate against the champion, and
read back what a version registered before an interruption recorded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stemma.components.model.artifact import decode_manifest
from stemma.components.platform import tags as tag_names
from stemma.components.platform.refs import format_model_ref
from stemma.components.registry import gate
from stemma.components.runtime.loading import logged_model_id
from stemma.components.spec import Spec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


def judge_candidate(
    client: MlflowClient,
    spec: Spec,
    value: float,
    test_frame: pd.DataFrame,
    architectures: Sequence[str],
) -> gate.GateDecision:
    """The gate's decision on a candidate scoring ``value`` on the test split.

    The champion, if any, is scored on the same rows (``test_frame``) with the gate's
    metric; a champion that cannot be scored or is untrusted is reported in the decision.
    """
    model_name = spec.pipeline.registered_model_name
    champion = gate.find_champion(client, model_name)
    scored = gate.ChampionValue(None, None)
    if champion is not None:
        scored = gate.champion_value_on(
            format_model_ref(model_name, version=champion.version),
            test_frame,
            test_frame[spec.data.target].to_numpy(dtype=np.float64),
            task=spec.data.task,
            metric=spec.gate.metric,
            architectures=list(architectures),
            client=client,
        )
    return gate.decide_gate(
        spec.gate,
        spec.data.task,
        value,
        str(champion.version) if champion is not None else None,
        scored.value,
        champion_error=scored.error,
        champion_untrusted=scored.untrusted,
    )


def registered_model_facts(
    client: MlflowClient, existing: ModelVersion, profile_file: str
) -> tuple[str, str, dict[str, str]]:
    """Weights hash, reference-profile hash and artifact digests of a registered version.

    A resumed run that had registered its version before it was interrupted takes these
    from the registry instead of logging the model again. ``profile_file`` is the profile's
    artifact path in the run.
    """
    model_id = logged_model_id(existing)
    logged: dict[str, Any] = client.get_logged_model(model_id).tags if model_id else {}
    recorded = {**logged, **(existing.tags or {})}
    manifest = decode_manifest(recorded.get(tag_names.MODEL_FILES)) or {}
    artifacts = {
        f"model/{Path(path).name}": digest
        for path, digest in manifest.items()
        if path.startswith("artifacts/")
    }
    profile_sha256 = recorded.get(tag_names.PROFILE_SHA256, "")
    if profile_sha256:
        artifacts[profile_file] = profile_sha256
    weights = recorded.get(tag_names.WEIGHTS_SHA256) or recorded.get(
        tag_names.LOGGED_MODEL_WEIGHTS_SHA256, ""
    )
    return weights, profile_sha256, artifacts
