"""Promotion under faults: racing promoters, a promoter killed or paused right after its claim.

Real processes on a real SQLite MLflow store in ``tmp_path``. A promoter is paused at the
right moment from outside the production code: the child script below installs a profile
hook that stops its own process (SIGSTOP, heartbeat thread included) at the first call of
``Claim.ensure_held``, which a holder makes right after its claim and before any alias
moves. The test then kills it, or lets its heartbeat go stale and resumes it (SIGCONT).

Cases that wait for a heartbeat to go stale shorten the limit through the environment
variable ``STEMMA_PROMOTION_HEARTBEAT_S``, which every promoter reads when it claims.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from stemma.components.evaluation import canary, canary_guards
from stemma.components.registry.claims import HEARTBEAT_LIMIT_VARIABLE, claim_name
from stemma.components.registry.promotion import GENERATION_TAG, PromotionError, promote
from stemma.components.spec import EvaluateSpec
from stemma.flows.promote import format_record

MODEL = "credit"
#: Versions in the template registry, all with a passed gate; v1 is the champion.
VERSIONS = 16
#: Longest a process waits for the start line, or the test waits for a process (seconds).
PROCESS_TIMEOUT_S = 90
#: How long a finished case waits for a child to exit before killing it (seconds).
CHILD_EXIT_S = 5
#: The heartbeat limit of the cases that wait for it to go stale (seconds).
SHORT_HEARTBEAT_S = 4.0
#: How long taking over a claim whose holder is gone may take, far below any heartbeat limit.
TAKEOVER_BOUND_S = 10.0

ROOT = Path(__file__).resolve().parents[2]

#: A promoter that stops its own process right after its claim and, once resumed, reports.
PAUSING_PROMOTER = """
import json, os, signal, sys
from pathlib import Path
from mlflow import MlflowClient
from stemma.components.registry.promotion import PromotionError, promote

db, version, out = sys.argv[1:4]
client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
client.get_registered_model("credit")


def stop_after_claim(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "ensure_held":
        sys.setprofile(None)
        Path(out + ".claimed").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)


sys.setprofile(stop_after_claim)
try:
    record = promote(client, "credit", version, reason="paused promoter")
    result = {"outcome": record.outcome}
except PromotionError as error:
    result = {"outcome": error.record.outcome, "error": error.render()}
sys.setprofile(None)
Path(out + ".partial").write_text(json.dumps(result))
Path(out + ".partial").rename(out)
"""


def make_client(db: Path) -> MlflowClient:
    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1..v16, all passed their gate; v1 is champion. Built once, copied per test."""
    folder = tmp_path_factory.mktemp("promotion-faults")
    client = make_client(folder / "mlflow.db")
    client.create_registered_model(MODEL)
    for _ in range(VERSIONS):
        client.create_model_version(
            MODEL, source=str(folder), tags={"stemma.gate.decision": "passed"}
        )
    client.set_registered_model_alias(MODEL, "champion", "1")
    return folder / "mlflow.db"


@pytest.fixture
def registry(template: Path, tmp_path: Path) -> tuple[MlflowClient, Path]:
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    return make_client(db), db


@pytest.fixture
def children():
    """Every child process a case starts; each is killed and reaped at the end."""
    started: list[subprocess.Popen | multiprocessing.Process] = []
    yield started
    for child in started:
        if isinstance(child, subprocess.Popen):
            if child.poll() is None:
                child.kill()
            child.wait(PROCESS_TIMEOUT_S)
        else:
            child.join(CHILD_EXIT_S)  # a racer still waiting for a start line never gets it
            if child.is_alive():
                child.kill()
                child.join()


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def generation(client: MlflowClient) -> int:
    return int(client.get_registered_model(MODEL).tags.get(GENERATION_TAG, "0"))


