"""Canary release: a growing share of entities is served by the challenger, one step per batch.

Each batch is routed by the stable hash bucket of its ids and scored by both arms
(:mod:`.canary_steps`), then judged by the guards (:mod:`.canary_guards`): any breach
rolls back, too few rows hold the step, otherwise the canary advances. Live, the online
endpoint routes with the same hash and follows the state below; each day of its log is
then a step's batch (:mod:`.live`).

The state machine (:func:`plan_transition`), one transition per batch::

    canary, step i (fraction < 1) --advance--> step i + 1
    canary, step at 1.0           --advance--> promote() --> bake (or completed without bake)
    bake, batch k                 --advance--> bake k + 1 --> completed after bake_batches
    canary (any step)             --breach---> retire_challenger(): rolled_back
    bake                          --breach---> rollback(): the previous champion is back
    any                           --hold-----> same step; more than max_holds in a row ends it

Every alias move goes through :mod:`.promotion` (compare-and-set ``promote``, ``rollback``,
``retire_challenger``), and each is idempotent on resume: a promotion already made, a
rollback already done or an alias already gone is recognised, not repeated.

State. The canary's state is a JSON tag on the registered model (:data:`STATE_TAG`), written
once per batch after the batch's alias move, so each nightly run continues the step
sequence. A batch's decision is written to its folder (``_STEP.json``) before any alias
moves: a run killed at any point, started again, re-reads that decision instead of
re-deciding on data that may have changed (labels that arrived meanwhile), finishes the
alias move if it had not happened, and then records the step once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.errors import RegistryError
from stemma.components.evaluation.canary_guards import HOLD, ROLLBACK
from stemma.components.platform import tags
from stemma.components.platform.decisions import Decided, build_decision_record
from stemma.components.platform.files import write_atomically
from stemma.components.platform.lineage import (
    Edge,
    LineageRecord,
    Node,
    decision_node_id,
    evaluation_node_id,
    input_node_id,
    model_version_node,
    run_node,
)
from stemma.components.registry.gate import CHAMPION_ALIAS
from stemma.components.spec import EvaluateSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stemma.components.registry.promotion import PromotionRecord

#: The alias the champion's predecessor keeps (see :mod:`.promotion`).
PREVIOUS_CHAMPION_ALIAS = "previous-champion"
#: Registered-model tag holding the canary's state as JSON.
STATE_TAG = tags.CANARY_STATE
STATE_FORMAT = 1
#: Phases and statuses of a canary.
PHASE_CANARY = "canary"
PHASE_BAKE = "bake"
RUNNING = "running"
COMPLETED = "completed"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
TERMINAL = (COMPLETED, ROLLED_BACK, ABORTED)
#: Alias moves a transition makes.
ACTION_NONE = "none"
ACTION_PROMOTE = "promote"
ACTION_ROLLBACK = "rollback"
ACTION_RETIRE = "retire"
#: The step's decision file in its folder.
STEP_FILE = "_STEP.json"
#: Suffix of the default canary output folder, beside ``score.output``.
CANARY_SUFFIX = "-canary"
#: Version of the step decision file; part of its key.
STEP_FORMAT = 1
#: Run tag that identifies a step's MLflow run, so a resumed step reuses it.
STEP_KEY_TAG = tags.CANARY_STEP_KEY


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class StepEntry:
    """One batch the canary processed."""

    batch: str
    digest: str
    phase: str
    step: int
    fraction: float
    decision: str
    action: str
    outcome: str
    run_id: str | None
    when: str


@dataclass(frozen=True)
class CanaryState:
    """Where a canary stands; persisted as the registered-model tag :data:`STATE_TAG`.

    Attributes:
        model: the registered model.
        challenger: the version under canary.
        control: the champion when the canary started (the rollback target).
        salt: mixed into the routing hash; fixed for the canary's life.
        steps: the fractions, ending at 1.0.
        bake_batches: batches watched after the promotion.
        max_holds: holds in a row that end the canary.
        phase: ``canary`` or ``bake``.
        step: index of the current fraction (``canary`` phase).
        holds: holds in a row at the current step.
        baked: batches watched since the promotion.
        status: ``running``, ``completed``, ``rolled_back`` or ``aborted``.
        cause: why it ended (terminal statuses).
        revision: bumped on every write; a writer checks it has not moved.
        history: the batches processed, in order.
    """

    model: str
    challenger: str
    control: str
    salt: str
    steps: tuple[float, ...]
    bake_batches: int
    max_holds: int
    phase: str = PHASE_CANARY
    step: int = 0
    holds: int = 0
    baked: int = 0
    status: str = RUNNING
    cause: str = ""
    started: str = field(default_factory=utc_now)
    updated: str = field(default_factory=utc_now)
    revision: int = 0
    history: tuple[StepEntry, ...] = ()

    @property
    def fraction(self) -> float:
        """The share of entities the challenger serves now."""
        return 1.0 if self.phase == PHASE_BAKE else float(self.steps[self.step])

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def processed(self, digest: str) -> StepEntry | None:
        """The entry of a batch already processed, by its content digest."""
        return next((entry for entry in self.history if entry.digest == digest), None)

    def describe(self) -> str:
        """``credit v5 (control v4): step 2 of 4 at 25%, running``."""
        where = (
            f"step {self.step + 1} of {len(self.steps)} at {self.fraction:.0%}"
            if self.phase == PHASE_CANARY
            else f"bake {self.baked} of {self.bake_batches} at 100%"
        )
        tail = f" ({self.cause})" if self.cause else ""
        return (
            f"{self.model} v{self.challenger} (control v{self.control}): {where}, "
            f"{self.status}{tail}"
        )

    def to_json(self) -> str:
        return json.dumps({"format": STATE_FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CanaryState:
        document = json.loads(text)
        if document.pop("format", None) != STATE_FORMAT:
            raise ValueError("unknown canary state format")
        document["steps"] = tuple(document["steps"])
        document["history"] = tuple(StepEntry(**entry) for entry in document["history"])
        return cls(**document)


def read_state(client: MlflowClient, model_name: str) -> CanaryState | None:
    """The canary state recorded on the registered model, or None.

    Raises:
        RegistryError: the model cannot be read, or its state tag is not readable.
    """
    text = (_registered_model(client, model_name).tags or {}).get(STATE_TAG)
    if not text:
        return None
    try:
        return CanaryState.from_json(text)
    except (ValueError, TypeError, KeyError) as error:
        raise RegistryError(
            f"{model_name}: the canary state (tag {STATE_TAG}) is unreadable",
            [str(error), "delete the tag to start over: it was written by another version"],
        ) from error


def write_state(client: MlflowClient, state: CanaryState) -> CanaryState:
    """Record ``state`` as the next revision, if nobody else wrote since it was read.

    Raises:
        RegistryError: the recorded revision is not the one ``state`` was derived from
            (two canary runs of one model at once); nothing is written.
    """
    current = read_state(client, state.model)
    recorded = current.revision if current is not None else 0
    if recorded != state.revision:
        raise RegistryError(
            f"{state.model}: the canary state changed while this run worked "
            f"(revision {recorded}, expected {state.revision})",
            ["another canary run of this model is under way; run one at a time"],
        )
    written = replace(state, revision=state.revision + 1, updated=utc_now())
    client.set_registered_model_tag(state.model, STATE_TAG, written.to_json())
    return written


def start_state(
    model_name: str,
    challenger: str,
    control: str,
    settings: EvaluateSpec,
    *,
    revision: int = 0,
) -> CanaryState:
    """A new canary of ``challenger`` against ``control`` at the first step."""
    canary = settings.canary
    return CanaryState(
        model=model_name,
        challenger=str(challenger),
        control=str(control),
        salt=f"{model_name}/v{challenger}",
        steps=tuple(float(step) for step in canary.steps),
        bake_batches=canary.bake_batches,
        max_holds=canary.max_holds,
        revision=revision,
    )


# ---------------------------------------------------------------------------------------
# Transitions


@dataclass(frozen=True)
class Transition:
    """What a step's decision does to the canary."""

    action: str
    state: CanaryState
    cause: str = ""


