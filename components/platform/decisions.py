"""The lineage record of a run that decided on a challenger (shadow, canary): the
evaluation, the decision taken against the incumbent, the labels it rested on and the run
that carried it out, added to the flow's own nodes and edges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stemma.components.platform.lineage import (
    Edge,
    LineageRecord,
    Node,
    labels_node_id,
    run_node_id,
)


@dataclass(frozen=True)
class Decided:
    """How an evaluation of a challenger against the incumbent (the champion of a shadow,
    the control of a canary) ended, and what carried the decision out."""

    evaluation: str  # the evaluation node's id
    decision: str  # the decision node's id
    challenger: str  # model node ids
    incumbent: str
    verdict: str  # promote, keep, rollback...: the decision's edge to the challenger
    reasons: list[str]
    who: str
    when: str
    labels_path: str | None = None
    labels_digest: str | None = None
    action: str | None = None  # promote or rollback, when a run carried it out
    action_outcome: str | None = None
    action_run_id: str | None = None


def _decision_links(decided: Decided) -> tuple[list[Node], list[Edge]]:
    """The nodes and edges every decision record adds to the flow's own."""
    nodes: list[Node] = []
    edges = [
        Edge(decided.evaluation, decided.decision, "decided"),
        Edge(decided.decision, decided.challenger, decided.verdict),
        Edge(decided.decision, decided.incumbent, "against"),
    ]
    if decided.labels_path and decided.labels_digest:
        labels = labels_node_id(decided.labels_path, decided.labels_digest)
        nodes.append(
            Node("labels", labels, f"md5:{decided.labels_digest}", {"path": decided.labels_path})
        )
        edges.append(Edge(labels, decided.evaluation, "labelled"))
    if decided.action_run_id:
        action_run = run_node_id(decided.action_run_id)
        attributes = {"action": decided.action, "outcome": decided.action_outcome}
        nodes.append(Node("run", action_run, None, attributes))
        edges.append(Edge(decided.decision, action_run, "carried_out_by"))
        if decided.action_outcome == "done" and decided.action == "promote":
            edges.append(Edge(decided.challenger, decided.incumbent, "promoted_over"))
        if decided.action_outcome == "done" and decided.action == "rollback":
            edges.append(Edge(decided.incumbent, decided.challenger, "rolled_back_over"))
    return nodes, edges


def build_decision_record(
    *,
    flow: str,
    pipeline: str,
    nodes: list[Node],
    edges: list[Edge],
    decided: Decided,
    summary: dict[str, Any] | None = None,
) -> LineageRecord:
    """The lineage record of an evaluation that decided on a challenger.

    ``nodes`` and ``edges`` are the flow's own (input, models, run, predictions, the
    evaluation and decision nodes); this adds what every such record links: the decision
    taken on the challenger against the incumbent, the labels, and the run that carried
    the decision out (a promotion puts the challenger over the incumbent, a rollback the
    reverse). The record's ``decision`` entry holds the verdict, ``summary`` (what the
    flow adds), the reasons, who and when.
    """
    more_nodes, more_edges = _decision_links(decided)
    return LineageRecord(
        flow=flow,
        pipeline=pipeline,
        created=decided.when,
        decision={
            "decision": decided.verdict,
            **(summary or {}),
            "reasons": list(decided.reasons),
            "who": decided.who,
            "when": decided.when,
        },
        nodes=[*nodes, *more_nodes],
        edges=[*edges, *more_edges],
    )
