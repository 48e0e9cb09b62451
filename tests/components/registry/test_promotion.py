"""Promotion and rollback with compare-and-set, on a real MLflow store (SQLite in tmp_path).

The race test starts real processes, each with its own MlflowClient on the same SQLite file,
released together by a barrier file.
"""

from __future__ import annotations

import getpass
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stemma.components.errors import RegistryError
from stemma.components.platform.lineage import RECORD_ARTIFACT
from stemma.components.registry.claims import claim_name
from stemma.components.registry.promotion import (
    GENERATION_TAG,
    LAST_PROMOTION_TAG,
    PromotionError,
    moved_outside,
    promote,
    rollback,
)

MODEL = "credit"
#: Processes in the race and rounds run in one test.
RACERS = 4
ROUNDS = 3
#: Longest a racer waits for the barrier or the test waits for a racer, in seconds.
RACE_TIMEOUT_S = 60


def make_client(db: Path) -> MlflowClient:
    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def add_version(client: MlflowClient, tmp: Path, gate: str | None) -> str:
    """A version with the gate's decision tag (``None``: no tag at all)."""
    tags = {} if gate is None else {"stemma.gate.decision": gate}
    if gate == "failed":
        tags["stemma.gate.reasons"] = "roc_auc 0.7000 is below minimum 0.8000"
    source = tmp / "model"
    source.mkdir(exist_ok=True)
    return str(client.create_model_version(MODEL, source=str(source), tags=tags).version)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with v1 champion (passed), v2 challenger (passed), v3 failed, v4 ungated.

    Built once: a fresh SQLite store spends seconds on migrations; tests copy the file.
    """
    folder = tmp_path_factory.mktemp("promotion")
    client = make_client(folder / "mlflow.db")
    client.create_registered_model(MODEL)
    versions = [add_version(client, folder, gate) for gate in ("passed", "passed", "failed")]
    versions.append(add_version(client, folder, None))
    client.set_registered_model_alias(MODEL, "champion", versions[0])
    client.set_registered_model_alias(MODEL, "challenger", versions[1])
    client.create_experiment("credit", artifact_location=(folder / "artifacts").as_uri())
    return folder / "mlflow.db"


@pytest.fixture
def registry(template: Path, tmp_path: Path):
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    client = make_client(db)
    experiment = client.get_experiment_by_name("credit").experiment_id
    return {"client": client, "db": db, "tmp": tmp_path, "experiment": experiment}


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def test_promote_moves_champion_and_keeps_previous(registry):
    client = registry["client"]

    record = promote(
        client,
        MODEL,
        "2",
        expected_champion="1",
        reason="shadow win",
        evidence={"roc_auc_delta": 0.01},
        flow_run_id="flow-123",
        experiment_id=registry["experiment"],
    )

    assert (record.outcome, record.from_version, record.to_version) == ("done", "1", "2")
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}  # challenger gone
    assert client.get_registered_model(MODEL).tags[GENERATION_TAG] == "1"
    tagged = json.loads(client.get_model_version(MODEL, "2").tags[LAST_PROMOTION_TAG])
    assert tagged["reason"] == "shadow win" and tagged["flow_run_id"] == "flow-123"
    assert json.loads(client.get_model_version(MODEL, "1").tags[LAST_PROMOTION_TAG]) == tagged
    run = client.get_run(record.record_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stemma.promotion.outcome"] == "done"
    document = json.loads(
        Path(client.download_artifacts(run.info.run_id, RECORD_ARTIFACT)).read_text()
    )
    assert document["decision"]["evidence"] == {"roc_auc_delta": 0.01}
    promoted_over = {
        "source": "models:/credit/2",
        "target": "models:/credit/1",
        "relation": "promoted_over",
    }
    assert promoted_over in document["edges"]


def test_a_champion_moved_outside_stemma_is_detected_until_stemma_moves_it(registry):
    client = registry["client"]
    assert moved_outside(client, MODEL) is None  # Stemma never made a champion here yet
    promote(client, MODEL, "2", reason="shadow win")
    assert client.get_registered_model(MODEL).tags["stemma.promotion.champion"] == "2"
    assert moved_outside(client, MODEL) is None

    client.set_registered_model_alias(MODEL, "champion", "3")  # the MLflow UI's pencil
    problem = moved_outside(client, MODEL)
    assert problem is not None
    assert "points to v3, but Stemma last made v2 the champion" in problem.render()
    assert "undo it: stemma promote models:/credit/2" in problem.render()
    client.delete_registered_model_alias(MODEL, "champion")
    assert "points to no version" in moved_outside(client, MODEL).render()

    client.set_registered_model_alias(MODEL, "champion", "3")
    promote(client, MODEL, "2", reason="undo the manual move")  # Stemma's move again
    assert moved_outside(client, MODEL) is None
    # while a promotion holds the next generation, the alias is moving: no alarm
    generation = int(client.get_registered_model(MODEL).tags[GENERATION_TAG])
    client.create_experiment(claim_name(MODEL, generation + 1))
    client.set_registered_model_alias(MODEL, "champion", "1")
    assert moved_outside(client, MODEL) is None


REFUSALS = [
    ("failed-gate", "3", "1", "v3 cannot be promoted: its gate did not pass", "below minimum"),
    ("no-gate-tag", "4", "1", "v4 cannot be promoted", "has no gate decision"),
    ("stale-expectation", "2", "7", "the champion is v1, expected v7; someone else moved it", ""),
    ("already-champion", "1", "1", "v1 is already the champion", ""),
]


@pytest.mark.parametrize(
    "version,expected,headline,detail",
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refused_promotion_moves_nothing_and_is_recorded(
    registry, version, expected, headline, detail
):
    client = registry["client"]
    before = aliases(client)

    with pytest.raises(PromotionError, match=headline) as caught:
        promote(
            client,
            MODEL,
            version,
            expected_champion=expected,
            reason="try",
            experiment_id=registry["experiment"],
        )

    assert detail in caught.value.render()
    assert aliases(client) == before
    record = caught.value.record
    assert record.outcome in ("refused", "lost_race")
    assert client.get_run(record.record_run_id).info.status == "FAILED"
    assert (
        json.loads(client.get_model_version(MODEL, version).tags[LAST_PROMOTION_TAG])["outcome"]
        == record.outcome
    )


def test_each_move_logs_the_champion_history_so_far(registry):
    client, experiment = registry["client"], registry["experiment"]
    promote(client, MODEL, "2", reason="shadow win", experiment_id=experiment)
    with pytest.raises(PromotionError):  # refused: not a move, not in the history
        promote(client, MODEL, "3", reason="no", experiment_id=experiment)
    last = rollback(client, MODEL, reason="canary | error rate", experiment_id=experiment)

    folder = Path(client.download_artifacts(last.record_run_id, "champion_history"))
    table = (folder / "history.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 2")]
    assert len(rows) == 2  # newest first: the rollback, then the promotion
    assert "| v1 | v2 | rollback |" in rows[0] and "canary / error rate" in rows[0]
    assert "| v2 | v1 | promote |" in rows[1] and "shadow win" in rows[1]
    assert (folder / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_rollback_restores_previous_champion_in_one_step(registry):
    client = registry["client"]
    promote(client, MODEL, "2", reason="better")

    record = rollback(client, MODEL, reason="canary error rate")

    assert (record.outcome, record.from_version, record.to_version) == ("done", "2", "1")
    assert aliases(client) == {"champion": "1", "previous-champion": "2"}
    assert client.get_registered_model(MODEL).tags[GENERATION_TAG] == "2"

    # the registry's text follows every move: each version's role first, then its history
    one = client.get_model_version(MODEL, "1").description.splitlines()
    two = client.get_model_version(MODEL, "2").description.splitlines()
    assert one[0] == "champion · gate passed"
    assert two[0] == "previous-champion · gate passed"
    user = getpass.getuser()
    assert [line.split(": ", 1)[1] for line in one[3:5]] == [
        "champion → previous-champion (promote of v2)",
        f"rolled back to champion by {user}: canary error rate",
    ]
    assert [line.split(": ", 1)[1] for line in two[3:5]] == [
        f"promoted to champion by {user}: better",
        "champion → previous-champion (rollback of v1)",
    ]
    described = client.get_registered_model(MODEL).description
    assert described.startswith("**Champion: v1**")
    assert f"rolled back to champion by {user}: canary error rate" in described
    assert "Other aliases: previous-champion: v2" in described


def test_rollback_without_previous_champion_is_a_clear_error(registry):
    client = registry["client"]

    with pytest.raises(PromotionError, match="nothing to roll back to") as caught:
        rollback(client, MODEL, reason="oops")

    assert "the champion is v1" in caught.value.render()
    assert aliases(client)["champion"] == "1"
    assert isinstance(caught.value, RegistryError) and caught.value.exit_code == 5


# ---------------------------------------------------------------------------------------
# The race


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + RACE_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)


def _race(db: str, index: int, folder: str) -> None:
    """One promoter for every round: wait for the round's start file, promote, report.

    The start file (written atomically) names each racer's version and the expected
    champion, so all racers leave the line together with the same expectation.
    """
    client = make_client(Path(db))
    client.get_registered_model(MODEL)  # import and connect before the first start line
    for round_number in range(ROUNDS):
        start = Path(folder, f"go-{round_number}")
        _wait_for(start)
        plan = json.loads(start.read_text())
        version = plan["candidates"][index]
        try:
            record = promote(
                client, MODEL, version, expected_champion=plan["expected"], reason="race"
            )
            outcome = {"version": version, "outcome": record.outcome}
        except PromotionError as error:
            outcome = {"version": version, "outcome": error.record.outcome, "error": error.headline}
        except Exception as error:  # reported to the test, which fails on it
            outcome = {"version": version, "outcome": "crashed", "error": repr(error)}
        champion = client.get_registered_model(MODEL).aliases.get("champion")
        outcome["champion_after"] = None if champion is None else str(champion)
        # Written aside and renamed, so the test never reads half a result.
        partial = Path(folder, f".partial-{round_number}-{index}")
        partial.write_text(json.dumps(outcome))
        partial.rename(Path(folder, f"result-{round_number}-{index}.json"))


def _results(folder: Path, round_number: int) -> list[dict]:
    deadline = time.monotonic() + RACE_TIMEOUT_S
    while len(found := list(folder.glob(f"result-{round_number}-*.json"))) < RACERS:
        assert time.monotonic() < deadline, f"racers did not finish round {round_number}"
        time.sleep(0.01)
    return [json.loads(path.read_text()) for path in found]


def test_racing_promoters_leave_exactly_one_champion_that_passed(tmp_path):
    context = multiprocessing.get_context("spawn")
    db = tmp_path / "mlflow.db"
    client = make_client(db)
    client.create_registered_model(MODEL)
    racers = [
        context.Process(target=_race, args=(str(db), index, str(tmp_path)))
        for index in range(RACERS)
    ]
    for racer in racers:
        racer.start()
    try:
        for round_number in range(ROUNDS):
            original = add_version(client, tmp_path, "passed")
            candidates = [add_version(client, tmp_path, "passed") for _ in range(RACERS)]
            client.set_registered_model_alias(MODEL, "champion", original)
            plan = tmp_path / "plan.json"
            plan.write_text(json.dumps({"expected": original, "candidates": candidates}))
            plan.rename(tmp_path / f"go-{round_number}")  # atomic: all see the whole plan

            outcomes = _results(tmp_path, round_number)

            done = [o["version"] for o in outcomes if o["outcome"] == "done"]
            assert len(done) == 1, outcomes
            assert all(o["outcome"] == "lost_race" for o in outcomes if o["version"] not in done)
            final = aliases(client)
            assert final["champion"] == done[0]
            assert final["previous-champion"] == original
            gate = client.get_model_version(MODEL, done[0]).tags["stemma.gate.decision"]
            assert gate == "passed"
            # A loser may finish before the winner has moved the alias, so it sees the
            # original champion or the winner, never no champion and never another loser.
            seen = {o["champion_after"] for o in outcomes}
            assert seen <= {original, done[0]}, outcomes
    finally:
        for racer in racers:
            racer.join(RACE_TIMEOUT_S)
            if racer.is_alive():
                racer.kill()
    assert [racer.exitcode for racer in racers] == [0] * RACERS
