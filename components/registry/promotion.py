"""Promotion and rollback: move the ``champion`` alias with compare-and-set.

MLflow's ``set_registered_model_alias`` overwrites unconditionally, so two promoters that
both read the same champion would both "win" one after the other. A real compare-and-set
needs one write that can fail atomically; the registry has none, but the tracking store
does: an experiment name is unique. Each move of the champion is a numbered *generation*
(registered-model tag :data:`GENERATION_TAG`); a promoter claims generation ``g + 1``
through :mod:`.claims` (the experiment ``stemma.claims/<model>/<g + 1>``, with its holder
and a heartbeat). Exactly one claimer succeeds; every other one waits briefly for the
holder and then learns who won, or who is still working, before it has written anything.
A claim whose holder died or stopped beating is taken over, again by compare-and-set.

The holder checks the claim is still its own before each write, sets
``previous-champion``, then ``champion`` (so a champion always exists: the alias is moved,
never deleted), reads it back, and only then advances the generation tag. A reader checks
the generation *before* the champion, so anyone who sees the new generation also sees the
new champion, and anyone who saw the old one fails its claim.

The read-back stays as the last rule: a writer outside this protocol (a manual alias in the
UI) can still move the alias, and then the promoter undoes what is still its own and fails.

Every decision (done, lost, blocked, refused) is recorded as a ``stemma.promotion.last``
tag on the versions involved and, when an experiment is given, as a small MLflow run named
``promote <model> v<to>`` with the record as tags and a lineage document
(``lineage/record.json``: the model versions and a ``promoted_over`` edge).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from stemma.components.errors import RegistryError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.lineage import (
    RECORD_ARTIFACT,
    Edge,
    LineageRecord,
    Node,
    index_tags,
    model_node_id,
    run_node_id,
)
from stemma.components.platform.tracked_run import tracked_run
from stemma.components.registry import claims, gate, history
from stemma.components.registry.claims import GENERATION_TAG
from stemma.components.registry.gate import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    CHAMPION_TAG,
    TAG_PREFIX,
)
from stemma.components.registry.text import record_moves

if TYPE_CHECKING:
    from mlflow import MlflowClient

PREVIOUS_CHAMPION_ALIAS = "previous-champion"
#: Version tag holding the JSON of the latest decision that involved the version.
LAST_PROMOTION_TAG = tag_names.PROMOTION_LAST
#: Fields of a decision its run carries as ``stemma.promotion.<field>`` tags (who, when, the
#: reason, the evidence and a take-over are in the run's lineage record; runs of older
#: Stemma versions carry them as tags too).
RUN_TAG_FIELDS = tag_names.PROMOTION_RUN_FIELDS
#: The gate's verdict tag on a version and the value that allows promotion.
GATE_DECISION_TAG = TAG_PREFIX + "decision"
GATE_PASSED = "passed"

OUTCOME_DONE = "done"
OUTCOME_LOST = "lost_race"
OUTCOME_REFUSED = "refused"
#: Another promoter's live claim on the generation did not finish within the wait.
OUTCOME_BLOCKED = "blocked"
#: The action of :func:`retire_challenger` (the champion does not move).
ACTION_RETIRE = "retire"


class Unset:
    """Marker: the caller gave no expectation; the champion read now is expected."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()