def wait_until(condition, what: str, timeout: float = PROCESS_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_paused_promoter(
    db: Path, version: str, folder: Path, children: list, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    """A promoter of ``version`` stopped right after its claim; returns it and its result file."""
    script = folder / "pausing_promoter.py"
    script.write_text(PAUSING_PROMOTER)
    out = folder / f"paused-v{version}.json"
    child = subprocess.Popen(
        [sys.executable, str(script), str(db), version, str(out)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    children.append(child)
    claimed = Path(str(out) + ".claimed")
    wait_until(
        lambda: claimed.exists() or child.poll() is not None, "the promoter's claim", timeout=120
    )
    assert child.poll() is None, f"the promoter exited with {child.returncode} before claiming"
    wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_STOPPED, "the stop")
    return child, out


# ---------------------------------------------------------------------------------------
# Racing promoters: each process promotes one version per round, released together


def _race(db: str, index: int, folder: str, rounds: int) -> None:
    client = make_client(Path(db))
    client.get_registered_model(MODEL)  # import and connect before the first start line
    for round_number in range(rounds):
        start = Path(folder, f"go-{round_number}")
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not start.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{start} never appeared")
            time.sleep(0.001)
        plan = json.loads(start.read_text())
        version = plan["candidates"][index]
        try:
            record = promote(
                client, MODEL, version, expected_champion=plan["expected"], reason="race"
            )
            outcome = {"version": version, "outcome": record.outcome, "note": record.took_over}
        except PromotionError as error:
            outcome = {"version": version, "outcome": error.record.outcome, "error": error.render()}
        except Exception as error:  # reported to the test, which fails on it
            outcome = {"version": version, "outcome": "crashed", "error": repr(error)}
        partial = Path(folder, f".partial-{round_number}-{index}")
        partial.write_text(json.dumps(outcome))
        partial.rename(Path(folder, f"result-{round_number}-{index}.json"))


def start_racers(db: Path, folder: Path, count: int, rounds: int, children: list) -> None:
    context = multiprocessing.get_context("spawn")
    for index in range(count):
        racer = context.Process(target=_race, args=(str(db), index, str(folder), rounds))
        racer.start()
        children.append(racer)


def run_round(folder: Path, round_number: int, expected: str, candidates: list[str]) -> list:
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"expected": expected, "candidates": candidates}))
    plan.rename(folder / f"go-{round_number}")  # atomic: every racer sees the whole plan
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while len(found := list(folder.glob(f"result-{round_number}-*.json"))) < len(candidates):
        assert time.monotonic() < deadline, f"racers did not finish round {round_number}"
        time.sleep(0.01)
    return [json.loads(path.read_text()) for path in found]


def check_one_winner(outcomes: list[dict]) -> str:
    """The winner's version; every other racer lost to it, and its message says so."""
    done = [o["version"] for o in outcomes if o["outcome"] == "done"]
    assert len(done) == 1, outcomes
    winner = done[0]
    for loser in (o for o in outcomes if o["version"] != winner):
        assert loser["outcome"] == "lost_race", loser
        assert f"lost the race to v{winner}" in loser["error"], loser
        assert f"the champion is now v{winner}" in loser["error"], loser
    return winner


@pytest.mark.slow
@pytest.mark.fault_case("fault")
def test_racing_promoters_each_round_has_one_winner_named_by_the_losers(
    registry, tmp_path, children, fault_ledger
):
    client, db = registry
    racers, rounds = 4, 3
    start_racers(db, tmp_path, racers, rounds, children)
    champion = "1"
    winners, generations = [], []
    for round_number in range(rounds):
        first = 2 + round_number * racers
        candidates = [str(v) for v in range(first, first + racers)]
        outcomes = run_round(tmp_path, round_number, champion, candidates)
        fault_ledger.lost_rows(0)  # a promotion moves aliases, never rows
        winner = check_one_winner(outcomes)
        assert aliases(client)["champion"] == winner
        assert aliases(client)["previous-champion"] == champion
        winners.append(winner)
        generations.append(generation(client))
        champion = winner
    assert generations == [1, 2, 3]
    for racer in children:
        racer.join(PROCESS_TIMEOUT_S)
    assert [racer.exitcode for racer in children] == [0] * racers