def plan_transition(state: CanaryState, decision: str, reasons: Sequence[str]) -> Transition:
    """The alias move and the next state after a step decided ``decision``.

    The returned state is not yet written and carries no history entry for the step.
    """
    why = "; ".join(reasons)
    if state.phase == PHASE_CANARY:
        if decision == ROLLBACK:
            cause = f"breach at {state.fraction:.0%}: {why}"
            return Transition(ACTION_RETIRE, replace(state, status=ROLLED_BACK, cause=cause), cause)
        if decision == HOLD:
            if state.holds + 1 > state.max_holds:
                cause = f"held {state.holds + 1} batches at {state.fraction:.0%}: {why}"
                return Transition(
                    ACTION_RETIRE, replace(state, status=ROLLED_BACK, cause=cause), cause
                )
            return Transition(ACTION_NONE, replace(state, holds=state.holds + 1))
        if state.step + 1 < len(state.steps):
            return Transition(ACTION_NONE, replace(state, step=state.step + 1, holds=0))
        done = state.bake_batches == 0
        return Transition(
            ACTION_PROMOTE,
            replace(
                state,
                phase=PHASE_BAKE,
                holds=0,
                status=COMPLETED if done else RUNNING,
                cause="promoted at 100% with every guard green" if done else "",
            ),
        )
    if decision == ROLLBACK:
        cause = f"breach after the promotion: {why}"
        return Transition(ACTION_ROLLBACK, replace(state, status=ROLLED_BACK, cause=cause), cause)
    if decision == HOLD:
        if state.holds + 1 > state.max_holds:
            cause = f"bake ended after {state.holds + 1} batches without evidence; kept"
            return Transition(ACTION_NONE, replace(state, status=COMPLETED, cause=cause))
        return Transition(ACTION_NONE, replace(state, holds=state.holds + 1))
    baked = state.baked + 1
    if baked >= state.bake_batches:
        return Transition(
            ACTION_NONE,
            replace(
                state, baked=baked, holds=0, status=COMPLETED, cause="baked with every guard green"
            ),
        )
    return Transition(ACTION_NONE, replace(state, baked=baked, holds=0))