@dataclass(frozen=True)
class PromotionRecord:
    """One promotion or rollback decision, as recorded in MLflow.

    Attributes:
        model: the registered model name.
        action: ``promote`` or ``rollback``.
        from_version: the champion before (None: there was none).
        to_version: the version asked to become champion (None: rollback had no target).
        who: the operating-system user who asked.
        when: UTC time of the decision, ISO 8601.
        reason: why, in the user's words.
        evidence: anything that backs the decision (shadow metrics, canary results...).
        flow_run_id: the Prefect flow run that made it, if any.
        outcome: ``done``, ``lost_race`` (another writer moved the champion first),
            ``blocked`` (another promoter's live claim is in flight) or ``refused`` (the
            version may not be champion, or nothing to roll back to).
        detail: one line on why, for anything but ``done``.
        generation: the champion generation this decision created (``done``) or aimed at.
        record_run_id: the MLflow run that records the decision, if one was logged.
        took_over: the abandoned claim this decision took over and why it was abandoned
            (empty when there was none).
    """

    model: str
    action: str
    from_version: str | None
    to_version: str | None
    who: str
    when: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    outcome: str = OUTCOME_DONE
    detail: str = ""
    generation: int | None = None
    record_run_id: str | None = None
    took_over: str = ""

    def to_json(self) -> str:
        """The record as compact JSON (what the ``stemma.promotion.last`` tag holds)."""
        return json.dumps(asdict(self), sort_keys=True, default=str)


class PromotionError(RegistryError):
    """A promotion or rollback was refused or lost; ``record`` says what was recorded."""

    def __init__(
        self, headline: str, details: list[str] | tuple[str, ...] = (), record=None
    ) -> None:
        super().__init__(headline, details)
        self.record: PromotionRecord | None = record

    def __reduce__(self):  # the record travels with the error across processes
        return (self.__class__, (self.headline, self.details, self.record))