# ---------------------------------------------------------------------------------------
# A promoter killed right after its claim


@pytest.mark.fault_case("fault")
def test_claim_of_a_killed_promoter_is_taken_over_at_once(
    registry, tmp_path, children, fault_ledger
):
    client, db = registry
    child, _ = start_paused_promoter(db, "2", tmp_path, children)
    killed = child.pid
    child.kill()
    child.wait(PROCESS_TIMEOUT_S)

    started = time.monotonic()
    record = promote(client, MODEL, "3", reason="after a crash")
    took = time.monotonic() - started

    fault_ledger.lost_rows(0)
    assert took < TAKEOVER_BOUND_S
    assert record.outcome == "done"
    assert f"the claim of pid {killed} on host {socket.gethostname()} (promoting v2" in (
        record.took_over
    )
    assert "no longer runs" in record.took_over
    assert "took over an abandoned claim: the claim of pid" in format_record(record)
    assert aliases(client) == {"champion": "3", "previous-champion": "1"}
    assert generation(client) == 1
    assert client.get_experiment_by_name(claim_name(MODEL, 1, 1)) is not None


@pytest.mark.slow
@pytest.mark.fault_case("fault")
def test_paused_promoter_blocks_then_is_taken_over_and_cannot_overwrite(
    registry, tmp_path, children, fault_ledger, monkeypatch
):
    client, db = registry
    short = {HEARTBEAT_LIMIT_VARIABLE: str(SHORT_HEARTBEAT_S)}
    monkeypatch.setenv(HEARTBEAT_LIMIT_VARIABLE, str(SHORT_HEARTBEAT_S))
    child, out = start_paused_promoter(db, "2", tmp_path, children, env=short)
    paused_at = time.time()

    # While its heartbeat is fresh, the paused holder blocks and is named.
    with pytest.raises(PromotionError) as blocked:
        promote(client, MODEL, "3", reason="while paused")
    fault_ledger.lost_rows(0)
    assert blocked.value.record.outcome == "blocked"
    assert blocked.value.headline.startswith(
        f"a promotion of credit is in progress: claim on generation 1 held by pid {child.pid} "
        f"on host {socket.gethostname()} (promoting v2) since "
    )
    assert ", heartbeat " in blocked.value.headline
    assert "lost the race" not in blocked.value.render()
    assert aliases(client) == {"champion": "1"} and generation(client) == 0

    # Once its heartbeat is older than the limit, the claim is taken over.
    time.sleep(max(0.0, paused_at + SHORT_HEARTBEAT_S + 0.5 - time.time()))
    record = promote(client, MODEL, "3", reason="after the pause")
    assert record.outcome == "done"
    assert f"pid {child.pid}" in record.took_over and "no heartbeat for" in record.took_over
    assert aliases(client) == {"champion": "3", "previous-champion": "1"}

    # Resumed, the paused holder finds its claim taken and writes nothing.
    child.send_signal(signal.SIGCONT)
    assert child.wait(PROCESS_TIMEOUT_S) == 0
    result = json.loads(out.read_text())
    assert result["outcome"] == "lost_race"
    assert (
        f"credit: the claim on generation 1 was taken over by pid {os.getpid()} on host "
        f"{socket.gethostname()} (promoting v3) after this process was silent for "
    ) in result["error"]
    assert "the champion is v3" in result["error"]
    assert aliases(client) == {"champion": "3", "previous-champion": "1"}
    assert generation(client) == 1


