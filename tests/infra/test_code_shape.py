"""The code-shape numbers of the redesign hold (``make shape``, ``tests/code_shape.py``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import code_shape

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_code_shape_holds():
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "code_shape.py")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("code shape: ok")


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from stemma.components.scoring.engine import _helper\n", ["import _helper"]),
        ("from .engine import _helper\n", ["from stemma.components.scoring.engine import"]),
        ("from stemma.components.scoring import engine\nengine._helper()\n", ["engine._helper"]),
        ("import torch._dynamo\n", ["import torch._dynamo"]),
        ("import os\nos._exit(0)\nimport _thread\n", []),
        ("from stemma.components.scoring.engine import helper\n", []),
        ("def _mine():\n    pass\n_mine()\n", []),
    ],
    ids=[
        "private-name",
        "relative",
        "module-attribute",
        "private-module",
        "stdlib",
        "public",
        "own",
    ],
)
def test_private_imports_are_found(tmp_path, monkeypatch, source, found):
    monkeypatch.setattr(code_shape, "ROOT", tmp_path)
    module = tmp_path / "components" / "scoring" / "fanout.py"
    module.parent.mkdir(parents=True)
    module.write_text(textwrap.dedent(source))
    hits = code_shape.private_imports([module])
    assert len(hits) == len(found)
    for hit, expected in zip(hits, found, strict=True):
        assert hit.startswith("components/scoring/fanout.py:") and expected in hit


def test_long_functions_and_modules_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(code_shape, "ROOT", tmp_path)
    module = tmp_path / "components" / "big.py"
    module.parent.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(code_shape.MAX_FUNCTION_LINES))
    filler = "\n" * code_shape.MAX_MODULE_LINES
    module.write_text(f"def long():\n{body}\n\n\ndef short():\n    pass\n{filler}")
    assert code_shape.long_functions([module]) == [
        ("components/big.py:1 long", code_shape.MAX_FUNCTION_LINES + 1)
    ]
    assert code_shape.long_modules([module])[0][0] == "components/big.py"
    failing = code_shape.Check("x", 2, 0, ["a", "b"])
    text = code_shape.report([failing, code_shape.Check("y", 1, 1)])
    assert "FAIL x: 2 (limit 0)" in text and "ok   y: 1 (limit 1)" in text
    assert text.endswith("code shape: 1 of 2 checks failed")