# ---------------------------------------------------------------------------------------
# Registry reads


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as error:
        raise gate.registry_error(f"cannot read registered model {model_name!r}", error) from error
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def _check_gate(client: MlflowClient, model_name: str, version: str) -> str | None:
    """Why ``version`` may not be champion, or None when its gate passed."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(model_name, version)
    except MlflowException as error:
        return f"{model_name} v{version} cannot be read: {getattr(error, 'message', error)}"
    decision = (found.tags or {}).get(GATE_DECISION_TAG)
    if decision is None:
        return (
            f"{model_name} v{version} has no gate decision (tag {GATE_DECISION_TAG}); "
            "only versions registered by the training flow's gate can be champion"
        )
    if decision != GATE_PASSED:
        # older stores tag the reasons; newer ones leave them to the training run
        reasons = (found.tags or {}).get(TAG_PREFIX + "reasons") or "; ".join(
            gate.recorded_decision(client, found.run_id).get("reasons") or []
        )
        return f"{model_name} v{version} failed its gate ({decision}): {reasons}".rstrip(": ")
    return None


# ---------------------------------------------------------------------------------------
# Recording


def build_promotion_lineage(record: PromotionRecord) -> LineageRecord:
    """The decision as a lineage document: the versions and a ``promoted_over`` edge."""
    nodes: list[Node] = []
    edges: list[Edge] = []
    attributes = {
        "action": record.action,
        "outcome": record.outcome,
        "who": record.who,
        "reason": record.reason,
        "flow_run_id": record.flow_run_id,
    }
    run = run_node_id(record.record_run_id) if record.record_run_id else None
    if run:
        nodes.append(Node("run", run, None, attributes))
    new = model_node_id(record.model, record.to_version) if record.to_version else None
    old = model_node_id(record.model, record.from_version) if record.from_version else None
    for node_id in (new, old):
        if node_id:
            nodes.append(Node("model_version", node_id, None, {}))
    retired = record.action == ACTION_RETIRE
    if record.outcome == OUTCOME_DONE and new and old and not retired:
        edges.append(Edge(new, old, "promoted_over"))
    if run and new:
        done = "retired" if retired else "promoted"
        edges.append(Edge(run, new, done if record.outcome == OUTCOME_DONE else "refused"))
    return LineageRecord(
        flow=record.action,
        pipeline=record.model,
        nodes=nodes,
        edges=edges,
        created=record.when,
        decision=asdict(record),
    )


def _record(
    client: MlflowClient, record: PromotionRecord, experiment_id: str | None
) -> PromotionRecord:
    """Tag the versions involved and, given an experiment, log a run; best effort per step."""
    from mlflow.exceptions import MlflowException

    if experiment_id is not None:
        target = f"v{record.to_version}" if record.to_version else "(none)"
        with tracked_run(
            f"{record.action} {record.model} {target}",
            experiment_id=experiment_id,
            tags={
                tag_names.FLOW: "promote",
                **{
                    tag_names.PROMOTION_PREFIX + key: str(value)
                    for key, value in asdict(record).items()
                    if value not in (None, "", {}) and key in RUN_TAG_FIELDS
                },
            },
            detached=True,
            client=client,
        ) as run:
            record = replace(record, record_run_id=run.run_id)
            lineage_record = build_promotion_lineage(record)
            run.log_dict(lineage_record.to_dict(), RECORD_ARTIFACT)
            # The index tags make the decision findable by `stemma lineage` searches.
            run.set_tags(index_tags(lineage_record, run.run_id))
            if record.outcome != OUTCOME_DONE:
                run.end_status = "FAILED"
            else:
                _log_history(run, client, experiment_id, record.model)
    for version in {record.from_version, record.to_version} - {None}:
        # A version that vanished cannot carry the tag; the run still records the decision.
        with contextlib.suppress(MlflowException):
            client.set_model_version_tag(
                record.model, version, LAST_PROMOTION_TAG, record.to_json()
            )
    return record


def _log_history(run: Any, client: MlflowClient, experiment_id: str, model: str) -> None:
    """The champion history with this move, on the move's run; a history that cannot be
    drawn leaves the move (already made) and its record as they are."""
    try:
        history.log_history(run, client, experiment_id, model)
    except Exception as error:  # the aliases moved: a missing picture must not undo that
        logging.getLogger(__name__).warning("champion history not logged: %s", error)


def _fail(
    client: MlflowClient,
    record: PromotionRecord,
    experiment_id: str | None,
    headline: str,
    details: list[str],
) -> PromotionError:
    record = _record(client, replace(record, detail=headline), experiment_id)
    return PromotionError(headline, details, record)


# ---------------------------------------------------------------------------------------
# Promote and roll back


def promote(
    client: MlflowClient,
    model_name: str,
    version: str,
    *,
    expected_champion: str | Unset | None = UNSET,
    reason: str,
    evidence: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
    experiment_id: str | None = None,
) -> PromotionRecord:
    """Make ``version`` the champion if the champion is still ``expected_champion``.

    The old champion keeps the ``previous-champion`` alias, and ``challenger`` is removed
    when it pointed at ``version``.

    Args:
        version: the version to promote; its gate tag must say ``passed``.
        expected_champion: the champion the caller decided against (None: none); by
            default the champion read now.
        reason, evidence, flow_run_id: recorded with the decision (evidence as JSON).
        experiment_id: where to log the decision's run; None logs tags only.

    Returns:
        The ``done`` record.

    Raises:
        PromotionError: refused (gate not passed, already champion), lost (the champion
            moved, or another promoter moved first; both named) or blocked (another
            promoter's live claim stayed in flight; its pid, host, version and heartbeat
            named); nothing is moved, ``error.record`` says what was recorded. A claim
            abandoned by a dead or silent promoter is taken over (``record.took_over``).
        RegistryError: the registry could not be read or written.
    """
    version = str(version)
    generation = _generation_or_raise(client, model_name)
    current = _aliases(client, model_name).get(CHAMPION_ALIAS)
    expected = current if isinstance(expected_champion, Unset) else expected_champion
    record = PromotionRecord(
        model=model_name,
        action="promote",
        from_version=current,
        to_version=version,
        who=getpass.getuser(),
        when=datetime.now(UTC).isoformat(),
        reason=reason,
        evidence=dict(evidence or {}),
        flow_run_id=flow_run_id,
        generation=generation + 1,
    )
    why_not = _check_gate(client, model_name, version)
    refusal: tuple[str, str | None] | None = None
    if why_not is not None:
        refusal = (f"{model_name} v{version} cannot be promoted: its gate did not pass", why_not)
    elif current == version:
        refusal = (f"{model_name} v{version} is already the {CHAMPION_ALIAS}", None)
    if refusal is not None:
        headline, detail = refusal
        refused = replace(record, outcome=OUTCOME_REFUSED)
        details = [*([detail] if detail else []), "nothing was moved"]
        raise _fail(client, refused, experiment_id, headline, details)
    expected = None if expected is None else str(expected)
    if current != expected:
        raise _fail(
            client,
            replace(record, outcome=OUTCOME_LOST),
            experiment_id,
            _moved_headline(client, model_name, generation, current, expected),
            ["nothing was moved; decide again against the current champion"],
        )
    return _move(client, record, experiment_id, new_champion=version, new_previous=current)


def _moved_headline(
    client: MlflowClient,
    model_name: str,
    generation: int,
    current: str | None,
    expected: str | None,
) -> str:
    """Who moved the champion away from ``expected``: the last move's claim, when it did.

    The mover advances the generation only after moving the aliases, so the claim that
    put ``current`` in place is looked for at the generation read earlier, at the one
    read now, and at the one after it (a move still finishing).
    """
    mover = None
    if current is not None:
        from mlflow.exceptions import MlflowException

        try:
            now = claims.read_generation(client, model_name)
        except (MlflowException, ValueError):  # best effort: the refusal stands without it
            now = generation
        for candidate in dict.fromkeys((generation, now, now + 1)):
            holder = claims.last_holder(client, model_name, candidate) if candidate else None
            if holder is not None and holder.to_version == current:
                mover = holder
                break
    if mover is not None:
        return (
            f"{model_name}: lost the race to v{current} ({mover.action} by {mover.user}, "
            f"{mover.who}); the {CHAMPION_ALIAS} is now v{current}, expected v{expected or ' (none)'}"
        )
    return (
        f"{model_name}: the {CHAMPION_ALIAS} is v{current or ' (none)'}, "
        f"expected v{expected or ' (none)'}; someone else moved it"
    )


def rollback(
    client: MlflowClient,
    model_name: str,
    *,
    reason: str,
    evidence: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
    experiment_id: str | None = None,
) -> PromotionRecord:
    """Give the ``champion`` alias back to ``previous-champion``, in one step.

    ``previous-champion`` then points at the demoted version, so a second rollback undoes
    the first. The compare-and-set is the same as :func:`promote`'s.

    Raises:
        PromotionError: no previous champion, it no longer passes its gate, another
            writer moved the champion first, or another promoter's claim is in flight.
        RegistryError: the registry could not be read or written.
    """
    generation = _generation_or_raise(client, model_name)
    aliases = _aliases(client, model_name)
    current = aliases.get(CHAMPION_ALIAS)
    previous = aliases.get(PREVIOUS_CHAMPION_ALIAS)
    record = PromotionRecord(
        model=model_name,
        action="rollback",
        from_version=current,
        to_version=previous,
        who=getpass.getuser(),
        when=datetime.now(UTC).isoformat(),
        reason=reason,
        evidence=dict(evidence or {}),
        flow_run_id=flow_run_id,
        generation=generation + 1,
    )
    if previous is None:
        raise _fail(
            client,
            replace(record, outcome=OUTCOME_REFUSED),
            experiment_id,
            f"{model_name}: nothing to roll back to (no {PREVIOUS_CHAMPION_ALIAS} alias)",
            [
                f"the {CHAMPION_ALIAS} is v{current}" if current else "there is no champion",
                "promote a version explicitly: stemma promote models:/<name>/<version>",
            ],
        )
    why_not = _check_gate(client, model_name, previous)
    if why_not is not None:
        raise _fail(
            client,
            replace(record, outcome=OUTCOME_REFUSED),
            experiment_id,
            f"{model_name}: cannot roll back to v{previous}",
            [why_not, "nothing was moved"],
        )
    return _move(client, record, experiment_id, new_champion=previous, new_previous=current)


def retire_challenger(
    client: MlflowClient,
    model_name: str,
    version: str,
    *,
    reason: str,
    evidence: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
    experiment_id: str | None = None,
) -> PromotionRecord | None:
    """Take the ``challenger`` alias from ``version``, which was judged not fit to serve.

    The champion does not move. The alias is removed only while it still points at
    ``version`` (a newer challenger registered meanwhile keeps it), and the decision is
    recorded like a promotion (action ``retire``).

    Returns:
        The ``done`` record, or None when the alias no longer pointed at ``version``
        (nothing to do, nothing recorded).

    Raises:
        PromotionError: a live promotion of the model stayed in flight for the whole wait
            (outcome ``blocked``); nothing was moved.
        RegistryError: the registry could not be read or written.
    """
    from mlflow.exceptions import MlflowException

    version = str(version)
    # A promotion in flight may be promoting this very challenger: let it finish first,
    # so the alias is judged as it ends up, not as it was halfway.
    busy = claims.wait_for_live_claim(client, model_name)
    aliases = _aliases(client, model_name)
    if aliases.get(CHALLENGER_ALIAS) != version:
        return None
    record = PromotionRecord(
        model=model_name,
        action=ACTION_RETIRE,
        from_version=aliases.get(CHAMPION_ALIAS),
        to_version=version,
        who=getpass.getuser(),
        when=datetime.now(UTC).isoformat(),
        reason=reason,
        evidence=dict(evidence or {}),
        flow_run_id=flow_run_id,
        generation=_generation_or_raise(client, model_name),
    )
    if busy is not None:
        raise _blocked(client, record, experiment_id, (record.generation or 0) + 1, busy)
    try:
        # The registry cannot delete conditionally: a challenger registered between the
        # read above and this delete would lose its alias. The window is one request wide.
        client.delete_registered_model_alias(model_name, CHALLENGER_ALIAS)
    except MlflowException as error:
        raise gate.registry_error(f"cannot retire {model_name} v{version}", error) from error
    return _record(client, record, experiment_id)


def moved_outside(client: MlflowClient, model_name: str) -> RegistryError | None:
    """The champion alias moved outside Stemma (the MLflow UI's pencil, another tool): not
    where Stemma last put it, and no promotion is moving it now (the next generation is not
    claimed); None otherwise, and for a model Stemma never made a champion of."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
        recorded = (model.tags or {}).get(CHAMPION_TAG)
        actual = (model.aliases or {}).get(CHAMPION_ALIAS)
        if recorded is None or str(actual) == recorded:
            return None
        moving = claims.claim_name(model_name, claims.read_generation(client, model_name) + 1)
        if client.get_experiment_by_name(moving) is not None:
            return None
    except (MlflowException, ValueError):  # unreadable: the flows' own reads will say so
        return None
    where = f"v{actual}" if actual is not None else "no version (the alias was deleted)"
    return RegistryError(
        f"{model_name}: the {CHAMPION_ALIAS} alias points to {where}, but Stemma last made "
        f"v{recorded} the {CHAMPION_ALIAS}; it was moved outside `stemma promote` (the MLflow "
        "UI or another tool), with no gate check, evidence or record",
        [
            f"undo it: stemma promote models:/{model_name}/{recorded}",
            "keep it, checked and recorded: undo it, then stemma promote "
            f"models:/{model_name}/{actual if actual is not None else '<version>'}",
        ],
    )


def _generation_or_raise(client: MlflowClient, model_name: str) -> int:
    from mlflow.exceptions import MlflowException

    try:
        return claims.read_generation(client, model_name)
    except MlflowException as error:
        raise gate.registry_error(f"cannot read registered model {model_name!r}", error) from error
    except ValueError as error:
        raise RegistryError(
            f"{model_name}: tag {GENERATION_TAG} is not a number",
            [str(error), "set it to the number of promotions made so far, or delete it"],
        ) from error


def _move(
    client: MlflowClient,
    record: PromotionRecord,
    experiment_id: str | None,
    *,
    new_champion: str,
    new_previous: str | None,
) -> PromotionRecord:
    """Claim the next generation, move the aliases, read back, advance the generation."""
    from mlflow.exceptions import MlflowException

    assert record.generation is not None
    claimed = claims.claim_generation(
        client,
        record.model,
        record.generation,
        action=record.action,
        to_version=new_champion,
        from_version=new_previous,
    )
    if isinstance(claimed, claims.Refusal):
        raise _refused_by_claim(client, record, experiment_id, claimed)
    claim = claimed
    if claim.took_over is not None:
        abandoned, why = claim.took_over
        record = replace(
            record,
            took_over=f"the claim of {abandoned.who} ({abandoned.doing}, since "
            f"{_clock(abandoned.claimed_at)}): {why}",
        )
    try:
        failure: Exception | None = None
        try:
            _move_aliases(client, claim, record, experiment_id, new_champion, new_previous)
        except claims.ClaimLost as lost:
            # Someone else holds the generation now: spend nothing, write nothing more.
            raise _claim_lost(client, record, experiment_id, lost) from None
        except PromotionError as error:
            failure = error
        except MlflowException as error:
            failure = gate.registry_error(
                f"{record.action} of {record.model} v{new_champion} failed mid-way", error
            )
        # The claim is spent whatever happened: advancing the generation lets the next
        # promoter claim the one after instead of taking this one over. It is written
        # after the aliases, so a reader that sees it also sees the new champion.
        try:
            claim.ensure_held()
            client.set_registered_model_tag(record.model, GENERATION_TAG, str(claim.generation))
        except claims.ClaimLost as lost:
            raise _claim_lost(client, record, experiment_id, lost) from None
        except MlflowException as error:
            raise gate.registry_error(
                f"{record.model}: generation {claim.generation} not recorded", error
            ) from failure
        if failure is not None:
            raise failure
    finally:
        claim.release()
    return _record(client, record, experiment_id)


def _move_aliases(
    client: MlflowClient,
    claim: claims.Claim,
    record: PromotionRecord,
    experiment_id: str | None,
    new_champion: str,
    new_previous: str | None,
) -> None:
    """The writes of a held claim, each after checking the claim is still held."""
    name = record.model
    claim.ensure_held()
    aliases = _aliases(client, name)
    champion = aliases.get(CHAMPION_ALIAS)
    # Read again under the claim: an abandoned claim's holder may have moved the alias
    # before it stopped, and a writer outside the protocol may have moved it too.
    if champion != record.from_version or (
        record.action == "rollback" and aliases.get(PREVIOUS_CHAMPION_ALIAS) != new_champion
    ):
        by = "someone else moved it"
        if claim.took_over is not None and claim.took_over[0].to_version == champion:
            by = f"{claim.took_over[0].who} moved it before its claim was abandoned"
        raise _fail(
            client,
            replace(record, outcome=OUTCOME_LOST),
            experiment_id,
            f"{name}: the {CHAMPION_ALIAS} is v{champion or ' (none)'}, expected "
            f"v{record.from_version or ' (none)'}; {by}",
            ["nothing was moved; decide again against the current champion"],
        )
    before = aliases.get(PREVIOUS_CHAMPION_ALIAS)
    if new_previous is not None:
        claim.ensure_held()
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS, new_previous)
    claim.ensure_held()
    client.set_registered_model_alias(name, CHAMPION_ALIAS, new_champion)
    aliases = _aliases(client, name)
    if aliases.get(CHAMPION_ALIAS) != new_champion:
        # A writer outside the protocol moved the alias: keep its champion and undo
        # only the previous-champion alias, and only if it is still the one we set.
        if new_previous is not None and aliases.get(PREVIOUS_CHAMPION_ALIAS) == new_previous:
            if before is None:
                client.delete_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS)
            else:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION_ALIAS, before)
        raise _fail(
            client,
            replace(record, outcome=OUTCOME_LOST),
            experiment_id,
            f"{name}: lost the race to v{aliases.get(CHAMPION_ALIAS)} (the "
            f"{CHAMPION_ALIAS} alias was set outside stemma promote)",
            ["the other writer's champion was kept"],
        )
    client.set_registered_model_tag(name, CHAMPION_TAG, new_champion)
    if aliases.get(CHALLENGER_ALIAS) == new_champion:
        client.delete_registered_model_alias(name, CHALLENGER_ALIAS)
    record_moves(client, name, _move_events(record, new_champion, new_previous, before))