def model_aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """The registered model's aliases, alias -> version.

    Raises:
        RegistryError: the model cannot be read.
    """
    registered = _registered_model(client, model_name)
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def _registered_model(client: MlflowClient, model_name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name)
    except MlflowException as error:
        message = getattr(error, "message", None) or str(error)
        raise RegistryError(f"cannot read registered model {model_name!r}", [message]) from error


def check_aliases(client: MlflowClient, state: CanaryState) -> str | None:
    """Why the registry no longer matches the canary (someone moved the champion), or None."""
    champion = model_aliases(client, state.model).get(CHAMPION_ALIAS)
    expected = state.control if state.phase == PHASE_CANARY else state.challenger
    if champion == expected:
        return None
    role = "the control" if state.phase == PHASE_CANARY else "the promoted challenger"
    return (
        f"the champion is v{champion}, the canary expected v{expected} ({role}): "
        "it was moved outside the canary"
    )


@dataclass(frozen=True)
class AppliedAction:
    """The outcome of a transition's alias move."""

    action: str
    outcome: str
    record: PromotionRecord | None = None
    detail: str = ""


def apply_transition(
    client: MlflowClient,
    state: CanaryState,
    transition: Transition,
    *,
    evidence: dict[str, Any],
    flow_run_id: str | None,
    experiment_id: str | None,
) -> AppliedAction:
    """Make the transition's alias move through :mod:`.promotion`, once.

    A move already made (by a run killed before it recorded the step) is recognised and
    not repeated: the champion already is the challenger (promote), already is the control
    (rollback), or the challenger alias is already gone (retire).

    Returns:
        Outcome ``done``, ``already`` (found made), ``none`` (no move), or the
        promotion's ``lost_race``/``refused`` (the caller ends the canary as aborted).
    """
    from stemma.components.registry.promotion import PromotionError, promote, retire_challenger

    action = transition.action
    if action == ACTION_NONE:
        return AppliedAction(action, "none")
    aliases = model_aliases(client, state.model)
    champion = aliases.get(CHAMPION_ALIAS)
    record = {"evidence": evidence, "flow_run_id": flow_run_id, "experiment_id": experiment_id}
    try:
        if action == ACTION_PROMOTE:
            if champion == state.challenger:
                return AppliedAction(action, "already", detail="the challenger is champion already")
            reason = f"canary: every guard green at 100% for v{state.challenger}"
            promoted = promote(
                client,
                state.model,
                state.challenger,
                expected_champion=state.control,
                reason=reason,
                **record,
            )
            return AppliedAction(action, "done", promoted)
        if action == ACTION_ROLLBACK:
            return _roll_back(client, state, transition, aliases, record)
        retired = retire_challenger(
            client, state.model, state.challenger, reason=f"canary: {transition.cause}", **record
        )
        if retired is None:
            return AppliedAction(action, "already", detail="the challenger alias was gone already")
        return AppliedAction(action, "done", retired)
    except PromotionError as error:
        outcome = error.record.outcome if error.record is not None else "refused"
        return AppliedAction(action, outcome, error.record, error.headline)