@pytest.mark.slow
@pytest.mark.fault_case("fault")
def test_two_promoters_taking_over_one_abandoned_claim_leave_one_winner(
    registry, tmp_path, children, fault_ledger
):
    client, db = registry
    child, _ = start_paused_promoter(db, "2", tmp_path, children)
    killed = child.pid
    child.kill()
    child.wait(PROCESS_TIMEOUT_S)
    racers = 3
    start_racers(db, tmp_path, racers, 1, children)

    outcomes = run_round(tmp_path, 0, "1", [str(v) for v in range(3, 3 + racers)])

    fault_ledger.lost_rows(0)
    winner = check_one_winner(outcomes)
    note = next(o["note"] for o in outcomes if o["outcome"] == "done")
    assert f"the claim of pid {killed} " in note
    assert aliases(client) == {"champion": winner, "previous-champion": "1"}
    assert generation(client) == 1
    assert client.get_experiment_by_name(claim_name(MODEL, 1, 1)) is not None
    assert client.get_experiment_by_name(claim_name(MODEL, 1, 2)) is None


# ---------------------------------------------------------------------------------------
# The canary's moves use the same claims


def canary_states(challenger: str, control: str):
    """A canary of ``challenger`` against ``control``: at 100%, and baking after promotion."""
    settings = EvaluateSpec.model_validate({"canary": {"steps": [1.0], "bake_batches": 1}})
    at_full = canary.start_state(MODEL, challenger, control, settings)
    return at_full, canary.plan_transition(at_full, canary_guards.ADVANCE, ["green"]).state


@pytest.mark.fault_case("fault")
def test_canary_rollback_takes_over_the_claim_of_a_killed_promoter(
    registry, tmp_path, children, fault_ledger
):
    client, db = registry
    client.set_registered_model_alias(MODEL, "champion", "2")
    client.set_registered_model_alias(MODEL, "previous-champion", "1")
    child, _ = start_paused_promoter(db, "3", tmp_path, children)
    killed = child.pid
    child.kill()
    child.wait(PROCESS_TIMEOUT_S)
    _, baking = canary_states("2", "1")
    back = canary.plan_transition(baking, canary.ROLLBACK, ["metric: worse"])

    applied = canary.apply_transition(
        client, baking, back, evidence={}, flow_run_id=None, experiment_id=None
    )

    fault_ledger.lost_rows(0)
    assert (applied.action, applied.outcome) == ("rollback", "done"), applied
    assert f"the claim of pid {killed} " in applied.record.took_over
    assert aliases(client) == {"champion": "1", "previous-champion": "2"}
    assert generation(client) == 1


@pytest.mark.fault_case("fault")
def test_canary_retire_waits_for_a_live_promotion_and_names_it(
    registry, tmp_path, children, fault_ledger, monkeypatch
):
    client, db = registry
    short = {HEARTBEAT_LIMIT_VARIABLE: str(SHORT_HEARTBEAT_S)}
    monkeypatch.setenv(HEARTBEAT_LIMIT_VARIABLE, str(SHORT_HEARTBEAT_S))
    client.set_registered_model_alias(MODEL, "challenger", "4")
    child, _ = start_paused_promoter(db, "3", tmp_path, children, env=short)
    early, _ = canary_states("4", "1")
    retire = canary.plan_transition(early, canary.ROLLBACK, ["error_rate: broken"])

    applied = canary.apply_transition(
        client, early, retire, evidence={}, flow_run_id=None, experiment_id=None
    )

    fault_ledger.lost_rows(0)
    assert (applied.action, applied.outcome) == ("retire", "blocked"), applied
    assert applied.detail.startswith(
        f"a promotion of credit is in progress: claim on generation 1 held by pid {child.pid} "
        f"on host {socket.gethostname()} (promoting v3) since "
    )
    following = canary.record_step(
        early,
        retire,
        applied,
        batch=tmp_path / "batch",
        digest="d",
        decision="rollback",
        run_id=None,
    )
    assert following.status == canary.ABORTED and "in progress" in following.cause
    assert aliases(client) == {"champion": "1", "challenger": "4"}
