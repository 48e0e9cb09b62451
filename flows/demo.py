"""`stemma demo`: the whole life of the worked example over simulated days.

The demo builds a fresh project (git, DVC, the credit spec, Stemma's seeded data) under
``.stemma/demo`` and plays the story the product is for: train the first champion, then
day by day score that day's applications with the champion, monitor the batch for drift,
receive the day's labels, and, when the monitor reports drift, retrain on the labelled
production rows (a new DVC data version), shadow the new model against the champion on
the newest labelled day, and promote it if the shadow evaluation says so. The generator
shifts the applicant population from day 6 and the approval rule from day 10.

Each step is the same flow a deployment runs (`stemma serve` triggers retraining from the
monitor's Prefect event; here the demo calls it when the monitor's report says drift), so
every run lands in MLflow and Prefect like a production run would.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stemma.examples.credit import generate_credit_data

#: Where the demo project lives, under the folder `stemma demo` runs in.
DEMO_DIR = Path(".stemma") / "demo"
#: The demo project's spec, relative to its root.
DEMO_CONFIG = Path("configs") / "credit.yaml"
#: Spec values that keep the demo under ten minutes on two cores.
DEMO_OVERRIDES = {
    "train": {"epochs": 8},
    "score": {
        "input": "production/batches",
        "output": "outputs/credit/scores",
        "chunk_rows": 100_000,
    },
    "retrain": {
        "labels": "production/labels",
        "batches": "production/batches",
        "min_new_rows": 1000,
        "schedule": "0 3 * * *",
        "on_drift": True,
        "promote": "shadow",
    },
}


@dataclass
class Day:
    """What happened on one simulated day (a row of the closing table)."""

    day: int
    rows_scored: int
    drift: str
    decision: str
    champion: str
    seconds: float


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Stemma demo", "-c", "user.email=demo@stemma.invalid", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def build_demo_project(
    root: Path, spec_source: Path, *, days: int, train_rows: int, batch_rows: int
) -> Path:
    """A fresh project: git and DVC repos, the spec, the training table as data version 1.

    The production days are generated up front into ``.future/`` and "arrive" one by one
    into ``production/`` (outside the DVC-tracked ``data/``, as a landing area would be).
    """
    from dvc.repo import Repo

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _git(root, "init", "-q")
    Repo.init(str(root))
    future = root / ".future"
    generate_credit_data(future, train_rows=train_rows, days=days, batch_rows=batch_rows)
    (root / "data" / "credit").mkdir(parents=True)
    shutil.move(str(future / "credit" / "train.parquet"), root / "data" / "credit")
    with Repo(str(root)) as repo:
        repo.add(str(root / "data"))
    spec = yaml.safe_load(spec_source.read_text())
    for section, values in DEMO_OVERRIDES.items():
        spec[section] = {**(spec.get(section) or {}), **values}
    (root / "configs").mkdir()
    (root / "configs" / "credit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    ignore = root / ".gitignore"  # `dvc add` wrote `/data` into it: keep that line
    existing = ignore.read_text() if ignore.exists() else ""
    ignore.write_text(existing + ".future/\nproduction/\noutputs/\n.stemma/\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "Credit pipeline with its first data version")
    return root


def _arrive(root: Path, kind: str, day: int) -> Path:
    source = root / ".future" / "credit" / kind / f"day_{day:02d}.parquet"
    target = root / "production" / kind / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target


def _champion(model_name: str) -> str:
    import mlflow

    aliases = mlflow.MlflowClient().get_registered_model(model_name).aliases or {}
    return str(aliases.get("champion", "-"))


def run_demo(
    repo_root: Path,
    *,
    days: int = 12,
    train_rows: int = 20_000,
    batch_rows: int = 4_000,
    location: Path | None = None,
) -> dict[str, Any]:
    """Play the demo; returns the per-day table and where to look.

    Args:
        repo_root: the folder holding ``configs/credit.yaml`` (the demo copies it).
        days: simulated production days (drift appears from day 6 and day 10).
        train_rows: rows of the first training table.
        batch_rows: applications per day.
        location: the demo project (default ``<repo_root>/.stemma/demo``; rebuilt).
    """
    from stemma.flows.train import train_flow

    root = (location or repo_root / DEMO_DIR).resolve()
    build_demo_project(
        root,
        repo_root / "configs" / "credit.yaml",
        days=days,
        train_rows=train_rows,
        batch_rows=batch_rows,
    )
    # The flows resolve every other path against the project root the spec lives in.
    config = str(root / DEMO_CONFIG)
    started = time.perf_counter()
    first = train_flow(config=config, overrides=[])
    print(
        f"day 0: trained the first champion v{first['model_version']} "
        f"({first['gate']['metric']} {first['gate']['value']:.3f})",
        flush=True,
    )
    version = str(first["model_version"])
    table = [Day(0, 0, "-", "trained first champion", version, time.perf_counter() - started)]
    for day in range(1, days + 1):
        row = _play_day(root, config, day)
        table.append(row)
        print(_format_row(row), flush=True)
    return {"root": str(root), "days": table}


def _play_day(root: Path, config: str, day: int) -> Day:
    """One production day: score the day's batch, monitor it, receive its labels, and
    retrain when the monitor reports drift."""
    from stemma.flows.monitor import monitor_flow
    from stemma.flows.retrain import retrain_flow
    from stemma.flows.score import score_flow

    started = time.perf_counter()
    batch = _arrive(root, "batches", day)
    scored = score_flow(
        config=config,
        input=str(batch.relative_to(root)),
        output=f"outputs/credit/scores/day_{day:02d}",
    )
    monitored = monitor_flow(config=config, batch=str(batch.relative_to(root)))
    _arrive(root, "labels", day)
    drifted = monitored["drifted_features"]
    drift = (
        f"yes: {', '.join(drifted[:3])}{'…' if len(drifted) > 3 else ''}"
        if monitored["drift_detected"]
        else "no"
    )
    decision = "-"
    if monitored["drift_detected"]:
        retrained = retrain_flow(config=config, cause=monitored["run_id"])
        decision = _decision_text(retrained)
    return Day(
        day,
        scored["rows"]["scored"],
        drift,
        decision,
        _champion("credit"),
        time.perf_counter() - started,
    )


def _decision_text(result: dict[str, Any]) -> str:
    outcome = result["outcome"]
    version = result.get("model_version")
    shadow = (result.get("shadow") or {}).get("decision")
    if outcome == "promoted":
        return f"retrained v{version}, shadow: promote -> promoted"
    if outcome == "not_promoted":
        return f"retrained v{version}, shadow: {shadow or 'none'}"
    if outcome == "gate_failed":
        return f"retrained v{version}, gate failed"
    return outcome.replace("_", " ")


def _format_row(row: Day) -> str:
    return (
        f"day {row.day:>2}: {row.rows_scored:>6,} rows scored | drift {row.drift:<34} | "
        f"{row.decision:<40} | champion v{row.champion} ({row.seconds:.0f} s)"
    )


def format_demo(result: dict[str, Any], prefect_ui: str | None = None) -> str:
    """The closing table and where to look in the UIs (``prefect_ui``: the UI of the Prefect
    server the flow runs went to, when they went to one that stays up)."""
    header = f"{'day':>3}  {'rows':>7}  {'drift':<36}  {'decision':<42}  champion\n" + "-" * 104
    rows = [
        f"{d.day:>3}  {d.rows_scored:>7,}  {d.drift:<36}  {d.decision:<42}  v{d.champion}"
        for d in result["days"]
    ]
    root = result["root"]
    return "\n".join(
        [
            header,
            *rows,
            "",
            f"demo project: {root}",
            f"  MLflow UI:  mlflow ui --backend-store-uri sqlite:///{root}/.stemma/mlflow.db "
            "(runs of experiment 'credit', model 'credit' and its aliases)",
            f"  lineage:    cd {root} && stemma lineage models:/credit@champion",
            f"  data:       cd {root} && git log --oneline -- data.dvc",
            f"  Prefect UI: {prefect_ui}/runs (this demo's flow runs and their summaries)"
            if prefect_ui
            else "  Prefect UI: run `stemma up` before the demo to keep its flow runs there, "
            "and `stemma serve configs/credit.yaml` in the demo project for deployments",
        ]
    )