def _roll_back(
    client: MlflowClient,
    state: CanaryState,
    transition: Transition,
    aliases: dict[str, str],
    record: dict[str, Any],
) -> AppliedAction:
    """Put the control back as champion, unless it already is or someone else moved it."""
    from stemma.components.registry.promotion import rollback

    champion, previous = aliases.get(CHAMPION_ALIAS), aliases.get(PREVIOUS_CHAMPION_ALIAS)
    if champion == state.control:
        return AppliedAction(
            ACTION_ROLLBACK, "already", detail=f"v{state.control} is champion already"
        )
    if champion != state.challenger or previous != state.control:
        return AppliedAction(
            ACTION_ROLLBACK,
            "lost_race",
            detail=f"the champion is v{champion} and the previous champion v{previous}, "
            f"not v{state.challenger} and v{state.control}: nothing was moved",
        )
    rolled_back = rollback(client, state.model, reason=f"canary: {transition.cause}", **record)
    return AppliedAction(ACTION_ROLLBACK, "done", rolled_back)


def record_step(
    state: CanaryState,
    transition: Transition,
    applied: AppliedAction,
    *,
    batch: Path,
    digest: str,
    decision: str,
    run_id: str | None,
) -> CanaryState:
    """The state after a step: the transition's, with the step in the history.

    A promotion that was refused or lost ends the canary as ``aborted``.
    """
    entry = StepEntry(
        batch=Path(batch).name,
        digest=digest,
        phase=state.phase,
        step=state.step,
        fraction=state.fraction,
        decision=decision,
        action=applied.action,
        outcome=applied.outcome,
        run_id=run_id,
        when=utc_now(),
    )
    following = transition.state
    if applied.outcome not in ("done", "already", "none"):
        following = replace(
            state, status=ABORTED, cause=f"{applied.action} {applied.outcome}: {applied.detail}"
        )
    return replace(following, history=(*state.history, entry), revision=state.revision)


# ---------------------------------------------------------------------------------------
# The step record on disk


def step_folder(root: Path, state: CanaryState, batch: Path) -> Path:
    """Where the canary keeps one batch's scores: ``<root>/v<challenger>/<batch stem>``."""
    return Path(root) / f"v{state.challenger}" / Path(batch).stem


def step_key(state: CanaryState, digest: str) -> str:
    """What a step's decision depends on, hashed: the canary, its position and the batch."""
    names = ("model", "challenger", "control", "salt", "started", "phase", "step", "holds", "baked")
    document = {name: getattr(state, name) for name in names}
    document.update(format=STEP_FORMAT, fraction=state.fraction, batch=digest)
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def read_step_record(folder: Path, key: str) -> dict[str, Any] | None:
    """The decision a run took on this step already (maybe killed after it), or None."""
    path = Path(folder) / STEP_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) and document.get("key") == key else None


def write_step_record(folder: Path, document: dict[str, Any]) -> Path:
    """Write the step's decision atomically, before any alias moves."""
    path = Path(folder) / STEP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(document, sort_keys=True, indent=2, default=str))
    return path


