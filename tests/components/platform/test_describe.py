"""A run's description, rendered from its lineage record."""

from __future__ import annotations

from stemma.components.platform.describe import describe_record, short
from stemma.components.platform.lineage import Edge, LineageRecord, Node

RUN = "0123456789abcdef0123456789abcdef"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"


def record(decision: dict | None = None, reasons: int = 2) -> LineageRecord:
    run = f"mlflow-run:{RUN}"
    nodes = [
        Node("data_version", f"dvc:data.dvc@{MD5}", f"md5:{MD5}", {"path": "data"}),
        Node("model_version", "models:/churn/3", "sha256:" + "ab" * 32, {"role": "champion"}),
        Node("run", run, None, {"flow_run_id": "f-42"}),
        Node("predictions", f"predictions:out@{'cd' * 32}", None, {"rows": 1200}),
        Node("model_version", "models:/churn/4", None, {"role": "challenger"}),
    ]
    edges = [
        Edge(nodes[0].id, run, "input_of"),
        Edge(nodes[1].id, run, "scored_by"),
        Edge(run, nodes[3].id, "produced"),
        Edge(run, nodes[4].id, "produced"),
    ]
    decided = decision or {
        "decision": "promote",
        "metric": "rmse",
        "delta": -0.123456,
        "reasons": [f"reason {index}" for index in range(reasons)],
        "who": "stemma",
        "when": "2026-12-06T07:00:00+00:00",
    }
    return LineageRecord(
        flow="shadow", pipeline="churn", created="", decision=decided, nodes=nodes, edges=edges
    )


def test_the_description_says_what_was_read_made_and_decided_and_links_it():
    text = describe_record(record(), RUN, parent_run=("7", "f" * 32))
    lines = text.splitlines()
    assert lines[0] == "**shadow** · pipeline `churn` · decision **promote**"
    assert lines[1] == (
        "read [churn v3](#/models/churn/versions/3), data version `data.dvc@d41d8cd9` → "
        "made [churn v4](#/models/churn/versions/4), predictions `out@cdcdcdcd`"
    )
    assert lines[3] == "**Why**"
    assert "metric rmse · delta -0.1235" in lines
    assert "- reason 0" in lines and "- reason 1" in lines
    read = lines[lines.index("**Read**") + 1 : lines.index("**Made**") - 1]
    assert read == [
        f"- data version `dvc:data.dvc@{MD5[:8]}` (md5:{MD5[:8]}, path data)",
        "- model version [churn v3](#/models/churn/versions/3) (sha256:abababab, role champion)",
    ]
    made = lines[lines.index("**Made**") + 1 :]
    assert f"- predictions `predictions:out@{'cd' * 4}` (rows 1200)" in made
    assert "- model version [churn v4](#/models/churn/versions/4) (role challenger)" in made
    assert (
        lines[-1]
        == "Prefect flow run: `f-42` · parent run: [ffffffff](#/experiments/7/runs/"
        + "f" * 32
        + ")"
    )


def test_long_lists_are_cut_and_point_to_the_record():
    text = describe_record(record(reasons=30), RUN)
    assert "- reason 11" in text and "- reason 12" not in text
    assert "- and 18 more in `lineage/record.json`" in text


def test_a_record_without_decision_or_run_node_still_describes_the_run():
    document = record().to_dict()
    document.pop("decision")
    document["nodes"] = [node for node in document["nodes"] if node["kind"] != "run"]
    text = describe_record(document, RUN, links={"Prefect flow run": "[nightly](http://x/runs/1)"})
    assert "decision" not in text and "**Why**" not in text
    assert "**Read**" in text and "**Made**" in text
    assert text.rstrip().endswith("Prefect flow run: [nightly](http://x/runs/1)")


def test_short_cuts_only_long_hex_digests():
    assert short(f"md5:{MD5} v12 cafe") == f"md5:{MD5[:8]} v12 cafe"
