"""The lineage picture: a walked graph as a self-contained SVG, drawn without any network.

The picture is the tree :func:`.graph.render_summary` prints, drawn as boxes: each node
once, with its kind, short name and key facts (decisions, aliases, metrics); a long chain
folds into a grey box saying how many nodes lie beyond it (``stemma lineage --full`` lists
them). Data flows left to right: upstream of a model version, the version stands at the
right and what it came from (runs, checks, data versions) to its left; downstream, the
start stands at the left. The node the walk started from has a thick border.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from stemma.components.lineage.graph import (
    UPSTREAM,
    LineageGraph,
    node_facts,
    node_name,
    summary_tree,
)

#: Box size and the gaps between columns and rows, in pixels.
BOX_WIDTH, BOX_HEIGHT, COLUMN_GAP, ROW_GAP, MARGIN = 230, 64, 60, 14, 20
#: Characters per text line in a box.
LINE_CHARS = 34
#: Fill colour by node kind (others are white; a fold is grey).
COLOURS = {
    "data_version": "#e3f2fd",
    "data_file": "#e3f2fd",
    "input": "#e3f2fd",
    "labels": "#e3f2fd",
    "validation": "#e8f5e9",
    "run": "#f3e5f5",
    "model_version": "#fff3e0",
    "decision": "#fce4ec",
    "predictions": "#f1f8e9",
}


def _clip(text: str) -> str:
    return text if len(text) <= LINE_CHARS else text[: LINE_CHARS - 1] + "…"


def _box(x: int, y: int, kind: str, lines: list[str], *, root: bool, fold: bool) -> str:
    fill = "#eeeeee" if fold else COLOURS.get(kind, "#ffffff")
    parts = [
        f'<rect x="{x}" y="{y}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}" rx="6" '
        f'fill="{fill}" stroke="#555" stroke-width="{3 if root else 1}"/>',
        f'<text x="{x + 8}" y="{y + 14}" font-size="10" fill="#666">'
        f"{escape(kind.replace('_', ' '))}</text>",
    ]
    for row, line in enumerate(line for line in lines[:3] if line):
        weight = ' font-weight="bold"' if row == 0 else ""
        parts.append(
            f'<text x="{x + 8}" y="{y + 30 + 14 * row}" font-size="11"{weight}>'
            f"{escape(_clip(line))}</text>"
        )
    return "".join(parts)


def _lines(graph: LineageGraph, node_id: str, beyond: int | None) -> list[str]:
    node = graph.nodes[node_id]
    name = node_name(node).removeprefix(node.kind.replace("_", " ") + " ")
    if beyond is not None:
        return [name, f"… and {beyond} more nodes beyond", "stemma lineage --full"]
    facts = node_facts(node)
    return [name, " · ".join(facts[1:3]), facts[0] if facts else ""]


def render_svg(graph: LineageGraph) -> str:
    """The graph as an SVG document (see the module's description)."""
    tree = summary_tree(graph)
    deepest = max(depth for depth, *_ in tree)
    upstream = graph.direction == UPSTREAM
    parents = {
        row: next((up for up in range(row - 1, -1, -1) if tree[up][0] == depth - 1), -1)
        for row, (depth, *_) in enumerate(tree)
    }
    # a leaf takes the next free line; a node stands on the line of its first child
    line_of: dict[int, int] = {}
    leaves = 0
    for row in range(len(tree)):
        if row + 1 == len(tree) or tree[row + 1][0] <= tree[row][0]:
            line_of[row], leaves = leaves, leaves + 1
    for row in reversed(range(len(tree))):
        line_of.setdefault(row, line_of.get(row + 1, 0))
    where = {
        row: (
            MARGIN + (deepest - depth if upstream else depth) * (BOX_WIDTH + COLUMN_GAP),
            MARGIN + line_of[row] * (BOX_HEIGHT + ROW_GAP),
        )
        for row, (depth, *_) in enumerate(tree)
    }
    width = MARGIN * 2 + (deepest + 1) * (BOX_WIDTH + COLUMN_GAP) - COLUMN_GAP
    height = MARGIN * 2 + leaves * (BOX_HEIGHT + ROW_GAP) - ROW_GAP
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
        f"<title>{escape(f'lineage {graph.direction} of {graph.reference}')}</title>",
    ]
    for row, (_, _, relation, _) in enumerate(tree):
        if parents[row] < 0:
            continue
        # data flows left to right: from the child to its parent upstream, the other way down
        left, right = (row, parents[row]) if upstream else (parents[row], row)
        (x1, y1), (x2, y2) = where[left], where[right]
        x1, y1, y2 = x1 + BOX_WIDTH, y1 + BOX_HEIGHT // 2, y2 + BOX_HEIGHT // 2
        bend = COLUMN_GAP // 2
        parts.append(
            f'<path d="M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}" fill="none" '
            'stroke="#999" marker-end="url(#arrow)"/>'
            f'<text x="{x1 + 6}" y="{y1 - 4}" font-size="9" fill="#777">'
            f"{escape(relation or '')}</text>"
        )
    for row, (_, node_id, _, beyond) in enumerate(tree):
        x, y = where[row]
        kind = graph.nodes[node_id].kind
        lines = _lines(graph, node_id, beyond)
        parts.append(_box(x, y, kind, lines, root=node_id == graph.root, fold=beyond is not None))
    parts.append("</svg>")
    return "\n".join(parts)