def default_output_root(score_output: Path) -> Path:
    """``<score.output>-canary`` beside the scoring output."""
    score_output = Path(score_output)
    return score_output.with_name(score_output.name + CANARY_SUFFIX)


# ---------------------------------------------------------------------------------------
# Lineage


@dataclass(frozen=True)
class StepLineage:
    """What one canary step read, wrote and decided."""

    pipeline: str
    model_name: str
    control_version: str
    control_weights: str
    challenger_version: str
    challenger_weights: str
    batch_path: str
    batch_digest: str
    labels_path: str | None
    labels_digest: str | None
    predictions_path: str | None  # None: the endpoint served them (a day of its log)
    predictions_sha256: str | None
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    phase: str
    step: int
    fraction: float
    decision: str
    reasons: list[str]
    action: str
    outcome: str
    who: str
    when: str
    action_run_id: str | None = None
    batch_files: dict[str, str] | None = None  # a day of the log: each part's md5


def _input_node(facts: StepLineage, node_id: str) -> Node:
    """The batch a step judged (a day of the endpoint's log, with each part's md5)."""
    attributes: dict[str, Any] = {"path": facts.batch_path}
    if facts.batch_files:
        attributes["files"] = dict(facts.batch_files)
    return Node("input", node_id, f"md5:{facts.batch_digest}", attributes)


def _served_nodes(facts: StepLineage) -> list[Node]:
    """The served predictions a step wrote (none for a day of the endpoint's log)."""
    if facts.predictions_path is None:
        return []
    return [
        Node(
            "predictions",
            f"predictions:{facts.predictions_path}@{facts.predictions_sha256}",
            f"sha256:{facts.predictions_sha256}",
            {"path": facts.predictions_path, "served": True},
        )
    ]


def build_step_record(facts: StepLineage) -> LineageRecord:
    """The lineage record of a canary step (``lineage/record.json``)."""
    batch = input_node_id(facts.batch_path, facts.batch_digest)
    control = model_version_node(
        facts.model_name, facts.control_version, facts.control_weights, "control"
    )
    challenger = model_version_node(
        facts.model_name, facts.challenger_version, facts.challenger_weights, "challenger"
    )
    run = run_node(facts.run_id, facts.experiment_id, facts.flow_run_id)
    step = evaluation_node_id("canary-step", facts.run_id)
    decision = decision_node_id(facts.run_id)
    served = _served_nodes(facts)
    nodes = [
        _input_node(facts, batch),
        control,
        challenger,
        run,
        *served,
        Node(
            "canary_step",
            step,
            None,
            {"phase": facts.phase, "step": facts.step, "fraction": facts.fraction},
        ),
        Node(
            "decision",
            decision,
            None,
            {
                "decision": facts.decision,
                "reasons": list(facts.reasons),
                "action": facts.action,
                "outcome": facts.outcome,
                "who": facts.who,
                "when": facts.when,
                "flow_run_id": facts.flow_run_id,
                "action_run_id": facts.action_run_id,
            },
        ),
    ]
    edges = [
        Edge(batch, run.id, "input_of"),
        Edge(control.id, run.id, "scored_with"),
        Edge(challenger.id, run.id, "scored_with"),
        *(Edge(run.id, node.id, "produced") for node in served),
        Edge(batch, step, "evaluated_on"),
        Edge(control.id, step, "control_of"),
        Edge(challenger.id, step, "challenger_of"),
        Edge(run.id, step, "produced"),
    ]
    decided = Decided(
        evaluation=step,
        decision=decision,
        challenger=challenger.id,
        incumbent=control.id,
        verdict=facts.decision,
        reasons=list(facts.reasons),
        who=facts.who,
        when=facts.when,
        labels_path=facts.labels_path,
        labels_digest=facts.labels_digest,
        action=facts.action,
        action_outcome=facts.outcome,
        action_run_id=facts.action_run_id,
    )
    return build_decision_record(
        flow="canary",
        pipeline=facts.pipeline,
        nodes=nodes,
        edges=edges,
        decided=decided,
        summary={"action": facts.action, "outcome": facts.outcome},
    )
