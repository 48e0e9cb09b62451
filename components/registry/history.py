"""Champion history: who was champion when, and why, as a table and a plot.

Every champion move Stemma makes is an MLflow run of the pipeline's experiment
(``promote <model> v<to>``, see :mod:`.promotion`). On each move the run logs the history
so far, read back from those runs: ``champion_history/history.md`` (one row per move: when,
the new and the old champion, what moved it, who and why) and ``history.png`` (the
champion's version over time). The newest promotion run holds the whole story.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.platform import tags as tag_names
from stemma.components.training.metrics import save_figure

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Where a promotion run keeps the history.
HISTORY_DIR = "champion_history"
#: Moves read back (newest first), and shown.
MAX_MOVES = 200


def _fields(client: MlflowClient, run: Any, names: tuple[str, ...]) -> dict[str, str]:
    """``names`` of a promotion run's decision: its tags, else (who, when and reason, which
    runs of this version keep only there) its lineage record's ``decision``."""
    from stemma.components.platform.lineage import read_run_record

    tags = run.data.tags
    found = {name: tags.get(tag_names.PROMOTION_PREFIX + name) for name in names}
    if any(value is None for value in found.values()):
        record = read_run_record(client, run.info.run_id)
        decision = (record.decision if record is not None else None) or {}
        found = {
            name: value if value is not None else decision.get(name)
            for name, value in found.items()
        }
    return {name: "" if value is None else str(value) for name, value in found.items()}


def champion_moves(client: MlflowClient, experiment_id: str, model: str) -> list[dict[str, str]]:
    """The champion moves of ``model`` recorded in ``experiment_id``, oldest first."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{tag_names.FLOW}` = 'promote' and tags.`{tag_names.PROMOTION_PREFIX}model` = "
        f"'{model}' and tags.`{tag_names.PROMOTION_OUTCOME}` = 'done'",
        order_by=["attributes.start_time DESC"],
        max_results=MAX_MOVES,
    )
    fields = ("when", "to_version", "from_version", "action", "who", "reason")
    moves = [_fields(client, run, fields) for run in runs]
    return sorted(moves, key=lambda move: move["when"])


def history_table(model: str, moves: list[dict[str, str]]) -> str:
    """The moves as a markdown table, newest first."""
    rows = [
        f"| {move['when'][:16].replace('T', ' ')} | v{move['to_version']} | "
        f"{'v' + move['from_version'] if move['from_version'] else '-'} | {move['action']} | "
        f"{move['who']} | {move['reason'].replace('|', '/')} |"
        for move in reversed(moves)
    ]
    head = "| since (UTC) | champion | before | move | by | why |\n|---|---|---|---|---|---|"
    return f"# Champion history of {model}\n\n{head}\n" + "\n".join(rows) + "\n"


def history_plot(model: str, moves: list[dict[str, str]], path: Path) -> Path:
    """The champion's version over time, one step per move, each step labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import date2num
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    times = [float(date2num(datetime.fromisoformat(move["when"]))) for move in moves]
    versions = [int(move["to_version"]) for move in moves]
    if moves and moves[0]["from_version"]:  # the champion before the first recorded move
        times.insert(0, times[0])
        versions.insert(0, int(moves[0]["from_version"]))
    axes.step(times, versions, where="post", marker="o")
    for when, version, move in zip(
        times[-len(moves) :], versions[-len(moves) :], moves, strict=True
    ):
        axes.annotate(f"v{version} ({move['action']})", (when, version), fontsize=7, rotation=20)
    axes.xaxis_date()
    axes.margins(x=0.12, y=0.15)
    axes.set_ylabel("champion version")
    axes.set_title(f"{model}: champion over time ({len(moves)} moves)")
    figure.autofmt_xdate()
    return save_figure(figure, path)


def log_history(run: Any, client: MlflowClient, experiment_id: str, model: str) -> None:
    """Log the history so far (this run's move included) as the run's artifacts."""
    import tempfile

    moves = champion_moves(client, experiment_id, model)
    if not moves:
        return
    with tempfile.TemporaryDirectory(prefix="stemma-history-") as folder:
        (Path(folder) / "history.md").write_text(history_table(model, moves))
        history_plot(model, moves, Path(folder) / "history.png")
        run.log_artifacts(Path(folder), HISTORY_DIR)