def _move_events(
    record: PromotionRecord, champion: str, previous: str | None, before: str | None
) -> dict[str, str]:
    """What a move did to each version it touched, for the registry's text."""
    verb = "promoted to champion" if record.action == "promote" else "rolled back to champion"
    events = {champion: f"{verb} by {record.who}: {record.reason}"}
    old = record.from_version
    if old is not None and old != champion:
        role = PREVIOUS_CHAMPION_ALIAS if previous == old else "no alias"
        events[old] = f"{CHAMPION_ALIAS} → {role} ({record.action} of v{champion})"
    if before is not None and before not in events and previous not in (None, before):
        events[before] = f"{PREVIOUS_CHAMPION_ALIAS} alias moved to v{previous}"
    return events


def _clock(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds).strftime("%H:%M:%S")


def _champion_now(client: MlflowClient, model_name: str) -> str:
    try:
        champion = _aliases(client, model_name).get(CHAMPION_ALIAS)
    except RegistryError:
        return "(unreadable)"
    return f"v{champion}" if champion else "(none)"


def _blocked(
    client: MlflowClient,
    record: PromotionRecord,
    experiment_id: str | None,
    generation: int,
    holder: claims.Holder,
) -> PromotionError:
    """The error for a move blocked by another promoter's live claim on ``generation``:
    ``a promotion of credit is in progress: claim on generation 7 held by ...``."""
    return _fail(
        client,
        replace(record, outcome=OUTCOME_BLOCKED),
        experiment_id,
        f"a promotion of {record.model} is in progress: claim on generation {generation} "
        f"held by {holder.describe(time.time())}",
        [
            "nothing was moved",
            f"the claim is taken over once {holder.who} no longer runs or its heartbeat is "
            f"older than {claims.heartbeat_limit():g} s; decide again then",
        ],
    )


