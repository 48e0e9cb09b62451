"""Registry text that stays true: each version says its current role, and its history.

After every alias move Stemma makes (registration behind the gate, promotion, rollback),
:func:`record_moves` rewrites the descriptions MLflow shows: each version involved opens
with one line (its aliases, the gate's verdict and number, the data it was trained on)
followed by its history, one dated line per move; the registered model's description
names the current champion, its data and when and why it became champion.

A version's measured latency and cost (see :mod:`.latency`) are a block of its description
(:func:`state_figures`), kept through every rewrite like the gate's account; the model's
description quotes the champion's cost per million predictions from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from stemma.components.platform import tags as tag_names

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Separates a version description's opening line from its history.
HISTORY_HEADING = "History:"
_SPLIT = f"\n\n{HISTORY_HEADING}\n"
#: History lines kept per version (the oldest first go).
MAX_HISTORY = 20
#: Opens the block of a version's description that states its latency and cost.
FIGURES_HEADING = "Latency and cost"
#: Starts the line of that block stating the cost; the model's description quotes it.
COST_LINE = "- Cost: "


def stamp(when: datetime | None = None) -> str:
    """``2026-12-06 07:40 UTC``."""
    return (when or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")


def _roles(client: MlflowClient, name: str) -> dict[str, list[str]]:
    aliases = client.get_registered_model(name).aliases or {}
    roles: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        roles.setdefault(str(version), []).append(alias)
    return roles


def opening_line(aliases: list[str], version_tags: Mapping[str, str]) -> str:
    """``champion · gate passed on roc_auc 0.8379 · data bcbf6809``."""
    role = ", ".join(aliases) if aliases else "no alias"
    parts = [role]  # plain: the versions table shows descriptions as raw text
    verdict = version_tags.get(tag_names.GATE_PREFIX + "decision")
    if verdict:
        metric = version_tags.get(tag_names.GATE_PREFIX + "metric")
        value = version_tags.get(tag_names.GATE_PREFIX + "value")
        shown = f" {float(value):.4g}" if value else ""
        parts.append(f"gate {verdict}" + (f" on {metric}{shown}" if metric else ""))
    md5 = version_tags.get(tag_names.DATA_MD5)
    if md5:
        parts.append(f"data `{md5[:8]}`")
    return " · ".join(parts)


def compose(opening: str, history: list[str], body: str) -> str:
    """A version's description from its parts."""
    text = opening + _SPLIT + "\n".join(history[-MAX_HISTORY:])
    return text + (f"\n\n{body}" if body else "")


def parse(description: str) -> tuple[list[str], str]:
    """A version's history lines and the rest of its description (the gate's account)."""
    if _SPLIT not in description:
        return [], description.strip()
    _, rest = description.split(_SPLIT, 1)
    history, _, body = rest.partition("\n\n")
    return [line for line in history.splitlines() if line.strip()], body.strip()


def with_figures(body: str, figures: str) -> str:
    """``body`` (the part of a description after the history) with its figures block
    replaced by ``figures``, which opens with :data:`FIGURES_HEADING` and holds no blank line."""
    blocks = [block for block in body.split("\n\n") if block.strip()]
    kept = [block for block in blocks if not block.startswith(FIGURES_HEADING)]
    return "\n\n".join([*kept, figures.strip()])


def state_figures(client: MlflowClient, name: str, number: str, figures: str) -> None:
    """Put a version's latency and cost block in its description (replacing an older one),
    then rewrite the model's description, which quotes the champion's cost."""
    description = client.get_model_version(name, number).description or ""
    history, body = parse(description)
    if _SPLIT in description:
        opening = description.split(_SPLIT, 1)[0]
        text = compose(opening, history, with_figures(body, figures))
    else:  # registered outside Stemma's text: the figures go after what it says
        text = with_figures(body, figures)
    client.update_model_version(name, number, description=text)
    client.update_registered_model(
        name, description=model_description(client, name, _roles(client, name))
    )


def stated_cost(description: str) -> str | None:
    """The cost a version's description states (``0.0021 USD per million predictions on
    cpu-small``), or None."""
    for line in description.splitlines():
        if line.startswith(COST_LINE):
            return line.removeprefix(COST_LINE).strip()
    return None


def record_moves(
    client: MlflowClient, name: str, events: Mapping[str, str], *, when: datetime | None = None
) -> None:
    """Write each version's role and the event that moved it, then the model's description.

    Args:
        client: the registry's client.
        name: the registered model.
        events: what happened to each version involved, by version number
            (``promoted to champion by ana: shadow says promote``).
        when: when it happened (default: now).
    """
    roles = _roles(client, name)
    at = stamp(when)
    for number, event in events.items():
        version = client.get_model_version(name, number)
        history, body = parse(version.description or "")
        history.append(f"- {at}: {event}")
        opening = opening_line(roles.get(str(number), []), version.tags or {})
        client.update_model_version(name, number, description=compose(opening, history, body))
    client.update_registered_model(name, description=model_description(client, name, roles))


def model_description(client: MlflowClient, name: str, roles: dict[str, list[str]]) -> str:
    """The registered model's description: the champion, its data, since when and why."""
    champion = next((number for number, aliases in roles.items() if "champion" in aliases), None)
    others = [
        f"{', '.join(aliases)}: v{number}"
        for number, aliases in sorted(roles.items(), key=lambda item: int(item[0]))
        if number != champion
    ]
    if champion is None:
        lines = [f"**{name}** has no champion yet."]
    else:
        version = client.get_model_version(name, champion)
        history, _ = parse(version.description or "")
        became = next((line for line in reversed(history) if "champion" in line), None)
        tags = version.tags or {}
        data = tags.get(tag_names.DATA_MD5)
        cost = stated_cost(version.description or "")
        lines = [
            f"**Champion: v{champion}**"
            + (f", trained on data version `{data[:8]}`" if data else ""),
            became.removeprefix("- ") if became else "",
            f"Champion's cost: {cost}" if cost else "",
        ]
    if others:
        lines.append("Other aliases: " + "; ".join(others))
    return "\n\n".join(line for line in lines if line)
