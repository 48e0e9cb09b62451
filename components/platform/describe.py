"""A run's description: the markdown MLflow shows at the top of the run page.

Rendered from the run's lineage record (:mod:`.lineage`), so every flow's run answers on
its first screen what ran, on which data and models, what it made, what was decided and
why, with links to the model versions, the parent run and the Prefect flow run. MLflow
keeps it in the ``mlflow.note.content`` tag; the full record stays an artifact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from stemma.components.platform.lineage import as_document, record_roles, run_node_id

#: MLflow's tag holding the markdown description of a run, an experiment or a model.
NOTE_TAG = "mlflow.note.content"
#: Hex digests longer than this are shortened to their first :data:`SHORT_DIGEST` digits.
SHORT_DIGEST = 8
_LONG_HEX = re.compile(r"\b[0-9a-f]{16,64}\b")
#: Node attributes shown after a node, when present.
_SHOWN_ATTRIBUTES = ("path", "role", "rows", "success", "method")
#: Kinds named first in a description's opening line.
_GIST_ORDER = {"model_version": 0, "data_version": 1, "input": 2, "labels": 3, "predictions": 4}
#: Reasons and inputs listed before the rest is summarised.
MAX_LINES = 12


def short(text: str) -> str:
    """``text`` with every long hex digest cut to :data:`SHORT_DIGEST` digits."""
    return _LONG_HEX.sub(lambda found: found.group(0)[:SHORT_DIGEST], text)


def _model_link(node_id: str, base: str) -> str | None:
    """``[credit v7](#/models/credit/versions/7)`` for a ``models:/credit/7`` node."""
    found = re.fullmatch(r"models:/([^/@]+)/(\d+)", node_id)
    if not found:
        return None
    name, version = found.groups()
    return f"[{name} v{version}]({base}#/models/{name}/versions/{version})"


def _node_line(node: Mapping[str, Any], base: str) -> str:
    attributes = node.get("attributes") or {}
    label = _model_link(str(node.get("id", "")), base) or f"`{short(str(node.get('id', '')))}`"
    details = [f"{key} {attributes[key]}" for key in _SHOWN_ATTRIBUTES if key in attributes]
    digest = node.get("digest")
    if digest:
        details.insert(0, short(str(digest)))
    extra = f" ({', '.join(details)})" if details else ""
    return f"- {str(node.get('kind', 'node')).replace('_', ' ')} {label}{extra}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_value(item) for item in value)
    return short(str(value))


def _decision_lines(decision: Mapping[str, Any]) -> list[str]:
    lines = ["**Why**"]
    numbers = [
        f"{key.replace('_', ' ')} {_value(value)}"
        for key, value in decision.items()
        if key not in ("decision", "verdict", "reasons", "who", "when")
        and isinstance(value, int | float | str)
        and value is not None
    ]
    if numbers:
        lines.append(" · ".join(numbers[:MAX_LINES]))
    reasons = [str(reason) for reason in decision.get("reasons") or ()]
    lines += [f"- {reason}" for reason in reasons[:MAX_LINES]]
    if len(reasons) > MAX_LINES:
        lines.append(f"- and {len(reasons) - MAX_LINES} more in `lineage/record.json`")
    if decision.get("who") or decision.get("when"):
        lines.append(f"_by {decision.get('who') or 'Stemma'}, {decision.get('when') or ''}_")
    return lines


def _label(node: Mapping[str, Any], base: str) -> str:
    node_id = str(node.get("id", ""))
    kind = str(node.get("kind", "node")).replace("_", " ")
    return _model_link(node_id, base) or f"{kind} `{short(node_id.split(':', 1)[-1])}`"


def _gist(read: list[Mapping[str, Any]], made: list[Mapping[str, Any]], base: str) -> str:
    """One line: the first things read and made, model versions and data first."""

    def first(nodes: list[Mapping[str, Any]]) -> str:
        ranked = sorted(nodes, key=lambda node: _GIST_ORDER.get(str(node.get("kind")), 9))
        shown = ", ".join(_label(node, base) for node in ranked[:3])
        return shown + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")

    parts = [f"read {first(read)}" if read else "", f"made {first(made)}" if made else ""]
    return " → ".join(part for part in parts if part)


def _section(title: str, nodes: list[Mapping[str, Any]], base: str) -> list[str]:
    if not nodes:
        return []
    lines = [f"**{title}**", *(_node_line(node, base) for node in nodes[:MAX_LINES])]
    if len(nodes) > MAX_LINES:
        lines.append(f"- and {len(nodes) - MAX_LINES} more in `lineage/record.json`")
    return ["", *lines]


def describe_record(
    document: Mapping[str, Any],
    run_id: str,
    *,
    links: Mapping[str, str] | None = None,
    parent_run: tuple[str, str] | None = None,
    base: str = "",
) -> str:
    """The markdown description of a run, from its lineage record.

    Args:
        document: the run's lineage record (a ``stemma.lineage/1`` document).
        run_id: the run's id (its node is ``run:<run_id>``).
        links: more links to show, by label (the Prefect flow run's page).
        parent_run: ``(experiment id, run id)`` of the run this one is nested in.
        base: what MLflow links start with: empty on MLflow's own pages, the server's URL
            (ending in ``/``) elsewhere.

    Returns:
        Markdown: what ran, the decision, what it read and made, and the links.
    """
    document = as_document(document)
    by_id = {str(node.get("id")): node for node in document.get("nodes") or ()}
    made_ids, used_ids = record_roles(document, run_id)
    run = run_node_id(run_id)
    made = [node for key, node in by_id.items() if key in made_ids and node.get("kind") != "run"]
    read = [node for key, node in by_id.items() if key in used_ids]
    decision = document.get("decision")
    headline = f"**{document.get('flow', 'run')}** · pipeline `{document.get('pipeline', '')}`"
    if isinstance(decision, Mapping) and decision.get("decision") is not None:
        headline += f" · decision **{_value(decision['decision'])}**"
    lines = [headline, _gist(read, made, base)]
    if isinstance(decision, Mapping):
        lines += ["", *_decision_lines(decision)]
    lines += _section("Read", read, base) + _section("Made", made, base)
    shown = dict(links or {})
    flow_run = (by_id.get(run, {}).get("attributes") or {}).get("flow_run_id")
    if flow_run and "Prefect flow run" not in shown:
        shown["Prefect flow run"] = f"`{flow_run}`"
    if parent_run:
        experiment, parent = parent_run
        shown["parent run"] = f"[{parent[:8]}]({base}#/experiments/{experiment}/runs/{parent})"
    if shown:
        lines += ["", " · ".join(f"{label}: {target}" for label, target in shown.items())]
    return "\n".join(lines) + "\n"
