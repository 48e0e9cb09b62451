"""What a resumed training run reads back from a version it registered before."""

from __future__ import annotations

import json
from types import SimpleNamespace

from stemma.components.registry.gate import registered_model_facts


class Client:
    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def get_logged_model(self, model_id: str) -> SimpleNamespace:
        assert model_id == "m-1"
        return SimpleNamespace(tags=self.tags)


def test_registered_model_facts_come_from_the_logged_model_and_the_version() -> None:
    manifest = {"artifacts/weights.safetensors": "w", "MLmodel": "x"}
    logged = {"stemma.model.files": json.dumps(manifest), "stemma.weights_sha256": "abc"}
    version = SimpleNamespace(model_id="m-1", tags={"stemma.profile.sha256": "p"})
    weights, profile, artifacts = registered_model_facts(
        Client(logged), version, "profile/reference_profile.json"
    )
    assert (weights, profile) == ("abc", "p")
    assert artifacts == {
        "model/weights.safetensors": "w",
        "profile/reference_profile.json": "p",
    }