def _refused_by_claim(
    client: MlflowClient,
    record: PromotionRecord,
    experiment_id: str | None,
    refusal: claims.Refusal,
) -> PromotionError:
    """The error for a claim that was not granted: lost to a finished move, or blocked."""
    holder, name = refusal.holder, record.model
    if not refusal.spent:
        return _blocked(client, record, experiment_id, refusal.generation, holder)
    champion = _champion_now(client, name)
    if champion == f"v{holder.to_version}":
        headline = (
            f"{name}: lost the race to v{holder.to_version} ({holder.action} by "
            f"{holder.user}, {holder.who}); the {CHAMPION_ALIAS} is now {champion}"
        )
    else:
        headline = (
            f"{name}: lost the race for generation {refusal.generation} to {holder.who} "
            f"({holder.doing}), which did not make v{holder.to_version} "
            f"{CHAMPION_ALIAS}; the {CHAMPION_ALIAS} is {champion}"
        )
    return _fail(
        client,
        replace(record, outcome=OUTCOME_LOST),
        experiment_id,
        headline,
        ["nothing was moved; decide again against the new champion"],
    )


def _claim_lost(
    client: MlflowClient,
    record: PromotionRecord,
    experiment_id: str | None,
    lost: claims.ClaimLost,
) -> PromotionError:
    """The error for a holder whose claim was taken over while it was silent."""
    taker = lost.taker
    return _fail(
        client,
        replace(record, outcome=OUTCOME_LOST),
        experiment_id,
        f"{record.model}: the claim on generation {lost.generation} was taken over by "
        f"{taker.who} ({taker.doing}) after this process was silent for "
        f"{lost.silent_for:.0f} s; the {CHAMPION_ALIAS} is {_champion_now(client, record.model)}",
        ["this process wrote nothing more; decide again against the current champion"],
    )
